//! Bring your own events (issue 23): read events in a service's own JSON shape, keyed by
//! sender with Sarama's FNV-1a partitioner, ordered by `read_at` in seconds, through two
//! `readstate run` processes, one killed with SIGKILL mid-stream. The receipt updates and
//! the stores equal an oracle computed from the events; every bad record is a dead letter.

mod support;

use std::collections::HashMap;

use rdkafka::producer::BaseRecord;
use readstate::model::ReadEvent;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use readstate_testing::process::terminate;
use support::*;

/// Seconds since the epoch of the first position.
const BASE_S: i64 = 1_700_000_000;

/// The event in the shape of a Go service's read receipts (ids as strings of digits, a
/// UUID-shaped message id, `read_at` in seconds).
fn json_of(e: &ReadEvent) -> String {
    format!(
        r#"{{"msg_id":"{}","sender_id":"{}","reader_id":"{}","conversation_id":"{}","read_at":{},"device_id":{},"meta":{{"client":"go","tags":["a"]}}}}"#,
        e.message_id.as_deref().unwrap_or_default(),
        sender_of(e),
        e.reader_id.0,
        e.conversation_id.0,
        BASE_S + e.message_seq,
        e.device_id
            .as_deref()
            .map_or("null".to_owned(), |d| format!("\"{d}\"")),
    )
}

fn sender_of(e: &ReadEvent) -> i64 {
    1000 + e.conversation_id.0 % 7
}

fn topology(env: &Env) -> String {
    let source = format!("topic = \"{}\"\nkeyed_by = \"sender_id\"", env.source);
    env.topology_text().replace(
        &source,
        &format!(
            r#"{source}
format = "json"
partitioner = "fnv1a"
position = "timestamp"
time_unit = "s"
fields = {{ reader = "reader_id", conversation = "conversation_id", position = "read_at", message_id = "msg_id", sender = "sender_id", device = "device_id" }}
defaults = {{ device = "unknown" }}"#
        ),
    )
}

/// Produce the events as JSON keyed by sender, placed by FNV-1a (Sarama's hash
/// partitioner); every `bad_every`-th record is followed by one that must be a dead letter.
fn produce(env: &Env, events: &[ReadEvent], bad_every: usize) -> usize {
    let p = kafka::producer_with(&env.brokers(), "fnv1a");
    let bad = [
        r#"{"reader_id": "user456", "conversation_id": "1", "read_at": 1}"#,
        r#"{"reader_id": 1, "conversation_id": 2"#,
        r#"{"reader_id": 1, "conversation_id": 2}"#,
    ];
    let mut sent_bad = 0;
    for (i, e) in events.iter().enumerate() {
        let key = sender_of(e).to_string();
        let value = json_of(e);
        kafka::send(
            &p,
            BaseRecord::to(&env.source)
                .key(key.as_str())
                .payload(value.as_bytes()),
        );
        if i % bad_every == bad_every - 1 {
            let value = bad[sent_bad % bad.len()];
            kafka::send(
                &p,
                BaseRecord::to(&env.source)
                    .key("bad")
                    .payload(value.as_bytes()),
            );
            sent_bad += 1;
        }
    }
    kafka::flush(&p);
    sent_bad
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

fn two_instances_one_killed(env: Env) {
    let events = zipf_workload(23, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = want(&events);
    let file = env.state.path().join("topology.toml");
    std::fs::write(&file, topology(&env)).unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = spawn_cli_in(&env, &file, dir_a.path(), &[]);
    let mut b = spawn_cli_in(&env, &file, dir_b.path(), &[]);
    let mut bad = produce(&env, first, 500);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 100);
    a.kill().unwrap();
    a.wait().unwrap();
    bad += produce(&env, second, 500);
    let updates = env.read_updates(&want);
    let dlq = format!("{}-dlq", env.app);
    let letters = env.read_until(
        &dlq,
        |m| header(m, "readstate.error.reason"),
        |d: &[Option<String>]| d.len() >= bad,
    );
    terminate(&mut b);
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(dir_b.path());
    assert_eq!(stored.len(), want.len(), "B owns every task at the end");
    assert_states_match(&want, |k| stored.get(&k).cloned());
    assert_eq!(letters.len(), bad, "one dead letter per bad record");
    let mut reasons: Vec<&str> = letters.iter().map(|r| r.as_deref().unwrap()).collect();
    reasons.sort();
    reasons.dedup();
    assert_eq!(reasons, ["invalid_event", "malformed"]);
}

#[test]
fn json_events_keyed_by_sender_with_one_of_two_instances_killed() {
    two_instances_one_killed(Env::keyed_by(Some("sender_id")));
}

/// The same on Apache Kafka (readstate creates its repartition, changelog and DLQ topics).
#[test]
fn real_broker_json_events_keyed_by_sender_with_one_of_two_instances_killed() {
    two_instances_one_killed(Env::on(Broker::real(), Some("sender_id")));
}
