//! `readstate run` against an in-process Kafka-protocol broker (MockCluster).

mod common;
#[path = "common/fake_registry.rs"]
mod fake_registry;
#[path = "common/kafka.rs"]
mod kafka;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use kafka::{send, suffix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::Message;
use readstate::kafka::KafkaSettings;
use readstate::model::{ReadEvent, ReceiptUpdate, StateKey};
use readstate::runtime::{run, RunConfig, RunSummary};
use readstate::serde::avro::{AvroReadEvent, EventEncoder, UpdateDecoder};
use readstate::serde::registry::{
    ConfluentRegistry, SchemaResolver, LOCAL_READ_EVENT_ID, LOCAL_RECEIPT_UPDATE_ID,
};
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
    /// `Some("reader_id")` etc.: the source is keyed by that field and repartitioned.
    keyed_by: Option<&'static str>,
}

impl Env {
    fn new() -> Self {
        Self::keyed_by(None)
    }

    /// An environment whose source is keyed by `keyed_by` (None: by conversation_id).
    fn keyed_by(keyed_by: Option<&'static str>) -> Self {
        let mock = MockCluster::new(1).unwrap();
        let s = suffix();
        let env = Env {
            mock,
            app: format!("app-{s}"),
            source: format!("events-{s}"),
            output: format!("updates-{s}"),
            state: tempfile::tempdir().unwrap(),
            keyed_by,
        };
        if keyed_by.is_some() {
            // The mock broker does not answer CreateTopics: internal topics are made here.
            env.mock
                .create_topic(&format!("{}-events-repartition", env.app), PARTS, 1)
                .unwrap();
        }
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
        self.topology_text_with_commit("200ms")
    }

    fn topology_text_with_commit(&self, commit_interval: &str) -> String {
        let text = topology_text(
            &self.app,
            commit_interval,
            &self.state.path().display().to_string(),
            &self.source,
            &self.output,
            "0s",
        );
        match self.keyed_by {
            Some(k) => text.replace(
                &format!("topic = \"{}\"", self.source),
                &format!("topic = \"{}\"\nkeyed_by = \"{k}\"", self.source),
            ),
            None => text,
        }
    }

    /// Sub-topology of the stateful tasks: 1 behind a repartition, else 0.
    fn task_dir(&self, p: i32) -> String {
        format!("{}_{p}", u8::from(self.keyed_by.is_some()))
    }

    fn brokers(&self) -> String {
        self.mock.bootstrap_servers()
    }

    fn start(&self) -> Instance {
        self.start_in(self.state.path())
    }

    /// Start an instance with its own state directory.
    fn start_in(&self, state_dir: &std::path::Path) -> Instance {
        self.start_with(state_dir, Arc::new(LocalRegistry::new()))
    }

    /// Start an instance serving /metrics, /health and /ready on 127.0.0.1:0.
    fn start_observed(&self) -> (Instance, readstate::telemetry::Server) {
        let health = readstate::telemetry::Health::new();
        let server =
            readstate::telemetry::serve("127.0.0.1:0".parse().unwrap(), health.clone()).unwrap();
        let inst = self.start_cfg(
            self.state.path(),
            Arc::new(LocalRegistry::new()),
            Some(health),
        );
        (inst, server)
    }

    fn start_with(
        &self,
        state_dir: &std::path::Path,
        resolver: Arc<dyn SchemaResolver>,
    ) -> Instance {
        self.start_cfg(state_dir, resolver, None)
    }

    fn start_cfg(
        &self,
        state_dir: &std::path::Path,
        resolver: Arc<dyn SchemaResolver>,
        health: Option<Arc<readstate::telemetry::Health>>,
    ) -> Instance {
        let mut cfg = RunConfig::new(
            self.topology(),
            KafkaSettings::new(self.brokers()),
            resolver,
        );
        if let Some(h) = health {
            cfg.health = h;
        }
        cfg.state_dir = state_dir.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = std::thread::spawn(move || run(cfg, s2).expect("instance runs"));
        Instance { stop, handle }
    }

    /// Produce records already encoded.
    fn produce_raw(&self, records: &[(String, Vec<u8>)]) {
        let p = self.producer();
        for (k, v) in records {
            send(
                &p,
                BaseRecord::to(&self.source)
                    .key(k.as_str())
                    .payload(v.as_slice()),
            );
        }
        p.flush(Duration::from_secs(30)).unwrap();
    }

    fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        kafka::producer(&self.brokers())
    }

    fn produce(&self, events: &[ReadEvent], garbage_every: usize) -> usize {
        let p = self.producer();
        let enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID).unwrap();
        let mut garbage = 0;
        for (i, e) in events.iter().enumerate() {
            let key = match self.keyed_by {
                Some(_) => e.reader_id.0.to_string(),
                None => e.conversation_id.0.to_string(),
            };
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
        kafka::read_until(&self.brokers(), topic, decode, done)
    }

    fn read_updates(&self, want: &HashMap<StateKey, Expected>) -> Vec<ReceiptUpdate> {
        self.read_updates_as(want, LOCAL_RECEIPT_UPDATE_ID)
    }

    /// Output updates, written with schema id `schema_id` (registered by the instance).
    fn read_updates_as(
        &self,
        want: &HashMap<StateKey, Expected>,
        schema_id: u32,
    ) -> Vec<ReceiptUpdate> {
        let reg = Arc::new(LocalRegistry::new().with_schema(schema_id, RECEIPT_UPDATE_SCHEMA));
        let mut dec = UpdateDecoder::new(reg, RECEIPT_UPDATE_SCHEMA).unwrap();
        let mut header = vec![0u8];
        header.extend_from_slice(&schema_id.to_be_bytes());
        futures::executor::block_on(dec.prepare(std::iter::once(Some(header.as_slice())))).unwrap();
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
                .join(self.task_dir(p))
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

/// A header's value as text.
fn header(m: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    readstate::testing::http_get(addr, path).unwrap()
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
            let get = |name: &str| header(m, name);
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
    let (inst, server) = env.start_observed();
    // Ready only once every assigned task has restored; the restore is on /metrics.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_get(server.addr(), "/ready").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    env.read_updates(&want);
    let metrics = http_get(server.addr(), "/metrics");
    let s2 = inst.stop();
    assert!(
        metrics.contains("readstate_restore_remaining_records{task=\"0_0\"}"),
        "restore progress is exposed per task"
    );
    let restored: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("readstate_changelog_records_restored_total "))
        .expect("restored counter")
        .parse()
        .unwrap();
    // The recorder is per process and tests run in parallel: at least this instance's.
    assert!(restored >= s2.restored_records as f64);
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

/// SIGTERM, and the instance exits 0 after its last flush and commit.
fn terminate(child: &mut std::process::Child) {
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
    sigkill_mid_stream_then_restart(Env::new(), 4);
}

/// A crash behind a repartition, between forwarding and committing: every source record
/// forwarded before the kill is forwarded again after the restart, and the origin header
/// makes the copies harmless (counts stay exact).
#[test]
fn sigkill_between_forward_and_commit_keeps_counts_exact() {
    let env = Env::keyed_by(Some("reader_id"));
    let events = zipf_workload(6, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let repartition = format!("{}-events-repartition", env.app);
    let file = env.state.path().join("topology.toml");
    // First run: no commit for 10 minutes, so nothing it forwards is committed.
    std::fs::write(&file, env.topology_text_with_commit("10m")).unwrap();
    env.produce(first, 0);
    let mut child = spawn_cli(&env, &file);
    env.read_until(&repartition, |_| (), |d: &[()]| d.len() >= first.len());
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::write(&file, env.topology_text()).unwrap();
    env.produce(second, 0);
    let mut child = spawn_cli(&env, &file);
    let updates = env.read_updates(&want);
    terminate(&mut child);
    let forwarded = env.read_until(
        &repartition,
        |_| (),
        |d: &[()]| d.len() >= first.len() + events.len(),
    );
    assert!(
        forwarded.len() >= first.len() + events.len(),
        "the first half was forwarded twice"
    );
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
}

fn sigkill_mid_stream_then_restart(env: Env, seed: u64) {
    let events = zipf_workload(seed, 16_000);
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
    terminate(&mut child);
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

/// A source keyed by reader_id: sub-topology 0 re-keys it by conversation through the
/// repartition topic while instances join and leave; state and output equal the oracle and
/// poison pills are caught before the repartition.
#[test]
fn repartitioned_source_with_instances_joining_and_leaving() {
    let env = Env::keyed_by(Some("reader_id"));
    let events = zipf_workload(7, 15_000);
    let want = oracle(&events);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let chunks: Vec<&[ReadEvent]> = events.chunks(5_000).collect();
    let a = env.start_in(dir_a.path());
    let mut garbage = env.produce(chunks[0], 200);
    let b = env.start_in(dir_b.path());
    garbage += env.produce(chunks[1], 200);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 50);
    let sa = a.stop();
    garbage += env.produce(chunks[2], 200);
    let updates = env.read_updates(&want);
    let sb = b.stop();
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(dir_b.path());
    assert_eq!(stored.len(), want.len());
    assert_states_match(&want, |k| stored.get(&k).cloned());
    assert!(
        sa.records_forwarded + sb.records_forwarded >= events.len() as u64,
        "every event went through the repartition topic: {sa:?} {sb:?}"
    );
    // Every poison pill is on the DLQ, and nothing else. Dead letters are at least once: an
    // offset commit refused during a rebalance makes the next owner write one again, so
    // they are counted by provenance (source partition and offset).
    let dlq = env.read_until(
        &format!("{}-dlq", env.app),
        |m| {
            let get = |name: &str| header(m, name);
            (
                get("readstate.source.partition"),
                get("readstate.source.offset"),
            )
        },
        |d| d.iter().collect::<std::collections::HashSet<_>>().len() >= garbage,
    );
    let distinct: std::collections::HashSet<_> = dlq.iter().collect();
    assert_eq!(distinct.len(), garbage);
}

/// The reader schema without two optional fields: what an older upstream service writes.
fn v1_writer_schema() -> String {
    let mut v: serde_json::Value = serde_json::from_str(READ_EVENT_SCHEMA).unwrap();
    let fields = v["fields"].as_array_mut().unwrap();
    fields.retain(|f| f["name"] != "client" && f["name"] != "trace_id");
    v.to_string()
}

/// The reader schema plus a field readstate does not know: what a newer service writes.
fn v2_writer_schema() -> String {
    let mut v: serde_json::Value = serde_json::from_str(READ_EVENT_SCHEMA).unwrap();
    v["fields"].as_array_mut().unwrap().push(serde_json::json!(
        {"name": "thread_id", "type": ["null", "long"], "default": null}
    ));
    v.to_string()
}

/// Confluent wire format with a writer schema of the test's own (apache-avro's generic
/// `Value` path, independent of readstate's encoder).
fn encode_with(schema_text: &str, id: u32, e: &ReadEvent) -> Vec<u8> {
    use apache_avro::types::{Record, Value};
    let schema = apache_avro::Schema::parse_str(schema_text).unwrap();
    let mut r = Record::new(&schema).unwrap();
    let has = |name: &str| schema_text.contains(&format!("\"{name}\""));
    r.put("reader_id", e.reader_id.0);
    r.put("conversation_id", e.conversation_id.0);
    r.put("message_seq", e.message_seq);
    r.put("message_id", e.message_id.clone());
    r.put("sender_id", e.sender_id.map(|s| s.0));
    r.put("device_id", e.device_id.clone());
    r.put("read_at", Value::TimestampMillis(e.read_at_ms));
    if has("client") {
        r.put("client", Some("test/1.0".to_owned()));
        r.put("trace_id", None::<String>);
    }
    if has("thread_id") {
        r.put("thread_id", Some(e.message_seq));
    }
    let mut out = vec![0u8];
    out.extend_from_slice(&id.to_be_bytes());
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap();
    out.extend(writer.write_value_to_vec(r).unwrap());
    out
}

/// Writers of three schema versions go through `run` with the Confluent registry over HTTP,
/// which is down (HTTP 503) for the first registration and lookups: every event is
/// decoded with schema resolution and folded; none becomes a dead letter because of the
/// outage; records naming a schema id the registry does not have are dead letters.
#[test]
fn evolved_writers_through_an_http_registry_that_is_down_at_first() {
    let env = Env::new();
    let reg = fake_registry::FakeRegistry::start();
    let subject = format!("{}-value", env.source);
    let v1 = v1_writer_schema();
    let v2 = v2_writer_schema();
    let writers = [
        (v1.as_str(), reg.add(&subject, &v1)),
        (READ_EVENT_SCHEMA, reg.add(&subject, READ_EVENT_SCHEMA)),
        (v2.as_str(), reg.add(&subject, &v2)),
    ];
    let events = zipf_workload(8, 9_000);
    let want = oracle(&events);
    let mut records: Vec<(String, Vec<u8>)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (schema, id) = writers[i % 3];
            (e.conversation_id.0.to_string(), encode_with(schema, id, e))
        })
        .collect();
    let unknown = 10;
    for e in &events[..unknown] {
        let v = encode_with(READ_EVENT_SCHEMA, 999, e);
        records.push(("x".into(), v));
    }
    env.produce_raw(&records);
    reg.fail_next(3, 2);
    let resolver = Arc::new(ConfluentRegistry::new(&reg.url(), Duration::from_secs(5)).unwrap());
    let inst = env.start_with(env.state.path(), resolver);
    let deadline = Instant::now() + Duration::from_secs(60);
    let output_id = loop {
        if let Some(id) = reg.id_of(&format!("{}-value", env.output)) {
            break id;
        }
        assert!(Instant::now() < deadline, "output schema never registered");
        std::thread::sleep(Duration::from_millis(20));
    };
    let updates = env.read_updates_as(&want, output_id);
    let summary = inst.stop();
    assert_eq!(reg.failed(), 5, "the outage was met and retried");
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
    assert_eq!(summary.records_consumed as usize, records.len());
    assert_eq!(summary.dead_letters as usize, unknown, "{summary:?}");
    for u in last_updates(&updates).values() {
        assert_eq!(
            u.device_id.as_deref(),
            want[&u.key()].device_of_max.as_deref(),
            "device rides along with the max"
        );
    }
}
