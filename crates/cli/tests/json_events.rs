//! Bring your own events (issue 23): read events in a service's own JSON shape, keyed by
//! sender with Sarama's FNV-1a partitioner, ordered by `read_at` in seconds, through two
//! `readstate run` processes, one killed with SIGKILL mid-stream. The receipt updates and
//! the stores equal an oracle computed from the events; every bad record is a dead letter.

mod support;

use std::collections::HashMap;

use rdkafka::producer::BaseRecord;
use readstate::ids::{ConversationId, Id, IdType, IdTypes, ReaderId, SenderId};
use readstate::model::{ReadEvent, StateKey};
use readstate_testing::db::Db;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use readstate_testing::process::terminate;
use support::*;

/// Seconds since the epoch of the first position.
const BASE_S: i64 = 1_700_000_000;

/// The topology's `[ids]`: the issue's shape has string user and conversation ids and
/// UUID message ids.
const IDS: IdTypes = IdTypes {
    conversation: IdType::String,
    user: IdType::String,
    message: IdType::Uuid,
};

fn text(s: String) -> Id {
    Id::text(&s).unwrap()
}

/// The workload's events with the issue's ids: `conv789`, `user456`, a sender per
/// conversation, and a UUID message id per (conversation, position).
fn with_string_ids(events: &[ReadEvent]) -> Vec<ReadEvent> {
    events
        .iter()
        .map(|e| {
            let conv = e.conversation_id.as_int().unwrap();
            let reader = e.reader_id.as_int().unwrap();
            ReadEvent {
                conversation_id: ConversationId(text(format!("conv{conv}"))),
                reader_id: ReaderId(text(format!("user{reader}"))),
                sender_id: Some(SenderId(text(format!("user{}", 1000 + conv % 7)))),
                message_id: Some(message_uuid(conv, e.message_seq)),
                device_id: e.device_id.as_ref().map(|d| format!("device-{d}")),
                ..e.clone()
            }
        })
        .collect()
}

/// The message at `seq` of conversation `conv`: a version-4-shaped UUID, canonical.
fn message_uuid(conv: i64, seq: i64) -> String {
    format!("{conv:08x}-e29b-41d4-a716-{seq:012x}")
}

/// The event in the exact shape of the issue's Go service: string ids, a UUID `msg_id`,
/// `read_at` in seconds, a device (or null), and a field readstate does not map.
fn json_of(e: &ReadEvent) -> String {
    format!(
        r#"{{"msg_id":"{}","sender_id":"{}","reader_id":"{}","conversation_id":"{}","read_at":{},"device_id":{},"meta":{{"client":"go","tags":["a"]}}}}"#,
        e.message_id.as_deref().unwrap_or_default(),
        e.sender_id.as_ref().unwrap(),
        e.reader_id,
        e.conversation_id,
        BASE_S + e.message_seq,
        e.device_id
            .as_deref()
            .map_or("null".to_owned(), |d| format!("\"{d}\"")),
    )
}

/// `topologies/json_read_receipts.toml` (string and UUID ids, FNV-1a, read_at as the
/// position) on the environment's topics, its source named `read-events` as the
/// environment's internal topics are; with its PostgreSQL sink (into the `read_receipts`
/// table, in small, quick batches) or without.
fn topology(env: &Env, postgres: bool) -> String {
    let t = Shipped::load("json_read_receipts.toml")
        .rename("source.read-receipt-events", "read-events")
        .into_env(env, "read-events", "receipt-updates");
    match postgres {
        true => t
            .set("sink.postgres.table", "read_receipts")
            .set("sink.postgres.batch_size", 200)
            .set("sink.postgres.linger", "100ms"),
        false => t.without("sink.postgres"),
    }
    .text()
}

/// Who produces the events, placing them with FNV-1a.
#[derive(Clone, Copy)]
enum Client {
    /// librdkafka's `fnv1a` partitioner.
    Librdkafka,
    /// Sarama (Go), its default hash partitioner: `bench/sarama-producer`, built by
    /// `scripts/test` (`READSTATE_SARAMA_PRODUCER`).
    Sarama,
}

/// The records to produce, `(key, value)`: the events as JSON keyed by sender (or by
/// conversation when the source is keyed by it), and after every `bad_every`-th one a
/// record that must be a dead letter; the number of those.
fn records(env: &Env, events: &[ReadEvent], bad_every: usize) -> (Vec<(String, String)>, usize) {
    let long_id = "u".repeat(256);
    let bad = [
        r#"{"msg_id": "not-a-uuid", "reader_id": "user456", "conversation_id": "conv1", "read_at": 1}"#.to_owned(),
        r#"{"reader_id": "user1", "conversation_id": "conv2""#.to_owned(),
        r#"{"reader_id": "user1", "conversation_id": "conv2"}"#.to_owned(),
        format!(r#"{{"reader_id": "{long_id}", "conversation_id": "conv2", "read_at": 5}}"#),
    ];
    let mut out = Vec::with_capacity(events.len() + events.len() / bad_every);
    let mut sent_bad = 0;
    for (i, e) in events.iter().enumerate() {
        let key = match env.keyed_by {
            Some(_) => e.sender_id.as_ref().unwrap().to_string(),
            None => e.conversation_id.to_string(),
        };
        out.push((key, json_of(e)));
        if i % bad_every == bad_every - 1 {
            out.push(("bad".into(), bad[sent_bad % bad.len()].clone()));
            sent_bad += 1;
        }
    }
    (out, sent_bad)
}

/// Produce `events` with `client`; how many bad records went with them.
fn produce(env: &Env, client: Client, events: &[ReadEvent], bad_every: usize) -> usize {
    let (records, bad) = records(env, events, bad_every);
    match client {
        Client::Librdkafka => {
            let p = kafka::producer_with(&env.brokers(), "fnv1a");
            for (k, v) in &records {
                kafka::send(
                    &p,
                    BaseRecord::to(&env.source)
                        .key(k.as_str())
                        .payload(v.as_bytes()),
                );
            }
            kafka::flush(&p);
        }
        Client::Sarama => kafka::sarama_produce(&env.brokers(), &env.source, &records),
    }
    bad
}

/// The oracle over the events as readstate must see them: positions in microseconds.
fn want(events: &[ReadEvent]) -> HashMap<readstate::model::StateKey, Expected> {
    let scaled: Vec<ReadEvent> = events
        .iter()
        .map(|e| ReadEvent {
            message_seq: (BASE_S + e.message_seq) * 1_000_000,
            device_id: e.device_id.clone().or(Some("unknown".into())),
            ..e.clone()
        })
        .collect();
    oracle(&scaled)
}

/// Per key, the message id of its furthest read: what the last update and the row carry.
fn message_of_max(events: &[ReadEvent]) -> HashMap<StateKey, String> {
    let mut max: HashMap<StateKey, (i64, String)> = HashMap::new();
    for e in events {
        let m = e.message_id.clone().unwrap();
        let x = max.entry(e.key()).or_insert((i64::MIN, String::new()));
        if (e.message_seq, &m) > (x.0, &x.1) {
            *x = (e.message_seq, m);
        }
    }
    max.into_iter().map(|(k, (_, m))| (k, m)).collect()
}

/// A row's pointer, version and message id.
type Row = (i64, i64, String);

/// The receipts table: its id columns' (name, type) and every row.
fn rows(db: &Db) -> (Vec<(String, String)>, HashMap<StateKey, Row>) {
    let c = db.connect(&db.url).unwrap();
    let types = db
        .rt
        .block_on(c.query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_name = 'read_receipts'
               AND column_name IN ('conversation_id', 'reader_id', 'sender_id', 'message_id')
             ORDER BY column_name",
            &[],
        ))
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let rows = db
        .rt
        .block_on(c.query(
            "SELECT conversation_id, reader_id, last_read_seq, version, message_id::text
             FROM read_receipts",
            &[],
        ))
        .unwrap()
        .iter()
        .map(|r| {
            let key = StateKey {
                conversation: ConversationId(text(r.get(0))),
                reader: ReaderId(text(r.get(1))),
            };
            (key, (r.get(2), r.get(3), r.get(4)))
        })
        .collect();
    (types, rows)
}

fn two_instances_one_killed(env: Env, client: Client, db: Option<&Db>) {
    let events = with_string_ids(&zipf_workload(23, 12_000));
    let (first, second) = events.split_at(events.len() / 2);
    let want = want(&events);
    let file = env.state.path().join("topology.toml");
    std::fs::write(&file, topology(&env, db.is_some())).unwrap();
    let mut vars = Vec::new();
    if let Some(db) = db {
        db.migrate_with(IDS).unwrap();
        vars.push(("DATABASE_URL", db.url.as_str()));
    }
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The survivor takes the killed instance's partitions once its session times out: 6 s,
    // not the default 45 s, which left a CI run's 90 s read window too short.
    let quick = readstate_testing::process::QUICK_FAILOVER;
    let mut a = spawn_cli_with(&env, &file, dir_a.path(), &quick, &vars);
    let mut b = spawn_cli_with(&env, &file, dir_b.path(), &quick, &vars);
    let mut bad = produce(&env, client, first, 500);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 100);
    a.kill().unwrap();
    a.wait().unwrap();
    bad += produce(&env, client, second, 500);
    // A survivor that stopped (or stalled) explains a read that times out: say how it
    // is and how its log ends.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        env.read_typed_updates(&want, &IDS)
    }));
    let updates = read.unwrap_or_else(|panic| {
        let log = readstate_testing::process::log_tail(&dir_b.path().join("readstate.log"), 60);
        eprintln!("B is {:?}; its log ends:\n{log}", b.try_wait());
        std::panic::resume_unwind(panic)
    });
    let dlq = format!("{}-dlq", env.app);
    // Dead letters are at least once, like every output: the killed instance's uncommitted
    // ones are written again by the other. One per bad source record, by its position.
    let distinct = |d: &[(String, String)]| {
        d.iter()
            .map(|(at, _)| at)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let letters = env.read_until(
        &dlq,
        |m| {
            let at = ["readstate.source.partition", "readstate.source.offset"]
                .map(|h| header(m, h).unwrap_or_default())
                .join("@");
            (at, header(m, "readstate.error.reason").unwrap_or_default())
        },
        |d: &[(String, String)]| distinct(d) >= bad,
    );
    let messages = message_of_max(&events);
    if let Some(db) = db {
        let want_rows: HashMap<StateKey, Row> = want
            .iter()
            .map(|(k, x)| (k.clone(), (x.max_seq, x.advances, messages[k].clone())))
            .collect();
        let (types, got) = readstate_testing::wait::wait_until(
            "every row in PostgreSQL equal to the oracle",
            std::time::Duration::from_secs(120),
            || Some(rows(db)).filter(|(_, got)| *got == want_rows),
        );
        assert_eq!(
            types,
            [
                ("conversation_id", "text"),
                ("message_id", "uuid"),
                ("reader_id", "text"),
                ("sender_id", "text")
            ]
            .map(|(c, t)| (c.to_owned(), t.to_owned()))
        );
        assert_eq!(got.len(), want.len());
    }
    terminate(&mut b);
    check_output_monotonic(&updates, &want);
    let last = last_updates_lenient(&updates);
    for (k, m) in &messages {
        assert_eq!(last[k].message_id.as_ref(), Some(m), "message id of {k:?}");
    }
    let stored = env.stored_states_in(dir_b.path());
    assert_eq!(stored.len(), want.len(), "B owns every task at the end");
    assert_states_match(&want, |k| stored.get(k).cloned());
    assert_eq!(distinct(&letters), bad, "a dead letter for each bad record");
    let mut reasons: Vec<&str> = letters.iter().map(|(_, r)| r.as_str()).collect();
    reasons.sort();
    reasons.dedup();
    assert_eq!(
        reasons,
        ["invalid_event", "malformed"],
        "no misrouted record: readstate's fnv1a places keys as the producer did"
    );
}

/// The last update per key (duplicates after the kill allowed).
fn last_updates_lenient(
    updates: &[readstate::model::ReceiptUpdate],
) -> HashMap<StateKey, readstate::model::ReceiptUpdate> {
    updates.iter().map(|u| (u.key(), u.clone())).collect()
}

#[test]
fn json_events_keyed_by_sender_with_one_of_two_instances_killed() {
    two_instances_one_killed(Env::keyed_by(Some("sender_id")), Client::Librdkafka, None);
}

/// The issue's exact shape on Apache Kafka: JSON with string ids and UUID message ids,
/// `read_at` in seconds, keyed by `sender_id` over 16 partitions by Sarama (Go) with its
/// FNV-1a hash partitioner, through two `readstate run` processes with the PostgreSQL
/// sink, one SIGKILLed mid-stream: the receipt updates, the rows (in `text` and `uuid`
/// columns) and the stores equal the oracle.
#[test]
fn real_broker_sarama_json_events_keyed_by_sender_with_one_of_two_instances_killed() {
    let db = Db::create();
    let env = Env::on_with_parts(Broker::real(), Some("sender_id"), 16);
    two_instances_one_killed(env, Client::Sarama, Some(&db));
}

/// Sarama's records keyed by conversation: every record is checked against readstate's
/// FNV-1a (`partitioner = "fnv1a"`), so one placed differently by Sarama would be a
/// `misrouted` dead letter and fail the test.
#[test]
fn real_broker_sarama_json_events_keyed_by_conversation_are_placed_as_declared() {
    two_instances_one_killed(Env::on(Broker::real(), None), Client::Sarama, None);
}

/// `readstate demo --json`: a Zipf workload as a Go service's JSON, keyed by sender with
/// FNV-1a, through the embedded broker, the repartition and the PostgreSQL sink: every row
/// equals the generator's max per key (in microseconds), every poison pill is a dead letter.
#[test]
fn the_json_demo_passes() {
    let admin = std::env::var("READSTATE_TEST_DATABASE_URL").expect(
        "READSTATE_TEST_DATABASE_URL is not set: run scripts/test, which starts a private PostgreSQL",
    );
    let report = readstate_tools::demo::run_demo(readstate_tools::demo::DemoConfig {
        spec: readstate_tools::loadgen::WorkloadSpec {
            events: 40_000,
            conversations: 3_000,
            poison_rate: 0.001,
            seed: 23,
            ..Default::default()
        },
        partitions: 4,
        database_url: admin,
        database_name: format!("rs_demo_json_{}", kafka::suffix()),
        metrics_addr: None,
        batch_size: 500,
        progress_every: std::time::Duration::from_secs(5),
        brokers: None,
        exactly_once: false,
        json: true,
    })
    .expect("demo runs");
    print!("{}", report.render());
    assert!(report.poison > 0 && report.keys > 1_000, "{report:?}");
    assert!(report.pass(), "demo FAILED: {:?}", report.mismatches);
}
