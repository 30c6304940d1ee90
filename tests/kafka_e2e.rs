//! `readstate run` against an in-process Kafka-protocol broker (MockCluster).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use readstate::kafka::KafkaSettings;
use readstate::model::{ReadEvent, ReceiptUpdate, StateKey};
use readstate::runtime::{run, RunConfig, RunSummary};
use readstate::serde::avro::{AvroReadEvent, EventEncoder, UpdateDecoder};
use readstate::serde::registry::LOCAL_READ_EVENT_ID;
use readstate::serde::{LocalRegistry, READ_EVENT_SCHEMA, RECEIPT_UPDATE_SCHEMA};
use readstate::state::rocks::{RocksDbOptions, RocksDbStore};
use readstate::state::{KeyValueStore, ReadState, StoreKey};
use readstate::topology::{compile, Topology};

const PARTS: i32 = 4;

struct Env {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    app: String,
    source: String,
    output: String,
    state: tempfile::TempDir,
}

fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl Env {
    fn new() -> Self {
        let mock = MockCluster::new(1).unwrap();
        let s = suffix();
        let env = Env {
            mock,
            app: format!("app-{s}"),
            source: format!("events-{s}"),
            output: format!("updates-{s}"),
            state: tempfile::tempdir().unwrap(),
        };
        env.mock.create_topic(&env.source, PARTS, 1).unwrap();
        env.mock.create_topic(&env.output, PARTS, 1).unwrap();
        env.mock
            .create_topic(&format!("{}-read-state-changelog", env.app), PARTS, 1)
            .unwrap();
        env.mock
            .create_topic(&format!("{}-dlq", env.app), 1, 1)
            .unwrap();
        env
    }

    fn topology(&self) -> Topology {
        compile(&self.topology_text()).unwrap()
    }

    fn topology_text(&self) -> String {
        topology_text(
            &self.app,
            "200ms",
            &self.state.path().display().to_string(),
            &self.source,
            &self.output,
            "0s",
        )
    }

    fn brokers(&self) -> String {
        self.mock.bootstrap_servers()
    }

    fn start(&self) -> Instance {
        self.start_in(self.state.path())
    }

    /// Start an instance with its own state directory.
    fn start_in(&self, state_dir: &std::path::Path) -> Instance {
        let mut cfg = RunConfig::new(
            self.topology(),
            KafkaSettings::new(self.brokers()),
            Arc::new(LocalRegistry::new()),
        );
        cfg.state_dir = state_dir.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = std::thread::spawn(move || run(cfg, s2).expect("instance runs"));
        Instance { stop, handle }
    }

    fn produce(&self, events: &[ReadEvent], garbage_every: usize) -> usize {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID).unwrap();
        let mut garbage = 0;
        for (i, e) in events.iter().enumerate() {
            let key = e.conversation_id.0.to_string();
            let v = enc.encode(&AvroReadEvent::from(e)).unwrap();
            send(
                &p,
                BaseRecord::to(&self.source)
                    .key(key.as_str())
                    .payload(v.as_slice()),
            );
            if garbage_every > 0 && i % garbage_every == 0 {
                send(
                    &p,
                    BaseRecord::to(&self.source)
                        .key(key.as_str())
                        .payload(b"\x00garbage".as_slice()),
                );
                garbage += 1;
            }
        }
        p.flush(Duration::from_secs(30)).unwrap();
        garbage
    }

    /// Read a whole topic from the beginning until `done` holds (bounded in time).
    fn read_until<T>(
        &self,
        topic: &str,
        decode: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
        done: impl Fn(&[T]) -> bool,
    ) -> Vec<T> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", format!("reader-{}", suffix()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let parts = c
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .unwrap()
            .topics()[0]
            .partitions()
            .len() as i32;
        for p in 0..parts {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(decode(&m)),
                Some(Err(e)) => eprintln!("reader: {e}"),
                None => {
                    if done(&out) {
                        return out;
                    }
                }
            }
        }
        panic!("timed out reading {topic}: {} records", out.len());
    }

    fn read_updates(&self, want: &HashMap<StateKey, Expected>) -> Vec<ReceiptUpdate> {
        let reg = Arc::new(LocalRegistry::new());
        let mut dec = UpdateDecoder::new(reg, RECEIPT_UPDATE_SCHEMA).unwrap();
        futures::executor::block_on(dec.prepare(std::iter::once(Some(&[0u8, 0, 0, 0, 2][..]))))
            .unwrap();
        self.read_until(
            &self.output,
            |m| ReceiptUpdate::from(dec.decode(m.payload().unwrap()).unwrap()),
            |us: &[ReceiptUpdate]| {
                let mut last: HashMap<StateKey, i64> = HashMap::new();
                for u in us {
                    let e = last.entry(u.key()).or_insert(-1);
                    *e = (*e).max(u.last_read_seq);
                }
                want.iter().all(|(k, x)| last.get(k) == Some(&x.max_seq))
            },
        )
    }

    /// Final state per key from the RocksDB stores the instance left behind.
    fn stored_states(&self) -> HashMap<StateKey, ReadState> {
        self.stored_states_in(self.state.path())
    }

    fn stored_states_in(&self, dir: &std::path::Path) -> HashMap<StateKey, ReadState> {
        let mut m = HashMap::new();
        for p in 0..PARTS {
            let path = dir
                .join(&self.app)
                .join(format!("0_{p}"))
                .join("read-state");
            if !path.exists() {
                continue;
            }
            let s =
                RocksDbStore::open("read-state".into(), &path, &RocksDbOptions::default()).unwrap();
            for (k, v) in s.scan_prefix(b"s").unwrap() {
                let (_, key) = StoreKey::decode(&k).unwrap();
                m.insert(key, ReadState::decode(&v).unwrap());
            }
        }
        m
    }
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, mut r: BaseRecord<'_, str, [u8]>) {
    loop {
        match p.send(r) {
            Ok(()) => return,
            Err((_, back)) => {
                r = back;
                p.flush(Duration::from_millis(100)).ok();
            }
        }
    }
}

struct Instance {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<RunSummary>,
}

impl Instance {
    fn stop(self) -> RunSummary {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Zipf-distributed conversations, several readers and devices, reordering, duplicates and
/// stale re-reads.
fn zipf_workload(seed: u64, n: usize) -> Vec<ReadEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let zipf = Zipf::new(500, 1.1).unwrap();
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

fn check_final_state(env: &Env, want: &HashMap<StateKey, Expected>) {
    let stored = env.stored_states();
    assert_eq!(stored.len(), want.len());
    assert_states_match(want, |k| stored.get(&k).cloned());
}

#[test]
fn end_to_end_output_and_state_match_the_oracle() {
    let env = Env::new();
    let events = zipf_workload(1, 20_000);
    let garbage = env.produce(&events, 100);
    let want = oracle(&events);
    let inst = env.start();
    let updates = env.read_updates(&want);
    let summary = inst.stop();
    let last = last_updates(&updates); // asserts versions strictly increase per key
    for (k, x) in &want {
        assert_eq!(last[k].last_read_seq, x.max_seq);
        assert_eq!(last[k].version, x.advances);
    }
    assert!(
        updates.len() < events.len(),
        "coalescing: {} updates for {} events",
        updates.len(),
        events.len()
    );
    assert_eq!(summary.dead_letters as usize, garbage);
    assert_eq!(summary.records_consumed as usize, events.len() + garbage);
    check_final_state(&env, &want);
    // Every poison pill is on the dead-letter topic with its provenance.
    let dlq = env.read_until(
        &format!("{}-dlq", env.app),
        |m| {
            use rdkafka::message::Headers;
            let h = m.headers().unwrap();
            let get = |name: &str| {
                h.iter()
                    .find(|x| x.key == name)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            (
                get("readstate.source.topic"),
                get("readstate.error.reason"),
                get("readstate.source.offset").is_some(),
            )
        },
        |d| d.len() >= garbage,
    );
    assert_eq!(dlq.len(), garbage);
    assert!(dlq
        .iter()
        .all(|(t, r, o)| t.as_deref() == Some(env.source.as_str())
            && r.as_deref() == Some("unknown_schema")
            && *o));
}

#[test]
fn deleting_the_state_directory_costs_only_a_restore() {
    let env = Env::new();
    let first = zipf_workload(2, 8_000);
    env.produce(&first, 0);
    let inst = env.start();
    env.read_updates(&oracle(&first));
    let s1 = inst.stop();
    assert_eq!(s1.records_consumed as usize, first.len());
    std::fs::remove_dir_all(env.state.path().join(&env.app)).unwrap();

    let second = zipf_workload(3, 4_000);
    env.produce(&second, 0);
    let all: Vec<ReadEvent> = first.iter().chain(second.iter()).cloned().collect();
    let want = oracle(&all);
    let inst = env.start();
    env.read_updates(&want);
    let s2 = inst.stop();
    assert!(
        s2.restored_records > 0,
        "state came back from the changelog"
    );
    assert_eq!(
        s2.records_consumed as usize,
        second.len(),
        "the source was not re-read from the beginning"
    );
    check_final_state(&env, &want);
}

/// Per key, versions never go backwards; equal versions carry equal pointers (duplicates
/// after a crash or a rebalance); the last update equals the oracle.
fn check_output_monotonic(updates: &[ReceiptUpdate], want: &HashMap<StateKey, Expected>) {
    let mut last: HashMap<StateKey, &ReceiptUpdate> = HashMap::new();
    for u in updates {
        if let Some(p) = last.get(&u.key()) {
            assert!(
                u.version >= p.version,
                "version of {:?} went back from {} to {}",
                u.key(),
                p.version,
                u.version
            );
            assert!(
                u.last_read_seq >= p.last_read_seq,
                "pointer of {:?} regressed",
                u.key()
            );
            if u.version == p.version {
                assert_eq!(u.last_read_seq, p.last_read_seq);
            }
        }
        last.insert(u.key(), u);
    }
    for (k, x) in want {
        assert_eq!(last[k].last_read_seq, x.max_seq, "pointer of {k:?}");
        assert_eq!(last[k].version, x.advances, "version of {k:?}");
    }
}

fn spawn_cli(env: &Env, topology: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args(["run", "--local-schemas", "--topology"])
        .arg(topology)
        .env("KAFKA_BROKERS", env.brokers())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn sigkill_mid_stream_then_restart_keeps_counts_exact() {
    let env = Env::new();
    let events = zipf_workload(4, 16_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let file = env.state.path().join("topology.toml");
    std::fs::write(&file, env.topology_text()).unwrap();
    env.produce(first, 0);
    let mut child = spawn_cli(&env, &file);
    // Wait until the instance is visibly processing, then kill it without any shutdown.
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 50);
    child.kill().unwrap();
    child.wait().unwrap();
    env.produce(second, 0);
    let mut child = spawn_cli(&env, &file);
    let updates = env.read_updates(&want);
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        child.wait().unwrap().success(),
        "graceful shutdown on SIGTERM"
    );
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
}

#[test]
fn instances_joining_and_leaving_mid_stream_converge() {
    let env = Env::new();
    let events = zipf_workload(5, 18_000);
    let want = oracle(&events);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let chunks: Vec<&[ReadEvent]> = events.chunks(6_000).collect();
    let a = env.start_in(dir_a.path());
    env.produce(chunks[0], 0);
    let b = env.start_in(dir_b.path());
    env.produce(chunks[1], 0);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 50);
    let sa = a.stop();
    env.produce(chunks[2], 0);
    let updates = env.read_updates(&want);
    let sb = b.stop();
    assert!(
        sa.tasks_opened > 0 && sb.tasks_opened > 0,
        "both instances ran tasks: {sa:?} {sb:?}"
    );
    check_output_monotonic(&updates, &want);
    // B owned every partition at the end: its stores hold the whole, exact state.
    let stored = env.stored_states_in(dir_b.path());
    assert_states_match(&want, |k| stored.get(&k).cloned());
}
