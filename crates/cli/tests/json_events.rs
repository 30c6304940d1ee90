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
    let topic = format!("topic = \"{}\"", env.source);
    env.topology_text().replace(
        &topic,
        &format!(
            r#"{topic}
format = "json"
partitioner = "fnv1a"
position = "timestamp"
time_unit = "s"
fields = {{ reader = "reader_id", conversation = "conversation_id", position = "read_at", message_id = "msg_id", sender = "sender_id", device = "device_id" }}
defaults = {{ device = "unknown" }}"#
        ),
    )
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
    let bad = [
        r#"{"reader_id": "user456", "conversation_id": "1", "read_at": 1}"#,
        r#"{"reader_id": 1, "conversation_id": 2"#,
        r#"{"reader_id": 1, "conversation_id": 2}"#,
    ];
    let mut out = Vec::with_capacity(events.len() + events.len() / bad_every);
    let mut sent_bad = 0;
    for (i, e) in events.iter().enumerate() {
        let key = match env.keyed_by {
            Some(_) => sender_of(e),
            None => e.conversation_id.0,
        };
        out.push((key.to_string(), json_of(e)));
        if i % bad_every == bad_every - 1 {
            out.push(("bad".into(), bad[sent_bad % bad.len()].into()));
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
        Client::Sarama => sarama_produce(env, &records),
    }
    bad
}

fn sarama_produce(env: &Env, records: &[(String, String)]) {
    use std::io::Write;
    let bin = std::env::var("READSTATE_SARAMA_PRODUCER").expect(
        "READSTATE_SARAMA_PRODUCER is not set: run scripts/test, which builds bench/sarama-producer",
    );
    let mut child = std::process::Command::new(bin)
        .args(["-brokers", &env.brokers(), "-topic", &env.source])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (k, v) in records {
        writeln!(stdin, "{k}\t{v}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sarama-producer failed: {out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.trim(), format!("produced {} records", records.len()));
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

fn two_instances_one_killed(env: Env, client: Client) {
    let events = zipf_workload(23, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = want(&events);
    let file = env.state.path().join("topology.toml");
    std::fs::write(&file, topology(&env)).unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = spawn_cli_in(&env, &file, dir_a.path(), &[]);
    let mut b = spawn_cli_in(&env, &file, dir_b.path(), &[]);
    let mut bad = produce(&env, client, first, 500);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 100);
    a.kill().unwrap();
    a.wait().unwrap();
    bad += produce(&env, client, second, 500);
    let updates = env.read_updates(&want);
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
    terminate(&mut b);
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(dir_b.path());
    assert_eq!(stored.len(), want.len(), "B owns every task at the end");
    assert_states_match(&want, |k| stored.get(&k).cloned());
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

#[test]
fn json_events_keyed_by_sender_with_one_of_two_instances_killed() {
    two_instances_one_killed(Env::keyed_by(Some("sender_id")), Client::Librdkafka);
}

/// The same on Apache Kafka (readstate creates its repartition, changelog and DLQ topics),
/// the events produced by Sarama (Go) as the services this is for do.
#[test]
fn real_broker_sarama_json_events_keyed_by_sender_with_one_of_two_instances_killed() {
    two_instances_one_killed(Env::on(Broker::real(), Some("sender_id")), Client::Sarama);
}

/// Sarama's records keyed by conversation: every record is checked against readstate's
/// FNV-1a (`partitioner = "fnv1a"`), so one placed differently by Sarama would be a
/// `misrouted` dead letter and fail the test.
#[test]
fn real_broker_sarama_json_events_keyed_by_conversation_are_placed_as_declared() {
    two_instances_one_killed(Env::on(Broker::real(), None), Client::Sarama);
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
