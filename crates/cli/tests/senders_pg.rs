//! Catch-up for offline senders in PostgreSQL (issue 24): `readstate migrate` then
//! `readstate run` (a real process, its embedded sinks) on MockCluster and the private
//! PostgreSQL of `scripts/test`. The `sender_receipts` table holds, per (sender,
//! conversation, reader), the chat oracle's highest of the sender's messages the reader
//! read, also for messages that arrive after the reads that cover them; and the catch-up
//! query ("everything for sender S since T") is an index scan at a realistic size.

use readstate_testing::chat;
use readstate_testing::db;
use readstate_testing::kafka;
use readstate_testing::process;
use readstate_testing::process::SpawnGuarded;

use std::collections::HashMap;
use std::time::Duration;

use chat::{produce, topology_text, ChatTopics};
use db::Db;
use kafka::suffix;
use process::terminate;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use readstate::model::SenderReceipt;
use readstate::sink::PostgresTable;
use readstate_testing::wait_until_explained;
use readstate_tools::loadgen::chat::{generate, ChatSpec};

const PARTS: i32 = 4;

type Triple = (i64, i64, i64);

fn rows(db: &Db) -> Option<HashMap<Triple, i64>> {
    let c = db.connect(&db.url).ok()?;
    let rows = db
        .rt
        .block_on(c.query(
            "SELECT sender_id, conversation_id, reader_id, message_seq FROM sender_receipts",
            &[],
        ))
        .ok()?;
    Some(
        rows.iter()
            .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
            .collect(),
    )
}

#[test]
fn postgres_sender_receipts_equal_the_oracle_with_reads_before_their_messages() {
    let db = Db::create();
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    let s = suffix();
    let app = format!("senders-pg-{s}");
    let t = ChatTopics::new(&s);
    let senders = format!("senders-{s}");
    for name in t.all().into_iter().chain([senders.as_str()]) {
        mock.create_topic(name, PARTS, 1).unwrap();
    }
    for internal in readstate_testing::chat::INTERNAL_TOPICS {
        mock.create_topic(&format!("{app}-{internal}"), PARTS, 1)
            .unwrap();
    }
    mock.create_topic(&format!("{app}-dlq"), 1, 1).unwrap();
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("topology.toml");
    let sinks = format!(
        r#"
[[sink]]
name = "senders"
kind = "kafka"
input = "read-state"
output = "sender-receipts"
topic = "{senders}"
[[sink]]
name = "pg"
kind = "postgres"
input = "receipt-updates"
linger = "200ms"
[[sink]]
name = "pg-senders"
kind = "postgres"
input = "senders"
batch_size = 300
linger = "200ms"
"#
    );
    std::fs::write(&file, topology_text(&app, state.path(), &t, &sinks)).unwrap();
    let brokers = mock.bootstrap_servers();
    let cli = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_readstate"));
        c.args(args)
            .arg("--topology")
            .arg(&file)
            .env("KAFKA_BROKERS", &brokers)
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        c
    };
    assert!(cli(&["migrate"]).status().unwrap().success(), "migrate");
    // Reordered: a fifth of the events arrive up to 50 places late, so reads come before
    // the messages they cover.
    let w = generate(&ChatSpec {
        seed: 24,
        conversations: 24,
        max_members: 30,
        max_messages: 80,
        reorder_rate: 0.2,
        ..Default::default()
    });
    produce(&brokers, &t, &w.arrivals);
    let mut child = cli(&["run", "--local-schemas"]).spawn_guarded();
    let want = chat::sender_oracle(&w);
    assert!(want.len() > 500, "{} triples", want.len());
    let last = std::cell::RefCell::new(None);
    wait_until_explained(
        "sender_receipts to equal the oracle",
        Duration::from_secs(120),
        || {
            let got = rows(&db);
            let done = got.as_ref() == Some(&want);
            *last.borrow_mut() = got;
            done.then_some(())
        },
        || {
            let got = last.borrow().clone().unwrap_or_default();
            let wrong: Vec<_> = (want.iter())
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .take(10)
                .map(|(k, v)| format!("{k:?}: want {v}, got {:?}", got.get(k)))
                .collect();
            let extra = got.keys().filter(|k| !want.contains_key(*k)).count();
            format!(
                "{} rows of {} wanted, {extra} unwanted; first differences: {wrong:#?}",
                got.len(),
                want.len()
            )
        },
    );
    terminate(&mut child.0);
}

/// "Everything for sender S since T" on 400,000 rows (20,000 senders): the plan is a scan
/// of the `(sender_id, updated_at)` index, never of the table.
#[test]
fn the_catch_up_query_is_an_index_scan_at_a_realistic_size() {
    let db = Db::create();
    let table = PostgresTable::<SenderReceipt>::open(
        &db.url,
        "sender_receipts",
        1,
        Duration::from_secs(60),
    )
    .unwrap();
    db.rt.block_on(table.migrate()).unwrap();
    let c = db.connect(&db.url).unwrap();
    db.rt
        .block_on(c.batch_execute(
            "INSERT INTO sender_receipts (sender_id, conversation_id, reader_id, message_seq,
                 read_at, covers_older, updated_at)
             SELECT i % 20000, i / 20, i % 7919, i, now(), false,
                    now() - (i % 86400) * interval '1 second'
             FROM generate_series(1, 400000) AS i;
             ANALYZE sender_receipts;",
        ))
        .unwrap();
    let rows = db
        .rt
        .block_on(c.query(
            "EXPLAIN (COSTS OFF) SELECT conversation_id, reader_id, message_seq, message_id,
                 read_at, device_id FROM sender_receipts
             WHERE sender_id = 42 AND updated_at > now() - interval '1 hour'
             ORDER BY updated_at",
            &[],
        ))
        .unwrap();
    let plan: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let text = plan.join("\n");
    eprintln!("{text}");
    assert!(
        text.contains("sender_receipts_by_sender_updated") && !text.contains("Seq Scan"),
        "the catch-up query scans the table:\n{text}"
    );
}
