//! A checked topology: parse a topology file, compile it into a graph whose every reference
//! resolves, and describe it.
//!
//! `compile` never stops at the first mistake: it gathers every error with the place it is
//! at (`sink[1].batch_size: ...`) so `readstate validate` can report them all in one run.

mod compile;
mod describe;
mod fields;
pub mod graph;
pub mod schema_check;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config;
use crate::ids::{ApplicationId, IdTypes, StoreName, TopicName};
pub use crate::kafka::partitioner::Partitioner;
pub use crate::serde::json::FieldMapping;

pub use describe::describe;

/// Default record-cache budget of an instance, in entries (~200 bytes each in memory; the
/// hash table holds up to 917,504 of them in 2^20 slots, so this stays in one size class).
pub const DEFAULT_CACHE_MAX_ENTRIES: usize = 500_000;

/// One mistake in a topology file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError {
    pub at: String,
    pub message: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// All mistakes found in one topology file.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The OS error is part of the message (not a `source`, which `{:#}` would print a
    /// second time).
    #[error("{path}: cannot read: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {} error(s):\n{}", .errors.len(), .errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        errors: Vec<TopologyError>,
    },
}

impl CompileError {
    pub fn errors(&self) -> &[TopologyError] {
        match self {
            CompileError::Io { .. } => &[],
            CompileError::Invalid { errors, .. } => errors,
        }
    }
}

/// The field a source's record key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedBy {
    ConversationId,
    ReaderId,
    SenderId,
    DeviceId,
    Other,
    /// No key (null keys: the producer spread the records as it liked).
    None,
}

impl KeyedBy {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "conversation_id" => Self::ConversationId,
            "reader_id" => Self::ReaderId,
            "sender_id" => Self::SenderId,
            "device_id" => Self::DeviceId,
            "other" => Self::Other,
            "none" => Self::None,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ConversationId => "conversation_id",
            Self::ReaderId => "reader_id",
            Self::SenderId => "sender_id",
            Self::DeviceId => "device_id",
            Self::Other => "other",
            Self::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub topic: TopicName,
    pub keyed_by: KeyedBy,
    /// Set when the source is not keyed by conversation: records go through this internal
    /// topic, keyed by conversation_id, before the processor.
    pub repartition_topic: Option<TopicName>,
    /// The partitioner of the source's producers (over the conversation id as text).
    pub partitioner: Partitioner,
    /// Where a record found on another partition than `partitioner` puts it is produced,
    /// on the partition it belongs on (`on_misrouted = "repartition"`); `None` (the
    /// default): such a record is a `misrouted` dead letter.
    pub rerouted_topic: Option<TopicName>,
    /// How its values are written.
    pub format: SourceFormat,
}

/// How a source's values are written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SourceFormat {
    /// Avro in the Confluent wire format, read with the built-in reader schema.
    #[default]
    AvroConfluent,
    /// JSON (plain, or framed as Confluent's JSON Schema wire format), mapped by fields.
    Json(Box<FieldMapping>),
    /// Avro in the Confluent wire format of the users' own schema, mapped by fields.
    AvroMapped(Box<FieldMapping>),
}

impl SourceFormat {
    /// The field mapping of a mapped source (JSON, or Avro of the users' schema).
    pub fn mapping(&self) -> Option<&FieldMapping> {
        match self {
            SourceFormat::AvroConfluent => None,
            SourceFormat::Json(m) | SourceFormat::AvroMapped(m) => Some(m),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SourceFormat::AvroConfluent | SourceFormat::AvroMapped(_) => "avro-confluent",
            SourceFormat::Json(m) if m.wire_header => "json-schema",
            SourceFormat::Json(_) => "json",
        }
    }
}

impl Source {
    /// The partitioner that placed the records the processor's tasks read for this
    /// source: readstate's own (murmur2) through a repartition topic, else the source's.
    pub fn task_input_partitioner(&self) -> Partitioner {
        match self.repartition_topic {
            Some(_) => Partitioner::Murmur2,
            None => self.partitioner,
        }
    }

    /// The topic the processor's tasks read for this source.
    pub fn task_input_topic(&self) -> &TopicName {
        self.repartition_topic.as_ref().unwrap_or(&self.topic)
    }

    /// Whether `topic` is one the tasks read this source's records from (its task input
    /// topic, or its rerouted topic).
    pub fn feeds_from(&self, topic: &str) -> bool {
        self.task_input_topic().as_str() == topic
            || self
                .rerouted_topic
                .as_ref()
                .is_some_and(|r| r.as_str() == topic)
    }
}

/// Kafka Streams' `processing.guarantee`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProcessingGuarantee {
    /// Outputs acknowledged before offsets are committed; a crash or a zombie can
    /// duplicate an update (same version), never lose one.
    #[default]
    AtLeastOnce,
    /// Each commit is one Kafka transaction: outputs, changelog records, repartitioned
    /// records, dead letters and the source offsets, all or nothing.
    ExactlyOnceV2,
}

impl std::fmt::Display for ProcessingGuarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessingGuarantee::AtLeastOnce => "at_least_once",
            ProcessingGuarantee::ExactlyOnceV2 => "exactly_once_v2",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    RocksDb,
    Memory,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    pub name: StoreName,
    pub kind: StoreKind,
    pub changelog_topic: Option<TopicName>,
    /// Record-cache entries for the whole instance, shared equally by its tasks.
    pub cache_max_entries: usize,
    pub rocksdb: crate::state::rocks::RocksDbOptions,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadStateNode {
    pub name: String,
    /// The processor kind ([`READ_STATE_KIND`], or one registered with the runtime's
    /// `ProcessorRegistry`).
    pub kind: String,
    pub inputs: Vec<String>,
    pub store: StoreName,
    /// The store of the conversation heads (with a message source).
    pub heads_store: Option<StoreName>,
    pub min_emit_interval: Duration,
    /// Set when a message source feeds the processor: recent messages kept per
    /// conversation (unread and mention counts are exact up to this far behind the head).
    pub unread_cap: Option<usize>,
    /// Set when a read source's positions are message ids: how reads wait for the
    /// messages they name.
    pub resolve: Option<ResolveSpec>,
    /// Set with a members source: groups with more members get read-by aggregates only,
    /// no per-reader receipts for senders.
    pub large_group_members: Option<usize>,
}

/// How reads positioned by message id wait for their messages (`processor::resolve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolveSpec {
    /// How far the message source's time must pass a read's time before the read stops
    /// waiting for its message (then its `read_at` resolves it, or it is a dead letter).
    pub wait: Duration,
    /// Reads a task keeps waiting at most; beyond it the oldest stop waiting early.
    pub max_waiting: usize,
    /// The read source maps `read_at`: a read whose message never came is resolved to
    /// the newest message sent by then (else it is a dead letter).
    pub fallback_to_read_at: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSink {
    pub name: String,
    pub input: String,
    pub topic: TopicName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSink {
    pub name: String,
    /// The output topic it consumes.
    pub topic: TopicName,
    pub consumer_group: String,
    pub table: String,
    pub batch_size: usize,
    pub linger: Duration,
    pub pool_size: usize,
    pub statement_timeout: Duration,
    pub url: Option<String>,
    pub embedded: bool,
    /// The receipts table: for a conversation-heads sink, the table its unread view joins
    /// (for the receipts sink, its own table).
    pub receipts_table: String,
}

/// What a record that cannot be processed does (Kafka Streams'
/// `deserialization.exception.handler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadRecord {
    /// Write it to the dead-letter topic and go on (LogAndContinue plus a DLQ), under the
    /// circuit breaker.
    #[default]
    DeadLetter,
    /// Stop the instance at the first one, committing nothing past it (LogAndFail).
    Fail,
}

/// Bad-record handling: the size limit, the policy and the dead-letter circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BadRecords {
    /// Largest record accepted (bytes); also the most of a record's value a dead letter
    /// carries.
    pub max_record_bytes: usize,
    pub on_bad_record: OnBadRecord,
    /// Trip when dead letters exceed this share of a window's records (1.0: never).
    pub max_ratio: f64,
    pub window: Duration,
    /// A window with fewer records is not judged.
    pub min_records: u64,
}

impl Eq for BadRecords {}

impl Default for BadRecords {
    fn default() -> Self {
        Self {
            max_record_bytes: crate::serde::avro::MAX_RECORD_BYTES,
            on_bad_record: OnBadRecord::DeadLetter,
            max_ratio: 0.5,
            window: Duration::from_secs(60),
            min_records: 100,
        }
    }
}

/// A compiled, checked topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub application_id: ApplicationId,
    pub commit_interval: Duration,
    pub guarantee: ProcessingGuarantee,
    pub state_dir: PathBuf,
    pub dead_letter_topic: TopicName,
    pub bad_records: BadRecords,
    /// Read-event sources.
    pub sources: Vec<Source>,
    /// The message-event source, co-partitioned with the read events' task topic.
    pub messages: Option<Source>,
    /// The read-state store (pointers and their pending-emit index).
    pub store: Store,
    /// The conversation-heads store, with its own changelog (a message source).
    pub heads_store: Option<Store>,
    pub processor: ReadStateNode,
    pub output: KafkaSink,
    /// Where conversation-head updates go (a message source and a kafka sink with
    /// `output = "conversation-heads"`).
    pub heads_output: Option<KafkaSink>,
    /// Where read receipts for senders go, keyed by sender (a message source and a kafka
    /// sink with `output = "sender-receipts"`).
    pub sender_receipts_output: Option<KafkaSink>,
    pub postgres: Option<PostgresSink>,
    /// The PostgreSQL sink of the conversation-heads topic (`conversation_heads`).
    pub heads_postgres: Option<PostgresSink>,
    /// The PostgreSQL sink of the sender-receipts topic (catch-up for offline senders).
    pub senders_postgres: Option<PostgresSink>,
    /// The PostgreSQL sink of the members source (`conversation_members`, with its
    /// read-by function).
    pub members_postgres: Option<PostgresSink>,
    /// The conversations' members: a compacted table topic keyed by conversation, each
    /// value the member list (`records = "members"`), co-partitioned with the reads.
    pub members: Option<Source>,
    /// Where "read by N of M" goes, keyed by sender (a members source and a kafka sink
    /// with `output = "read-by"`).
    pub read_by_output: Option<KafkaSink>,
    /// The id types (`[ids]`): decoding, store keys, output schemas and table columns.
    pub ids: IdTypes,
}

impl Topology {
    /// The sources read co-partitioned with the read events, beside them in each task:
    /// the message source, then the members source.
    pub fn side_sources(&self) -> Vec<&Source> {
        self.messages.iter().chain(&self.members).collect()
    }

    /// Read, parse and compile a topology file.
    pub fn from_file(path: &Path) -> Result<Self, CompileError> {
        let text = std::fs::read_to_string(path).map_err(|error| CompileError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        compile(&text).map_err(|errors| CompileError::Invalid {
            path: path.to_path_buf(),
            errors,
        })
    }

    /// Internal topics this topology creates: (topic, compacted).
    pub fn internal_topics(&self) -> Vec<(TopicName, bool)> {
        let mut t: Vec<(TopicName, bool)> = self
            .sources
            .iter()
            .filter_map(|s| s.repartition_topic.clone().map(|r| (r, false)))
            .collect();
        t.extend(self.rerouted_topics().into_iter().map(|r| (r, false)));
        for s in self.stores() {
            if let Some(c) = &s.changelog_topic {
                t.push((c.clone(), true));
            }
        }
        t.push((self.dead_letter_topic.clone(), false));
        t
    }

    /// The directory of the instances serving the read API (`query::directory`): created
    /// by `readstate run` when it serves the read API, not one of [`Self::internal_topics`].
    pub fn instances_topic(&self) -> TopicName {
        TopicName(format!("{}-instances", self.application_id))
    }

    /// Every store of a task, in the order a task's stores are indexed (`state::TaskStores`): the
    /// read-state store, then the conversation-heads store.
    pub fn stores(&self) -> Vec<&Store> {
        std::iter::once(&self.store)
            .chain(self.heads_store.as_ref())
            .collect()
    }

    /// The changelog topic of each store of a task (indexed as [`Topology::stores`]).
    pub fn changelog_topics(&self) -> Vec<Option<String>> {
        self.stores()
            .iter()
            .map(|s| s.changelog_topic.as_ref().map(|c| c.0.clone()))
            .collect()
    }

    /// The internal topics misrouted records are produced to, one per source read as it is
    /// (`on_misrouted = "repartition"`): co-partitioned with the task input topics, task p
    /// reads partition p of each.
    pub fn rerouted_topics(&self) -> Vec<TopicName> {
        (self.sources.iter())
            .chain(self.side_sources())
            .filter_map(|s| s.rerouted_topic.clone())
            .collect()
    }

    /// Topics the stream tasks consume (after repartitioning).
    pub fn task_input_topics(&self) -> Vec<TopicName> {
        self.sources
            .iter()
            .map(|s| s.task_input_topic().clone())
            .collect()
    }
}

/// The processor kind built in: read states from read events (and unread counts with a
/// message source).
pub const READ_STATE_KIND: &str = "read-state";

/// Compile topology text into a checked [`Topology`], or every error found; the processor
/// must be of kind `read-state`.
pub fn compile(text: &str) -> Result<Topology, Vec<TopologyError>> {
    compile_with_kinds(text, &[READ_STATE_KIND])
}

/// As [`compile`], with the processor kinds a registry knows (e.g. a program's own).
pub fn compile_with_kinds(text: &str, kinds: &[&str]) -> Result<Topology, Vec<TopologyError>> {
    let (spec, unknown) = config::parse(text).map_err(|e| {
        vec![TopologyError {
            at: "file".into(),
            message: e.to_string().trim().to_owned(),
        }]
    })?;
    let mut errs = compile::Errors(Vec::new());
    for (path, message) in unknown {
        errs.push(path, message);
    }
    let t = compile::compile_spec(&spec, kinds, &mut errs);
    if errs.0.is_empty() {
        Ok(t.expect("no errors means a topology"))
    } else {
        Err(errs.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[application]
id = "rr"
[[source]]
name = "events"
topic = "chat.read-events"
[[store]]
name = "read-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["events"]
store = "read-state"
min_emit_interval = "30s"
[[sink]]
name = "updates"
kind = "kafka"
input = "read-state"
topic = "chat.receipt-updates"
"#;

    #[test]
    fn compiles_and_names_internal_topics() {
        let t = compile(GOOD).unwrap();
        assert_eq!(
            t.store.changelog_topic.as_ref().unwrap().as_str(),
            "rr-read-state-changelog"
        );
        assert_eq!(t.dead_letter_topic.as_str(), "rr-dlq");
        assert_eq!(t.processor.min_emit_interval, Duration::from_secs(30));
        assert!(t.postgres.is_none());
        assert_eq!(
            t.task_input_topics(),
            vec![TopicName::from("chat.read-events")]
        );
        let internal: Vec<(String, bool)> = (t.internal_topics().into_iter())
            .map(|(n, c)| (n.0, c))
            .collect();
        assert_eq!(
            internal,
            [
                ("rr-read-state-changelog".to_owned(), true),
                ("rr-dlq".to_owned(), false)
            ]
        );
    }

    #[test]
    fn avro_names_the_confluent_wire_format_and_unkeyed_sources_are_repartitioned() {
        let text = GOOD.replace(
            "topic = \"chat.read-events\"",
            "topic = \"chat.read-events\"\nformat = \"avro\"\nkeyed_by = \"none\"",
        );
        let t = compile(&text).unwrap();
        assert_eq!(t.sources[0].format, SourceFormat::AvroConfluent);
        assert_eq!(t.sources[0].keyed_by, KeyedBy::None);
        assert_eq!(
            t.sources[0].repartition_topic,
            Some(TopicName::from("rr-events-repartition"))
        );
    }

    #[test]
    fn misrouted_records_are_rerouted_where_asked_for() {
        // Dead letters by default (no co-partitioned rerouted topic).
        assert!(compile(GOOD).unwrap().rerouted_topics().is_empty());
        let rerouted = GOOD.replace(
            "topic = \"chat.read-events\"",
            "topic = \"chat.read-events\"\non_misrouted = \"repartition\"",
        );
        let t = compile(&rerouted).unwrap();
        assert_eq!(t.rerouted_topics(), [TopicName::from("rr-events-rerouted")]);
        assert!(t.sources[0].feeds_from("rr-events-rerouted"));
        assert!(t
            .internal_topics()
            .contains(&(TopicName::from("rr-events-rerouted"), false)));
        // With a message source too, each source reroutes when asked.
        let unread = include_str!("../../../../topologies/read_state_with_unread.toml").replace(
            "partitioner = \"murmur2\"",
            "partitioner = \"murmur2\"\non_misrouted = \"repartition\"",
        );
        assert!(compile(include_str!(
            "../../../../topologies/read_state_with_unread.toml"
        ))
        .unwrap()
        .rerouted_topics()
        .is_empty());
        let names: Vec<String> = (compile(&unread).unwrap().rerouted_topics().into_iter())
            .map(|t| t.0)
            .collect();
        assert_eq!(
            names,
            [
                "read-state-unread-read-events-rerouted",
                "read-state-unread-message-events-rerouted"
            ]
        );
        let dead = rerouted.replace("repartition", "dead-letter");
        assert!(compile(&dead).unwrap().rerouted_topics().is_empty());
        let errs = compile(&dead.replace("dead-letter", "drop")).unwrap_err();
        assert_eq!(errs[0].at, "source[0].on_misrouted", "{errs:?}");
        assert!(errs[0].message.contains("\"repartition\""), "{errs:?}");
        // A repartitioned source is placed by readstate: never misrouted.
        let keyed = dead.replace("on_misrouted", "keyed_by = \"reader_id\"\non_misrouted");
        let errs = compile(&keyed).unwrap_err();
        assert_eq!(errs[0].at, "source[0].on_misrouted", "{errs:?}");
        let t = compile(&keyed.replace("on_misrouted = \"dead-letter\"", "")).unwrap();
        assert!(t.rerouted_topics().is_empty(), "{:?}", t.rerouted_topics());
    }

    #[test]
    fn the_wal_is_off_only_where_a_changelog_rebuilds_the_store() {
        assert!(compile(GOOD).unwrap().store.rocksdb.disable_wal);
        let no_changelog = GOOD.replace(
            "name = \"read-state\"\n[[processor]]",
            "name = \"read-state\"\nchangelog = false\n[[processor]]",
        );
        let t = compile(&no_changelog).unwrap();
        assert!(t.store.changelog_topic.is_none());
        assert!(
            !t.store.rocksdb.disable_wal,
            "no changelog: the WAL stays on"
        );
        let errs = compile(
            &no_changelog.replace("changelog = false", "changelog = false\ndisable_wal = true"),
        )
        .unwrap_err();
        assert_eq!(errs[0].at, "store[0].disable_wal", "{errs:?}");
    }

    #[test]
    fn reports_every_error_at_once() {
        let bad = GOOD
            .replace("inputs = [\"events\"]", "inputs = [\"evnts\"]")
            .replace(
                "min_emit_interval = \"30s\"",
                "min_emit_interval = \"30 parsecs\"",
            )
            .replace("[[store]]\n", "[[store]]\ncolour = \"blue\"\n");
        let errs = compile(&bad).unwrap_err();
        let ats: Vec<&str> = errs.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(ats.contains(&"processor[0].inputs[0]"), "{ats:?}");
        assert!(ats.contains(&"processor[0].min_emit_interval"), "{ats:?}");
        assert!(ats.iter().any(|a| a.contains("colour")), "{ats:?}");
    }

    #[test]
    fn a_custom_kind_refuses_the_read_state_source_fields() {
        let custom = GOOD
            .replace("kind = \"read-state\"", "kind = \"last-seen\"")
            .replace("min_emit_interval = \"30s\"\n", "");
        let kinds = [READ_STATE_KIND, "last-seen"];
        assert!(compile_with_kinds(&custom, &kinds).is_ok());
        let keyed = custom.replace(
            "topic = \"chat.read-events\"",
            "topic = \"chat.read-events\"\nkeyed_by = \"sender_id\"\nformat = \"avro-confluent\"",
        );
        let errs = compile_with_kinds(&keyed, &kinds).unwrap_err();
        let ats: Vec<&str> = errs.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(ats, ["source[0].format", "source[0].keyed_by"], "{errs:?}");
        // Its records are not checked for their partition: nothing to reroute.
        let rerouted = custom.replace(
            "topic = \"chat.read-events\"",
            "topic = \"chat.read-events\"\non_misrouted = \"repartition\"",
        );
        let errs = compile_with_kinds(&rerouted, &kinds).unwrap_err();
        let ats: Vec<&str> = errs.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(ats, ["source[0].on_misrouted"], "{errs:?}");
    }

    #[test]
    fn sender_keyed_source_gets_a_repartition_topic() {
        let t = compile(&GOOD.replace(
            "topic = \"chat.read-events\"",
            "topic = \"chat.read-events\"\nkeyed_by = \"sender_id\"",
        ))
        .unwrap();
        assert_eq!(
            t.sources[0].repartition_topic.as_ref().unwrap().as_str(),
            "rr-events-repartition"
        );
        assert_eq!(
            t.task_input_topics(),
            vec![TopicName::from("rr-events-repartition")]
        );
    }

    /// Each source names its producers' partitioner; co-partitioned sources must name one
    /// (a repartitioned read source is placed by readstate's murmur2).
    #[test]
    fn co_partitioned_sources_need_one_partitioner() {
        let unread = include_str!("../../../../topologies/read_state_with_unread.toml");
        let t = compile(unread).unwrap();
        assert_eq!(t.sources[0].partitioner, Partitioner::Murmur2);
        let declared = "partitioner = \"murmur2\"";
        let (reads_at, messages_at) = (
            unread.find(declared).unwrap(),
            unread.rfind(declared).unwrap(),
        );
        assert!(reads_at < messages_at, "both sources declare one");
        let with = |reads: &str, messages: &str| {
            let mut text = unread.to_owned();
            text.replace_range(
                messages_at..messages_at + declared.len(),
                &format!("partitioner = \"{messages}\""),
            );
            text.replace_range(
                reads_at..reads_at + declared.len(),
                &format!("partitioner = \"{reads}\""),
            );
            text
        };
        let both = with("consistent", "crc32");
        let t = compile(&both).unwrap();
        assert_eq!(t.messages.unwrap().partitioner, Partitioner::Crc32);
        let errs = compile(&with("murmur2", "fnv1a")).unwrap_err();
        assert_eq!(errs[0].at, "source[1].partitioner", "{errs:?}");
        assert!(
            errs[0].message.contains("murmur2") && errs[0].message.contains("fnv1a"),
            "{errs:?}"
        );
        let repartitioned = both.replacen(
            "keyed_by = \"conversation_id\"",
            "keyed_by = \"reader_id\"",
            1,
        );
        let errs = compile(&repartitioned).unwrap_err();
        assert!(
            errs[0]
                .message
                .contains("repartitioned by readstate with murmur2"),
            "{errs:?}"
        );
        let unknown = GOOD.replace(
            "topic = \"chat.read-events\"",
            "topic = \"chat.read-events\"\npartitioner = \"random\"",
        );
        let errs = compile(&unknown).unwrap_err();
        assert_eq!(errs[0].at, "source[0].partitioner", "{errs:?}");
    }
}
