//! A bounded chaos scenario: three `readstate run` processes (each with its embedded
//! PostgreSQL sink) over 16 partitions of an in-process broker, a producer writing a Zipf
//! workload with reordering, duplicates and stale re-reads, and one after the other:
//! kill -9; kill -9 with the state directory deleted; SIGTERM; SIGSTOP past the session
//! timeout, then SIGCONT; a fourth instance joining and leaving; PostgreSQL refusing
//! connections for a while. Every instance that goes is started again.
//!
//! At the end, per key: the output topic and the changelog never regress, PostgreSQL rows
//! hold the true max pointer and version, and a fresh restore from the changelog gives the
//! exact state, counts included. `READSTATE_CHAOS_EVENTS` sets the workload size.

use readstate_testing::db;
use readstate_testing::kafka;
use readstate_testing::process;
use readstate_testing::process::SpawnGuarded;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use db::Db;
use kafka::suffix;
use process::{signal, terminate_logged_past_upstream_abort, KillOnDrop};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::Message;
use readstate::kafka::KafkaSettings;
use readstate::model::{ReceiptUpdate, StateKey};
use readstate::runtime::RunConfig;
use readstate::serde::avro::UpdateDecoder;
use readstate::serde::registry::LOCAL_RECEIPT_UPDATE_ID;
use readstate::serde::{LocalRegistry, RECEIPT_UPDATE_SCHEMA};
use readstate::state::ReadState;
use readstate::topology::compile;
use readstate_testing::fixtures::*;

const PARTS: i32 = 16;
const SESSION_TIMEOUT_MS: u64 = 6_000;

struct Scenario {
    mock: MockCluster<'static, DefaultProducerContext>,
    app: String,
    source: String,
    output: String,
    topology: PathBuf,
    text: String,
    db: Db,
    root: tempfile::TempDir,
}

impl Scenario {
    fn new() -> Self {
        let mock = MockCluster::new(1).unwrap();
        let s = suffix();
        let app = format!("chaos-{s}");
        let (source, output) = (format!("events-{s}"), format!("updates-{s}"));
        for t in [&source, &output] {
            mock.create_topic(t, PARTS, 1).unwrap();
        }
        let root = tempfile::tempdir().unwrap();
        let text = format!(
            "{}\n[[sink]]\nname = \"postgres\"\nkind = \"postgres\"\ninput = \"receipt-updates\"\nbatch_size = 500\nlinger = \"100ms\"\n",
            topology_text(&app, "200ms", "./unused", &source, &output, "0s")
        );
        let topology = root.path().join("topology.toml");
        std::fs::write(&topology, &text).unwrap();
        let compiled = readstate::topology::compile(&text).unwrap();
        readstate_testing::kafka::create_internal_topics(&mock, &compiled, PARTS);
        let db = Db::create();
        db.migrate();
        Self {
            mock,
            app,
            source,
            output,
            topology,
            text,
            db,
            root,
        }
    }

    fn node_dir(&self, n: usize) -> PathBuf {
        self.root.path().join(format!("node-{n}"))
    }

    /// `readstate run` number `n` (its own state directory and log file).
    fn spawn(&self, n: usize) -> KillOnDrop {
        let dir = self.node_dir(n);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join(format!("node-{n}.log")))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_readstate"))
            .args(["run", "--local-schemas", "--topology"])
            .arg(&self.topology)
            .arg("--state-dir")
            .arg(&dir)
            .args(["-X", &format!("session.timeout.ms={SESSION_TIMEOUT_MS}")])
            .args(["-X", "heartbeat.interval.ms=500"])
            .env("KAFKA_BROKERS", self.mock.bootstrap_servers())
            .env("DATABASE_URL", &self.db.url)
            .env("RUST_LOG", "warn,readstate=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn_guarded()
    }

    /// The last 6 KB of node `n`'s log.
    fn tail(&self, n: usize) -> String {
        self.log_since(n, self.log_len(n).saturating_sub(6000))
    }

    fn log_len(&self, n: usize) -> usize {
        std::fs::read(self.root.path().join(format!("node-{n}.log"))).map_or(0, |b| b.len())
    }

    /// What node `n` logged after byte `from` of its log.
    fn log_since(&self, n: usize, from: usize) -> String {
        let b = std::fs::read(self.root.path().join(format!("node-{n}.log"))).unwrap_or_default();
        String::from_utf8_lossy(b.get(from..).unwrap_or_default()).into_owned()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for n in 0..4 {
            if let Ok(t) = std::fs::read_to_string(self.root.path().join(format!("node-{n}.log"))) {
                let tail: Vec<&str> = t.lines().rev().take(30).collect();
                out += &format!("--- node {n} (last lines)\n");
                for l in tail.into_iter().rev() {
                    out += l;
                    out.push('\n');
                }
            }
        }
        out
    }

    fn output_records(&self) -> i64 {
        kafka::end_offsets(&self.mock.bootstrap_servers(), &self.output)
            .iter()
            .sum()
    }
}

fn kill9(child: &mut Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Wait (bounded, through the tests' one wait helper) until `cond` holds; a timeout
/// prints the children's logs.
fn wait_for(s: &Scenario, what: &str, limit: Duration, cond: impl Fn() -> bool) {
    readstate_testing::fixtures::wait_until_explained(
        what,
        limit,
        || cond().then_some(()),
        || s.logs(),
    );
}

fn pause(d: Duration) {
    // The length of a fault, not a synchronisation.
    std::thread::sleep(d);
}

#[test]
fn chaos_three_instances_with_kills_pauses_wipes_and_a_database_outage() {
    let n: usize = std::env::var("READSTATE_CHAOS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let s = Scenario::new();
    let events = zipf_workload(21, n);
    let want = oracle(&events);
    // Killed if the test fails: a failed run leaves no instance behind.
    let mut nodes: Vec<KillOnDrop> = (0..3).map(|i| s.spawn(i)).collect();
    let producer = kafka::produce_paced(
        s.mock.bootstrap_servers(),
        s.source.clone(),
        events.clone(),
        (n / 300).max(10),
    );
    wait_for(&s, "first output", Duration::from_secs(60), || {
        s.output_records() > 0
    });
    eprintln!("chaos: kill -9 node 0, restart");
    kill9(&mut nodes[0].0);
    let restarted_at = s.log_len(0);
    nodes[0] = s.spawn(0);
    pause(Duration::from_secs(3));
    eprintln!("chaos: kill -9 node 1, delete its state, restart");
    kill9(&mut nodes[1].0);
    std::fs::remove_dir_all(s.node_dir(1)).unwrap();
    nodes[1] = s.spawn(1);
    pause(Duration::from_secs(3));
    eprintln!("chaos: SIGTERM node 2, restart");
    terminate_logged_past_upstream_abort(&mut nodes[2].0, "node 2", || s.tail(2));
    nodes[2] = s.spawn(2);
    pause(Duration::from_secs(3));
    eprintln!("chaos: SIGSTOP node 0 past the session timeout, then SIGCONT");
    wait_for(
        &s,
        "node 0 to own partitions again",
        Duration::from_secs(60),
        || s.log_since(0, restarted_at).contains("task restored"),
    );
    let stopped_at = s.log_len(0);
    signal(&nodes[0].0, "STOP");
    pause(Duration::from_millis(SESSION_TIMEOUT_MS * 2));
    signal(&nodes[0].0, "CONT");
    eprintln!("chaos: node 3 joins, then leaves");
    let mut extra = s.spawn(3);
    let log3 = s.root.path().join("node-3.log");
    wait_for(
        &s,
        "node 3 to be given partitions",
        Duration::from_secs(60),
        || std::fs::read_to_string(&log3).is_ok_and(|l| l.contains("task restored")),
    );
    terminate_logged_past_upstream_abort(&mut extra.0, "node 3", || s.tail(3));
    eprintln!("chaos: PostgreSQL refuses connections for 8 s");
    s.db.block();
    pause(Duration::from_secs(8));
    s.db.unblock();
    producer.join().unwrap();
    eprintln!("chaos: waiting for PostgreSQL to hold the true max of every key");
    wait_for(
        &s,
        "PostgreSQL to match the oracle",
        Duration::from_secs(180),
        || {
            let rows = s.db.rows().unwrap_or_default();
            rows.len() == want.len()
                && want.iter().all(|(k, x)| {
                    rows.get(k).is_some_and(|r| {
                        r.seq == x.max_seq && r.version == x.advances && r.device == x.device_of_max
                    })
                })
        },
    );
    for (i, c) in nodes.iter_mut().enumerate() {
        terminate_logged_past_upstream_abort(&mut c.0, &format!("node {i}"), || s.tail(i));
    }
    let log0 = s.log_since(0, stopped_at);
    assert!(
        log0.contains("tasks lost"),
        "node 0, paused past its session timeout, closed its tasks dirty\n{}",
        s.logs()
    );
    let mut restored_total = 0;
    for n in 0..4 {
        let log = std::fs::read_to_string(s.root.path().join(format!("node-{n}.log")))
            .unwrap_or_default();
        let count = |what: &str| log.matches(what).count();
        let restored = restored_records(&log);
        restored_total += restored;
        eprintln!(
            "chaos: node {n}: {} loss(es) ({} wiping stores), {} commit(s) postponed by a rebalance, {} restore(s) of {restored} changelog records, {} assignment(s)",
            count("tasks lost"),
            count("stores wiped"),
            count("commit postponed"),
            count("task restored"),
            count("assigned")
        );
    }
    eprintln!(
        "chaos: {restored_total} changelog records restored for {n} input records ({:.2} per input record)",
        restored_total as f64 / n as f64
    );
    let outputs = check_output(&s, &want);
    let changelog = check_changelog(&s);
    check_restore(&s, &want);
    eprintln!(
        "chaos: PASS: {n} events, {} keys, {outputs} output records and {changelog} changelog records without a regression; PostgreSQL and the restored stores equal the oracle",
        want.len()
    );
}

/// The changelog records a node's log says it restored (`task restored ... records=N`).
fn restored_records(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("task restored"))
        .filter_map(|l| l.split("records=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Every output record in offset order: per key, pointer and version never go down, and
/// the last one is the oracle's.
fn check_output(s: &Scenario, want: &HashMap<StateKey, Expected>) -> usize {
    let reg = Arc::new(LocalRegistry::new());
    let mut dec = UpdateDecoder::new(reg, RECEIPT_UPDATE_SCHEMA).unwrap();
    let mut header = vec![0u8];
    header.extend_from_slice(&LOCAL_RECEIPT_UPDATE_ID.to_be_bytes());
    futures::executor::block_on(dec.prepare(std::iter::once(Some(header.as_slice())))).unwrap();
    let total = s.output_records();
    let updates = kafka::read_until(
        &s.mock.bootstrap_servers(),
        &s.output,
        |m| ReceiptUpdate::from(dec.decode(m.payload().unwrap()).unwrap()),
        |u: &[ReceiptUpdate]| u.len() as i64 >= total,
    );
    let mut last: HashMap<StateKey, &ReceiptUpdate> = HashMap::new();
    for u in &updates {
        if let Some(p) = last.get(&u.key()) {
            assert!(
                u.version >= p.version && u.last_read_seq >= p.last_read_seq,
                "output regressed for {:?}: v{} seq {} then v{} seq {}",
                u.key(),
                p.version,
                p.last_read_seq,
                u.version,
                u.last_read_seq
            );
        }
        last.insert(u.key(), u);
    }
    for (k, x) in want {
        assert_eq!(last[k].last_read_seq, x.max_seq, "output pointer of {k:?}");
        assert_eq!(last[k].version, x.advances, "output version of {k:?}");
    }
    updates.len()
}

/// Per key, in changelog order: pointer, version and event count never go down.
fn check_changelog(s: &Scenario) -> usize {
    let topic = format!("{}-read-state-changelog", s.app);
    let records = kafka::read_all(&s.mock.bootstrap_servers(), &topic, |m| {
        (
            m.key().unwrap().to_vec(),
            ReadState::decode(m.payload().unwrap()).unwrap(),
        )
    });
    let mut last: HashMap<&[u8], &ReadState> = HashMap::new();
    for (k, st) in &records {
        if let Some(p) = last.get(k.as_slice()) {
            assert!(
                st.last_read_seq >= p.last_read_seq
                    && st.version >= p.version
                    && st.events_total >= p.events_total,
                "changelog regressed for {k:02x?}: {p:?} then {st:?}"
            );
        }
        last.insert(k, st);
    }
    records.len()
}

/// A fresh instance restores every partition from the changelog: exact state, counts
/// included.
fn check_restore(s: &Scenario, want: &HashMap<StateKey, Expected>) {
    let dir = tempfile::tempdir().unwrap();
    let topology = compile(&s.text).unwrap();
    let mut cfg = RunConfig::new(
        topology,
        KafkaSettings::new(s.mock.bootstrap_servers()),
        Arc::new(LocalRegistry::new()),
    );
    cfg.state_dir = dir.path().to_path_buf();
    let inst = readstate_cli::App::new(cfg)
        .with_database(s.db.url.clone())
        .start()
        .unwrap();
    wait_for(
        s,
        "the fresh instance to restore",
        Duration::from_secs(120),
        || inst.health().is_ready(),
    );
    inst.stop().unwrap();
    let stored = stored_states(&dir.path().join(&s.app), 0, PARTS);
    assert_eq!(stored.len(), want.len());
    assert_states_match(want, |k| stored.get(k).cloned());
}
