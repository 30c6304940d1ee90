//! The PostgreSQL sink against a real PostgreSQL and an in-process Kafka (MockCluster).
//!
//! `scripts/test` starts a private PostgreSQL and exports its URL as
//! `READSTATE_TEST_DATABASE_URL`; every test works in a database of its own.

use readstate_testing::db;
use readstate_testing::kafka;
use readstate_testing::process::{KillOnDrop, SpawnGuarded};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use db::Db;
use kafka::{send, suffix};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext};
use readstate::ids::{ConversationId, ReaderId, SenderId};
use readstate::kafka::KafkaSettings;
use readstate::model::{ReceiptUpdate, StateKey};
use readstate::runtime::RunConfig;
use readstate::serde::avro::{AvroReceiptUpdate, UpdateEncoder};
use readstate::serde::registry::LOCAL_RECEIPT_UPDATE_ID;
use readstate::serde::{LocalRegistry, RECEIPT_UPDATE_SCHEMA};
use readstate::sink::{run_sink, SinkConfig, SinkSummary};
use readstate::topology::compile;
use readstate_testing::fixtures::*;

const PARTS: i32 = 4;

/// A broker with the output and dead-letter topics.
struct Kafka {
    mock: MockCluster<'static, DefaultProducerContext>,
    app: String,
    output: String,
    dlq: String,
}

impl Kafka {
    fn new() -> Self {
        readstate_testing::fixtures::capture_logs();
        let mock = MockCluster::new(1).unwrap();
        let s = suffix();
        let k = Kafka {
            mock,
            app: format!("app-{s}"),
            output: format!("updates-{s}"),
            dlq: format!("app-{s}-dlq"),
        };
        k.mock.create_topic(&k.output, PARTS, 1).unwrap();
        k.mock.create_topic(&k.dlq, 1, 1).unwrap();
        k
    }

    fn brokers(&self) -> String {
        self.mock.bootstrap_servers()
    }

    /// The stream's internal topics besides the dead letters: the mock does not answer
    /// CreateTopics.
    fn create_stream_topics(&self) {
        let changelog = format!("{}-read-state-changelog", self.app);
        self.mock.create_topic(&changelog, PARTS, 1).unwrap();
    }

    fn group(&self) -> String {
        format!("{}-pg-sink", self.app)
    }

    /// Produce updates to the output topic as the stream processor does.
    fn produce(&self, updates: &[ReceiptUpdate]) {
        produce_updates(&self.brokers(), &self.output, updates);
    }

    fn records(&self) -> i64 {
        kafka::end_offsets(&self.brokers(), &self.output)
            .iter()
            .sum()
    }

    fn sink_config(&self, db: &Db, batch_size: usize, linger: Duration) -> SinkConfig {
        SinkConfig {
            group: self.group(),
            topic: self.output.clone(),
            dead_letter_topic: self.dlq.clone(),
            batch_size,
            linger,
            kafka: KafkaSettings::new(self.brokers()),
            resolver: Arc::new(LocalRegistry::new()),
            table: Arc::new(db.table()),
            progress: Default::default(),
            health: readstate::telemetry::Health::new(),
            topics_ready: None,
        }
    }

    /// Dead letters: (reason, partition header) per record.
    fn dead_letters(&self, at_least: usize) -> Vec<String> {
        kafka::read_until(
            &self.brokers(),
            &self.dlq,
            |m| {
                use rdkafka::message::{Headers, Message};
                m.headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|x| x.key == "readstate.error.reason")
                            .and_then(|x| x.value)
                    })
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            },
            |d| d.len() >= at_least,
        )
    }
}

/// Produce updates to `topic` as the stream processor does (keyed by conversation).
fn produce_updates(brokers: &str, topic: &str, updates: &[ReceiptUpdate]) {
    let p = kafka::producer(brokers);
    let enc = UpdateEncoder::new(RECEIPT_UPDATE_SCHEMA, LOCAL_RECEIPT_UPDATE_ID).unwrap();
    for u in updates {
        let key = u.conversation_id.0.to_string();
        let v = enc.encode(&AvroReceiptUpdate::from(u)).unwrap();
        send(
            &p,
            BaseRecord::to(topic)
                .key(key.as_str())
                .payload(v.as_slice()),
        );
    }
    kafka::flush(&p);
}

struct Running<T> {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<T>,
}

impl<T> Running<T> {
    fn stop(self) -> T {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn start_sink(cfg: SinkConfig) -> Running<SinkSummary> {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let handle = std::thread::spawn(move || run_sink(cfg, s2).expect("sink runs"));
    Running { stop, handle }
}

/// Updates as the stream processor would emit them for `keys` keys (several versions
/// each), shuffled across keys, with some duplicates.
fn update_stream(seed: u64, keys: i64, max_versions: i64) -> Vec<ReceiptUpdate> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for k in 0..keys {
        for v in 1..=rng.gen_range(1..=max_versions) {
            let u = ReceiptUpdate {
                conversation_id: ConversationId::from(k / 4),
                reader_id: ReaderId::from(k % 4),
                last_read_seq: v * 3,
                message_id: Some(format!("m-{k}-{v}")),
                sender_id: Some(SenderId::from(7)),
                device_id: Some(format!("d{}", v % 3)),
                read_at_ms: Some(1_700_000_000_000 + v),
                version: v,
                events_folded: 2,
                stale_events: 1,
                events_total: v * 2,
                stale_total: v,
                emitted_at_ms: 0,
                counts: None,
            };
            if rng.gen_bool(0.05) {
                out.push(u.clone());
            }
            out.push(u);
        }
    }
    out.shuffle(&mut rng);
    out
}

/// The highest version per key: what the table must hold.
fn latest(updates: &[ReceiptUpdate]) -> HashMap<StateKey, ReceiptUpdate> {
    let mut m: HashMap<StateKey, ReceiptUpdate> = HashMap::new();
    for u in updates {
        if m.get(&u.key()).is_none_or(|o| o.version < u.version) {
            m.insert(u.key(), u.clone());
        }
    }
    m
}

fn records_applied(db: &Db, group: &str) -> i64 {
    db.offsets(group).unwrap().values().map(|(_, n)| n).sum()
}

/// Rows equal the oracle; a row the database rejects goes to the DLQ; the offsets table
/// accounts for every record exactly once; re-reading the topic from the beginning
/// changes no row (not even `updated_at`).
/// A receipts table made for 64-bit ids refuses a topology declaring string and UUID ids
/// (`[ids]`), naming every column that differs, at migrate and when a sink starts; the
/// types it was made for still pass.
#[test]
fn a_table_with_other_id_types_is_refused() {
    use readstate::ids::{IdType, IdTypes};
    let db = Db::create();
    db.migrate();
    let ids = IdTypes {
        conversation: IdType::String,
        user: IdType::String,
        message: IdType::Uuid,
    };
    let says = |e: String| {
        for part in [
            "table read_receipts does not match the topology's [ids]",
            "conversation_id is bigint, the topology's string ids need text",
            "reader_id is bigint",
            "sender_id is bigint",
            "message_id is text, the topology's uuid ids need uuid",
        ] {
            assert!(e.contains(part), "{part:?} in {e}");
        }
    };
    says(db.migrate_with(ids).unwrap_err().to_string());
    let table = db.table().with_ids(ids);
    says(
        db.rt
            .block_on(table.check_migrated())
            .unwrap_err()
            .to_string(),
    );
    db.migrate_with(IdTypes::default()).unwrap();
    db.rt.block_on(db.table().check_migrated()).unwrap();
}

#[test]
fn sink_rows_equal_the_oracle_and_a_replay_changes_nothing() {
    let (db, k) = (Db::create(), Kafka::new());
    db.migrate();
    let mut updates = update_stream(1, 3_000, 8);
    let want = latest(&updates);
    // A poison row: its read_at is beyond PostgreSQL's timestamp range.
    let mut poison = updates[0].clone();
    poison.conversation_id = ConversationId::from(1_000_000);
    poison.read_at_ms = Some(i64::MAX / 2);
    updates.insert(updates.len() / 2, poison);
    k.produce(&updates);

    let sink = start_sink(k.sink_config(&db, 500, Duration::from_millis(200)));
    let rows = db.wait_rows(&want);
    let summary = sink.stop();
    assert_eq!(k.dead_letters(1), vec!["rejected_by_database".to_owned()]);
    assert_eq!(records_applied(&db, &k.group()), k.records());
    assert_eq!(summary.records as i64, k.records());
    assert!(
        summary.statements <= summary.batches,
        "one upsert per batch: {summary:?}"
    );
    assert!(summary.batches >= (want.len() as u64).div_ceil(500));
    eprintln!(
        "sink: {} records -> {} rows in {} statements ({summary:?})",
        updates.len(),
        want.len(),
        summary.statements
    );

    // Replay: forget the stored offsets; the sink starts from the beginning.
    let c = db.connect(&db.url).unwrap();
    db.rt
        .block_on(c.execute("DELETE FROM readstate_sink_offsets", &[]))
        .unwrap();
    let sink = start_sink(k.sink_config(&db, 500, Duration::from_millis(200)));
    wait_for("the replay to finish", Duration::from_secs(60), || {
        db.offsets(&k.group())
            .map(|o| o.values().map(|x| x.1).sum::<i64>())
            == Some(k.records())
    });
    let replay = sink.stop();
    assert_eq!(replay.rows_changed, 0, "{replay:?}");
    assert_eq!(db.rows().unwrap(), rows, "a replay rewrote rows");
}

/// `run` and the sink together: raw events in, the oracle's max per key in PostgreSQL, with
/// far fewer statements than events.
#[test]
fn end_to_end_run_then_sink_matches_the_oracle() {
    let (db, k) = (Db::create(), Kafka::new());
    db.migrate();
    let source = format!("events-{}", suffix());
    k.mock.create_topic(&source, PARTS, 1).unwrap();
    k.create_stream_topics();
    let state = tempfile::tempdir().unwrap();
    let topology = compile(&topology_text(
        &k.app,
        "200ms",
        &state.path().display().to_string(),
        &source,
        &k.output,
        "0s",
    ))
    .unwrap();
    let events = workload(11, 2_000, 12);
    let p = kafka::producer(&k.brokers());
    kafka::send_events(&p, &source, &events);
    kafka::flush(&p);

    let cfg = RunConfig::new(
        topology,
        KafkaSettings::new(k.brokers()),
        Arc::new(LocalRegistry::new()),
    );
    let inst = readstate_cli::App::new(cfg)
        .start()
        .expect("instance starts");
    let cfg = k.sink_config(&db, 500, Duration::from_millis(200));
    let progress = cfg.progress.clone();
    let sink = start_sink(cfg);
    let oracle = oracle(&events);
    // Counters are as of the last emitted update: stale events after the last advance
    // emit nothing (exact counts are in the store).
    let fits = |x: &Expected, r: &db::Row| {
        r.seq == x.max_seq
            && r.version == x.advances
            && r.device == x.device_of_max
            && (x.advances..=x.events).contains(&r.events_total)
            && r.stale_total <= x.events - x.advances
    };
    let differing = |rows: &HashMap<StateKey, db::Row>| -> Vec<String> {
        oracle
            .iter()
            .filter(|(key, x)| !rows.get(*key).is_some_and(|r| fits(x, r)))
            .map(|(key, x)| format!("{key:?}: want {x:?}, row {:?}", rows.get(key)))
            .collect()
    };
    readstate_testing::wait_until_explained(
        "PostgreSQL to match the oracle",
        Duration::from_secs(120),
        || {
            let rows = db.rows().unwrap_or_default();
            (rows.len() == oracle.len() && differing(&rows).is_empty()).then_some(())
        },
        || {
            let rows = db.rows().unwrap_or_default();
            let differ = differing(&rows);
            format!(
                "{} rows for {} keys; {} differ, e.g. {:?}; output topic ends {:?}; sink {:?}",
                rows.len(),
                oracle.len(),
                differ.len(),
                &differ[..differ.len().min(3)],
                kafka::end_offsets(&k.brokers(), &k.output),
                progress
            )
        },
    );
    let run_summary = inst.stop().expect("instance runs");
    let summary = sink.stop();
    assert!(summary.statements <= summary.batches);
    assert!(
        summary.statements * 20 < events.len() as u64,
        "write reduction: {} events, {} statements",
        events.len(),
        summary.statements
    );
    eprintln!(
        "{} events -> {} updates -> {} rows, {} statements",
        events.len(),
        run_summary.updates_emitted,
        oracle.len(),
        summary.statements
    );
}

/// The database goes away for 15 s mid-stream (connections killed, new ones refused):
/// the sink pauses and retries, its lag rises, and after the database returns the rows
/// equal the oracle and the lag falls back to zero. No row ever moves backwards.
#[test]
fn outage_mid_stream_pauses_then_catches_up_without_regression() {
    let (db, k) = (Db::create(), Kafka::new());
    db.migrate();
    let updates = update_stream(2, 2_000, 10);
    let (first, second) = updates.split_at(updates.len() / 2);
    let want = latest(&updates);
    k.produce(first);
    let sink = start_sink(k.sink_config(&db, 200, Duration::from_millis(100)));
    db.wait_rows(&latest(first));

    // A watcher samples the table and checks that no version ever goes down.
    let watching = Arc::new(AtomicBool::new(true));
    let sampled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watcher = {
        let (url, watching, sampled) = (db.url.clone(), watching.clone(), sampled.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut seen: HashMap<(i64, i64), i64> = HashMap::new();
            let mut samples = 0;
            while watching.load(Ordering::Relaxed) {
                let rows = rt.block_on(async {
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    c.query(
                        "SELECT conversation_id, reader_id, version FROM read_receipts",
                        &[],
                    )
                    .await
                });
                if let Ok(rows) = rows {
                    samples += 1;
                    sampled.fetch_add(1, Ordering::Relaxed);
                    for r in rows {
                        let v: i64 = r.get(2);
                        let prev = seen.insert((r.get(0), r.get(1)), v).unwrap_or(0);
                        assert!(v >= prev, "a row regressed from version {prev} to {v}");
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            samples
        })
    };

    db.block();
    k.produce(second);
    let group = k.group();
    let lag = || -> i64 {
        let end = kafka::end_offsets(&k.brokers(), &k.output);
        let done = kafka::committed(&k.brokers(), &group, &k.output);
        end.iter().zip(done).map(|(e, c)| e - c.max(0)).sum()
    };
    let outage_started = Instant::now();
    let mut lag_during = 0;
    while outage_started.elapsed() < Duration::from_secs(15) {
        lag_during = lag_during.max(lag());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        lag_during >= second.len() as i64 / 2,
        "lag rose during the outage: {lag_during}"
    );
    db.unblock();
    db.wait_rows(&want);
    wait_for(
        "the lag to fall back to zero",
        Duration::from_secs(60),
        || lag() == 0,
    );
    // The watcher samples the caught-up table too (the catch-up can take less than its
    // sampling period: a fixed count of samples by then was a race).
    let before = sampled.load(Ordering::Relaxed);
    wait_for(
        "the watcher to sample the caught-up table",
        Duration::from_secs(30),
        || sampled.load(Ordering::Relaxed) >= before + 3,
    );
    watching.store(false, Ordering::Relaxed);
    let samples = watcher.join().expect("no row regressed");
    let summary = sink.stop();
    assert!(summary.retries > 0, "the outage was met: {summary:?}");
    assert!(samples > 2);
    assert_eq!(records_applied(&db, &group), k.records());
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_readstate"));
    c.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn sink_topology(k: &Kafka, dir: &std::path::Path, batch: usize) -> std::path::PathBuf {
    sink_topology_from(k, dir, batch, &format!("events-{}", suffix()))
}

fn sink_topology_from(
    k: &Kafka,
    dir: &std::path::Path,
    batch: usize,
    source: &str,
) -> std::path::PathBuf {
    let text = format!(
        "{}\n[[sink]]\nname = \"postgres\"\nkind = \"postgres\"\ninput = \"receipt-updates\"\nbatch_size = {batch}\nlinger = \"50ms\"\n",
        topology_text(
            &k.app,
            "200ms",
            &dir.display().to_string(),
            source,
            &k.output,
            "0s"
        )
    );
    let file = dir.join("topology.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// A topology file with a postgres sink, and the environment the binary needs.
struct CliEnv {
    _dir: tempfile::TempDir,
    file: String,
    url: String,
    brokers: String,
}

impl CliEnv {
    fn new(db: &Db, k: &Kafka) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = sink_topology(k, dir.path(), 100).display().to_string();
        Self {
            _dir: dir,
            file,
            url: db.url.clone(),
            brokers: k.brokers(),
        }
    }

    fn file(&self) -> &str {
        &self.file
    }

    fn env(&self) -> [(&str, &str); 2] {
        [
            ("DATABASE_URL", &self.url),
            ("KAFKA_BROKERS", &self.brokers),
        ]
    }
}

/// `migrate` applies each migration once; `sink` and `run` refuse an unmigrated database.
#[test]
fn migrations_apply_once_and_an_unmigrated_database_is_refused() {
    let (db, k) = (Db::create(), Kafka::new());
    let c = CliEnv::new(&db, &k);
    let (file, env) = (c.file(), c.env());
    for (cmd, _) in [("sink", 0), ("run", 0)] {
        let out = cli(&[cmd, "--local-schemas", "--topology", file], &env)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} started on an empty database");
        assert!(
            err.contains("not migrated") && err.contains("readstate migrate"),
            "{cmd}: {err}"
        );
    }
    let first = cli(&["migrate", "--topology", file], &env)
        .output()
        .unwrap();
    assert!(first.status.success());
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied migrations [1, 2]"));
    let again = cli(&["migrate", "--topology", file], &env)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date"));
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(
        !log.contains("NOTICE"),
        "a repeated migrate is quiet: {log}"
    );
    let c = db.connect(&db.url).unwrap();
    let n: i64 = db
        .rt
        .block_on(c.query_one("SELECT count(*) FROM readstate_migrations", &[]))
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

/// `readstate sink` killed with SIGKILL mid-stream, then restarted: every output record is
/// applied exactly once (the offsets table counts them) and the rows equal the oracle.
#[test]
fn sigkill_sink_then_restart_applies_every_batch_exactly_once() {
    let (db, k) = (Db::create(), Kafka::new());
    let c = CliEnv::new(&db, &k);
    let (file, env) = (c.file(), c.env());
    assert!(cli(&["migrate", "--topology", file], &env)
        .status()
        .unwrap()
        .success());
    let updates = update_stream(3, 5_000, 8);
    let want = latest(&updates);
    k.produce(&updates);
    let total = k.records();
    let spawn = || {
        cli(&["sink", "--local-schemas", "--topology", file], &env)
            .stdout(std::process::Stdio::null())
            .spawn_guarded()
    };
    let mut child = spawn();
    let mut applied = 0;
    wait_for_every(
        "the sink's first write",
        Duration::from_secs(60),
        Duration::from_millis(5),
        || {
            applied = (db.offsets(&k.group()))
                .map(|o| o.values().map(|x| x.1).sum::<i64>())
                .unwrap_or(0);
            applied > 0
        },
    );
    assert!(applied < total, "killed too late to mean anything");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn();
    db.wait_rows(&want);
    wait_for("the sink to finish", Duration::from_secs(60), || {
        records_applied(&db, &k.group()) >= total
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        records_applied(&db, &k.group()),
        total,
        "no batch lost or applied twice"
    );
    let offsets = db.offsets(&k.group()).unwrap();
    let end = kafka::end_offsets(&k.brokers(), &k.output);
    for (p, e) in end.iter().enumerate() {
        assert_eq!(offsets[&(p as i32)].0, *e, "partition {p} fully consumed");
    }
}

/// A statement that times out (the table is locked by someone else) is retried, not
/// fatal: once the lock is gone the sink writes everything.
#[test]
fn statement_timeouts_are_retried() {
    let (db, k) = (Db::create(), Kafka::new());
    db.migrate();
    let updates = update_stream(4, 500, 4);
    let want = latest(&updates);
    let locker = db.connect(&db.url).unwrap();
    db.rt
        .block_on(locker.batch_execute("BEGIN; LOCK TABLE read_receipts IN ACCESS EXCLUSIVE MODE"))
        .unwrap();
    k.produce(&updates);
    let mut cfg = k.sink_config(&db, 100, Duration::from_millis(50));
    cfg.table = Arc::new(db.table_with_timeout(Duration::from_millis(300)));
    let sink = start_sink(cfg);
    // Hold the lock until the sink has been seen waiting on it twice, a timeout apart.
    let watcher = db.connect(&db.url).unwrap();
    let mut seen = 0;
    wait_for_every(
        "the sink to wait on the lock twice, a statement timeout apart",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            let waiting: i64 = db
                .rt
                .block_on(watcher.query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                ))
                .unwrap()
                .get(0);
            if waiting > 0 {
                seen += 1;
                // The next sighting must be a later statement (timeout 300 ms).
                std::thread::sleep(Duration::from_millis(400));
            }
            seen >= 2
        },
    );
    db.rt.block_on(locker.batch_execute("COMMIT")).unwrap();
    db.wait_rows(&want);
    let summary = sink.stop();
    assert!(summary.retries >= 1, "{summary:?}");
    assert_eq!(records_applied(&db, &k.group()), k.records());
}

/// Wait (bounded, 90 s) until `cond` holds.
fn settle(what: &str, cond: impl Fn() -> bool) {
    readstate_testing::fixtures::wait_for(what, Duration::from_secs(90), cond);
}

/// The database goes away while sink partitions move: B (owning half) stops during the
/// outage, within a bounded time, and A is assigned B's partitions while it cannot claim
/// them. When the database returns every row arrives and every record is applied once.
#[test]
fn outage_while_sink_partitions_move_then_every_row_arrives() {
    let (db, k) = (Db::create(), Kafka::new());
    db.migrate();
    let updates = update_stream(4, 2_000, 8);
    let (first, second) = updates.split_at(updates.len() / 2);
    let want = latest(&updates);
    let cfg_a = k.sink_config(&db, 200, Duration::from_millis(100));
    let health_a = cfg_a.health.clone();
    let a = start_sink(cfg_a);
    let cfg_b = k.sink_config(&db, 200, Duration::from_millis(100));
    let health_b = cfg_b.health.clone();
    let b = start_sink(cfg_b);
    k.produce(first);
    db.wait_rows(&latest(first));
    db.block();
    k.produce(second);
    settle("both sinks to meet the outage", || {
        health_a.waiting().is_some() && health_b.waiting().is_some()
    });
    let stopping = Instant::now();
    let sb = b.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "a sink stops within a bounded time during an outage ({:?})",
        stopping.elapsed()
    );
    assert!(sb.retries > 0, "{sb:?}");
    db.unblock();
    db.wait_rows(&want);
    let group = k.group();
    settle("every record applied", || {
        records_applied(&db, &group) == k.records()
    });
    let sa = a.stop();
    assert!(sa.retries > 0, "{sa:?}");
    assert!(health_a.waiting().is_none(), "ready again after the outage");
    assert_eq!(records_applied(&db, &group), k.records());
}

/// `readstate run` with its embedded sink starts while PostgreSQL refuses connections: the
/// stream is processed (updates reach the output topic), the sink waits, and once the
/// database returns every row arrives. SIGTERM then stops it cleanly.
#[test]
fn run_started_while_postgres_is_down_processes_the_stream_and_the_sink_catches_up() {
    let (db, k) = (Db::create(), Kafka::new());
    db.migrate();
    db.block();
    let source = format!("events-{}", suffix());
    k.mock.create_topic(&source, PARTS, 1).unwrap();
    k.create_stream_topics();
    let events = workload(12, 600, 8);
    let p = kafka::producer(&k.brokers());
    kafka::send_events(&p, &source, &events);
    kafka::flush(&p);
    let dir = tempfile::tempdir().unwrap();
    let file = sink_topology_from(&k, dir.path(), 200, &source);
    let file = file.display().to_string();
    let brokers = k.brokers();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
    ];
    let mut child = cli(&["run", "--local-schemas", "--topology", &file], &env).spawn_guarded();
    let want = oracle(&events);
    settle(
        "updates on the output topic while PostgreSQL is down",
        || k.records() >= want.len() as i64,
    );
    assert!(child.try_wait().unwrap().is_none(), "run keeps running");
    assert!(
        db.rows().is_none(),
        "the database is still refusing connections"
    );
    db.unblock();
    settle("PostgreSQL to match the oracle", || {
        let rows = db.rows().unwrap_or_default();
        rows.len() == want.len()
            && want.iter().all(|(key, x)| {
                rows.get(key)
                    .is_some_and(|r| r.seq == x.max_seq && r.version == x.advances)
            })
    });
    assert!(sigterm(&mut child).success(), "clean exit on SIGTERM");
}

/// The real broker of `scripts/test`, a migrated database and names of this test's own.
struct RealBroker {
    brokers: String,
    db: Db,
    app: String,
    source: String,
    output: String,
}

impl RealBroker {
    fn new() -> Self {
        let brokers = std::env::var("READSTATE_TEST_KAFKA").expect(
            "READSTATE_TEST_KAFKA is not set: run scripts/test, which starts a private Apache Kafka",
        );
        let db = Db::create();
        db.migrate();
        let s = suffix();
        Self {
            brokers,
            db,
            app: format!("app-{s}"),
            source: format!("events-{s}"),
            output: format!("updates-{s}"),
        }
    }

    /// A topology file in `dir` with the embedded sink, under `guarantee`.
    fn topology_file(
        &self,
        dir: &std::path::Path,
        guarantee: &str,
        state: &std::path::Path,
    ) -> String {
        let state = state.display().to_string();
        let text = Shipped::load("read_receipts.toml")
            .set("application.id", self.app.as_str())
            .set("application.commit_interval", "200ms")
            .set("application.state_dir", state)
            .set("application.processing_guarantee", guarantee)
            .set("source.read-events.topic", self.source.as_str())
            .set("sink.receipt-updates.topic", self.output.as_str())
            .set("processor.read-state.min_emit_interval", "0s")
            .set("sink.postgres.batch_size", 200)
            .set("sink.postgres.linger", "50ms")
            .text();
        let file = dir.join("topology.toml");
        std::fs::write(&file, text).unwrap();
        file.display().to_string()
    }

    fn env(&self) -> [(&str, &str); 2] {
        [
            ("DATABASE_URL", self.db.url.as_str()),
            ("KAFKA_BROKERS", self.brokers.as_str()),
        ]
    }
}

/// exactly_once_v2 on the real broker with the embedded sink: `readstate run` is killed
/// with SIGKILL mid-stream and restarted; a read_committed consumer of the output sees each
/// (key, version) once and never a decrease, and PostgreSQL ends equal to the oracle.
#[test]
fn real_broker_exactly_once_run_killed_and_restarted_then_postgres_equals_the_oracle() {
    let rb = RealBroker::new();
    let db = &rb.db;
    let (brokers, source, output) = (rb.brokers.clone(), rb.source.clone(), rb.output.clone());
    kafka::create_topic(&brokers, &source, PARTS, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = rb.topology_file(dir.path(), "exactly_once_v2", dir.path());
    let env = rb.env();
    let events = zipf_workload(41, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let p = kafka::producer(&brokers);
    kafka::send_events(&p, &source, first);
    kafka::flush(&p);
    let mut child = cli(&["run", "--local-schemas", "--topology", &file], &env).spawn_guarded();
    let half = oracle(first);
    settle("the first half in PostgreSQL", || {
        let rows = db.rows().unwrap_or_default();
        half.iter()
            .all(|(k, x)| rows.get(k).is_some_and(|r| r.seq == x.max_seq))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    kafka::send_events(&p, &source, second);
    kafka::flush(&p);
    let log = dir.path().join("second.log");
    let mut child = run_observed(&file, &env, &log);
    settle("PostgreSQL to match the oracle", || {
        let rows = db.rows().unwrap_or_default();
        rows.len() == want.len()
            && want.iter().all(|(k, x)| {
                rows.get(k).is_some_and(|r| {
                    r.seq == x.max_seq && r.version == x.advances && r.device == x.device_of_max
                })
            })
    });
    // Consumed and written to the end: both lags read 0 on every partition, although the
    // offsets were committed in transactions and each output partition ends with a commit
    // marker (issue 26: they read thousands, and 1, forever).
    let lags = |name: &str| -> Vec<i64> {
        let page = scrape_logged(&log).unwrap_or_default();
        page.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as i64)
            .collect()
    };
    let both = || {
        (
            lags("readstate_consumer_lag_records"),
            lags("readstate_sink_lag_records"),
        )
    };
    wait_until_explained(
        "every lag to read 0",
        Duration::from_secs(90),
        || {
            let (c, s) = both();
            let all = c.len() == PARTS as usize && s.len() == PARTS as usize;
            (all && c.iter().chain(&s).all(|v| *v == 0)).then_some(())
        },
        || {
            let page = scrape_logged(&log).unwrap_or_default();
            let _ = child.kill();

            let lines: Vec<&str> = page.lines().filter(|l| l.contains("lag")).collect();
            format!("consumer and sink lags: {:?}\n{}", both(), lines.join("\n"))
        },
    );
    assert!(sigterm(&mut child).success(), "clean exit on SIGTERM");
    let reg = Arc::new(LocalRegistry::new());
    let mut dec = readstate::serde::avro::UpdateDecoder::new(reg, RECEIPT_UPDATE_SCHEMA).unwrap();
    let mut header = vec![0u8];
    header.extend_from_slice(&LOCAL_RECEIPT_UPDATE_ID.to_be_bytes());
    futures::executor::block_on(dec.prepare(std::iter::once(Some(header.as_slice())))).unwrap();
    let updates = kafka::read_all(&brokers, &output, |m| {
        use rdkafka::Message;
        ReceiptUpdate::from(dec.decode(m.payload().unwrap()).unwrap())
    });
    let mut seen = std::collections::HashSet::new();
    let last = last_updates(&updates);
    for u in &updates {
        assert!(
            seen.insert((u.key(), u.version)),
            "{:?} v{} twice",
            u.key(),
            u.version
        );
    }
    for (k, x) in &want {
        assert_eq!(last[k].last_read_seq, x.max_seq, "output pointer of {k:?}");
        assert_eq!(last[k].version, x.advances, "output version of {k:?}");
    }
}

/// Wait (bounded) for a child to exit.
fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    wait_until("the process to exit", within, || child.try_wait().unwrap())
}

fn sigterm(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_exit(child, Duration::from_secs(60))
}

/// `readstate run` serving telemetry on 127.0.0.1:0, its log (with the address) in `log`.
fn run_observed(file: &str, env: &[(&str, &str)], log: &std::path::Path) -> KillOnDrop {
    let args = ["run", "--local-schemas", "--topology", file];
    cli(&args, env)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,readstate_core::telemetry=info")
        .stderr(std::fs::File::create(log).unwrap())
        .spawn_guarded()
}

/// The output topic recreated while PostgreSQL kept the sink's offsets (the compose stack's
/// Kafka without a volume): the sink stops each partition with an error naming it instead
/// of skipping records, and `/ready` says why. `readstate reset` is refused while an instance runs, `--dry-run`
/// changes nothing, and the reset (offsets to earliest, changelog deleted, sink offsets and
/// local state deleted) lets the next run write every row again.
#[test]
fn real_broker_recreated_output_topic_stops_the_sink_until_reset() {
    let rb = RealBroker::new();
    let db = &rb.db;
    let (brokers, app) = (rb.brokers.clone(), rb.app.clone());
    let (source, output) = (rb.source.clone(), rb.output.clone());
    let (changelog, sink_group) = (
        format!("{app}-read-state-changelog"),
        format!("{app}-pg-sink"),
    );
    kafka::create_topic(&brokers, &source, PARTS, &[]);
    kafka::create_topic(&brokers, &output, PARTS, &[]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = rb.topology_file(dir.path(), "at_least_once", &state);
    let env = rb.env();
    let events = zipf_workload(43, 4_000);
    let want = oracle(&events);
    let p = kafka::producer(&brokers);
    kafka::send_events(&p, &source, &events);
    kafka::flush(&p);
    let rows_match = || {
        let rows = db.rows().unwrap_or_default();
        rows.len() == want.len()
            && want
                .iter()
                .all(|(k, x)| rows.get(k).is_some_and(|r| r.seq == x.max_seq))
    };
    let run = || {
        cli(&["run", "--local-schemas", "--topology", &file], &env)
            .stderr(std::process::Stdio::piped())
            .spawn_guarded()
    };
    let mut child = run();
    settle("PostgreSQL to match the oracle", rows_match);
    let refused = cli(&["reset", "--topology", &file], &env).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "reset while an instance runs");
    assert!(
        stderr.contains(&format!("consumer group {app} still has")),
        "{stderr}"
    );
    assert!(sigterm(&mut child).success());
    let committed = kafka::committed(&brokers, &app, &source);
    assert_eq!(committed.iter().sum::<i64>(), events.len() as i64);

    // The output topic is recreated; PostgreSQL keeps the sink's offsets. The sink stops
    // every partition (none is skipped), says so and how to fix it, and /ready says why.
    kafka::delete_topic(&brokers, &output);
    kafka::create_topic(&brokers, &output, PARTS, &[]);
    let log = dir.path().join("stopped.log");
    let mut child = run_observed(&file, &env, &log);
    let stopped = format!("for group {sink_group}, {output} [");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    settle("the sink to stop every partition", || {
        text().matches("sink partition stopped").count() == PARTS as usize
    });
    let stderr = text();
    assert!(
        stderr.contains(&stopped)
            && stderr.contains("but the topic ends at offset 0")
            && stderr.contains("readstate reset"),
        "{stderr}"
    );
    let ready = http_get_logged(&log, "/ready");
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains(&stopped),
        "{ready}"
    );
    assert!(child.try_wait().unwrap().is_none(), "the instance runs on");
    assert!(sigterm(&mut child).success());

    let reset_args = [
        "reset",
        "--topology",
        &file,
        "--sink-offsets",
        "--local-state",
    ];
    let dry = cli(&[&reset_args[..], &["--dry-run"]].concat(), &env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(
        stdout.contains(&format!("would delete internal topic {changelog}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("would delete {PARTS} stored sink offset(s)")),
        "{stdout}"
    );
    assert_eq!(
        kafka::committed(&brokers, &app, &source),
        committed,
        "dry run"
    );
    assert!(kafka::topic_exists(&brokers, &changelog), "dry run");
    assert_eq!(
        db.offsets(&sink_group).unwrap().len(),
        PARTS as usize,
        "dry run"
    );
    assert!(state.join(&app).exists(), "dry run");

    let done = cli(&reset_args, &env).output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(
        kafka::committed(&brokers, &app, &source),
        vec![0; PARTS as usize]
    );
    assert!(!kafka::topic_exists(&brokers, &changelog));
    assert!(db.offsets(&sink_group).unwrap().is_empty());
    assert!(!state.join(&app).exists());

    // Everything is processed again: every key is emitted to the new topic and written.
    let mut child = run();
    settle("the sink to write the whole new output topic", || {
        let ends = kafka::end_offsets(&brokers, &output);
        let offsets = db.offsets(&sink_group).unwrap_or_default();
        ends.iter().sum::<i64>() >= want.len() as i64
            && (0..PARTS).all(|p| offsets.get(&p).map(|(next, _)| *next) == Some(ends[p as usize]))
    });
    assert!(rows_match());
    assert!(sigterm(&mut child).success());
}

/// A healthy first start on the real broker logs no error: the embedded sink subscribes
/// only once readstate has created the output topic (issue 26: it subscribed first, and
/// librdkafka logged `Subscribed topic not available` for the output topic).
#[test]
fn real_broker_first_start_with_the_embedded_sink_logs_no_error() {
    let rb = RealBroker::new();
    kafka::create_topic(&rb.brokers, &rb.source, PARTS, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = rb.topology_file(dir.path(), "at_least_once", &dir.path().join("state"));
    let events = zipf_workload(61, 2_000);
    let want = oracle(&events);
    let p = kafka::producer(&rb.brokers);
    kafka::send_events(&p, &rb.source, &events);
    kafka::flush(&p);
    let log = dir.path().join("run.log");
    let mut child = cli(&["run", "--local-schemas", "--topology", &file], &rb.env())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn_guarded();
    settle("PostgreSQL to match the oracle", || {
        let rows = rb.db.rows().unwrap_or_default();
        rows.len() == want.len()
            && want
                .iter()
                .all(|(k, x)| rows.get(k).is_some_and(|r| r.seq == x.max_seq))
    });
    assert!(sigterm(&mut child).success());
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The output topic deleted and recreated while the sink runs (issue 26: librdkafka reset
/// the offsets to the new log's start, and the sink skipped every record below its stored
/// offsets without a word): the partitions whose offsets went back stop, `/ready` says why
/// and names the fix, the sink itself runs on, and no record of the new topic is skipped
/// into PostgreSQL as if written.
#[test]
fn real_broker_output_topic_recreated_while_the_sink_runs_stops_its_partitions() {
    let rb = RealBroker::new();
    let (brokers, db) = (rb.brokers.clone(), &rb.db);
    let dlq = format!("{}-dlq", rb.app);
    kafka::create_topic(&brokers, &rb.output, PARTS, &[]);
    kafka::create_topic(&brokers, &dlq, 1, &[]);
    let health = readstate::telemetry::Health::new();
    let group = format!("{}-pg-sink", rb.app);
    let sink = start_sink(SinkConfig {
        group: group.clone(),
        topic: rb.output.clone(),
        dead_letter_topic: dlq,
        batch_size: 100,
        linger: Duration::from_millis(50),
        kafka: KafkaSettings::new(brokers.clone()),
        resolver: Arc::new(LocalRegistry::new()),
        table: Arc::new(db.table()),
        progress: Default::default(),
        health: health.clone(),
        topics_ready: None,
    });
    let first = update_stream(51, 300, 4);
    produce_updates(&brokers, &rb.output, &first);
    settle("every record written", || {
        records_applied(db, &group) == first.len() as i64
    });
    let rows_before = db.rows().unwrap();
    kafka::delete_topic(&brokers, &rb.output);
    kafka::create_topic(&brokers, &rb.output, PARTS, &[]);
    // Fewer records than were written before: each partition's new log ends below its
    // stored offset.
    let second = update_stream(52, 20, 1);
    produce_updates(&brokers, &rb.output, &second);
    let stopped = || health.stopped().unwrap_or_default();
    settle("the sink to stop a recreated partition", || {
        !stopped().is_empty()
    });
    let why = stopped();
    assert!(
        why.contains(&format!("for group {group}, {} [", rb.output))
            && why.contains("readstate reset")
            && why.contains("--sink-offsets"),
        "{why}"
    );
    assert!(
        !health.is_ready(),
        "/ready answers 503 while a partition is stopped"
    );
    let summary = sink.stop();
    assert_eq!(
        records_applied(db, &group),
        first.len() as i64,
        "no record of the new topic was counted as written: {summary:?}"
    );
    assert_eq!(db.rows().unwrap(), rows_before, "no row changed");
}

/// libpq's `sslmode` values and `sslrootcert`, as managed databases require. The private
/// server's certificate is for "localhost" only, signed by a test CA (`scripts/env.sh`).
#[test]
fn postgres_tls_modes_behave_as_libpq() {
    let ca = std::env::var("READSTATE_TEST_PG_CA")
        .expect("READSTATE_TEST_PG_CA is not set: run scripts/test (its PostgreSQL has TLS)");
    let db = Db::create();
    let (base, name) = db.url.rsplit_once('/').unwrap();
    let port = base.rsplit_once(':').unwrap().1;
    let url = |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/{name}?{query}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Whether the session is encrypted, or why it could not be opened.
    let encrypted = |u: &str| -> Result<bool, String> {
        let table =
            readstate::sink::PostgresTable::connect(u, "read_receipts", 1, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let c = table.client().await.map_err(|e| e.to_string())?;
            let row = c
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.get::<_, bool>(0))
        })
    };
    let with_ca = format!("sslrootcert={ca}");
    assert_eq!(
        encrypted(&url("localhost", &format!("sslmode=verify-full&{with_ca}"))),
        Ok(true)
    );
    let e = encrypted(&url("127.0.0.1", &format!("sslmode=verify-full&{with_ca}"))).unwrap_err();
    assert!(
        e.contains(&format!("postgres@127.0.0.1:{port}/{name}")),
        "names the target: {e}"
    );
    assert!(e.contains("address mismatch"), "names the cause: {e}");
    assert_eq!(
        encrypted(&url("127.0.0.1", &format!("sslmode=verify-ca&{with_ca}"))),
        Ok(true)
    );
    let e = encrypted(&url("localhost", "sslmode=verify-full")).unwrap_err();
    assert!(
        e.contains("certificate verify failed"),
        "CA not trusted, and said so: {e}"
    );
    assert_eq!(encrypted(&url("127.0.0.1", "sslmode=require")), Ok(true));
    assert_eq!(encrypted(&url("127.0.0.1", "sslmode=disable")), Ok(false));
    let e = encrypted(&url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .unwrap_err();
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
}

/// The body of a /metrics page served at the address a child logged.
fn scrape_logged(log: &std::path::Path) -> Option<String> {
    let reply = get_logged(log, "/metrics")?;
    Some(reply.split_once("\r\n\r\n")?.1.to_owned())
}

/// GET `path` (the whole reply) from the telemetry address a child logged.
fn get_logged(log: &std::path::Path, path: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains("serving /metrics"))?;
    let addr: std::net::SocketAddr = line
        .split("addr=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    readstate_testing::http_get(addr, path).ok()
}

fn http_get_logged(log: &std::path::Path, path: &str) -> String {
    wait_until(
        "the telemetry address in the log",
        Duration::from_secs(30),
        || get_logged(log, path),
    )
}

/// `readstate_sink_lag_records` is 0 for every partition once everything is written, and
/// counts exactly what arrived while PostgreSQL is down (it is measured apart from the
/// sink loop, which is waiting for the database).
#[test]
fn sink_lag_is_zero_when_written_and_grows_while_postgres_is_down() {
    let db = Db::create();
    db.migrate();
    let k = Kafka::new();
    let env = CliEnv::new(&db, &k);
    k.produce(&update_stream(3, 200, 3));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sink.log");
    let mut child = cli(
        &[
            "sink",
            "--local-schemas",
            "--topology",
            env.file(),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &env.env(),
    )
    .env("RUST_LOG", "warn,readstate_core::telemetry=info")
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn_guarded();
    // The lag summed over partitions, once every partition has its series.
    let lag = || -> Option<i64> {
        let page = scrape_logged(&log)?;
        let values: Vec<i64> = page
            .lines()
            .filter(|l| l.starts_with("readstate_sink_lag_records{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as i64)
            .collect();
        (values.len() == PARTS as usize).then(|| values.iter().sum())
    };
    settle("lag 0 on every partition", || lag() == Some(0));
    db.block();
    let second = update_stream(4, 200, 2);
    k.produce(&second);
    settle("the lag to count what arrived during the outage", || {
        lag() == Some(second.len() as i64)
    });
    db.unblock();
    settle("lag 0 again", || lag() == Some(0));
    assert!(sigterm(&mut child).success());
}
