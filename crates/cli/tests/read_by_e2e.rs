//! Read by N of M on the real Apache Kafka of `scripts/test` (issue 24): two `readstate
//! run` processes read reads, messages and a compacted members topic (JSON member lists
//! keyed by conversation); one is SIGKILLed mid-stream and restarted. Membership changes
//! (joins of members who never read, leaves, a deleted list) come before, during and after
//! the kill. Per (sender, conversation), the last read-by record equals the oracle of the
//! final state: the sender's latest message, N = members whose final pointer reaches it,
//! M = final members. PostgreSQL (the embedded sinks) agrees: `sender_receipts` holds
//! every sender's oracle receipts, and `conversation_members_read_by(conversation,
//! position)` gives the same N and M from the members and receipts tables.

use readstate_testing::chat;
use readstate_testing::db::Db;
use readstate_testing::kafka;
use readstate_testing::process;
use readstate_testing::process::SpawnGuarded;

use std::collections::{BTreeSet, HashMap};

use chat::{produce, ChatTopics};
use kafka::suffix;
use process::terminate;
use rdkafka::producer::BaseRecord;
use rdkafka::Message;
use readstate::ids::{ConversationId, ReaderId};
use readstate::model::{ReadBy, StateKey};
use readstate_tools::loadgen::chat::{generate, ChatSpec, ChatWorkload};

const PARTS: i32 = 4;

type Figures = HashMap<(i64, i64), (i64, i64, i64)>;

/// Per (sender, conversation) of a conversation with members: (latest message, N, M).
fn oracle(w: &ChatWorkload, members: &HashMap<ConversationId, BTreeSet<ReaderId>>) -> Figures {
    let mut want = HashMap::new();
    for (c, messages) in &w.messages {
        let ms = &members[c];
        let mut latest: HashMap<i64, i64> = HashMap::new();
        for m in messages {
            let l = latest.entry(m.sender_id.as_int().unwrap()).or_insert(-1);
            *l = (*l).max(m.message_seq);
        }
        for (s, seq) in latest {
            let n = (ms.iter())
                .filter(|r| {
                    let key = StateKey {
                        conversation: c.clone(),
                        reader: (*r).clone(),
                    };
                    w.pointers.get(&key).is_some_and(|p| *p >= seq)
                })
                .count();
            want.insert((s, c.as_int().unwrap()), (seq, n as i64, ms.len() as i64));
        }
    }
    want
}

fn produce_members(
    brokers: &str,
    topic: &str,
    lists: &[(ConversationId, Option<&BTreeSet<ReaderId>>)],
) {
    let p = kafka::producer(brokers);
    for (c, ms) in lists {
        let key = c.to_string();
        let value = ms.map(|ms| {
            let ids: Vec<i64> = ms.iter().map(|m| m.as_int().unwrap()).collect();
            serde_json::json!({ "members": ids }).to_string()
        });
        let mut r = BaseRecord::<str, [u8]>::to(topic).key(key.as_str());
        if let Some(v) = &value {
            r = r.payload(v.as_bytes());
        }
        kafka::send(&p, r);
    }
    kafka::flush(&p);
}

#[test]
fn real_broker_read_by_n_of_m_across_a_kill_9_and_a_restart_equals_the_oracle() {
    let brokers = std::env::var("READSTATE_TEST_KAFKA").expect(
        "READSTATE_TEST_KAFKA is not set: run scripts/test, which starts a private Apache Kafka",
    );
    readstate_testing::fixtures::capture_logs();
    let s = suffix();
    let app = format!("read-by-{s}");
    let t = ChatTopics::new(&s);
    let members_topic = format!("members-{s}");
    let read_by_topic = format!("read-by-{s}");
    for topic in [&t.reads, &t.messages] {
        kafka::create_topic(&brokers, topic, PARTS, &[]);
    }
    kafka::create_topic(
        &brokers,
        &members_topic,
        PARTS,
        &[("cleanup.policy", "compact")],
    );
    let w = generate(&ChatSpec {
        seed: 24,
        conversations: 24,
        max_members: 30,
        max_messages: 60,
        ..Default::default()
    });
    let db = Db::create();
    let extra = format!(
        r#"
[[source]]
name = "members"
topic = "{members_topic}"
records = "members"
[[sink]]
name = "read-by"
kind = "kafka"
input = "read-state"
output = "read-by"
topic = "{read_by_topic}"
[[sink]]
name = "senders"
kind = "kafka"
input = "read-state"
output = "sender-receipts"
topic = "senders-{s}"
[[sink]]
name = "pg"
kind = "postgres"
input = "receipt-updates"
linger = "200ms"
[[sink]]
name = "pg-senders"
kind = "postgres"
input = "senders"
linger = "200ms"
[[sink]]
name = "pg-members"
kind = "postgres"
input = "members"
linger = "200ms"
"#
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spawn = |dir: &std::path::Path| {
        let inputs = vec!["read-events", "message-events", "members"];
        let text = chat::fixture(&app, dir, &t)
            .with_tables(&extra)
            .set("processor.read-state.inputs", inputs)
            .text();
        let file = dir.join("topology.toml");
        std::fs::write(&file, text).unwrap();
        let migrated = std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
            .args(["migrate", "--topology"])
            .arg(&file)
            .env("DATABASE_URL", &db.url)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(migrated.success(), "readstate migrate");
        std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
            .args(["run", "--local-schemas", "--topology"])
            .arg(&file)
            .args(readstate_testing::process::QUICK_FAILOVER)
            .env("KAFKA_BROKERS", &brokers)
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("readstate.log")).unwrap())
            .spawn_guarded()
    };
    // Every conversation's members, and one who never reads.
    let mut members: HashMap<ConversationId, BTreeSet<ReaderId>> = (w.members.iter())
        .map(|(c, ms)| {
            let mut set: BTreeSet<ReaderId> = ms.iter().cloned().collect();
            set.insert(ReaderId::from(900_000 + c.as_int().unwrap()));
            (c.clone(), set)
        })
        .collect();
    let mut convs: Vec<ConversationId> = members.keys().cloned().collect();
    convs.sort();
    let all: Vec<(ConversationId, Option<&BTreeSet<ReaderId>>)> = convs
        .iter()
        .map(|c| (c.clone(), Some(&members[c])))
        .collect();
    produce_members(&brokers, &members_topic, &all);
    let mut a = spawn(dir_a.path());
    let mut b = spawn(dir_b.path());
    let (first, second) = w.arrivals.split_at(w.arrivals.len() / 2);
    produce(&brokers, &t, first);
    kafka::read_until(&brokers, &read_by_topic, |_| (), |d: &[()]| d.len() >= 50);
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    // While one instance is dead: a third of the groups change (a leave, or a join).
    let mut changed = Vec::new();
    for (i, c) in convs.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
        let ms = members.get_mut(c).unwrap();
        if i % 2 == 0 {
            let leaving = ms.iter().next().unwrap().clone();
            ms.remove(&leaving);
        } else {
            ms.insert(ReaderId::from(950_000 + i as i64));
        }
        changed.push(c.clone());
    }
    let lists: Vec<_> = changed
        .iter()
        .map(|c| (c.clone(), Some(&members[c])))
        .collect();
    produce_members(&brokers, &members_topic, &lists);
    produce(&brokers, &t, second);
    let mut a = spawn(dir_a.path());
    // After the restart: another join, and one conversation's list deleted.
    members
        .get_mut(&convs[1])
        .unwrap()
        .insert(ReaderId::from(990_001));
    members.insert(convs[2].clone(), BTreeSet::new());
    let lists = [
        (convs[1].clone(), Some(&members[&convs[1]])),
        (convs[2].clone(), None),
    ];
    produce_members(&brokers, &members_topic, &lists);
    let want = oracle(&w, &members);
    let schema = apache_avro::Schema::parse_str(readstate::serde::READ_BY_SCHEMA).unwrap();
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .unwrap();
    let got = kafka::read_until(
        &brokers,
        &read_by_topic,
        |m| {
            let mut datum = &m.payload().unwrap()[5..];
            let v = reader.read_value(&mut datum).unwrap();
            let r: readstate::serde::message::AvroReadBy = apache_avro::from_value(&v).unwrap();
            let key = std::str::from_utf8(m.key().unwrap()).unwrap().to_owned();
            (key, m.partition(), ReadBy::from(r))
        },
        |got: &[(String, i32, ReadBy)]| last(got) == want,
    );
    let senders = chat::sender_oracle(&w);
    readstate_testing::wait_until_explained(
        "PostgreSQL's sender_receipts and read_by to equal the oracle",
        std::time::Duration::from_secs(120),
        || (in_postgres(&db, &want) == (senders.clone(), want.clone())).then_some(()),
        || {
            let (s, r) = in_postgres(&db, &want);
            format!(
                "sender_receipts: {} rows of {} ({} equal); read_by: {} of {} equal",
                s.len(),
                senders.len(),
                s.iter()
                    .filter(|(k, v)| senders.get(*k) == Some(*v))
                    .count(),
                r.iter().filter(|(k, v)| want.get(*k) == Some(*v)).count(),
                want.len()
            )
        },
    );
    terminate(&mut a.0);
    terminate(&mut b.0);
    let mut home: HashMap<String, i32> = HashMap::new();
    for (key, p, r) in &got {
        assert_eq!(key, &r.sender_id.to_string(), "keyed by sender");
        assert_eq!(
            *home.entry(key.clone()).or_insert(*p),
            *p,
            "one partition per sender"
        );
    }
    let deleted = convs[2].as_int().unwrap();
    assert!(
        want.iter().any(|((_, c), f)| *c == deleted && f.2 == 0),
        "a deleted list leaves M = 0"
    );
    eprintln!(
        "{} read-by records for {} (sender, conversation)",
        got.len(),
        want.len()
    );
}

/// PostgreSQL's view: every `sender_receipts` row, and for each (sender, conversation) of
/// `want` the read-by function's figures at its message.
fn in_postgres(db: &Db, want: &Figures) -> (HashMap<(i64, i64, i64), i64>, Figures) {
    let Ok(c) = db.connect(&db.url) else {
        return Default::default();
    };
    let rows = db.rt.block_on(c.query(
        "SELECT sender_id, conversation_id, reader_id, message_seq FROM sender_receipts",
        &[],
    ));
    let senders = (rows.iter().flatten())
        .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
        .collect();
    let mut figures = HashMap::new();
    for ((s, conv), (seq, _, _)) in want {
        let row = db.rt.block_on(c.query_one(
            "SELECT read_by, members FROM conversation_members_read_by($1, $2)",
            &[conv, seq],
        ));
        if let Ok(r) = row {
            figures.insert((*s, *conv), (*seq, r.get(0), r.get(1)));
        }
    }
    (senders, figures)
}

/// The last record per (sender, conversation), in topic order (one partition per sender).
fn last(got: &[(String, i32, ReadBy)]) -> Figures {
    got.iter()
        .map(|(_, _, r)| {
            let k = (
                r.sender_id.as_int().unwrap(),
                r.conversation_id.as_int().unwrap(),
            );
            (k, (r.message_seq, r.read_by, r.members))
        })
        .collect()
}
