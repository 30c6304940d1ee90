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

/// The text of a minimal topology.
pub fn topology_text(
    app: &str,
    commit: &str,
    state_dir: &str,
    source: &str,
    output: &str,
    min_emit: &str,
) -> String {
    format!(
        r#"
[application]
id = "{app}"
commit_interval = "{commit}"
state_dir = "{state_dir}"
[[source]]
name = "events"
topic = "{source}"
[[store]]
name = "read-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["events"]
store = "read-state"
min_emit_interval = "{min_emit}"
[[sink]]
name = "updates"
kind = "kafka"
input = "read-state"
topic = "{output}"
"#
    )
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
