//! `readstate run` against an in-process Kafka-protocol broker (MockCluster).

use readstate_testing::fake_registry;
use readstate_testing::kafka;
use readstate_testing::process;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka::{send, suffix};
use process::{signal, terminate, terminate_logged, wait_log};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::BaseRecord;
use rdkafka::Message;
use readstate::kafka::KafkaSettings;
use readstate::model::{ReadEvent, ReceiptUpdate, StateKey};
use readstate::runtime::{run, RunConfig, RunSummary, RuntimeError};
use readstate::serde::avro::{AvroReadEvent, EventEncoder, UpdateDecoder};
use readstate::serde::registry::{
    ConfluentRegistry, SchemaResolver, LOCAL_READ_EVENT_ID, LOCAL_RECEIPT_UPDATE_ID,
};
use readstate::serde::{LocalRegistry, READ_EVENT_SCHEMA, RECEIPT_UPDATE_SCHEMA};
use readstate::state::rocks::{RocksDbOptions, RocksDbStore};
use readstate::state::{KeyValueStore, ReadState};
use readstate::topology::{compile, Topology};
use readstate_cli::{App, AppError, RunningApp};
use readstate_testing::fixtures::*;

const PARTS: i32 = 4;

/// The broker a test runs against: librdkafka's in-process mock, or the real Apache Kafka
/// that `scripts/test` starts (`READSTATE_TEST_KAFKA`).
enum Broker {
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    Real(String),
}

impl Broker {
    fn real() -> Self {
        Broker::Real(std::env::var("READSTATE_TEST_KAFKA").expect(
            "READSTATE_TEST_KAFKA is not set: run scripts/test, which starts a private Apache Kafka",
        ))
    }

    fn bootstrap(&self) -> String {
        match self {
            Broker::Mock(m) => m.bootstrap_servers(),
            Broker::Real(b) => b.clone(),
        }
    }

    /// Create a topic (on a real broker through the admin API, with `config`).
    fn create_topic(&self, name: &str, partitions: i32, config: &[(&str, &str)]) {
        match self {
            Broker::Mock(m) => m.create_topic(name, partitions, 1).unwrap(),
            Broker::Real(b) => kafka::create_topic(b, name, partitions, config),
        }
    }
}

struct Env {
    broker: Broker,
    app: String,
    source: String,
    output: String,
    state: tempfile::TempDir,
    /// `Some("reader_id")` etc.: the source is keyed by that field and repartitioned.
    keyed_by: Option<&'static str>,
    /// Run under exactly_once_v2.
    eos: bool,
}

impl Env {
    fn new() -> Self {
        Self::keyed_by(None)
    }

    /// An environment whose source is keyed by `keyed_by` (None: by conversation_id).
    fn keyed_by(keyed_by: Option<&'static str>) -> Self {
        Self::on_mock(keyed_by)
    }

    fn on_mock(keyed_by: Option<&'static str>) -> Self {
        let broker = Broker::Mock(MockCluster::new(1).unwrap());
        let env = Self::on(broker, keyed_by);
        // The mock broker does not answer CreateTopics: internal topics are made here.
        if keyed_by.is_some() {
            env.broker
                .create_topic(&format!("{}-events-repartition", env.app), PARTS, &[]);
        }
        let changelog = format!("{}-read-state-changelog", env.app);
        env.broker.create_topic(&changelog, PARTS, &[]);
        env.broker.create_topic(&format!("{}-dlq", env.app), 1, &[]);
        env
    }

    /// On the real broker: only the source and output topics exist; readstate creates
    /// its internal topics through the admin API.
    fn real() -> Self {
        Self::on(Broker::real(), None)
    }

    /// On the real broker under exactly_once_v2, the source keyed by `keyed_by`.
    fn real_exactly_once(keyed_by: Option<&'static str>) -> Self {
        let mut env = Self::on(Broker::real(), keyed_by);
        env.eos = true;
        env
    }

    fn on(broker: Broker, keyed_by: Option<&'static str>) -> Self {
        readstate_testing::fixtures::capture_logs();
        let s = suffix();
        let env = Env {
            broker,
            app: format!("app-{s}"),
            source: format!("events-{s}"),
            output: format!("updates-{s}"),
            state: tempfile::tempdir().unwrap(),
            keyed_by,
            eos: false,
        };
        env.broker.create_topic(&env.source, PARTS, &[]);
        env.broker.create_topic(&env.output, PARTS, &[]);
        env
    }

    fn mock(&self) -> &MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        match &self.broker {
            Broker::Mock(m) => m,
            Broker::Real(_) => panic!("fault injection needs the mock broker"),
        }
    }

    fn topology(&self) -> Topology {
        compile(&self.topology_text()).unwrap()
    }

    fn topology_text(&self) -> String {
        self.topology_text_with_commit("200ms")
    }

    fn topology_text_with_commit(&self, commit_interval: &str) -> String {
        let commit_interval = match self.eos {
            true => format!("{commit_interval}\"\nprocessing_guarantee = \"exactly_once_v2"),
            false => commit_interval.to_owned(),
        };
        let text = topology_text(
            &self.app,
            &commit_interval,
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
        self.broker.bootstrap()
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
        let mut cfg = self.config(state_dir, resolver, &[]);
        if let Some(h) = health {
            cfg.health = h;
        }
        launch(cfg)
    }

    /// An instance's configuration, with librdkafka properties `props` ("key=value").
    fn config(
        &self,
        state_dir: &std::path::Path,
        resolver: Arc<dyn SchemaResolver>,
        props: &[&str],
    ) -> RunConfig {
        let props: Vec<String> = props.iter().map(|p| p.to_string()).collect();
        let kafka = KafkaSettings::new(self.brokers())
            .with_properties(&props)
            .unwrap();
        let mut cfg = RunConfig::new(self.topology(), kafka, resolver);
        cfg.state_dir = state_dir.to_path_buf();
        cfg
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
        kafka::flush(&p);
    }

    fn producer(&self) -> kafka::TestProducer {
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
        kafka::flush(&p);
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
        let sub = u8::from(self.keyed_by.is_some());
        stored_states(&dir.join(&self.app), sub, PARTS)
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
    readstate_testing::http_get(addr, path).unwrap()
}

/// An instance started in-process through the binary's composition root.
struct Instance(RunningApp);

/// Start an instance (stream thread, no sinks).
fn launch(cfg: RunConfig) -> Instance {
    Instance(App::new(cfg).start().expect("instance starts"))
}

impl Instance {
    fn stop(self) -> RunSummary {
        self.0.stop().expect("instance runs")
    }

    /// Wait (bounded) for the instance to stop by itself; its error.
    fn failure(self) -> RuntimeError {
        self.failure_beside(None)
    }

    /// The same while `other` runs beside it (it must not stop first).
    fn failure_beside(self, other: Option<&Instance>) -> RuntimeError {
        wait_for("the instance to stop", Duration::from_secs(150), || {
            assert!(
                other.is_none_or(|o| !o.0.is_finished()),
                "the other instance stopped first"
            );
            self.0.is_finished()
        });
        match self.0.join() {
            Err(AppError::Runtime(e)) => e,
            other => panic!("the instance stopped with a runtime error, not {other:?}"),
        }
    }
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
    // In-process instances of other tests share the process's recorder; each prunes only
    // the per-task series it set (telemetry::series::Owner), so this one's stay.
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
    wait_for("never ready", Duration::from_secs(60), || {
        http_get(server.addr(), "/ready").starts_with("HTTP/1.1 200")
    });
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
    // The recorder is per process (earlier tests counted too): at least this instance's.
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
    instances_joining_and_leaving(Env::new());
}

fn instances_joining_and_leaving(env: Env) {
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
    let subject = format!("{}-value", env.output);
    let output_id = wait_until(
        "the output schema to be registered",
        Duration::from_secs(60),
        || reg.id_of(&subject),
    );
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

// ---- Faults: the task lifecycle under pauses, failed produces, long restores and
// registry outages.

/// `readstate run` as a child process with its own state directory and extra arguments.
fn spawn_cli_in(
    env: &Env,
    topology: &std::path::Path,
    state_dir: &std::path::Path,
    extra: &[&str],
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args(["run", "--local-schemas", "--topology"])
        .arg(topology)
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra)
        .env("KAFKA_BROKERS", env.brokers())
        .env(
            "RUST_LOG",
            std::env::var("READSTATE_TEST_CHILD_LOG")
                .unwrap_or_else(|_| "warn,readstate=info".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(state_dir.join("readstate.log")).unwrap())
        .spawn()
        .unwrap()
}

/// Per key, in changelog order: pointer, version and event count never go down.
fn check_changelog_monotonic(env: &Env) -> usize {
    let topic = format!("{}-read-state-changelog", env.app);
    let records = kafka::read_all(&env.brokers(), &topic, |m| {
        (
            m.key().unwrap().to_vec(),
            ReadState::decode(m.payload().unwrap()).unwrap(),
        )
    });
    let mut last: HashMap<Vec<u8>, ReadState> = HashMap::new();
    for (k, s) in &records {
        if let Some(p) = last.get(k) {
            assert!(
                s.last_read_seq >= p.last_read_seq
                    && s.version >= p.version
                    && s.events_total >= p.events_total,
                "changelog regressed for {k:02x?}: {p:?} then {s:?}"
            );
        }
        last.insert(k.clone(), s.clone());
    }
    records.len()
}

/// A fresh instance restores every partition from the changelog; its stores must equal
/// the oracle (pointer, version and counts).
fn check_restored_state(env: &Env, want: &HashMap<StateKey, Expected>) {
    let dir = tempfile::tempdir().unwrap();
    let health = readstate::telemetry::Health::new();
    let mut cfg = env.config(dir.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.health = health.clone();
    let inst = launch(cfg);
    wait_for(
        "the fresh instance never restored",
        Duration::from_secs(90),
        || health.is_ready(),
    );
    let s = inst.stop();
    assert_eq!(
        s.tasks_opened, PARTS as u64,
        "it owned every partition: {s:?}"
    );
    let stored = env.stored_states_in(dir.path());
    assert_eq!(stored.len(), want.len());
    assert_states_match(want, |k| stored.get(&k).cloned());
}

/// An instance paused (SIGSTOP) longer than its session timeout while another takes over
/// its partitions, then resumed (SIGCONT): it learns of its loss before it commits, closes
/// its tasks dirty and restores whatever it gets back from the changelog. Output and
/// changelog never regress per key, and the state restored from the changelog is exact.
#[test]
fn sigstop_past_the_session_timeout_then_sigcont_never_regresses() {
    sigstop_then_sigcont(Env::new());
}

fn sigstop_then_sigcont(env: Env) {
    let events = zipf_workload(11, 15_000);
    let chunks: Vec<&[ReadEvent]> = events.chunks(5_000).collect();
    let want = oracle(&events);
    let file = env.state.path().join("topology.toml");
    std::fs::write(&file, env.topology_text()).unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let props = [
        "-X",
        "session.timeout.ms=6000",
        "-X",
        "heartbeat.interval.ms=500",
    ];
    let mut a = spawn_cli_in(&env, &file, dir_a.path(), &props);
    env.produce(chunks[0], 0);
    env.read_updates(&oracle(chunks[0]));
    // B joins; A keeps the partitions B is not given (cooperative-sticky).
    let mut b = spawn_cli_in(&env, &file, dir_b.path(), &props);
    wait_log(
        &dir_b.path().join("readstate.log"),
        "assigned partitions=[(",
    );
    signal(&a, "STOP");
    env.produce(chunks[1], 0);
    // B can only reach this once it owns A's partitions (A's session timed out).
    let stopped_at = Instant::now();
    env.read_updates(&oracle(&events[..10_000]));
    let taken_over = stopped_at.elapsed();
    signal(&a, "CONT");
    env.produce(chunks[2], 0);
    let updates = env.read_updates(&want);
    let log = |dir: &std::path::Path| {
        let path = dir.join("readstate.log");
        move || process::log_tail(&path, 200)
    };
    terminate_logged(&mut a, "A", log(dir_a.path()));
    terminate_logged(&mut b, "B", log(dir_b.path()));
    assert!(
        taken_over >= Duration::from_secs(3),
        "B took A's partitions only after A's session timed out ({taken_over:?})"
    );
    let log_a = std::fs::read_to_string(dir_a.path().join("readstate.log")).unwrap();
    if std::env::var("READSTATE_TEST_CHILD_LOG").is_ok() {
        eprintln!("instance A:\n{log_a}");
    }
    assert!(
        log_a.contains("tasks lost"),
        "A learned of its loss and closed its tasks dirty:\n{log_a}"
    );
    check_output_monotonic(&updates, &want);
    if env.eos {
        check_each_version_once(&updates);
    }
    check_changelog_monotonic(&env);
    check_restored_state(&env, &want);
}

/// Under exactly_once_v2 a read_committed consumer sees each (key, version) once.
fn check_each_version_once(updates: &[ReceiptUpdate]) {
    let mut seen = std::collections::HashSet::new();
    for u in updates {
        assert!(
            seen.insert((u.key(), u.version)),
            "{:?} version {} seen twice",
            u.key(),
            u.version
        );
    }
}

/// Wait (bounded) until an instance has consumed `n` records.
fn wait_consumed(progress: &readstate::telemetry::Progress, n: usize) {
    wait_for(
        "records were never consumed",
        Duration::from_secs(90),
        || readstate::telemetry::Progress::get(&progress.records_consumed) >= n as u64,
    );
}

/// Every produce request fails for good (the broker says the message is too large) while
/// this guard lives.
struct FailingProduces<'a>(&'a Env);

impl<'a> FailingProduces<'a> {
    fn start(env: &'a Env) -> Self {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        env.mock().request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 200],
        );
        Self(env)
    }
}

impl Drop for FailingProduces<'_> {
    fn drop(&mut self) {
        self.0
            .mock()
            .clear_request_errors(rdkafka::types::RDKafkaApiKey::Produce);
    }
}

/// A produce that fails for good during a commit stops the instance with an error and
/// `/health` 503 (no zombie that stays up and does nothing); a restarted instance recovers
/// the exact state.
#[test]
fn failed_produce_during_a_commit_stops_the_instance_then_a_restart_recovers() {
    let env = Env::new();
    let events = zipf_workload(12, 12_000);
    let parts: Vec<&[ReadEvent]> = events.chunks(4_000).collect();
    let want = oracle(&events);
    let health = readstate::telemetry::Health::new();
    let mut cfg = env.config(env.state.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.topology.commit_interval = Duration::from_secs(600);
    cfg.health = health.clone();
    let (progress, commit_now) = (cfg.progress.clone(), cfg.commit_now.clone());
    let a = launch(cfg);
    env.produce(parts[0], 0);
    wait_consumed(&progress, parts[0].len());
    commit_now.store(true, Ordering::Relaxed);
    env.read_updates(&oracle(parts[0]));
    env.produce(parts[1], 0);
    wait_consumed(&progress, parts[0].len() + parts[1].len());
    let err = {
        let _failing = FailingProduces::start(&env);
        commit_now.store(true, Ordering::Relaxed);
        a.failure()
    };
    assert!(
        matches!(err, RuntimeError::Fatal(_)),
        "stopped as fatal: {err}"
    );
    assert!(!health.is_live(), "/health answers 503");
    env.produce(parts[2], 0);
    let b = env.start();
    let updates = env.read_updates(&want);
    b.stop();
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
}

/// The same during a revoke: a second instance joins, the first one's commit on revoke
/// fails; it stops with an error, and the second converges to the exact state.
#[test]
fn failed_produce_during_a_revoke_stops_the_instance_and_the_other_converges() {
    let env = Env::new();
    let events = zipf_workload(13, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Long commit intervals: A's state is committed on revoke, B's when it stops.
    let config = |dir: &std::path::Path| {
        let mut cfg = env.config(dir, Arc::new(LocalRegistry::new()), &[]);
        cfg.topology.commit_interval = Duration::from_secs(600);
        cfg
    };
    let cfg = config(dir_a.path());
    let progress_a = cfg.progress.clone();
    let a = launch(cfg);
    env.produce(first, 0);
    wait_consumed(&progress_a, first.len());
    let cfg = config(dir_b.path());
    let progress_b = cfg.progress.clone();
    let (err, b) = {
        let _failing = FailingProduces::start(&env);
        let b = launch(cfg);
        (a.failure_beside(Some(&b)), b)
    };
    assert!(matches!(err, RuntimeError::Fatal(_)), "{err}");
    env.produce(second, 0);
    // A committed nothing: B reads everything from the start.
    wait_consumed(&progress_b, events.len());
    b.stop();
    let updates = env.read_updates(&want);
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(dir_b.path());
    assert_states_match(&want, |k| stored.get(&k).cloned());
}

/// A restore larger than one restore step runs between polls: the instance keeps its
/// membership (one assignment, nothing lost) and ends with the exact state.
#[test]
fn restore_larger_than_one_step_keeps_polling_and_the_membership() {
    let env = Env::new();
    let events = zipf_workload(14, 20_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let a = env.start();
    env.produce(first, 0);
    env.read_updates(&oracle(first));
    a.stop();
    let changelog: i64 =
        kafka::end_offsets(&env.brokers(), &format!("{}-read-state-changelog", env.app))
            .iter()
            .sum();
    let fresh = tempfile::tempdir().unwrap();
    let mut cfg = env.config(fresh.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.restore_batch = 50;
    let b = launch(cfg);
    env.produce(second, 0);
    let updates = env.read_updates(&want);
    let s = b.stop();
    assert!(
        changelog > 4 * 50,
        "the restore took many steps ({changelog} records)"
    );
    assert_eq!(s.restored_records as i64, changelog, "{s:?}");
    assert_eq!(s.assignments, 1, "no rebalance during the restore: {s:?}");
    assert_eq!(s.tasks_lost, 0, "{s:?}");
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(fresh.path());
    assert_states_match(&want, |k| stored.get(&k).cloned());
}

/// The schema registry is down for longer than max.poll.interval.ms: the partitions that
/// need it are parked, the consumer keeps polling (no rebalance, nothing lost), nothing is
/// dead-lettered, and processing resumes when the registry answers.
#[test]
fn registry_down_longer_than_max_poll_interval_parks_and_resumes() {
    let env = Env::new();
    let reg = fake_registry::FakeRegistry::start();
    let id = reg.add(&format!("{}-value", env.source), READ_EVENT_SCHEMA);
    let events = zipf_workload(15, 6_000);
    let want = oracle(&events);
    let records: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| {
            (
                e.conversation_id.0.to_string(),
                encode_with(READ_EVENT_SCHEMA, id, e),
            )
        })
        .collect();
    let resolver = Arc::new(ConfluentRegistry::new(&reg.url(), Duration::from_secs(2)).unwrap());
    let props = [
        "session.timeout.ms=6000",
        "heartbeat.interval.ms=500",
        "max.poll.interval.ms=7000",
    ];
    let cfg = env.config(env.state.path(), resolver, &props);
    let health = cfg.health.clone();
    let inst = launch(cfg);
    let subject = format!("{}-value", env.output);
    let output_id = wait_until(
        "the output schema to be registered",
        Duration::from_secs(60),
        || reg.id_of(&subject),
    );
    // The outage starts once the instance runs its tasks (the schema is registered while
    // the topics are checked, before the group is joined).
    wait_for("the instance to be ready", Duration::from_secs(60), || {
        health.is_ready()
    });
    let outage = Duration::from_secs(12);
    reg.down_for(outage);
    let down_at = Instant::now();
    env.produce_raw(&records);
    let updates = env.read_updates_as(&want, output_id);
    let took = down_at.elapsed();
    let s = inst.stop();
    assert!(
        took >= outage,
        "nothing was processed while the registry was down"
    );
    assert!(reg.failed() > 1, "the outage was met and retried");
    assert_eq!(s.dead_letters, 0, "{s:?}");
    assert_eq!(s.assignments, 1, "no rebalance: {s:?}");
    assert_eq!(s.tasks_lost, 0, "{s:?}");
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
}

/// A store whose checkpoint lies beyond its changelog's end (the changelog was recreated)
/// is wiped and restored instead of trusted.
#[test]
fn a_checkpoint_beyond_the_changelog_end_is_wiped_and_restored() {
    use readstate::state::{put_checkpoint, StoreBatch};
    let env = Env::new();
    let events = zipf_workload(16, 6_000);
    let want = oracle(&events);
    env.produce(&events, 0);
    let a = env.start();
    env.read_updates(&want);
    a.stop();
    // Move every store's checkpoint far beyond the changelog's end.
    for p in 0..PARTS {
        let path = env
            .state
            .path()
            .join(&env.app)
            .join(env.task_dir(p))
            .join("read-state");
        let mut s =
            RocksDbStore::open("read-state".into(), &path, &RocksDbOptions::default()).unwrap();
        let mut b = StoreBatch::default();
        put_checkpoint(&mut b, 1_000_000);
        s.write(b).unwrap();
        s.flush().unwrap();
    }
    let health = readstate::telemetry::Health::new();
    let mut cfg = env.config(env.state.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.health = health.clone();
    let b = launch(cfg);
    wait_for("never restored", Duration::from_secs(60), || {
        health.is_ready()
    });
    let s = b.stop();
    assert_eq!(s.tasks_corrupted, PARTS as u64, "{s:?}");
    check_final_state(&env, &want);
}

/// Why an instance refused to start.
fn refused(cfg: RunConfig) -> String {
    run(cfg, Arc::new(AtomicBool::new(false)))
        .unwrap_err()
        .to_string()
}

/// An existing changelog with another partition count than the source stops the instance
/// at start with an error naming the topic.
#[test]
fn an_internal_topic_with_the_wrong_partition_count_is_refused() {
    let mock = MockCluster::new(1).unwrap();
    let s = suffix();
    let (app, source) = (format!("app-{s}"), format!("events-{s}"));
    mock.create_topic(&source, 4, 1).unwrap();
    let changelog = format!("{app}-read-state-changelog");
    mock.create_topic(&changelog, 2, 1).unwrap();
    let state = tempfile::tempdir().unwrap();
    let text = topology_text(
        &app,
        "200ms",
        &state.path().display().to_string(),
        &source,
        "out",
        "0s",
    );
    let cfg = RunConfig::new(
        compile(&text).unwrap(),
        KafkaSettings::new(mock.bootstrap_servers()),
        Arc::new(LocalRegistry::new()),
    );
    let err = refused(cfg);
    assert!(
        err.contains(&changelog) && err.contains("2 partitions"),
        "the error names the topic and what is wrong: {err}"
    );
}

// ---- The same against a real Apache Kafka (scripts/test starts one): what the mock broker
// does not do (admin topic creation and configs, compaction, the real group coordinator).

#[test]
fn real_broker_sigkill_mid_stream_then_restart_keeps_counts_exact() {
    sigkill_mid_stream_then_restart(Env::real(), 31);
}

#[test]
fn real_broker_instances_joining_and_leaving_converge() {
    instances_joining_and_leaving(Env::real());
}

#[test]
fn real_broker_sigstop_past_the_session_timeout_never_regresses() {
    sigstop_then_sigcont(Env::real());
}

/// `cleanup.policy` of a topic, through DescribeConfigs.
fn cleanup_policy(brokers: &str, topic: &str) -> String {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let spec = ResourceSpecifier::Topic(topic);
    let r =
        futures::executor::block_on(admin.describe_configs([&spec], &AdminOptions::new())).unwrap();
    let resource = r.into_iter().next().unwrap().unwrap();
    resource
        .get("cleanup.policy")
        .and_then(|e| e.value.clone())
        .unwrap_or_default()
}

/// readstate creates its changelog (compacted, the source's partition count) and its
/// dead-letter topic through the admin API, and refuses an existing changelog that is not
/// compacted, naming it.
#[test]
fn real_broker_internal_topics_are_created_compacted_and_checked() {
    let mut env = Env::real();
    // An output topic that does not exist yet: readstate creates it too.
    env.output = format!("fresh-updates-{}", suffix());
    let events = zipf_workload(32, 3_000);
    let want = oracle(&events);
    let a = env.start();
    wait_for(
        "the output topic was created with {PARTS} partitions",
        Duration::from_secs(30),
        || kafka::end_offsets(&env.brokers(), &env.output).len() == PARTS as usize,
    );
    env.produce(&events, 500);
    env.read_updates(&want);
    a.stop();
    let brokers = env.brokers();
    let changelog = format!("{}-read-state-changelog", env.app);
    assert_eq!(
        kafka::end_offsets(&brokers, &changelog).len(),
        PARTS as usize
    );
    assert_eq!(cleanup_policy(&brokers, &changelog), "compact");
    assert_eq!(
        cleanup_policy(&brokers, &format!("{}-dlq", env.app)),
        "delete"
    );
    check_final_state(&env, &want);

    let other = Env::real();
    let wrong = format!("{}-read-state-changelog", other.app);
    other
        .broker
        .create_topic(&wrong, PARTS, &[("cleanup.policy", "delete")]);
    let cfg = other.config(other.state.path(), Arc::new(LocalRegistry::new()), &[]);
    let err = refused(cfg);
    assert!(
        err.contains(&wrong) && err.contains("cleanup.policy"),
        "names the topic and what is wrong: {err}"
    );
}

/// A changelog the broker has compacted (fewer records than were written, offsets with
/// gaps) restores a fresh instance to the exact state, counts included.
#[test]
fn real_broker_restore_from_a_compacted_changelog_is_exact() {
    let env = Env::real();
    let events = zipf_workload(33, 40_000);
    let want = oracle(&events);
    let a = env.start();
    let mut done = 0;
    for chunk in events.chunks(5_000) {
        env.produce(chunk, 0);
        done += chunk.len();
        env.read_updates(&oracle(&events[..done]));
    }
    let written = a.stop().changelog_records as i64;
    let changelog = format!("{}-read-state-changelog", env.app);
    let kept = wait_until(
        &format!("the broker to compact {changelog} (below {written} records)"),
        Duration::from_secs(120),
        || Some(kafka::count_records(&env.brokers(), &changelog)).filter(|k| *k < written),
    );
    let fresh = tempfile::tempdir().unwrap();
    let health = readstate::telemetry::Health::new();
    let mut cfg = env.config(fresh.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.health = health.clone();
    let b = launch(cfg);
    wait_for("never restored", Duration::from_secs(60), || {
        health.is_ready()
    });
    let s = b.stop();
    eprintln!(
        "compaction kept {kept} of {written} changelog records; restored {}",
        s.restored_records
    );
    assert!(s.restored_records as i64 <= kept, "{s:?}");
    let stored = env.stored_states_in(fresh.path());
    assert_eq!(stored.len(), want.len());
    assert_states_match(&want, |k| stored.get(&k).cloned());
}

// ---- exactly_once_v2 on the real broker.

/// An instance SIGSTOPped past its session timeout under exactly_once_v2: its open
/// transaction is fenced and aborted, none of its writes become visible; a read_committed
/// consumer sees each (key, version) exactly once and never a decrease.
#[test]
fn real_broker_exactly_once_zombie_is_fenced() {
    sigstop_then_sigcont(Env::real_exactly_once(None));
}

/// kill -9 between produce and commit under exactly_once_v2: the records the first run
/// forwarded to the repartition topic were never committed, so read_committed consumers
/// never see them; after a restart each (key, version) is on the output exactly once and
/// the state is exact.
#[test]
fn real_broker_exactly_once_kill9_between_produce_and_commit() {
    let env = Env::real_exactly_once(Some("reader_id"));
    let events = zipf_workload(34, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let file = env.state.path().join("topology.toml");
    // First run: no commit for 10 minutes, so everything it forwards stays uncommitted.
    std::fs::write(&file, env.topology_text_with_commit("10m")).unwrap();
    env.produce(first, 0);
    let mut child = spawn_cli_in(&env, &file, env.state.path(), &[]);
    let repartition = format!("{}-events-repartition", env.app);
    wait_for(
        "the first run to forward its records",
        Duration::from_secs(60),
        || {
            kafka::end_offsets(&env.brokers(), &repartition)
                .iter()
                .sum::<i64>()
                >= first.len() as i64
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        kafka::count_records(&env.brokers(), &repartition),
        0,
        "read_committed sees none of what the killed run forwarded (never committed)"
    );
    std::fs::write(&file, env.topology_text()).unwrap();
    env.produce(second, 0);
    let mut child = spawn_cli_in(&env, &file, env.state.path(), &[]);
    let updates = env.read_updates(&want);
    terminate(&mut child);
    check_output_monotonic(&updates, &want);
    check_each_version_once(&updates);
    check_final_state(&env, &want);
}

/// A repartitioned source on the real broker: readstate creates the repartition topic
/// through the admin API with the source's partition count, and deletes its records below
/// the committed offsets (DeleteRecords), as Kafka Streams does.
#[test]
fn real_broker_repartition_topic_is_created_and_purged_below_the_committed_offsets() {
    let env = Env::on(Broker::real(), Some("reader_id"));
    let events = zipf_workload(35, 8_000);
    let want = oracle(&events);
    let mut cfg = env.config(env.state.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.repartition_purge_interval = Duration::from_millis(500);
    let a = launch(cfg);
    env.produce(&events, 0);
    env.read_updates(&want);
    let repartition = format!("{}-events-repartition", env.app);
    let brokers = env.brokers();
    let low = |p: i32| -> (i64, i64) {
        let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        rdkafka::consumer::Consumer::fetch_watermarks(&c, &repartition, p, Duration::from_secs(5))
            .unwrap()
    };
    wait_for(
        "repartition records were never purged",
        Duration::from_secs(60),
        || (0..PARTS).map(|p| low(p).0).sum::<i64>() != 0,
    );
    a.stop();
    assert_eq!(
        kafka::end_offsets(&brokers, &repartition).len(),
        PARTS as usize
    );
    let committed = kafka::committed(&brokers, &env.app, &repartition);
    for p in 0..PARTS {
        let (lo, _) = low(p);
        assert!(
            lo <= committed[p as usize],
            "partition {p}: purged to {lo}, committed {}",
            committed[p as usize]
        );
    }
    check_final_state(&env, &want);
}

// ---- Bad input never stops processing (issue 15).

/// A record of about 1 MB is a dead letter ("too_large") whose value is capped at
/// max_record_bytes (a header keeps its size): carried whole, it plus the dead-letter
/// headers would exceed the producers' message.max.bytes and stop the instance for good.
/// Processing goes on and every other event arrives.
#[test]
fn a_record_near_one_megabyte_is_dead_lettered_capped_and_processing_goes_on() {
    let env = Env::new();
    let events = zipf_workload(5, 2_000);
    let want = oracle(&events);
    env.produce(&events[..1_000], 0);
    let mut big = vec![0u8, 0, 0, 0, LOCAL_READ_EVENT_ID as u8];
    big.resize(999_850, 7);
    env.produce_raw(&[("big".to_owned(), big.clone())]);
    env.produce(&events[1_000..], 0);
    let inst = env.start();
    let updates = env.read_updates(&want);
    check_output_monotonic(&updates, &want);
    let dlq = format!("{}-dlq", env.app);
    let dead = env.read_until(
        &dlq,
        |m| {
            (
                header(m, "readstate.error.reason"),
                header(m, "readstate.value.truncated"),
                m.payload().map(<[u8]>::to_vec),
            )
        },
        |v| !v.is_empty(),
    );
    let summary = inst.stop();
    assert_eq!(summary.dead_letters, 1);
    assert_eq!(dead.len(), 1);
    let (reason, truncated, payload) = &dead[0];
    assert_eq!(reason.as_deref(), Some("too_large"));
    assert_eq!(truncated.as_deref(), Some("999850"));
    let limit = readstate::serde::avro::MAX_RECORD_BYTES;
    assert_eq!(payload.as_deref(), Some(&big[..limit]));
}

/// Producers use a schema id the registry does not know: every record would be a dead
/// letter. The circuit breaker stops the instance (an error saying why, /health 503)
/// instead of draining the topic into the DLQ: what was committed is exactly what reached
/// the DLQ, and most of the input is neither.
#[test]
fn the_circuit_breaker_stops_an_instance_that_would_dead_letter_everything() {
    let env = Env::new();
    let events = zipf_workload(6, 5_000);
    let raw: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| {
            let v = encode_with(READ_EVENT_SCHEMA, 99, e);
            (e.conversation_id.0.to_string(), v)
        })
        .collect();
    env.produce_raw(&raw);
    let (inst, server) = env.start_observed();
    let err = inst.failure().to_string();
    assert!(
        err.contains("circuit breaker")
            && err.contains("unknown_schema")
            && err.contains("schema id 99"),
        "{err}"
    );
    assert!(http_get(server.addr(), "/health").starts_with("HTTP/1.1 503"));
    let committed: i64 = kafka::committed(&env.brokers(), &env.app, &env.source)
        .iter()
        .map(|o| o.max(&0))
        .sum();
    let dlq = kafka::count_records(&env.brokers(), &format!("{}-dlq", env.app));
    assert_eq!(committed, dlq, "each committed record has its dead letter");
    assert!(dlq < events.len() as i64 / 2, "{dlq} dead letters");
}

/// `on_bad_record = "fail"`: the first bad record stops the instance with an error naming
/// it, and no offset past it is committed.
#[test]
fn on_bad_record_fail_stops_at_the_first_bad_record() {
    let env = Env::new();
    let events = zipf_workload(7, 1_000);
    env.produce(&events, 400);
    let garbage = env.read_until(
        &env.source,
        |m| {
            (
                m.partition(),
                m.offset(),
                m.payload() == Some(b"\x00garbage"),
            )
        },
        |v| v.len() >= events.len() + 3,
    );
    let mut cfg = env.config(env.state.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.topology.bad_records.on_bad_record = readstate::topology::OnBadRecord::Fail;
    let err = launch(cfg).failure().to_string();
    assert!(
        err.contains("on_bad_record") && err.contains("bad record at"),
        "{err}"
    );
    let committed = kafka::committed(&env.brokers(), &env.app, &env.source);
    for (p, o, bad) in &garbage {
        if *bad {
            assert!(
                committed[*p as usize] <= *o,
                "committed past the bad record at [{p}] {o}"
            );
        }
    }
    assert_eq!(garbage.iter().filter(|(_, _, bad)| *bad).count(), 3);
    assert_eq!(
        kafka::count_records(&env.brokers(), &format!("{}-dlq", env.app)),
        0,
        "fail writes no dead letter"
    );
}

/// The address a child serves /metrics on (it binds port 0 and logs what it got).
fn metrics_addr(log: &std::path::Path) -> std::net::SocketAddr {
    wait_log(log, "serving /metrics");
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("serving /metrics"))
        .unwrap();
    let at = line.split("addr=").nth(1).unwrap();
    at.split_whitespace().next().unwrap().parse().unwrap()
}

/// The body of a child's /metrics page (axum answers with a Content-Length, not chunks).
fn scrape(addr: std::net::SocketAddr) -> String {
    let reply = http_get(addr, "/metrics");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Tasks with a `readstate_store_estimated_keys` series on a /metrics page.
fn exported_tasks(page: &str) -> std::collections::BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("readstate_store_estimated_keys{task=\""))
        .map(|l| l.split('"').next().unwrap().to_owned())
        .collect()
}

/// `promtool check metrics` on a page: its complaints (empty when clean).
fn promtool(page: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.success() {
        true => said,
        false => format!("exit {}: {said}", out.status),
    }
}

/// `/metrics` of `readstate run` passes `promtool check metrics` (every metric described,
/// counters present at zero, `readstate_build_info`); when a second instance takes half
/// the partitions, the first stops exporting the moved tasks' series, so dashboards never
/// count a task twice. Logs written to a file carry no colour codes.
#[test]
fn metrics_pass_promtool_and_moved_tasks_lose_their_series() {
    let env = Env::new();
    let events = zipf_workload(8, 2_000);
    env.produce(&events, 0);
    let topology = env.state.path().join("topology.toml");
    std::fs::write(&topology, env.topology_text()).unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let metrics = ["--metrics-addr", "127.0.0.1:0"];
    let mut a = spawn_cli_in(&env, &topology, dir_a.path(), &metrics);
    let log_a = dir_a.path().join("readstate.log");
    let addr_a = metrics_addr(&log_a);
    let all: std::collections::BTreeSet<String> = (0..PARTS).map(|p| format!("0_{p}")).collect();
    let page = wait_until("A to export all its tasks", Duration::from_secs(60), || {
        Some(scrape(addr_a)).filter(|page| exported_tasks(page) == all)
    });
    assert_eq!(promtool(&page), "", "promtool check metrics");
    for line in [
        "readstate_tasks_lost_total 0",
        "readstate_commits_failed_total 0",
        "readstate_dead_letters_total{reason=\"unknown_schema\"} 0",
        "# HELP readstate_events_consumed_total ",
        "readstate_build_info{version=\"",
    ] {
        assert!(page.contains(line), "no {line:?} in\n{page}");
    }
    let mut b = spawn_cli_in(&env, &topology, dir_b.path(), &metrics);
    let addr_b = metrics_addr(&dir_b.path().join("readstate.log"));
    wait_for(
        "A to hand series over to B (disjoint, all tasks)",
        Duration::from_secs(90),
        || {
            let (ta, tb) = (
                exported_tasks(&scrape(addr_a)),
                exported_tasks(&scrape(addr_b)),
            );
            let union: std::collections::BTreeSet<_> = ta.union(&tb).cloned().collect();
            !tb.is_empty() && ta.is_disjoint(&tb) && union == all
        },
    );
    assert_eq!(promtool(&scrape(addr_a)), "", "after the rebalance");
    terminate(&mut b);
    terminate(&mut a);
    let log = std::fs::read_to_string(&log_a).unwrap();
    assert!(
        log.contains("serving /metrics") && !log.contains('\u{1b}'),
        "colour codes in a log file"
    );
}
