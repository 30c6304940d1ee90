//! `readstate demo --unread`: messages and reads together, through both sources, both
//! outputs and both PostgreSQL sinks, checked against the chat generator's oracle: every
//! member's unread and mention counts as PostgreSQL derives them (the
//! `read_receipts_unread` view, or `conversation_heads_counts` for members who never read).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

use super::{connect, fresh_database, DemoError};
use crate::loadgen::chat::{generate, ChatEvent, ChatSpec, ChatWorkload};
use readstate::ids::Id;
use readstate::kafka::KafkaSettings;
use readstate::model::UnreadCounts;
use readstate::runtime::{run, RunConfig, RunSummary};
use readstate::serde::avro::{AvroReadEvent, EventEncoder};
use readstate::serde::message::{AvroMessageEvent, MessageEncoder};
use readstate::serde::registry::{LOCAL_MESSAGE_EVENT_ID, LOCAL_READ_EVENT_ID};
use readstate::serde::{LocalRegistry, MESSAGE_EVENT_SCHEMA, READ_EVENT_SCHEMA};
use readstate::sink::{heads_from_topology, run_sink, PostgresTable};
use readstate::telemetry::{Health, Progress};
use readstate::topology::compile;

/// What the unread demo runs.
#[derive(Debug, Clone)]
pub struct UnreadDemoConfig {
    pub spec: ChatSpec,
    pub partitions: i32,
    pub database_url: String,
    pub database_name: String,
}

/// The outcome, as printed.
#[derive(Debug, Clone)]
pub struct UnreadDemoReport {
    pub messages: usize,
    pub reads: usize,
    pub conversations: usize,
    pub members: usize,
    pub run: RunSummary,
    pub head_rows: i64,
    pub elapsed: Duration,
    pub mismatches: Vec<String>,
}

impl UnreadDemoReport {
    pub fn pass(&self) -> bool {
        self.mismatches.is_empty() && self.head_rows == self.conversations as i64
    }

    pub fn render(&self) -> String {
        let mut o = String::from("readstate demo --unread summary\n");
        let mut line = |k: &str, v: String| o.push_str(&format!("  {k:<38} {v}\n"));
        line(
            "records in (messages + reads)",
            format!(
                "{} ({} + {})",
                self.messages + self.reads,
                self.messages,
                self.reads
            ),
        );
        line(
            "conversations, members",
            format!("{}, {}", self.conversations, self.members),
        );
        line(
            "receipt updates, with counts",
            format!("{}", self.run.updates_emitted),
        );
        line(
            "rows in conversation_heads",
            format!("{} (one per conversation, none per member)", self.head_rows),
        );
        line("wall time", format!("{:.1} s", self.elapsed.as_secs_f64()));
        if self.pass() {
            o.push_str("PASS: every member's unread and mention counts in PostgreSQL equal the generator's\n");
        } else {
            o.push_str(&format!(
                "FAIL: {} mismatching member(s)",
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

const APP: &str = "readstate-demo-unread";
const READS: &str = "chat.read-events";
const MESSAGES: &str = "chat.message-events";
const UPDATES: &str = "chat.receipt-updates";
const HEADS: &str = "chat.conversation-heads";

fn topology_text(state_dir: &std::path::Path) -> String {
    format!(
        r#"
[application]
id = "{APP}"
commit_interval = "1s"
state_dir = "{}"
[[source]]
name = "read-events"
topic = "{READS}"
[[source]]
name = "message-events"
topic = "{MESSAGES}"
records = "message-events"
[[store]]
name = "read-state"
[[store]]
name = "head-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["read-events", "message-events"]
store = "read-state"
heads_store = "head-state"
unread_cap = 1000
[[sink]]
name = "receipt-updates"
kind = "kafka"
input = "read-state"
topic = "{UPDATES}"
[[sink]]
name = "conversation-heads"
kind = "kafka"
input = "read-state"
output = "conversation-heads"
topic = "{HEADS}"
[[sink]]
name = "postgres"
kind = "postgres"
input = "receipt-updates"
linger = "500ms"
[[sink]]
name = "postgres-heads"
kind = "postgres"
input = "conversation-heads"
linger = "500ms"
"#,
        state_dir.display()
    )
}

/// Run the demo on the embedded broker and return its report (progress on stderr).
pub fn run_unread_demo(cfg: UnreadDemoConfig) -> Result<UnreadDemoReport, DemoError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Other(e.to_string()))?;
    let started = Instant::now();
    let url = fresh_database(&rt, &cfg.database_url, &cfg.database_name)?;
    let receipts = PostgresTable::connect(&url, "read_receipts", 2, Duration::from_secs(30))?;
    rt.block_on(receipts.migrate())?;
    let heads_table = PostgresTable::<readstate::model::HeadUpdate>::open(
        &url,
        "conversation_heads",
        1,
        Duration::from_secs(30),
    )?;
    rt.block_on(heads_table.migrate_beside("read_receipts"))?;
    eprintln!(
        "==> PostgreSQL database {} migrated (read_receipts, conversation_heads)",
        cfg.database_name
    );

    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1)?;
    let brokers = mock.bootstrap_servers();
    for t in [
        READS,
        MESSAGES,
        UPDATES,
        HEADS,
        &format!("{APP}-read-state-changelog"),
        &format!("{APP}-head-state-changelog"),
        &format!("{APP}-read-events-rerouted"),
        &format!("{APP}-message-events-rerouted"),
    ] {
        mock.create_topic(t, cfg.partitions, 1)?;
    }
    mock.create_topic(&format!("{APP}-dlq"), 1, 1)?;
    eprintln!("==> embedded broker on {brokers}: {READS} and {MESSAGES} co-partitioned, {} partitions each", cfg.partitions);

    let state = tempfile::tempdir().map_err(|e| DemoError::Other(e.to_string()))?;
    let topology =
        compile(&topology_text(state.path())).map_err(|e| DemoError::Other(format!("{e:?}")))?;
    let kafka = KafkaSettings::new(brokers.clone());
    let resolver = Arc::new(LocalRegistry::new());
    let progress = Arc::new(Progress::default());
    let health = Health::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut run_cfg = RunConfig::new(topology.clone(), kafka.clone(), resolver.clone());
    run_cfg.progress = progress.clone();
    run_cfg.health = health.clone();
    let instance = {
        let stop = stop.clone();
        std::thread::spawn(move || run(run_cfg, stop))
    };
    let sinks = {
        let r = readstate::sink::from_topology(&topology, kafka.clone(), resolver.clone(), &url)?;
        let h = heads_from_topology(&topology, kafka, resolver, &url)?
            .ok_or_else(|| DemoError::Other("the demo topology has a heads sink".into()))?;
        let (s1, s2) = (stop.clone(), stop.clone());
        [
            std::thread::spawn(move || run_sink(r, s1).map(|_| ())),
            std::thread::spawn(move || run_sink(h, s2).map(|_| ())),
        ]
    };

    let w = generate(&cfg.spec);
    let (messages, reads) = produce(&brokers, &w, &progress, cfg.partitions, &instance)?;
    eprintln!("==> produced {messages} messages and {reads} reads; waiting for PostgreSQL to hold every member's counts");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut mismatches;
    loop {
        mismatches = check(&rt, &url, &w)?;
        if mismatches.is_empty() || Instant::now() > deadline || instance.is_finished() {
            break;
        }
        eprintln!(
            "    consumed {:>8}  updates {:>7}  members not yet equal {:>6}  {:>5.1}s",
            Progress::get(&progress.records_consumed),
            Progress::get(&progress.updates_emitted),
            mismatches.len(),
            started.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    let run_summary = instance
        .join()
        .map_err(|_| DemoError::Other("instance thread panicked".into()))??;
    for s in sinks {
        s.join()
            .map_err(|_| DemoError::Other("sink thread panicked".into()))??;
    }
    let head_rows = rt.block_on(async {
        let c = connect(&url).await?;
        c.query_one("SELECT count(*) FROM conversation_heads", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| DemoError::Database(e.to_string()))
    })?;
    drop(mock);
    Ok(UnreadDemoReport {
        messages,
        reads,
        conversations: w.members.len(),
        members: w.members.values().map(Vec::len).sum(),
        run: run_summary,
        head_rows,
        elapsed: started.elapsed(),
        mismatches,
    })
}

/// Produce the workload to both topics, keyed by conversation, at most a few thousand
/// records per partition ahead of the consumer (the mock broker keeps 5 MB per partition).
fn produce(
    brokers: &str,
    w: &ChatWorkload,
    progress: &Progress,
    partitions: i32,
    instance: &std::thread::JoinHandle<Result<RunSummary, readstate::runtime::RuntimeError>>,
) -> Result<(usize, usize), DemoError> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;
    let reads_enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)?;
    let msgs_enc = MessageEncoder::new(MESSAGE_EVENT_SCHEMA, LOCAL_MESSAGE_EVENT_ID)?;
    let window = 2_000 * partitions.max(1) as u64;
    let (mut messages, mut reads) = (0usize, 0usize);
    for (i, e) in w.arrivals.iter().enumerate() {
        while i as u64 - Progress::get(&progress.records_consumed).min(i as u64) > window {
            if instance.is_finished() {
                return Err(DemoError::Other(
                    "the instance stopped while producing".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let key = e.conversation().0.to_string();
        let (topic, value) = match e {
            ChatEvent::Read(r) => {
                reads += 1;
                (READS, reads_enc.encode(&AvroReadEvent::from(r))?)
            }
            ChatEvent::Message(m) => {
                messages += 1;
                (MESSAGES, msgs_enc.encode(&AvroMessageEvent::from(m))?)
            }
        };
        readstate::kafka::send_waiting(
            &producer,
            BaseRecord::to(topic).key(key.as_str()).payload(&value),
        )?;
    }
    producer.flush(Duration::from_secs(60))?;
    Ok((messages, reads))
}

/// Every member whose counts in PostgreSQL differ from the oracle's (empty: all equal).
fn check(
    rt: &tokio::runtime::Runtime,
    url: &str,
    w: &ChatWorkload,
) -> Result<Vec<String>, DemoError> {
    let got = rt.block_on(pg_counts(url, w))?;
    let mut bad = Vec::new();
    for (conv, members) in &w.members {
        for r in members {
            let want = w.expected(conv, r);
            match got.get(&(conv.0.clone(), r.0.clone())) {
                Some(g) if *g == want => {}
                g => bad.push(format!(
                    "conversation {conv} member {r}: PostgreSQL {g:?}, generator {want:?}"
                )),
            }
        }
    }
    Ok(bad)
}

/// Counts per (conversation, member): the view for readers with a pointer, the function
/// at pointer -1 for the others.
async fn pg_counts(
    url: &str,
    w: &ChatWorkload,
) -> Result<HashMap<(Id, Id), UnreadCounts>, DemoError> {
    let c = connect(url).await?;
    let db = |e: tokio_postgres::Error| DemoError::Database(readstate::sink::db_error_text(&e));
    let counts = |r: &tokio_postgres::Row, at: usize| UnreadCounts {
        unread: r.get(at),
        mentions: r.get(at + 1),
        capped: r.get(at + 2),
    };
    let mut out: HashMap<(Id, Id), UnreadCounts> = c
        .query("SELECT conversation_id, reader_id, unread_count, mention_count, counts_capped FROM read_receipts_unread", &[])
        .await
        .map_err(db)?
        .iter()
        .map(|r| {
            let id = |at| Id::int(r.get(at));
            ((id(0), id(1)), counts(r, 2))
        })
        .collect();
    let stmt = c
        .prepare("SELECT * FROM conversation_heads_counts($1, $2, -1)")
        .await
        .map_err(db)?;
    for (conv, members) in &w.members {
        for m in members {
            let key = (conv.0.clone(), m.0.clone());
            if let std::collections::hash_map::Entry::Vacant(e) = out.entry(key) {
                let params = [conv.as_int(), m.as_int()];
                let r = c
                    .query_one(&stmt, &[&params[0], &params[1]])
                    .await
                    .map_err(db)?;
                e.insert(counts(&r, 0));
            }
        }
    }
    Ok(out)
}
