//! The harness of the `readstate run` tests (restore, rebalance, faults, exactly-once, bad
//! input, end to end): `Env` (a broker, mock or real, with the topics of one random
//! application; producing, reading, stored states), `Instance` (an instance started
//! in-process through `App`), child processes of the binary, and the checks against the
//! oracle the test files share.
#![allow(dead_code)]

use kafka::{send, suffix};
use process::{signal, terminate, terminate_logged, wait_log, KillOnDrop, SpawnGuarded};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::BaseRecord;
use rdkafka::Message;
use readstate::kafka::KafkaSettings;
use readstate::model::{ReadEvent, ReceiptUpdate, StateKey};
use readstate::runtime::{run, RunConfig, RunSummary, RuntimeError};
use readstate::serde::avro::{AvroReadEvent, EventEncoder, UpdateDecoder};
use readstate::serde::registry::{SchemaResolver, LOCAL_READ_EVENT_ID, LOCAL_RECEIPT_UPDATE_ID};
use readstate::serde::{LocalRegistry, READ_EVENT_SCHEMA, RECEIPT_UPDATE_SCHEMA};
use readstate::state::ReadState;
use readstate::topology::{compile, Topology};
use readstate_cli::{App, AppError, RunningApp};
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use readstate_testing::process;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const PARTS: i32 = 4;

/// The broker a test runs against: librdkafka's in-process mock, or the real Apache Kafka
/// that `scripts/test` starts (`READSTATE_TEST_KAFKA`).
pub enum Broker {
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    Real(String),
    /// A real cluster of three nodes: topics replicated three times.
    Cluster(String),
}

impl Broker {
    pub fn real() -> Self {
        Broker::Real(std::env::var("READSTATE_TEST_KAFKA").expect(
            "READSTATE_TEST_KAFKA is not set: run scripts/test, which starts a private Apache Kafka",
        ))
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Mock(m) => m.bootstrap_servers(),
            Broker::Real(b) | Broker::Cluster(b) => b.clone(),
        }
    }

    /// Create a topic (on a real broker through the admin API, with `config`).
    pub fn create_topic(&self, name: &str, partitions: i32, config: &[(&str, &str)]) {
        match self {
            Broker::Mock(m) => m.create_topic(name, partitions, 1).unwrap(),
            Broker::Real(b) => kafka::create_topic(b, name, partitions, config),
            Broker::Cluster(b) => kafka::create_replicated_topic(b, name, partitions, 3, config),
        }
    }
}

pub struct Env {
    pub broker: Broker,
    pub app: String,
    pub source: String,
    pub output: String,
    pub state: tempfile::TempDir,
    /// `Some("reader_id")` etc.: the source is keyed by that field and repartitioned.
    pub keyed_by: Option<&'static str>,
    /// Run under exactly_once_v2.
    pub eos: bool,
    /// Partitions of the source and output topics.
    pub parts: i32,
    /// librdkafka properties of every instance ("key=value").
    pub props: Vec<&'static str>,
}

impl Env {
    pub fn new() -> Self {
        Self::keyed_by(None)
    }

    /// An environment whose source is keyed by `keyed_by` (None: by conversation_id).
    pub fn keyed_by(keyed_by: Option<&'static str>) -> Self {
        Self::on_mock(keyed_by)
    }

    pub fn on_mock(keyed_by: Option<&'static str>) -> Self {
        let broker = Broker::Mock(MockCluster::new(1).unwrap());
        let env = Self::on(broker, keyed_by);
        // The mock broker does not answer CreateTopics: internal topics are made here.
        env.create_internal_topics(&env.topology());
        env
    }

    /// The internal topics of `t` (repartition, rerouted, changelogs, dead letters), as
    /// `readstate run` creates them: the sources' partition count (one for the dead
    /// letters).
    pub fn create_internal_topics(&self, t: &Topology) {
        for (topic, _) in t.internal_topics() {
            let parts = if topic == t.dead_letter_topic {
                1
            } else {
                PARTS
            };
            self.broker.create_topic(topic.as_str(), parts, &[]);
        }
    }

    /// On the real broker: only the source and output topics exist; readstate creates
    /// its internal topics through the admin API.
    pub fn real() -> Self {
        Self::on(Broker::real(), None)
    }

    /// On the real broker under exactly_once_v2, the source keyed by `keyed_by`.
    pub fn real_exactly_once(keyed_by: Option<&'static str>) -> Self {
        let mut env = Self::on(Broker::real(), keyed_by);
        env.eos = true;
        env
    }

    pub fn on(broker: Broker, keyed_by: Option<&'static str>) -> Self {
        Self::on_with_parts(broker, keyed_by, PARTS)
    }

    /// On `broker`, the source and output topics with `parts` partitions.
    pub fn on_with_parts(broker: Broker, keyed_by: Option<&'static str>, parts: i32) -> Self {
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
            parts,
            props: Vec::new(),
        };
        env.broker.create_topic(&env.source, parts, &[]);
        env.broker.create_topic(&env.output, parts, &[]);
        env
    }

    pub fn mock(&self) -> &MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        match &self.broker {
            Broker::Mock(m) => m,
            _ => panic!("fault injection needs the mock broker"),
        }
    }

    pub fn topology(&self) -> Topology {
        compile(&self.topology_text()).unwrap()
    }

    pub fn topology_text(&self) -> String {
        self.topology_text_with_commit("200ms")
    }

    pub fn topology_text_with_commit(&self, commit_interval: &str) -> String {
        self.fixture("read_receipts.toml", "read-events", "receipt-updates")
            .set("application.commit_interval", commit_interval)
            .without("sink.postgres")
            .text()
    }

    /// `topologies/<file>` with this environment's names and settings: its `source` and
    /// `output` nodes on the environment's topics, the source keyed as the environment's,
    /// a 200 ms commit interval, no minimum emit interval.
    pub fn fixture(&self, file: &str, source: &str, output: &str) -> Shipped {
        Shipped::load(file).into_env(self, source, output)
    }

    /// The internal topic a source keyed by another field is repartitioned through (its
    /// source `read-events` in `topologies/read_receipts.toml`).
    pub fn repartition_topic(&self) -> String {
        format!("{}-read-events-repartition", self.app)
    }

    /// Sub-topology of the stateful tasks: 1 behind a repartition, else 0.
    pub fn task_dir(&self, p: i32) -> String {
        format!("{}_{p}", u8::from(self.keyed_by.is_some()))
    }

    pub fn brokers(&self) -> String {
        self.broker.bootstrap()
    }

    pub fn start(&self) -> Instance {
        self.start_in(self.state.path())
    }

    /// Start an instance with its own state directory.
    pub fn start_in(&self, state_dir: &std::path::Path) -> Instance {
        self.start_with(state_dir, Arc::new(LocalRegistry::new()))
    }

    /// Start an instance serving /metrics, /health and /ready on 127.0.0.1:0.
    pub fn start_observed(&self) -> (Instance, readstate::telemetry::Server) {
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

    pub fn start_with(
        &self,
        state_dir: &std::path::Path,
        resolver: Arc<dyn SchemaResolver>,
    ) -> Instance {
        self.start_cfg(state_dir, resolver, None)
    }

    pub fn start_cfg(
        &self,
        state_dir: &std::path::Path,
        resolver: Arc<dyn SchemaResolver>,
        health: Option<Arc<readstate::telemetry::Health>>,
    ) -> Instance {
        let mut cfg = self.config(state_dir, resolver, &self.props);
        if let Some(h) = health {
            cfg.health = h;
        }
        launch(cfg)
    }

    /// An instance's configuration, with librdkafka properties `props` ("key=value").
    pub fn config(
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
    pub fn produce_raw(&self, records: &[(String, Vec<u8>)]) {
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

    pub fn producer(&self) -> kafka::TestProducer {
        kafka::producer(&self.brokers())
    }

    pub fn produce(&self, events: &[ReadEvent], garbage_every: usize) -> usize {
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
    pub fn read_until<T>(
        &self,
        topic: &str,
        decode: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
        done: impl Fn(&[T]) -> bool,
    ) -> Vec<T> {
        kafka::read_until(&self.brokers(), topic, decode, done)
    }

    pub fn read_updates(&self, want: &HashMap<StateKey, Expected>) -> Vec<ReceiptUpdate> {
        self.read_updates_as(want, LOCAL_RECEIPT_UPDATE_ID)
    }

    /// Output updates under the schema generated for `ids` (registered by the instance
    /// under whatever id its registry gave it), until every key of `want` is at its max.
    pub fn read_typed_updates(
        &self,
        want: &HashMap<StateKey, Expected>,
        ids: &readstate::ids::IdTypes,
    ) -> Vec<ReceiptUpdate> {
        let schema = readstate::serde::receipt_update_schema(ids);
        let dec = std::sync::Mutex::new(
            UpdateDecoder::new(Arc::new(LocalRegistry::new()), &schema).unwrap(),
        );
        self.read_until(
            &self.output,
            |m| {
                let bytes = m.payload().unwrap();
                let mut dec = dec.lock().unwrap();
                let id = u32::from_be_bytes(bytes[1..5].try_into().unwrap());
                if dec.needs_fetch(id) {
                    dec.install(id, Some(&schema));
                }
                ReceiptUpdate::from(dec.decode(bytes).unwrap())
            },
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

    /// Output updates, written with schema id `schema_id` (registered by the instance).
    pub fn read_updates_as(
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
    pub fn stored_states(&self) -> HashMap<StateKey, ReadState> {
        self.stored_states_in(self.state.path())
    }

    pub fn stored_states_in(&self, dir: &std::path::Path) -> HashMap<StateKey, ReadState> {
        let sub = u8::from(self.keyed_by.is_some());
        stored_states(&dir.join(&self.app), sub, self.parts)
    }
}

/// A shipped topology put on an [`Env`].
pub trait IntoEnv {
    /// Its `source` and `output` nodes on the environment's topics, the source keyed as the
    /// environment's, a 200 ms commit interval, no minimum emit interval.
    fn into_env(self, env: &Env, source: &str, output: &str) -> Shipped;
}

impl IntoEnv for Shipped {
    fn into_env(self, env: &Env, source: &str, output: &str) -> Shipped {
        let guarantee = match env.eos {
            true => "exactly_once_v2",
            false => "at_least_once",
        };
        self.set("application.id", env.app.as_str())
            .set("application.commit_interval", "200ms")
            .set(
                "application.state_dir",
                env.state.path().display().to_string(),
            )
            .set("application.processing_guarantee", guarantee)
            .set(&format!("source.{source}.topic"), env.source.as_str())
            .set(
                &format!("source.{source}.keyed_by"),
                env.keyed_by.unwrap_or("conversation_id"),
            )
            .set(&format!("sink.{output}.topic"), env.output.as_str())
            .set("processor.read-state.min_emit_interval", "0s")
    }
}

/// A header's value as text.
pub fn header(m: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    readstate_testing::http_get(addr, path).unwrap()
}

/// An instance started in-process through the binary's composition root.
pub struct Instance(pub RunningApp);

/// Start an instance (stream thread, no sinks).
pub fn launch(cfg: RunConfig) -> Instance {
    Instance(App::new(cfg).start().expect("instance starts"))
}

impl Instance {
    pub fn stop(self) -> RunSummary {
        self.0.stop().expect("instance runs")
    }

    /// Wait (bounded) for the instance to stop by itself; its error.
    pub fn failure(self) -> RuntimeError {
        self.failure_beside(None)
    }

    /// The same while `other` runs beside it (it must not stop first).
    pub fn failure_beside(self, other: Option<&Instance>) -> RuntimeError {
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

pub fn check_final_state(env: &Env, want: &HashMap<StateKey, Expected>) {
    let stored = env.stored_states();
    assert_eq!(stored.len(), want.len());
    assert_states_match(want, |k| stored.get(k).cloned());
}

/// Per key, versions never go backwards; equal versions carry equal pointers (duplicates
/// after a crash or a rebalance); the last update equals the oracle.
pub fn check_output_monotonic(updates: &[ReceiptUpdate], want: &HashMap<StateKey, Expected>) {
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

pub fn spawn_cli(env: &Env, topology: &std::path::Path) -> KillOnDrop {
    std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args(["run", "--local-schemas", "--topology"])
        .arg(topology)
        .env("KAFKA_BROKERS", env.brokers())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn_guarded()
}

pub fn sigkill_mid_stream_then_restart(env: Env, seed: u64) {
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

pub fn instances_joining_and_leaving(env: Env) {
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
        sa.lifecycle.tasks_opened > 0 && sb.lifecycle.tasks_opened > 0,
        "both instances ran tasks: {sa:?} {sb:?}"
    );
    check_output_monotonic(&updates, &want);
    // B owned every partition at the end: its stores hold the whole, exact state.
    let stored = env.stored_states_in(dir_b.path());
    assert_states_match(&want, |k| stored.get(k).cloned());
}

/// The reader schema without two optional fields: what an older upstream service writes.
pub fn v1_writer_schema() -> String {
    let mut v: serde_json::Value = serde_json::from_str(READ_EVENT_SCHEMA).unwrap();
    let fields = v["fields"].as_array_mut().unwrap();
    fields.retain(|f| f["name"] != "client" && f["name"] != "trace_id");
    v.to_string()
}

/// The reader schema plus a field readstate does not know: what a newer service writes.
pub fn v2_writer_schema() -> String {
    let mut v: serde_json::Value = serde_json::from_str(READ_EVENT_SCHEMA).unwrap();
    v["fields"].as_array_mut().unwrap().push(serde_json::json!(
        {"name": "thread_id", "type": ["null", "long"], "default": null}
    ));
    v.to_string()
}

/// Confluent wire format with a writer schema of the test's own (apache-avro's generic
/// `Value` path, independent of readstate's encoder).
pub fn encode_with(schema_text: &str, id: u32, e: &ReadEvent) -> Vec<u8> {
    use apache_avro::types::{Record, Value};
    let schema = apache_avro::Schema::parse_str(schema_text).unwrap();
    let mut r = Record::new(&schema).unwrap();
    let has = |name: &str| schema_text.contains(&format!("\"{name}\""));
    r.put("reader_id", e.reader_id.as_int().unwrap());
    r.put("conversation_id", e.conversation_id.as_int().unwrap());
    r.put("message_seq", e.message_seq);
    r.put("message_id", e.message_id.clone());
    r.put(
        "sender_id",
        e.sender_id.as_ref().map(|s| s.as_int().unwrap()),
    );
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

// ---- Faults: the task lifecycle under pauses, failed produces, long restores and
// registry outages.

/// `readstate run` as a child process with its own state directory and extra arguments.
pub fn spawn_cli_in(
    env: &Env,
    topology: &std::path::Path,
    state_dir: &std::path::Path,
    extra: &[&str],
) -> KillOnDrop {
    spawn_cli_with(env, topology, state_dir, extra, &[])
}

/// The same with environment variables `vars` (e.g. `DATABASE_URL`).
pub fn spawn_cli_with(
    env: &Env,
    topology: &std::path::Path,
    state_dir: &std::path::Path,
    extra: &[&str],
    vars: &[(&str, &str)],
) -> KillOnDrop {
    std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
        .envs(vars.iter().copied())
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
        .spawn_guarded()
}

/// Per key, in changelog order: pointer, version and event count never go down.
pub fn check_changelog_monotonic(env: &Env) -> usize {
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
pub fn check_restored_state(env: &Env, want: &HashMap<StateKey, Expected>) {
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
        s.lifecycle.tasks_opened, PARTS as u64,
        "it owned every partition: {s:?}"
    );
    let stored = env.stored_states_in(dir.path());
    assert_eq!(stored.len(), want.len());
    assert_states_match(want, |k| stored.get(k).cloned());
}

pub fn sigstop_then_sigcont(env: Env) {
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
    terminate_logged(&mut a, "A", process::log_in(dir_a.path()));
    terminate_logged(&mut b, "B", process::log_in(dir_b.path()));
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
    if env.eos {
        // Being fenced is how a zombie is expected to end: readstate says it at WARN
        // (tasks lost, producer recreated), not librdkafka at ERROR (issue 26).
        let fenced_errors: Vec<&str> = log_a
            .lines()
            .filter(|l| l.contains("ERROR"))
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("fenced") || l.contains("epoch")
            })
            .collect();
        assert!(fenced_errors.is_empty(), "{}", fenced_errors.join("\n"));
    }
    check_output_monotonic(&updates, &want);
    if env.eos {
        check_each_version_once(&updates);
    }
    check_changelog_monotonic(&env);
    check_restored_state(&env, &want);
}

/// Under exactly_once_v2 a read_committed consumer sees each (key, version) once.
pub fn check_each_version_once(updates: &[ReceiptUpdate]) {
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
pub fn wait_consumed(progress: &readstate::telemetry::Progress, n: usize) {
    wait_for(
        "records were never consumed",
        Duration::from_secs(90),
        || readstate::telemetry::Progress::get(&progress.records_consumed) >= n as u64,
    );
}

/// Every produce request fails for good (the broker says the message is too large) while
/// this guard lives.
pub struct FailingProduces<'a>(pub &'a Env);

impl<'a> FailingProduces<'a> {
    pub fn start(env: &'a Env) -> Self {
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

/// Why an instance refused to start.
pub fn refused(cfg: RunConfig) -> String {
    run(cfg, Arc::new(AtomicBool::new(false)))
        .unwrap_err()
        .to_string()
}

/// `cleanup.policy` of a topic, through DescribeConfigs.
pub fn cleanup_policy(brokers: &str, topic: &str) -> String {
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

/// The address a child serves /metrics on (it binds port 0 and logs what it got).
pub fn metrics_addr(log: &std::path::Path) -> std::net::SocketAddr {
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
pub fn scrape(addr: std::net::SocketAddr) -> String {
    let reply = http_get(addr, "/metrics");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Tasks with a `readstate_store_estimated_keys` series on a /metrics page.
pub fn exported_tasks(page: &str) -> std::collections::BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("readstate_store_estimated_keys{task=\""))
        .map(|l| l.split('"').next().unwrap().to_owned())
        .collect()
}

/// `promtool check metrics` on a page: its complaints (empty when clean).
pub fn promtool(page: &str) -> String {
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
