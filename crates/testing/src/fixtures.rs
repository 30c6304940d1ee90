//! Fixtures the tests share: topologies, workloads and an independent oracle.

pub use crate::wait::{wait_for, wait_for_every, wait_until, wait_until_explained};

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use readstate::ids::{ConversationId, ReaderId, SenderId};
use readstate::model::{ReadEvent, ReceiptUpdate, StateKey};
use readstate::state::ReadState;
use readstate::topology::{compile, Topology};

/// A topology file of `topologies/`, edited for one test: the test's own names (application
/// id, topics, state dir) and settings set by path, what it does not run removed. Tests
/// start from the files users are given rather than from copies of them, so a shipped
/// file that stops compiling or changes a default fails the tests that rest on it.
///
/// A path is `table.key` (`application.id`) or `array.name.key` for an entry of an array
/// of tables found by its `name` (`source.read-events.topic`). A path that names nothing
/// panics: a test never edits a key it believes is there and is not.
#[derive(Debug, Clone)]
pub struct Shipped {
    file: String,
    doc: toml::Table,
}

impl Shipped {
    /// `topologies/<file>` as shipped.
    pub fn load(file: &str) -> Self {
        let path = format!("{}/../../topologies/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let doc = text.parse().unwrap_or_else(|e| panic!("{path}: {e}"));
        Self {
            file: file.to_owned(),
            doc,
        }
    }

    /// Set the value at `path` (a key that is not there yet is added to its table).
    pub fn set(mut self, path: &str, value: impl Into<toml::Value>) -> Self {
        let (table, key) = self.parent(path);
        table.insert(key, value.into());
        self
    }

    /// Set the value at `path` to `value`, written in TOML (`{ reader = "user" }`).
    pub fn set_toml(self, path: &str, value: &str) -> Self {
        let doc: toml::Table = format!("v = {value}")
            .parse()
            .unwrap_or_else(|e| panic!("{value}: {e}"));
        let v = doc.get("v").expect("parsed above").clone();
        self.set(path, v)
    }

    /// Remove the key at `path`, or the array entry it names (`sink.postgres`).
    pub fn without(mut self, path: &str) -> Self {
        let file = self.file.clone();
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().expect("a path has a segment");
        if let [array] = parts.as_slice() {
            if let Some(toml::Value::Array(entries)) = self.doc.get_mut(*array) {
                let before = entries.len();
                entries.retain(|e| e.get("name").and_then(|n| n.as_str()) != Some(last));
                assert!(entries.len() < before, "{file}: no {path}");
                return self;
            }
        }
        let (table, key) = self.parent(path);
        assert!(table.remove(&key).is_some(), "{file}: no {path}");
        self
    }

    /// Rename the array entry at `path` (`source.read-receipt-events`) to `name`, and every
    /// reference to it (`inputs` and `input` of the other entries).
    pub fn rename(mut self, path: &str, name: &str) -> Self {
        let (array, old) = path.split_once('.').expect("array.name");
        let old = old.to_owned();
        self = self.set(&format!("{array}.{old}.name"), name);
        let renamed = |v: &mut toml::Value| {
            if v.as_str() == Some(old.as_str()) {
                *v = toml::Value::from(name);
            }
        };
        for (_, v) in self.doc.iter_mut() {
            let Some(entries) = v.as_array_mut() else {
                continue;
            };
            for e in entries.iter_mut().filter_map(toml::Value::as_table_mut) {
                e.get_mut("input").map(renamed);
                if let Some(inputs) = e.get_mut("inputs").and_then(toml::Value::as_array_mut) {
                    inputs.iter_mut().for_each(renamed);
                }
            }
        }
        self
    }

    /// Add the tables of `text` (TOML): entries of arrays of tables are appended to the
    /// shipped ones, other keys set.
    pub fn with_tables(mut self, text: &str) -> Self {
        let extra: toml::Table = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        for (k, v) in extra {
            match (self.doc.get_mut(&k), v) {
                (Some(toml::Value::Array(have)), toml::Value::Array(more)) => have.extend(more),
                (_, v) => {
                    self.doc.insert(k, v);
                }
            }
        }
        self
    }

    /// The edited topology's text.
    pub fn text(&self) -> String {
        toml::to_string(&self.doc).expect("a TOML table serializes")
    }

    /// The edited topology, compiled.
    pub fn compile(&self) -> Topology {
        compile(&self.text()).unwrap_or_else(|e| panic!("{} as edited: {e:?}", self.file))
    }

    /// The table that holds `path`'s last key, and that key.
    fn parent(&mut self, path: &str) -> (&mut toml::Table, String) {
        let file = self.file.clone();
        let mut parts = path.split('.').peekable();
        let mut table = &mut self.doc;
        loop {
            let part = parts.next().expect("a path has a segment");
            if parts.peek().is_none() {
                return (table, part.to_owned());
            }
            table = match table.get_mut(part) {
                Some(toml::Value::Table(t)) => t,
                Some(toml::Value::Array(entries)) => {
                    let name = parts.next().expect("an array entry is named");
                    assert!(parts.peek().is_some(), "{file}: {path} names no key");
                    entries
                        .iter_mut()
                        .filter_map(toml::Value::as_table_mut)
                        .find(|e| e.get("name").and_then(|n| n.as_str()) == Some(name))
                        .unwrap_or_else(|| panic!("{file}: no {part} named {name} ({path})"))
                }
                _ => panic!("{file}: no table {part} ({path})"),
            };
        }
    }
}

/// The text of a minimal topology: `topologies/read_receipts.toml` (its source
/// `read-events`, its sink `receipt-updates`) with the test's names, without its
/// PostgreSQL sink.
pub fn topology_text(
    app: &str,
    commit: &str,
    state_dir: &str,
    source: &str,
    output: &str,
    min_emit: &str,
) -> String {
    Shipped::load("read_receipts.toml")
        .set("application.id", app)
        .set("application.commit_interval", commit)
        .set("application.state_dir", state_dir)
        .set("source.read-events.topic", source)
        .set("sink.receipt-updates.topic", output)
        .set("processor.read-state.min_emit_interval", min_emit)
        .without("sink.postgres")
        .text()
}

/// A minimal topology with the given minimum emit interval ("0s" for none).
pub fn topology(min_emit: &str) -> Topology {
    compile(&topology_text(
        "test-app",
        "1s",
        "./state",
        "read-events",
        "receipt-updates",
        min_emit,
    ))
    .expect("test topology compiles")
}

/// Every key's state (looked up with `state_of`) equals the oracle: pointer, counts, version.
pub fn assert_states_match(
    want: &HashMap<StateKey, Expected>,
    state_of: impl Fn(&StateKey) -> Option<ReadState>,
) {
    for (k, x) in want {
        let s = state_of(k).unwrap_or_else(|| panic!("no state for {k:?}"));
        assert_eq!(s.last_read_seq, x.max_seq, "pointer of {k:?}");
        assert_eq!(s.events_total, x.events, "events of {k:?}");
        assert_eq!(s.stale_total, x.events - x.advances, "stale of {k:?}");
        assert_eq!(s.version, x.advances, "version of {k:?}");
    }
}

pub fn event(conv: i64, reader: i64, seq: i64, device: &str) -> ReadEvent {
    ReadEvent {
        reader_id: ReaderId::from(reader),
        conversation_id: ConversationId::from(conv),
        message_seq: seq,
        message_id: Some(format!("m-{conv}-{seq}")),
        sender_id: Some(SenderId::from(1000 + seq % 7)),
        device_id: Some(device.to_owned()),
        read_at_ms: 1_700_000_000_000 + seq,
    }
}

pub fn key(conv: i64, reader: i64) -> StateKey {
    StateKey {
        conversation: ConversationId::from(conv),
        reader: ReaderId::from(reader),
    }
}

/// What the state of each key must be after folding events in a given order: computed
/// directly from the definition, sharing no code with the processor.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expected {
    pub max_seq: i64,
    pub device_of_max: Option<String>,
    pub events: i64,
    pub advances: i64,
}

pub fn oracle(events: &[ReadEvent]) -> HashMap<StateKey, Expected> {
    let mut m: HashMap<StateKey, Expected> = HashMap::new();
    for e in events {
        let x = m.entry(e.key()).or_insert(Expected {
            max_seq: -1,
            ..Default::default()
        });
        x.events += 1;
        if e.message_seq > x.max_seq {
            x.max_seq = e.message_seq;
            x.device_of_max = e.device_id.clone();
            x.advances += 1;
        }
    }
    m
}

/// A random workload: `keys` keys, each read up to a random head in steps, events shuffled,
/// some duplicated; several devices per reader.
pub fn workload(seed: u64, keys: usize, events_per_key: usize) -> Vec<ReadEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for k in 0..keys {
        let conv = (k / 3) as i64;
        let reader = 100 + (k % 3) as i64;
        for _ in 0..events_per_key {
            let seq = rng.gen_range(0..(events_per_key as i64 * 3));
            let dev = format!("dev-{}", rng.gen_range(0..3));
            out.push(event(conv, reader, seq, &dev));
            if rng.gen_bool(0.1) {
                out.push(out.last().unwrap().clone());
            }
        }
    }
    out.shuffle(&mut rng);
    out
}

/// Last update per key, checking versions strictly increase per key along the way.
pub fn last_updates(updates: &[ReceiptUpdate]) -> HashMap<StateKey, ReceiptUpdate> {
    let mut last: HashMap<StateKey, ReceiptUpdate> = HashMap::new();
    for u in updates {
        if let Some(prev) = last.get(&u.key()) {
            assert!(
                u.version > prev.version && u.last_read_seq > prev.last_read_seq,
                "update for {:?} went from v{} seq {} to v{} seq {}",
                u.key(),
                prev.version,
                prev.last_read_seq,
                u.version,
                u.last_read_seq
            );
        }
        last.insert(u.key(), u.clone());
    }
    last
}

/// Partition of a conversation among `n` (the tests' stand-in for the key partitioner).
pub fn partition_of(conv: &ConversationId, n: i32) -> i32 {
    let c = conv
        .as_int()
        .expect("the tests' conversations have integer ids");
    c.rem_euclid(n as i64) as i32
}

/// Zipf-distributed conversations, several readers and devices, reordering, duplicates and
/// stale re-reads.
pub fn zipf_workload(seed: u64, n: usize) -> Vec<ReadEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let zipf = rand_distr::Zipf::new(500, 1.1).unwrap();
    let mut head: HashMap<(i64, i64), i64> = HashMap::new();
    let mut out: Vec<ReadEvent> = Vec::with_capacity(n);
    while out.len() < n {
        let conv = zipf.sample(&mut rng) as i64;
        let reader = rng.gen_range(0..4);
        let h = head.entry((conv, reader)).or_insert(0);
        *h += rng.gen_range(1..5);
        let seq = if rng.gen_bool(0.05) {
            (*h - 10).max(0)
        } else {
            *h
        };
        let e = event(conv, reader, seq, &format!("dev-{}", rng.gen_range(0..3)));
        if rng.gen_bool(0.05) {
            out.push(e.clone());
        }
        if rng.gen_bool(0.1) && !out.is_empty() {
            // Reorder: swap with a recent event.
            let j = out.len() - rng.gen_range(1..=out.len().min(20));
            let prev = std::mem::replace(&mut out[j], e);
            out.push(prev);
        } else {
            out.push(e);
        }
    }
    out
}

/// Every key's state in the RocksDB stores under `app_dir` (`<state_dir>/<application.id>`)
/// for tasks `<subtopology>_0..parts`.
pub fn stored_states(
    app_dir: &std::path::Path,
    subtopology: u8,
    parts: i32,
) -> HashMap<StateKey, ReadState> {
    use readstate::state::rocks::{RocksDbOptions, RocksDbStore};
    use readstate::state::StoreKey;
    let mut m = HashMap::new();
    for p in 0..parts {
        let path = app_dir
            .join(format!("{subtopology}_{p}"))
            .join("read-state");
        if !path.exists() {
            continue;
        }
        let s = RocksDbStore::open("read-state".into(), &path, &RocksDbOptions::default()).unwrap();
        for (k, v) in StoreKey::scan_tag(&s, readstate::state::codec::TAG_STATE).unwrap() {
            let (_, key) = StoreKey::decode(&k).unwrap();
            m.insert(key, ReadState::decode(&v).unwrap());
        }
    }
    m
}

/// Route the logs of instances run in this test process into the test's captured output
/// (shown only when the test fails; threads spawned by a test inherit its capture).
/// `RUST_LOG` filters them; by default readstate at `info`, the Kafka client at `error`.
pub fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
            .unwrap_or_else(|_| "info,rdkafka=error,librdkafka=error".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}

/// The workspace root (where `topologies/`, `schemas/`, `docker/` and `scripts/` live).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}
