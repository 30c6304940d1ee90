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
    #[serde(default)]
    pub source: Vec<SourceSpec>,
    #[serde(default)]
    pub store: Vec<StoreSpec>,
    #[serde(default)]
    pub processor: Vec<ProcessorSpec>,
    #[serde(default)]
    pub sink: Vec<SinkSpec>,
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
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct SourceSpec {
    pub name: Option<String>,
    pub topic: Option<String>,
    /// Which field the upstream record key holds: conversation_id (no repartition needed),
    /// or reader_id, sender_id, device_id, other (readstate repartitions by conversation).
    pub keyed_by: Option<String>,
    /// Value format; only "avro-confluent" for now.
    pub format: Option<String>,
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
    /// RocksDB memtable size, MiB (default 32).
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
    /// At most one update per key per this interval, e.g. "30s" (default: one per flush).
    pub min_emit_interval: Option<String>,
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

/// Parse a topology file. Returns the spec and the dotted paths of unknown fields.
pub fn parse(text: &str) -> Result<(TopologySpec, Vec<String>), toml::de::Error> {
    let de = toml::Deserializer::new(text);
    let mut unknown = Vec::new();
    let spec: TopologySpec = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))?;
    Ok((spec, unknown))
}
