//! `readstate demo`: the whole pipeline on one machine, checked against its own oracle.
//!
//! An in-process Kafka-protocol broker (librdkafka's MockCluster, on loopback), the
//! workload generator producing concurrently (flow-controlled so the mock's 5 MB per
//! partition retention never drops unread data), `run` and the PostgreSQL sink as threads,
//! then a check that every row in PostgreSQL equals the generator's max and count per key.

pub mod unread;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

use crate::loadgen::{Generated, Generator, Oracle, WorkloadSpec};
use readstate::kafka::KafkaSettings;
use readstate::model::{ReadEvent, StateKey};
use readstate::runtime::{run, RunConfig, RunSummary};
use readstate::serde::avro::{AvroReadEvent, EventEncoder};
use readstate::serde::registry::LOCAL_READ_EVENT_ID;
use readstate::serde::{LocalRegistry, READ_EVENT_SCHEMA};
use readstate::sink::{run_sink, PostgresTable, SinkConfig, SinkSummary};
use readstate::telemetry::{Health, Progress};
use readstate::topology::compile;

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Runtime(#[from] readstate::runtime::RuntimeError),
    #[error(transparent)]
    Sink(#[from] readstate::sink::SinkError),
    #[error(transparent)]
    Serde(#[from] readstate::serde::SerdeError),
    #[error(transparent)]
    Telemetry(#[from] readstate::telemetry::TelemetryError),
    #[error("database: {0}")]
    Database(String),
    #[error("{0}")]
    Other(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub spec: WorkloadSpec,
    pub partitions: i32,
    /// A PostgreSQL the demo may create its database on.
    pub database_url: String,
    /// The database it drops and creates there (`readstate_demo`).
    pub database_name: String,
    pub metrics_addr: Option<SocketAddr>,
    pub batch_size: usize,
    /// Print progress lines every this often.
    pub progress_every: Duration,
    /// A real Kafka to run on (its topics are made through the admin API, named per run);
    /// `None`: the embedded MockCluster.
    pub brokers: Option<String>,
    /// Run under exactly_once_v2 instead of at_least_once.
    pub exactly_once: bool,
    /// Produce the events as a Go service's JSON (`topologies/json_read_receipts.toml`'s
    /// shape: keyed by sender, FNV-1a, `read_at` in seconds) instead of readstate's Avro.
    pub json: bool,
}

/// The outcome, as printed.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub events: u64,
    pub poison: u64,
    pub keys: usize,
    pub run: RunSummary,
    pub sink: SinkSummary,
    pub rows_in_table: usize,
    pub elapsed: Duration,
    pub mismatches: Vec<String>,
    pub demo_database_url: String,
}

impl DemoReport {
    pub fn pass(&self) -> bool {
        self.mismatches.is_empty()
            && self.rows_in_table == self.keys
            && self.run.dead_letters == self.poison
    }

    /// The summary a person reads at a glance.
    pub fn render(&self) -> String {
        let records = self.events + self.poison;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let ratio = |a: u64, b: u64| a as f64 / (b.max(1)) as f64;
        let mut o = String::new();
        let line = |o: &mut String, k: &str, v: String| o.push_str(&format!("  {k:<34} {v}\n"));
        o.push_str("readstate demo summary\n");
        line(
            &mut o,
            "records in (events + poison pills)",
            format!("{records} ({} + {})", self.events, self.poison),
        );
        line(&mut o, "dead letters", format!("{}", self.run.dead_letters));
        line(
            &mut o,
            "distinct (conversation, reader) keys",
            format!("{}", self.keys),
        );
        line(
            &mut o,
            "coalesced updates out",
            format!(
                "{} ({:.1} events per update)",
                self.run.updates_emitted,
                ratio(self.events, self.run.updates_emitted)
            ),
        );
        line(
            &mut o,
            "rows written to PostgreSQL",
            format!("{}", self.sink.rows_changed),
        );
        line(
            &mut o,
            "SQL statements (upserts)",
            format!("{} in {} batches", self.sink.statements, self.sink.batches),
        );
        line(
            &mut o,
            "write reduction",
            format!(
                "{:.0} events per statement, {:.1} events per row written",
                ratio(self.events, self.sink.statements),
                ratio(self.events, self.sink.rows_changed)
            ),
        );
        line(&mut o, "wall time", format!("{:.1} s", secs));
        line(
            &mut o,
            "throughput (end to end)",
            format!("{:.0} events/s", records as f64 / secs),
        );
        line(
            &mut o,
            "rows in read_receipts",
            format!("{} (expected {})", self.rows_in_table, self.keys),
        );
        let url = readstate::sink::connect::redact(&self.demo_database_url);
        line(&mut o, "database", url);
        if self.pass() {
            o.push_str(
                "PASS: every row's pointer equals the generator's max per key (event counts within the generator's)\n",
            );
        } else {
            o.push_str(&format!(
                "FAIL: {} mismatching key(s)",
                self.mismatches.len()
            ));
            for m in self.mismatches.iter().take(10) {
                o.push_str(&format!("\n  {m}"));
            }
            o.push('\n');
        }
        o
    }
}

/// `url` with its database replaced by `db` (URL or key=value form).
pub fn with_database(url: &str, db: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let (before_query, query) = match rest.find('?') {
            Some(q) => (&rest[..q], &rest[q..]),
            None => (rest, ""),
        };
        let authority = before_query.split('/').next().unwrap_or(before_query);
        format!("{}{authority}/{db}{query}", &url[..scheme_end + 3])
    } else {
        format!("{url} dbname={db}")
    }
}

/// One connection, with the URL's TLS settings; errors name the target, never the
/// password.
pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client, DemoError> {
    let db =
        readstate::sink::connect::parse(url).map_err(|e| DemoError::Database(e.to_string()))?;
    let (client, conn) = db.config.connect(db.tls).await.map_err(|e| {
        let why = readstate::sink::db_error_text(&e);
        DemoError::Database(format!("connecting to {}: {why}", db.target))
    })?;
    tokio::spawn(conn);
    Ok(client)
}

pub(crate) async fn admin(url: &str, sql: &str) -> Result<(), DemoError> {
    let client = connect(url).await?;
    client
        .batch_execute(sql)
        .await
        .map_err(|e| DemoError::Database(readstate::sink::db_error_text(&e)))
}

/// Every row of the receipts table, its ids read as the topology's `ids` declare them.
async fn table_rows(
    url: &str,
    ids: readstate::ids::IdTypes,
) -> Result<HashMap<StateKey, (i64, i64)>, DemoError> {
    use readstate::ids::{ConversationId, Id, ReaderId};
    let client = connect(url).await?;
    let rows = client
        .query(
            "SELECT conversation_id::text, reader_id::text, last_read_seq, events_total
             FROM read_receipts",
            &[],
        )
        .await
        .map_err(|e| DemoError::Database(readstate::sink::db_error_text(&e)))?;
    rows.iter()
        .map(|r| {
            let id = |at: usize, ty| {
                Id::parse(ty, r.get(at)).map_err(|e| DemoError::Other(format!("row id: {e}")))
            };
            let key = StateKey {
                conversation: ConversationId(id(0, ids.conversation)?),
                reader: ReaderId(id(1, ids.user)?),
            };
            Ok((key, (r.get(2), r.get(3))))
        })
        .collect()
}

/// Drop and create database `db` on the server of `url`; the URL of the new database.
pub(crate) fn fresh_database(
    rt: &tokio::runtime::Runtime,
    url: &str,
    db: &str,
) -> Result<String, DemoError> {
    if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DemoError::Other(format!(
            "{db:?} is not a plain database name"
        )));
    }
    rt.block_on(admin(
        url,
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    ))?;
    rt.block_on(admin(url, &format!("CREATE DATABASE {db}")))?;
    Ok(with_database(url, db))
}

/// Create topics through the admin API (a real broker).
fn create_topics(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
    rt: &tokio::runtime::Runtime,
) -> Result<(), DemoError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in rt.block_on(admin.create_topics(&new, &opts))? {
        r.map_err(|(t, e)| DemoError::Other(format!("creating topic {t}: {e}")))?;
    }
    Ok(())
}

/// Run the demo and return its report (printing progress to stderr).
pub fn run_demo(cfg: DemoConfig) -> Result<DemoReport, DemoError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Other(e.to_string()))?;
    let started = Instant::now();

    // PostgreSQL: a fresh database.
    let db = &cfg.database_name;
    let demo_url = fresh_database(&rt, &cfg.database_url, db)?;
    // `--json` declares string user and conversation ids and UUID message ids (JSON_IDS).
    let ids = match cfg.json {
        true => readstate::ids::IdTypes {
            conversation: readstate::ids::IdType::String,
            user: readstate::ids::IdType::String,
            message: readstate::ids::IdType::Uuid,
        },
        false => readstate::ids::IdTypes::default(),
    };
    let table = PostgresTable::connect(&demo_url, "read_receipts", 2, Duration::from_secs(30))?
        .with_ids(ids);
    rt.block_on(table.migrate())?;
    eprintln!("==> PostgreSQL database {db} migrated");

    // Kafka: an in-process broker with the topics, or the real one given.
    let (mock, brokers, app) = match &cfg.brokers {
        None => {
            let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1)?;
            let brokers = mock.bootstrap_servers();
            (Some(mock), brokers, "readstate-demo".to_owned())
        }
        Some(b) => (
            None,
            b.clone(),
            format!("readstate-demo-{:08x}", rand::random::<u32>()),
        ),
    };
    let app = app.as_str();
    let (source, output) = match &mock {
        Some(_) => (
            "chat.read-events".to_owned(),
            "chat.receipt-updates".to_owned(),
        ),
        None => (
            format!("{app}.read-events"),
            format!("{app}.receipt-updates"),
        ),
    };
    let (source, output) = (source.as_str(), output.as_str());
    match &mock {
        Some(mock) => {
            for t in [source, output, &format!("{app}-read-state-changelog")] {
                mock.create_topic(t, cfg.partitions, 1)?;
            }
            if cfg.json {
                let repartition = format!("{app}-read-events-repartition");
                mock.create_topic(&repartition, cfg.partitions, 1)?;
            }
            mock.create_topic(&format!("{app}-dlq"), 1, 1)?;
            eprintln!(
                "==> embedded Kafka-protocol broker (MockCluster) on {brokers}, {} partitions",
                cfg.partitions
            );
        }
        None => {
            // readstate creates its internal topics itself; the source and output here.
            create_topics(&brokers, &[source, output], cfg.partitions, &rt)?;
            eprintln!(
                "==> Apache Kafka on {brokers}: topics {source} and {output}, {} partitions",
                cfg.partitions
            );
        }
    }
    let guarantee = match cfg.exactly_once {
        true => "exactly_once_v2",
        false => "at_least_once",
    };

    let state = tempfile::tempdir().map_err(|e| DemoError::Other(e.to_string()))?;
    let text = format!(
        r#"
[application]
id = "{app}"
commit_interval = "1s"
processing_guarantee = "{guarantee}"
state_dir = "{}"
[[source]]
name = "read-events"
topic = "{source}"
{json}
[[store]]
name = "read-state"
cache_max_entries = 2000000
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["read-events"]
store = "read-state"
[[sink]]
name = "receipt-updates"
kind = "kafka"
input = "read-state"
topic = "{output}"
[[sink]]
name = "postgres"
kind = "postgres"
input = "receipt-updates"
batch_size = {}
linger = "500ms"
"#,
        state.path().display(),
        cfg.batch_size,
        json = if cfg.json { JSON_SOURCE } else { "" },
    ) + if cfg.json { JSON_IDS } else { "" };
    let topology = compile(&text).map_err(|e| DemoError::Other(format!("{e:?}")))?;
    debug_assert_eq!(topology.ids, ids, "JSON_IDS declares the table's ids");
    let kafka = KafkaSettings::new(brokers.clone());
    let resolver = Arc::new(LocalRegistry::new());
    let progress = Arc::new(Progress::default());
    let health = Health::new();
    let _server = match cfg.metrics_addr {
        Some(addr) => {
            let s = readstate::telemetry::serve(addr, health.clone())?;
            eprintln!(
                "==> metrics on http://{}/metrics (/health, /ready)",
                s.addr()
            );
            Some(s)
        }
        None => None,
    };

    let stop_run = Arc::new(AtomicBool::new(false));
    let mut run_cfg = RunConfig::new(topology.clone(), kafka.clone(), resolver.clone());
    run_cfg.progress = progress.clone();
    run_cfg.health = health.clone();
    let instance = {
        let stop = stop_run.clone();
        std::thread::spawn(move || run(run_cfg, stop))
    };
    // The sink joins its group once the instance has its partitions (the mock broker's
    // coordinator is slow to settle two groups joining at the same instant).
    let ready_by = Instant::now() + Duration::from_secs(60);
    while !health.is_ready() && Instant::now() < ready_by && !instance.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stop_sink = Arc::new(AtomicBool::new(false));
    let pg = topology
        .postgres
        .as_ref()
        .expect("demo topology has a sink");
    let sink_cfg = SinkConfig {
        group: pg.consumer_group.clone(),
        topic: output.to_owned(),
        dead_letter_topic: topology.dead_letter_topic.0.clone(),
        batch_size: pg.batch_size,
        linger: pg.linger,
        kafka: kafka.clone(),
        resolver,
        table: Arc::new(table),
        progress: progress.clone(),
        health: Health::new(),
        topics_ready: None,
    };
    let sink = {
        let stop = stop_sink.clone();
        std::thread::spawn(move || run_sink(sink_cfg, stop))
    };

    // Produce, flow-controlled: at most `window` records ahead of the consumer.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set(
            "partitioner",
            if cfg.json { "fnv1a" } else { "murmur2_random" },
        )
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()?;
    let encoder = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)?;
    // The mock broker keeps at most 5 MB per partition and silently deletes older data: stay
    // a few hundred kB per partition ahead of the consumer.
    let window = 2_000 * cfg.partitions.max(1) as u64;
    let mut oracle = Oracle::default();
    let mut produced = 0u64;
    let mut buf = Vec::with_capacity(256);
    let mut last_print = Instant::now();
    let total = cfg.spec.events;
    let print = |phase: &str, produced: u64, p: &Progress| {
        eprintln!(
            "    {phase:<9} produced {produced:>9}/{total}  consumed {:>9}  updates {:>8}  sink rows {:>8}  statements {:>6}  {:>5.1}s",
            Progress::get(&p.records_consumed),
            Progress::get(&p.updates_emitted),
            Progress::get(&p.sink_rows_written),
            Progress::get(&p.sink_statements),
            started.elapsed().as_secs_f64()
        );
    };
    eprintln!("==> producing {total} read events (Zipf conversations, 1:1 and groups, several devices, bursts, reordering, duplicates, poison pills)");
    // Behind a repartition each event is consumed twice (source, repartition topic).
    let behind = |produced: u64| {
        let consumed = Progress::get(&progress.records_consumed);
        match cfg.json {
            true => (2 * produced).saturating_sub(consumed) / 2,
            false => produced.saturating_sub(consumed),
        }
    };
    for g in Generator::new(cfg.spec.clone()) {
        while behind(produced) > window && !instance.is_finished() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let (key, payload): (String, &[u8]) = match &g {
            Generated::Event(e) if cfg.json => {
                // readstate keeps read_at as the position, in microseconds.
                oracle.record(&Generated::Event(ReadEvent {
                    message_seq: crate::loadgen::go_service_position(e.message_seq),
                    ..crate::loadgen::go_service_ids(e)
                }));
                buf.clear();
                buf.extend_from_slice(crate::loadgen::go_service_json(e).as_bytes());
                (crate::loadgen::go_service_sender(e).to_string(), &buf)
            }
            Generated::Event(e) => {
                oracle.record(&g);
                buf.clear();
                encoder.encode_into(&AvroReadEvent::from(e), &mut buf)?;
                (e.conversation_id.0.to_string(), &buf)
            }
            Generated::Poison(b) => {
                oracle.record(&g);
                ("poison".to_owned(), b)
            }
        };
        readstate::kafka::send_waiting(
            &producer,
            BaseRecord::to(source).key(key.as_str()).payload(payload),
        )?;
        produced += 1;
        if last_print.elapsed() >= cfg.progress_every {
            print("running", produced, &progress);
            last_print = Instant::now();
        }
    }
    producer.flush(Duration::from_secs(60))?;

    // Drain: the instance consumes everything, then stops (final flush and commit).
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut tick = || {
        if last_print.elapsed() >= cfg.progress_every {
            last_print = Instant::now();
            true
        } else {
            false
        }
    };
    wait_for(
        || Progress::get(&progress.records_consumed),
        // Behind a repartition: the source records, and the events again.
        produced + if cfg.json { oracle.events } else { 0 },
        || instance.is_finished(),
        deadline,
        Some(Duration::from_secs(30)),
        || {
            if tick() {
                print("draining", produced, &progress)
            }
        },
    )
    .map_err(|now| {
        DemoError::Other(format!(
            "FAIL: the instance consumed {now} of {produced} records and stopped making progress"
        ))
    })?;
    stop_run.store(true, Ordering::Relaxed);
    let run_summary = instance
        .join()
        .map_err(|_| DemoError::Other("instance thread panicked".into()))??;
    // The sink writes the whole output topic: every update emitted.
    let outputs: i64 = {
        let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
        let mut n = 0;
        for p in 0..cfg.partitions {
            n += rdkafka::consumer::Consumer::fetch_watermarks(
                &c,
                output,
                p,
                Duration::from_secs(10),
            )?
            .1;
        }
        n
    };
    // Under exactly_once_v2 the end offsets also count transaction markers.
    let outputs = (outputs.max(0) as u64).min(run_summary.updates_emitted);
    wait_for(
        || Progress::get(&progress.sink_records),
        outputs,
        || sink.is_finished(),
        deadline,
        None,
        || {
            if tick() {
                print("sinking", produced, &progress)
            }
        },
    )
    .map_err(|_| DemoError::Other("the sink did not catch up in 10 minutes".into()))?;
    stop_sink.store(true, Ordering::Relaxed);
    let sink_summary = sink
        .join()
        .map_err(|_| DemoError::Other("sink thread panicked".into()))??;
    print("done", produced, &progress);
    let elapsed = started.elapsed();

    // Check every row against the generator's own max and count.
    let rows = rt.block_on(table_rows(&demo_url, topology.ids))?;
    let mut mismatches = Vec::new();
    // The pointer must equal the generator's max exactly. events_total is as of the last
    // emitted update (stale events after the last advance emit nothing), so it is at
    // least 1 and at most the generator's count.
    for (k, (max, n)) in &oracle.keys {
        match rows.get(k) {
            Some((seq, events)) if seq == max && (1..=*n).contains(events) => {}
            Some((seq, events)) => mismatches.push(format!(
                "{k:?}: row has seq {seq}, {events} events; generator says {max}, {n}"
            )),
            None => mismatches.push(format!("{k:?}: no row; generator says seq {max}")),
        }
    }
    drop(producer); // clients before the broker, or they log its disappearance
    drop(mock);
    Ok(DemoReport {
        events: oracle.events,
        poison: oracle.poison,
        keys: oracle.keys.len(),
        run: run_summary,
        sink: sink_summary,
        rows_in_table: rows.len(),
        elapsed,
        mismatches,
        demo_database_url: demo_url,
    })
}

/// The source fields of `--json`: `topologies/json_read_receipts.toml`'s mapping.
const JSON_SOURCE: &str = r#"format = "json"
keyed_by = "sender_id"
partitioner = "fnv1a"
position = "timestamp"
time_unit = "s"
fields = { reader = "reader_id", conversation = "conversation_id", position = "read_at", message_id = "msg_id", sender = "sender_id", device = "device_id" }"#;

/// The ids of `--json`: `topologies/json_read_receipts.toml`'s.
const JSON_IDS: &str = r#"
[ids]
conversation = "string"
user = "string"
message = "uuid"
"#;

/// Poll `count` until it reaches `target` or `finished` says the worker ended, calling
/// `report` between polls. Fails with the last count at `deadline`, or when the count has
/// not moved for `stall`.
fn wait_for(
    count: impl Fn() -> u64,
    target: u64,
    finished: impl Fn() -> bool,
    deadline: Instant,
    stall: Option<Duration>,
    mut report: impl FnMut(),
) -> Result<(), u64> {
    let (mut seen, mut moved) = (u64::MAX, Instant::now());
    loop {
        let now = count();
        if now >= target || finished() {
            return Ok(());
        }
        if now != seen {
            (seen, moved) = (now, Instant::now());
        }
        if Instant::now() > deadline || stall.is_some_and(|s| moved.elapsed() > s) {
            return Err(now);
        }
        report();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_both_url_forms() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/postgres?sslmode=disable", "d"),
            "postgres://u@127.0.0.1:5432/d?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "d"), "postgres://u@h/d");
        assert_eq!(
            with_database("host=h user=u", "d"),
            "host=h user=u dbname=d"
        );
    }
}
