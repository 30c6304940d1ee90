//! Topology files: the raw spec, as written (TOML).
//!
//! Every struct here mirrors the file one to one; nothing is checked beyond TOML syntax and
//! value types. Unknown fields are collected (not fatal at the first) so that
//! `topology::compile` can report them together with every other mistake.
//! See `topologies/read_receipts.toml` for a documented example of every field.

use serde::Deserialize;

/// A whole topology file.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct TopologySpec {
    pub application: Option<ApplicationSpec>,
    pub ids: Option<IdsSpec>,
    #[serde(default)]
    pub source: Vec<SourceSpec>,
    #[serde(default)]
    pub store: Vec<StoreSpec>,
    #[serde(default)]
    pub processor: Vec<ProcessorSpec>,
    #[serde(default)]
    pub sink: Vec<SinkSpec>,
}

/// `[ids]`: the type of each kind of id, "i64", "string" or "uuid".
#[derive(Debug, Clone, Deserialize, Default)]
pub struct IdsSpec {
    /// Conversation ids (default i64).
    pub conversation: Option<String>,
    /// User ids: readers, senders, mentioned users (default i64).
    pub user: Option<String>,
    /// Message ids (default string; "uuid" checks them and writes them canonically).
    pub message: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ApplicationSpec {
    /// Consumer group id, prefix of internal topics and of the state directory.
    pub id: Option<String>,
    /// Flush/commit interval, e.g. "1s" (default 1s).
    pub commit_interval: Option<String>,
    /// Root of local state (default ./state; env STATE_DIR overrides).
    pub state_dir: Option<String>,
    /// Dead-letter topic (default `<id>-dlq`).
    pub dead_letter_topic: Option<String>,
    /// "at_least_once" (default) or "exactly_once_v2".
    pub processing_guarantee: Option<String>,
    /// Largest record accepted, bytes (default 65536); larger ones are dead letters.
    pub max_record_bytes: Option<i64>,
    /// "dead-letter" (default) or "fail".
    pub on_bad_record: Option<String>,
    /// Circuit breaker: the largest share of dead letters among the records of one window
    /// (default 0.5; 1.0 turns it off).
    pub dead_letter_max_ratio: Option<f64>,
    /// Circuit breaker window, e.g. "60s" (default).
    pub dead_letter_window: Option<String>,
    /// Circuit breaker: records a window needs before the ratio is judged (default 100).
    pub dead_letter_min_records: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct SourceSpec {
    pub name: Option<String>,
    pub topic: Option<String>,
    /// Which field the upstream record key holds: conversation_id (no repartition needed),
    /// or reader_id, sender_id, device_id, other (readstate repartitions by conversation).
    pub keyed_by: Option<String>,
    /// Value format: "avro-confluent" (default, `read_event.avsc` or a compatible writer;
    /// "avro" is the same),
    /// "json" (plain JSON, mapped by `fields`) or "json-schema" (Confluent's JSON Schema
    /// wire format: a 5-byte header, then JSON mapped by `fields`).
    pub format: Option<String>,
    /// JSON formats: where each role of a read event is, `role = "path.to.field"`. Roles:
    /// reader, conversation, position (required), message_id, device, sender, read_at.
    pub fields: Option<std::collections::BTreeMap<String, String>>,
    /// JSON formats: values for roles a record lacks (or holds null), `role = value`.
    pub defaults: Option<std::collections::BTreeMap<String, toml::Value>>,
    /// JSON formats: what orders the reads, "seq" (default: an integer) or "timestamp"
    /// (kept in microseconds; equal times are ordered by message id).
    pub position: Option<String>,
    /// JSON formats: the unit of the time fields, "s", "ms" (default), "us" or "rfc3339".
    pub time_unit: Option<String>,
    /// What the records are: "read-events" (default, `read_event.avsc`) or
    /// "message-events" (`message_event.avsc`, co-partitioned with the read events).
    pub records: Option<String>,
    /// The partitioner the source's producers use, over the conversation id as text:
    /// "murmur2" (default: Java clients, readstate), "crc32" (librdkafka's `consistent`),
    /// "consistent_random" (librdkafka's default) or "fnv1a" (Sarama). Every record a task
    /// folds is checked against it; see `on_misrouted` for one found on another partition.
    pub partitioner: Option<String>,
    /// A record found on another partition than `partitioner` puts its conversation on:
    /// "repartition" (produced to the internal topic `<id>-<name>-rerouted`, on the
    /// partition it belongs on, and folded by the task that owns its conversation) or
    /// "dead-letter" (reason `misrouted`, the default).
    pub on_misrouted: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StoreSpec {
    pub name: Option<String>,
    /// "rocksdb" (default) or "memory".
    pub kind: Option<String>,
    /// Back the store with a compacted changelog topic (default true).
    pub changelog: Option<bool>,
    /// Entries the record cache keeps in memory (default 1,000,000).
    pub cache_max_entries: Option<i64>,
    /// RocksDB block cache, MiB (default 64).
    pub block_cache_mb: Option<i64>,
    /// RocksDB memtable size, MiB (default 8).
    pub write_buffer_mb: Option<i64>,
    /// Skip RocksDB's WAL; the changelog makes the store rebuildable (default: true when
    /// the store has a changelog; refused without one).
    pub disable_wal: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ProcessorSpec {
    pub name: Option<String>,
    /// Only "read-state" for now.
    pub kind: Option<String>,
    /// Names of sources feeding this processor.
    pub inputs: Option<Vec<String>>,
    /// Name of the store holding its state.
    pub store: Option<String>,
    /// With a message source: the store holding the conversation heads (its own
    /// changelog).
    pub heads_store: Option<String>,
    /// At most one update per key per this interval, e.g. "30s" (default: one per flush).
    pub min_emit_interval: Option<String>,
    /// With a message source: recent messages kept per conversation; unread and mention
    /// counts are exact up to this many messages behind the head (default 1000).
    pub unread_cap: Option<i64>,
    /// With a read source positioned by message id: how far the message source's time
    /// must pass a read's before it stops waiting for its message (default "30s").
    pub message_wait: Option<String>,
    /// With a read source positioned by message id: reads each task keeps waiting at
    /// most (default 100,000); beyond it the oldest stop waiting early.
    pub max_waiting_reads: Option<i64>,
    /// With a members source: groups with more members than this get read-by aggregates
    /// only, no per-reader receipts for senders (default 100).
    pub large_group_members: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct SinkSpec {
    pub name: Option<String>,
    /// "kafka" (the coalesced output topic) or "postgres".
    pub kind: Option<String>,
    /// kafka: the processor it takes updates from. postgres: the kafka sink whose topic it
    /// consumes.
    pub input: Option<String>,
    /// kafka: output topic.
    pub topic: Option<String>,
    /// kafka: value format; only "avro-confluent".
    pub format: Option<String>,
    /// kafka: which output of the processor: "receipts" (default) or
    /// "conversation-heads" (needs a message source).
    pub output: Option<String>,
    /// postgres: target table (default read_receipts).
    pub table: Option<String>,
    /// postgres: rows per statement (default 500).
    pub batch_size: Option<i64>,
    /// postgres: longest wait to fill a batch (default "1s").
    pub linger: Option<String>,
    /// postgres: connections (default 2).
    pub pool_size: Option<i64>,
    /// postgres: statement timeout (default "30s").
    pub statement_timeout: Option<String>,
    /// postgres: connection URL; DATABASE_URL overrides. Prefer the environment for secrets.
    pub url: Option<String>,
    /// postgres: run inside `readstate run` (default true) or only via `readstate sink`.
    pub embedded: Option<bool>,
}

/// The type a field of a topology file must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Str,
    Int,
    Float,
    Bool,
    StrList,
    /// A table of strings (`[source.fields]`).
    StrTable,
    /// A table of strings and integers (`[source.defaults]`).
    ValueTable,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Str => "a string",
            Type::Int => "an integer",
            Type::Float => "a number",
            Type::Bool => "true or false",
            Type::StrList => "a list of strings",
            Type::StrTable => "a table of strings",
            Type::ValueTable => "a table of strings and integers",
        }
    }

    fn accepts(self, v: &toml::Value) -> bool {
        use toml::Value as V;
        match (self, v) {
            (Type::Str, V::String(_))
            | (Type::Int, V::Integer(_))
            | (Type::Bool, V::Boolean(_)) => true,
            (Type::Float, V::Float(_) | V::Integer(_)) => true,
            (Type::StrList, V::Array(a)) => a.iter().all(toml::Value::is_str),
            (Type::StrTable, V::Table(t)) => t.values().all(toml::Value::is_str),
            (Type::ValueTable, V::Table(t)) => t.values().all(|v| v.is_str() || v.is_integer()),
            _ => false,
        }
    }
}

/// A section of a topology file: its name, whether it repeats (`[[name]]`), its fields.
type Section = (&'static str, bool, &'static [(&'static str, Type)]);

/// Every section of a topology file and its fields (the structs above, field for field).
const SECTIONS: &[Section] = &[
    (
        "application",
        false,
        &[
            ("id", Type::Str),
            ("commit_interval", Type::Str),
            ("state_dir", Type::Str),
            ("dead_letter_topic", Type::Str),
            ("processing_guarantee", Type::Str),
            ("max_record_bytes", Type::Int),
            ("on_bad_record", Type::Str),
            ("dead_letter_max_ratio", Type::Float),
            ("dead_letter_window", Type::Str),
            ("dead_letter_min_records", Type::Int),
        ],
    ),
    (
        "ids",
        false,
        &[
            ("conversation", Type::Str),
            ("user", Type::Str),
            ("message", Type::Str),
        ],
    ),
    (
        "source",
        true,
        &[
            ("name", Type::Str),
            ("topic", Type::Str),
            ("keyed_by", Type::Str),
            ("format", Type::Str),
            ("records", Type::Str),
            ("partitioner", Type::Str),
            ("on_misrouted", Type::Str),
            ("fields", Type::StrTable),
            ("defaults", Type::ValueTable),
            ("position", Type::Str),
            ("time_unit", Type::Str),
        ],
    ),
    (
        "store",
        true,
        &[
            ("name", Type::Str),
            ("kind", Type::Str),
            ("changelog", Type::Bool),
            ("cache_max_entries", Type::Int),
            ("block_cache_mb", Type::Int),
            ("write_buffer_mb", Type::Int),
            ("disable_wal", Type::Bool),
        ],
    ),
    (
        "processor",
        true,
        &[
            ("name", Type::Str),
            ("kind", Type::Str),
            ("inputs", Type::StrList),
            ("store", Type::Str),
            ("heads_store", Type::Str),
            ("min_emit_interval", Type::Str),
            ("unread_cap", Type::Int),
            ("message_wait", Type::Str),
            ("max_waiting_reads", Type::Int),
            ("large_group_members", Type::Int),
        ],
    ),
    (
        "sink",
        true,
        &[
            ("name", Type::Str),
            ("kind", Type::Str),
            ("input", Type::Str),
            ("topic", Type::Str),
            ("format", Type::Str),
            ("output", Type::Str),
            ("table", Type::Str),
            ("batch_size", Type::Int),
            ("linger", Type::Str),
            ("pool_size", Type::Int),
            ("statement_timeout", Type::Str),
            ("url", Type::Str),
            ("embedded", Type::Bool),
        ],
    ),
];

/// One mistake found while reading a file: where (`sink[1].batch_size`) and what.
pub type FieldError = (String, String);

/// Parse a topology file. Returns the spec and every unknown field or value of the wrong
/// type (those are left out of the spec, so the rest is still checked).
pub fn parse(text: &str) -> Result<(TopologySpec, Vec<FieldError>), toml::de::Error> {
    let mut table: toml::Table = toml::from_str(text)?;
    let mut errors: Vec<FieldError> = Vec::new();
    let names: Vec<&str> = SECTIONS.iter().map(|(n, _, _)| *n).collect();
    table.retain(|key, value| {
        let Some((_, many, fields)) = SECTIONS.iter().find(|(n, _, _)| *n == key) else {
            errors.push((key.to_owned(), unknown(key, &names)));
            return false;
        };
        match (value, many) {
            (toml::Value::Table(t), false) => check_fields(key, t, fields, &mut errors),
            (toml::Value::Array(items), true) => {
                for (i, item) in items.iter_mut().enumerate() {
                    match item {
                        toml::Value::Table(t) => {
                            check_fields(&format!("{key}[{i}]"), t, fields, &mut errors)
                        }
                        _ => errors.push((format!("{key}[{i}]"), "must be a table".into())),
                    }
                }
                items.retain(toml::Value::is_table);
            }
            (_, false) => {
                errors.push((key.to_owned(), format!("must be a table: [{key}]")));
                return false;
            }
            (_, true) => {
                errors.push((
                    key.to_owned(),
                    format!("must be a list of tables: [[{key}]]"),
                ));
                return false;
            }
        }
        true
    });
    let mut spec: TopologySpec = toml::Value::Table(table).try_into()?;
    let formats = (spec.source.iter_mut().map(|s| &mut s.format))
        .chain(spec.sink.iter_mut().map(|s| &mut s.format));
    for format in formats {
        if format.as_deref() == Some("avro") {
            // The Confluent wire format is the only Avro framing readstate reads.
            *format = Some("avro-confluent".to_owned());
        }
    }
    Ok((spec, errors))
}

/// Report (and drop) the unknown fields and the values of the wrong type of one section.
fn check_fields(
    at: &str,
    t: &mut toml::Table,
    fields: &[(&str, Type)],
    errors: &mut Vec<FieldError>,
) {
    let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
    t.retain(|key, v| match fields.iter().find(|(n, _)| *n == key) {
        None => {
            errors.push((format!("{at}.{key}"), unknown(key, &names)));
            false
        }
        Some((_, ty)) if !ty.accepts(v) => {
            errors.push((
                format!("{at}.{key}"),
                format!("expected {}, got {}", ty.name(), v.type_str()),
            ));
            false
        }
        Some((_, Type::Float)) => {
            if let toml::Value::Integer(i) = v {
                *v = toml::Value::Float(*i as f64);
            }
            true
        }
        Some(_) => true,
    });
}

/// "unknown field", with the closest known name when one is close.
fn unknown(key: &str, known: &[&str]) -> String {
    let best = known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .min()
        .filter(|(d, k)| *d <= 2.max(k.len() / 4));
    match best {
        Some((_, k)) => format!("unknown field (did you mean {k:?}?)"),
        None => format!("unknown field (expected one of: {})", known.join(", ")),
    }
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_field_is_a_field_of_the_spec() {
        let mut text = String::new();
        for (section, many, fields) in SECTIONS {
            text.push_str(&match many {
                true => format!("[[{section}]]\n"),
                false => format!("[{section}]\n"),
            });
            for (f, ty) in *fields {
                let v = match ty {
                    Type::Str => "\"x\"",
                    Type::Int => "1",
                    Type::Float => "0.5",
                    Type::Bool => "true",
                    Type::StrList => "[\"x\"]",
                    Type::StrTable => "{ a = \"x\" }",
                    Type::ValueTable => "{ a = \"x\", b = 1 }",
                };
                text.push_str(&format!("{f} = {v}\n"));
            }
        }
        let de = toml::Deserializer::new(&text);
        let mut ignored = Vec::new();
        let _: TopologySpec =
            serde_ignored::deserialize(de, |p| ignored.push(p.to_string())).unwrap();
        assert!(
            ignored.is_empty(),
            "listed but not in the structs: {ignored:?}"
        );
        let (_, errors) = parse(&text).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn type_errors_and_unknown_fields_are_reported_together_with_suggestions() {
        let text = "[application]\nid = 7\ncommit_intervall = \"1s\"\n[[sink]]\nname = \"s\"\nbatch_size = \"500\"\n[[sink]]\nembedded = \"yes\"\n[sorce]\n";
        let (spec, errors) = parse(text).unwrap();
        let text: Vec<String> = errors.iter().map(|(a, m)| format!("{a}: {m}")).collect();
        assert!(
            text.contains(&"application.id: expected a string, got integer".to_owned()),
            "{text:?}"
        );
        assert!(
            text.contains(
                &"application.commit_intervall: unknown field (did you mean \"commit_interval\"?)"
                    .to_owned()
            ),
            "{text:?}"
        );
        assert!(
            text.contains(&"sink[0].batch_size: expected an integer, got string".to_owned()),
            "{text:?}"
        );
        assert!(
            text.contains(&"sink[1].embedded: expected true or false, got string".to_owned()),
            "{text:?}"
        );
        assert!(
            text.contains(&"sorce: unknown field (did you mean \"source\"?)".to_owned()),
            "{text:?}"
        );
        assert_eq!(text.len(), 5);
        assert_eq!(spec.sink[0].name.as_deref(), Some("s"), "the rest is kept");
    }
}
