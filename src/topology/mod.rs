//! A checked topology: parse a topology file, compile it into a graph whose every reference
//! resolves, and describe it.
//!
//! `compile` never stops at the first mistake: it gathers every error with the place it is
//! at (`sink[1].batch_size: ...`) so `readstate validate` can report them all in one run.

mod describe;
pub mod graph;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{self, SinkSpec, TopologySpec};
use crate::ids::{ApplicationId, StoreName, TopicName};

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
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
}

impl KeyedBy {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "conversation_id" => Self::ConversationId,
            "reader_id" => Self::ReaderId,
            "sender_id" => Self::SenderId,
            "device_id" => Self::DeviceId,
            "other" => Self::Other,
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
}

impl Source {
    /// The topic the processor's tasks read for this source.
    pub fn task_input_topic(&self) -> &TopicName {
        self.repartition_topic.as_ref().unwrap_or(&self.topic)
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
    pub postgres: Option<PostgresSink>,
    /// The PostgreSQL sink of the conversation-heads topic (`conversation_heads`).
    pub heads_postgres: Option<PostgresSink>,
}

impl Topology {
    /// Read, parse and compile a topology file.
    pub fn from_file(path: &Path) -> Result<Self, CompileError> {
        let text = std::fs::read_to_string(path).map_err(|source| CompileError::Io {
            path: path.to_path_buf(),
            source,
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
        for s in self.stores() {
            if let Some(c) = &s.changelog_topic {
                t.push((c.clone(), true));
            }
        }
        t.push((self.dead_letter_topic.clone(), false));
        t
    }

    /// Every store of a task, in the order a task's stores are indexed (`state::TaskStores`): the
    /// read-state store, then the conversation-heads store.
    pub fn stores(&self) -> Vec<&Store> {
        std::iter::once(&self.store)
            .chain(self.heads_store.as_ref())
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

struct Errors(Vec<TopologyError>);

impl Errors {
    fn push(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.0.push(TopologyError {
            at: at.into(),
            message: message.into(),
        });
    }

    fn required<'a>(&mut self, at: &str, field: &str, v: &'a Option<String>) -> Option<&'a str> {
        match v.as_deref() {
            Some(s) if !s.trim().is_empty() => Some(s),
            Some(_) => {
                self.push(format!("{at}.{field}"), "must not be empty");
                None
            }
            None => {
                self.push(format!("{at}.{field}"), "is required");
                None
            }
        }
    }

    fn duration(&mut self, at: &str, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => {
                match humantime::parse_duration(s) {
                    Ok(d) => d,
                    Err(e) => {
                        self.push(at, format!("invalid duration {s:?}: {e} (examples: \"500ms\", \"1s\", \"30s\")"));
                        default
                    }
                }
            }
        }
    }

    fn positive(&mut self, at: &str, v: Option<i64>, default: usize, max: i64) -> usize {
        match v {
            None => default,
            Some(n) if n > 0 && n <= max => n as usize,
            Some(n) => {
                self.push(at, format!("must be between 1 and {max}, got {n}"));
                default
            }
        }
    }
}

/// Legal Kafka topic names: 1..=249 of [A-Za-z0-9._-].
fn check_topic(errs: &mut Errors, at: &str, t: &str) {
    if t.len() > 249
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        errs.push(
            at,
            format!("{t:?} is not a legal Kafka topic name ([A-Za-z0-9._-], at most 249)"),
        );
    }
}

fn compile_bad_records(app: &config::ApplicationSpec, errs: &mut Errors) -> BadRecords {
    let d = BadRecords::default();
    let on_bad_record = match app.on_bad_record.as_deref() {
        None | Some("dead-letter") => OnBadRecord::DeadLetter,
        Some("fail") => OnBadRecord::Fail,
        Some(other) => {
            errs.push(
                "application.on_bad_record",
                format!("unknown policy {other:?}: expected \"dead-letter\" or \"fail\""),
            );
            d.on_bad_record
        }
    };
    let max_ratio = match app.dead_letter_max_ratio {
        None => d.max_ratio,
        Some(r) if r > 0.0 && r <= 1.0 => r,
        Some(r) => {
            errs.push(
                "application.dead_letter_max_ratio",
                format!("must be in (0, 1], got {r} (1.0 turns the circuit breaker off)"),
            );
            d.max_ratio
        }
    };
    let window = errs.duration(
        "application.dead_letter_window",
        &app.dead_letter_window,
        d.window,
    );
    if window < Duration::from_secs(1) {
        errs.push("application.dead_letter_window", "must be at least 1s");
    }
    BadRecords {
        max_record_bytes: errs.positive(
            "application.max_record_bytes",
            app.max_record_bytes,
            d.max_record_bytes,
            crate::serde::avro::MAX_RECORD_BYTES_CEILING as i64,
        ),
        on_bad_record,
        max_ratio,
        window,
        min_records: errs.positive(
            "application.dead_letter_min_records",
            app.dead_letter_min_records,
            d.min_records as usize,
            1 << 40,
        ) as u64,
    }
}

/// The heads store of a read-state processor: required with a message input, refused
/// without one, distinct from the read-state store.
fn compile_heads_store(
    errs: &mut Errors,
    at: &str,
    p: &config::ProcessorSpec,
    reads_messages: bool,
    store: Option<&str>,
    stores: &[Store],
) -> Option<StoreName> {
    match (reads_messages, p.heads_store.as_deref()) {
        (true, None) => {
            errs.push(
                format!("{at}.heads_store"),
                "is required with a message-events input: the conversation heads live in their own store (and changelog)",
            );
            None
        }
        (false, Some(_)) => {
            errs.push(
                format!("{at}.heads_store"),
                "needs a source with records = \"message-events\" among the inputs",
            );
            None
        }
        (false, None) => None,
        (true, Some(h)) if Some(h) == store => {
            errs.push(
                format!("{at}.heads_store"),
                format!("{h:?} is the read-state store; the heads need a store of their own"),
            );
            None
        }
        (true, Some(h)) if !stores.iter().any(|s| s.name.as_str() == h) => {
            errs.push(format!("{at}.heads_store"), format!("no store named {h:?}"));
            None
        }
        (true, Some(h)) => Some(StoreName(h.to_owned())),
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
    let mut errs = Errors(Vec::new());
    for (path, message) in unknown {
        errs.push(path, message);
    }
    let t = compile_spec(&spec, kinds, &mut errs);
    if errs.0.is_empty() {
        Ok(t.expect("no errors means a topology"))
    } else {
        Err(errs.0)
    }
}

fn compile_spec(spec: &TopologySpec, kinds: &[&str], errs: &mut Errors) -> Option<Topology> {
    let app = spec.application.clone().unwrap_or_default();
    if spec.application.is_none() {
        errs.push("application", "section [application] is required");
    }
    let app_id = errs
        .required("application", "id", &app.id)
        .map(str::to_owned);
    if let Some(id) = &app_id {
        check_topic(errs, "application.id", id);
    }
    let app_id_s = app_id.clone().unwrap_or_else(|| "app".into());
    let commit_interval = errs.duration(
        "application.commit_interval",
        &app.commit_interval,
        Duration::from_secs(1),
    );
    if commit_interval.is_zero() {
        errs.push("application.commit_interval", "must be greater than zero");
    }
    let guarantee = match app.processing_guarantee.as_deref() {
        None | Some("at_least_once") => ProcessingGuarantee::AtLeastOnce,
        Some("exactly_once_v2") => ProcessingGuarantee::ExactlyOnceV2,
        Some(other) => {
            errs.push(
                "application.processing_guarantee",
                format!("unknown guarantee {other:?}: expected \"at_least_once\" or \"exactly_once_v2\""),
            );
            ProcessingGuarantee::AtLeastOnce
        }
    };
    let dead_letter_topic = app
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{app_id_s}-dlq"));
    check_topic(errs, "application.dead_letter_topic", &dead_letter_topic);
    let bad_records = compile_bad_records(&app, errs);

    // Sources.
    if spec.source.is_empty() {
        errs.push("source", "at least one [[source]] is required");
    }
    let mut sources = Vec::new();
    let mut messages: Option<Source> = None;
    for (i, s) in spec.source.iter().enumerate() {
        let at = format!("source[{i}]");
        let name = errs.required(&at, "name", &s.name);
        let topic = errs.required(&at, "topic", &s.topic);
        if let Some(t) = topic {
            check_topic(errs, &format!("{at}.topic"), t);
        }
        let keyed_by = match s.keyed_by.as_deref() {
            None => KeyedBy::ConversationId,
            Some(k) => KeyedBy::parse(k).unwrap_or_else(|| {
                errs.push(format!("{at}.keyed_by"), format!("unknown key {k:?} (one of conversation_id, reader_id, sender_id, device_id, other)"));
                KeyedBy::ConversationId
            }),
        };
        if let Some(f) = s.format.as_deref() {
            if f != "avro-confluent" {
                errs.push(
                    format!("{at}.format"),
                    format!("unsupported format {f:?} (supported: avro-confluent)"),
                );
            }
        }
        let is_messages = match s.records.as_deref() {
            None | Some("read-events") => false,
            Some("message-events") => true,
            Some(other) => {
                errs.push(
                    format!("{at}.records"),
                    format!("unknown records {other:?} (read-events or message-events)"),
                );
                false
            }
        };
        if is_messages && keyed_by != KeyedBy::ConversationId {
            errs.push(
                format!("{at}.keyed_by"),
                "message events must be keyed by conversation_id: they are read co-partitioned with the read events, never repartitioned",
            );
        }
        if let (Some(name), Some(topic), true) = (name, topic, is_messages) {
            if messages.is_some() {
                errs.push(format!("{at}.records"), "at most one message-events source");
            }
            if sources.iter().any(|x: &Source| x.name == name) {
                errs.push(
                    format!("{at}.name"),
                    format!("duplicate source name {name:?}"),
                );
            }
            messages = Some(Source {
                name: name.to_owned(),
                topic: TopicName(topic.to_owned()),
                keyed_by: KeyedBy::ConversationId,
                repartition_topic: None,
            });
        } else if let (Some(name), Some(topic)) = (name, topic) {
            if sources.iter().any(|x: &Source| x.name == name)
                || messages.as_ref().is_some_and(|m| m.name == name)
            {
                errs.push(
                    format!("{at}.name"),
                    format!("duplicate source name {name:?}"),
                );
            }
            let repartition_topic = (keyed_by != KeyedBy::ConversationId)
                .then(|| TopicName(format!("{app_id_s}-{name}-repartition")));
            sources.push(Source {
                name: name.to_owned(),
                topic: TopicName(topic.to_owned()),
                keyed_by,
                repartition_topic,
            });
        }
    }

    // Stores.
    let mut stores = Vec::new();
    for (i, s) in spec.store.iter().enumerate() {
        let at = format!("store[{i}]");
        let name = errs.required(&at, "name", &s.name);
        let kind = match s.kind.as_deref().unwrap_or("rocksdb") {
            "rocksdb" => StoreKind::RocksDb,
            "memory" => StoreKind::Memory,
            k => {
                errs.push(
                    format!("{at}.kind"),
                    format!("unknown store kind {k:?} (rocksdb or memory)"),
                );
                StoreKind::RocksDb
            }
        };
        let cache_max_entries = errs.positive(
            &format!("{at}.cache_max_entries"),
            s.cache_max_entries,
            DEFAULT_CACHE_MAX_ENTRIES,
            1 << 40,
        );
        let defaults = crate::state::rocks::RocksDbOptions::default();
        let block_cache_mb = errs.positive(
            &format!("{at}.block_cache_mb"),
            s.block_cache_mb,
            defaults.block_cache_bytes >> 20,
            1 << 20,
        );
        let write_buffer_mb = errs.positive(
            &format!("{at}.write_buffer_mb"),
            s.write_buffer_mb,
            defaults.write_buffer_bytes >> 20,
            1 << 16,
        );
        if let Some(name) = name {
            if stores.iter().any(|x: &Store| x.name.as_str() == name) {
                errs.push(
                    format!("{at}.name"),
                    format!("duplicate store name {name:?}"),
                );
            }
            let changelog_topic = s
                .changelog
                .unwrap_or(true)
                .then(|| TopicName(format!("{app_id_s}-{name}-changelog")));
            if let Some(t) = &changelog_topic {
                check_topic(errs, &format!("{at}.name"), t.as_str());
            }
            if changelog_topic.is_none() && s.disable_wal == Some(true) {
                errs.push(
                    format!("{at}.disable_wal"),
                    "disable_wal needs the changelog: without either, a crash loses the store's latest writes",
                );
            }
            let has_changelog = changelog_topic.is_some();
            stores.push(Store {
                name: StoreName(name.to_owned()),
                kind,
                changelog_topic,
                cache_max_entries,
                rocksdb: crate::state::rocks::RocksDbOptions {
                    block_cache_bytes: block_cache_mb << 20,
                    write_buffer_bytes: write_buffer_mb << 20,
                    max_write_buffers: defaults.max_write_buffers,
                    // As in Kafka Streams: the changelog (written before the store, with the
                    // checkpoint in the same batch) makes the WAL redundant.
                    disable_wal: s.disable_wal.unwrap_or(has_changelog),
                },
            });
        }
    }

    // Processors.
    let mut processors = Vec::new();
    for (i, p) in spec.processor.iter().enumerate() {
        let at = format!("processor[{i}]");
        let name = errs.required(&at, "name", &p.name);
        let kind = match p.kind.as_deref() {
            Some(k) if kinds.contains(&k) => k,
            Some(k) => {
                errs.push(
                    format!("{at}.kind"),
                    format!(
                        "unknown processor kind {k:?} (supported: {})",
                        kinds.join(", ")
                    ),
                );
                READ_STATE_KIND
            }
            None => {
                errs.push(
                    format!("{at}.kind"),
                    format!("is required ({})", kinds.join(", ")),
                );
                READ_STATE_KIND
            }
        };
        if kind != READ_STATE_KIND {
            let only_read_state = [
                ("unread_cap", p.unread_cap.is_some()),
                ("heads_store", p.heads_store.is_some()),
                ("min_emit_interval", p.min_emit_interval.is_some()),
            ];
            for (field, set) in only_read_state {
                if set {
                    errs.push(format!("{at}.{field}"), "only for kind read-state");
                }
            }
        }
        let inputs = p.inputs.clone().unwrap_or_default();
        if inputs.is_empty() {
            errs.push(format!("{at}.inputs"), "at least one source is required");
        }
        for (j, inp) in inputs.iter().enumerate() {
            if !spec
                .source
                .iter()
                .any(|s| s.name.as_deref() == Some(inp.as_str()))
            {
                errs.push(
                    format!("{at}.inputs[{j}]"),
                    format!("no source named {inp:?}"),
                );
            }
        }
        let reads_messages = messages.as_ref().is_some_and(|m| inputs.contains(&m.name));
        let unread_cap = match (reads_messages, p.unread_cap) {
            (true, cap) => Some(errs.positive(
                &format!("{at}.unread_cap"),
                cap,
                crate::processor::DEFAULT_UNREAD_CAP,
                100_000,
            )),
            (false, Some(_)) => {
                errs.push(
                    format!("{at}.unread_cap"),
                    "needs a source with records = \"message-events\" among the inputs",
                );
                None
            }
            (false, None) => None,
        };
        let store = errs.required(&at, "store", &p.store);
        if let Some(st) = store {
            if !stores.iter().any(|s| s.name.as_str() == st) {
                errs.push(format!("{at}.store"), format!("no store named {st:?}"));
            }
        }
        let heads_store = compile_heads_store(errs, &at, p, reads_messages, store, &stores);
        let min_emit_interval = errs.duration(
            &format!("{at}.min_emit_interval"),
            &p.min_emit_interval,
            Duration::ZERO,
        );
        if let (Some(name), Some(store)) = (name, store) {
            processors.push(ReadStateNode {
                name: name.to_owned(),
                kind: kind.to_owned(),
                inputs,
                store: StoreName(store.to_owned()),
                heads_store,
                min_emit_interval,
                unread_cap,
            });
        }
    }
    if spec.processor.is_empty() {
        errs.push("processor", "one [[processor]] is required");
    } else if spec.processor.len() > 1 {
        errs.push(
            "processor[1]",
            "only one processor per topology is supported",
        );
    }
    let inputs_resolve = processors.iter().all(|p| {
        p.inputs
            .iter()
            .all(|i| sources.iter().chain(&messages).any(|s| &s.name == i))
    });
    if sources.is_empty() && !spec.source.is_empty() && messages.is_some() {
        errs.push(
            "source",
            "a read-events source is required beside the message-events one",
        );
    }
    if let (Some(p), true) = (processors.first(), inputs_resolve) {
        for s in sources.iter().chain(&messages) {
            if !p.inputs.contains(&s.name) {
                errs.push(
                    format!("source {:?}", s.name),
                    "is not an input of any processor",
                );
            }
        }
    }

    // Sinks.
    let mut kafka: Vec<KafkaSink> = Vec::new();
    let mut heads: Vec<KafkaSink> = Vec::new();
    let mut postgres: Vec<(usize, &SinkSpec)> = Vec::new();
    for (i, s) in spec.sink.iter().enumerate() {
        let at = format!("sink[{i}]");
        let name = errs.required(&at, "name", &s.name);
        let input = errs.required(&at, "input", &s.input);
        match s.kind.as_deref() {
            Some("kafka") => {
                let topic = errs.required(&at, "topic", &s.topic);
                if let Some(t) = topic {
                    check_topic(errs, &format!("{at}.topic"), t);
                }
                if let Some(f) = s.format.as_deref() {
                    if f != "avro-confluent" {
                        errs.push(
                            format!("{at}.format"),
                            format!("unsupported format {f:?} (supported: avro-confluent)"),
                        );
                    }
                }
                for (field, set) in [
                    ("table", s.table.is_some()),
                    ("batch_size", s.batch_size.is_some()),
                    ("linger", s.linger.is_some()),
                ] {
                    if set {
                        errs.push(format!("{at}.{field}"), "only applies to postgres sinks");
                    }
                }
                if let Some(inp) = input {
                    if !processors.iter().any(|p| p.name == inp) {
                        errs.push(format!("{at}.input"), format!("no processor named {inp:?}"));
                    }
                }
                let to_heads = match s.output.as_deref() {
                    None | Some("receipts") => false,
                    Some("conversation-heads") => true,
                    Some(o) => {
                        errs.push(
                            format!("{at}.output"),
                            format!("unknown output {o:?} (receipts or conversation-heads)"),
                        );
                        false
                    }
                };
                if to_heads && messages.is_none() {
                    errs.push(
                        format!("{at}.output"),
                        "conversation-heads needs a source with records = \"message-events\"",
                    );
                }
                if let (Some(name), Some(input), Some(topic)) = (name, input, topic) {
                    let sink = KafkaSink {
                        name: name.into(),
                        input: input.into(),
                        topic: TopicName(topic.into()),
                    };
                    match to_heads {
                        true => heads.push(sink),
                        false => kafka.push(sink),
                    }
                }
            }
            Some("postgres") => postgres.push((i, s)),
            Some(k) => errs.push(
                format!("{at}.kind"),
                format!("unknown sink kind {k:?} (kafka or postgres)"),
            ),
            None => errs.push(format!("{at}.kind"), "is required (kafka or postgres)"),
        }
    }
    if kafka.len() != 1 {
        errs.push(
            "sink",
            format!(
                "exactly one kafka sink (the output topic) is required, found {}",
                kafka.len()
            ),
        );
    }
    if heads.len() > 1 {
        errs.push(
            "sink",
            "at most one kafka sink with output = \"conversation-heads\"",
        );
    }
    let mut pg = None;
    let mut heads_pg = None;
    for (i, s) in postgres {
        let at = format!("sink[{i}]");
        let input = s.input.as_deref();
        let receipts = input.and_then(|inp| kafka.iter().find(|k| k.name == inp));
        let of_heads = input.and_then(|inp| heads.iter().find(|k| k.name == inp));
        let topic = receipts.or(of_heads).map(|k| k.topic.clone());
        if topic.is_none() {
            if let Some(inp) = input {
                errs.push(format!("{at}.input"), format!("no kafka sink named {inp:?} (a postgres sink consumes a kafka sink's topic)"));
            }
        }
        let slot = match of_heads.is_some() {
            true => &mut heads_pg,
            false => &mut pg,
        };
        if slot.is_some() {
            errs.push(at.clone(), "at most one postgres sink per kafka sink");
        }
        if s.output.is_some() {
            errs.push(format!("{at}.output"), "only applies to kafka sinks");
        }
        if s.topic.is_some() {
            errs.push(
                format!("{at}.topic"),
                "a postgres sink reads its input's topic; remove topic",
            );
        }
        let batch_size = errs.positive(&format!("{at}.batch_size"), s.batch_size, 500, 100_000);
        let pool_size = errs.positive(&format!("{at}.pool_size"), s.pool_size, 2, 256);
        let linger = errs.duration(&format!("{at}.linger"), &s.linger, Duration::from_secs(1));
        let statement_timeout = errs.duration(
            &format!("{at}.statement_timeout"),
            &s.statement_timeout,
            Duration::from_secs(30),
        );
        let default_table = match of_heads.is_some() {
            true => "conversation_heads",
            false => "read_receipts",
        };
        let table = s.table.clone().unwrap_or_else(|| default_table.into());
        if !table
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            || table.is_empty()
        {
            errs.push(
                format!("{at}.table"),
                format!("{table:?} is not a plain SQL identifier"),
            );
        }
        if let (Some(name), Some(topic)) = (s.name.clone(), topic) {
            let group = match of_heads.is_some() {
                true => format!("{app_id_s}-pg-heads-sink"),
                false => format!("{app_id_s}-pg-sink"),
            };
            *slot = Some(PostgresSink {
                name,
                topic,
                consumer_group: group,
                receipts_table: table.clone(),
                table,
                batch_size,
                linger,
                pool_size,
                statement_timeout,
                url: s.url.clone(),
                embedded: s.embedded.unwrap_or(true),
            });
        }
    }

    if let Some(h) = &mut heads_pg {
        match &pg {
            Some(r) => h.receipts_table = r.table.clone(),
            None => errs.push(
                "sink",
                "a postgres sink of conversation heads needs the receipts' postgres sink (its unread view joins the receipts table)",
            ),
        }
    }
    let state_dir = PathBuf::from(app.state_dir.clone().unwrap_or_else(|| "./state".into()));
    let processor = processors.into_iter().next()?;
    let store = stores.iter().find(|s| s.name == processor.store)?.clone();
    let heads_store = match &processor.heads_store {
        Some(h) => Some(stores.iter().find(|s| &s.name == h)?.clone()),
        None => None,
    };
    if stores.len() > 1 + usize::from(heads_store.is_some()) {
        errs.push("store", "stores other than the processor's are not used");
    }
    Some(Topology {
        application_id: ApplicationId(app_id?),
        commit_interval,
        guarantee,
        state_dir,
        dead_letter_topic: TopicName(dead_letter_topic),
        bad_records,
        sources,
        messages,
        store,
        heads_store,
        processor,
        output: kafka.into_iter().next()?,
        heads_output: heads.into_iter().next(),
        postgres: pg,
        heads_postgres: heads_pg,
    })
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
}
