//! Unread and mention counts in PostgreSQL: `readstate migrate` then `readstate run` (a real
//! process, with both embedded sinks) on MockCluster and the private PostgreSQL of
//! `scripts/test`. The `read_receipts_unread` view and the `conversation_heads_counts`
//! function give every member's counts equal to the chat oracle, and `conversation_heads`
//! holds one row per conversation (nothing per member).

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
use process::{log_tail, terminate};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use readstate::ids::IdTypes;
use readstate::model::UnreadCounts;
use readstate_testing::wait_until_explained;
use readstate_tools::loadgen::chat::{generate, ChatEvent, ChatSpec, ChatWorkload};

const PARTS: i32 = 4;

const PG_SINKS: &str = r#"
[[sink]]
name = "pg"
kind = "postgres"
input = "receipt-updates"
batch_size = 200
linger = "200ms"
[[sink]]
name = "pg-heads"
kind = "postgres"
input = "conversation-heads"
batch_size = 200
linger = "200ms"
"#;

/// Every member's counts as PostgreSQL derives them: readers with a pointer from the
/// view, the others from the function at pointer -1.
fn counts_in_postgres(
    db: &Db,
    w: &ChatWorkload,
    ids: &IdTypes,
) -> Option<HashMap<Member, UnreadCounts>> {
    let c = db.connect(&db.url).ok()?;
    let rows = db
        .rt
        .block_on(c.query(
            "SELECT conversation_id::text, reader_id::text, unread_count, mention_count, counts_capped FROM read_receipts_unread",
            &[],
        ))
        .ok()?;
    let mut out: HashMap<Member, UnreadCounts> = rows
        .iter()
        .map(|r| {
            let counts = UnreadCounts {
                unread: r.get(2),
                mentions: r.get(3),
                capped: r.get(4),
            };
            ((r.get(0), r.get(1)), counts)
        })
        .collect();
    // The function's parameters have the id columns' types.
    let function = format!(
        "SELECT * FROM conversation_heads_counts($1::text::{}, $2::text::{}, -1)",
        ids.conversation.sql(),
        ids.user.sql()
    );
    for (conv, members) in &w.members {
        for m in members {
            let (conv, m) = (conv.to_string(), m.to_string());
            if out.contains_key(&(conv.clone(), m.clone())) {
                continue;
            }
            let r = db.rt.block_on(c.query_one(&function, &[&conv, &m])).ok()?;
            let counts = UnreadCounts {
                unread: r.get(0),
                mentions: r.get(1),
                capped: r.get(2),
            };
            out.insert((conv, m), counts);
        }
    }
    Some(out)
}

/// Where each embedded sink is against its topic's end, per partition (a sink behind
/// explains counts that differ; a sink at the end does not).
fn sink_positions(db: &Db, brokers: &str, app: &str, t: &ChatTopics) -> String {
    let mut out = Vec::new();
    for (group, topic) in [
        (format!("{app}-pg-sink"), &t.updates),
        (format!("{app}-pg-heads-sink"), &t.heads),
    ] {
        let applied = db.offsets(&group).unwrap_or_default();
        let ends = kafka::end_offsets(brokers, topic);
        for (p, end) in ends.iter().enumerate() {
            let at = applied.get(&(p as i32)).map(|(next, _)| *next);
            out.push(format!(
                "{group} {topic}[{p}]: applied up to {at:?} of {end}"
            ));
        }
    }
    out.join("\n")
}

/// What differs between the oracle and PostgreSQL's counts, with the instance's log end.
fn differences(
    want: &HashMap<Member, UnreadCounts>,
    got: Option<&HashMap<Member, UnreadCounts>>,
    log: &std::path::Path,
) -> String {
    let differ: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.is_none_or(|g| g.get(k) != Some(v)))
        .collect();
    let sample: Vec<String> = differ
        .iter()
        .take(5)
        .map(|(k, v)| {
            let g = got.and_then(|g| g.get(k));
            format!("(conversation, reader) {k:?}: want {v:?}, got {g:?}")
        })
        .collect();
    format!(
        "{} of {} members differ, e.g.\n{}\nthe instance's log ends:\n{}",
        differ.len(),
        want.len(),
        sample.join("\n"),
        log_tail(log, 150)
    )
}

fn expected(w: &ChatWorkload) -> HashMap<Member, UnreadCounts> {
    let mut m = HashMap::new();
    for (conv, members) in &w.members {
        for r in members {
            m.insert((conv.to_string(), r.to_string()), w.expected(conv, r));
        }
    }
    m
}

#[test]
fn postgres_counts_of_every_member_equal_the_oracle_with_one_row_per_conversation() {
    counts_in_postgres_equal_the_oracle(Shape::Avro);
}

/// The same with both sources in JSON and string user and conversation ids: `text`
/// columns in both tables, the counts function taking text ids.
#[test]
fn postgres_counts_with_string_ids_from_json_equal_the_oracle() {
    counts_in_postgres_equal_the_oracle(Shape::JsonStringIds);
}

/// The same with reads that name their message by id (`position = "message_id"`), every
/// read produced before every message: their positions resolved through the message
/// topic after waiting, PostgreSQL's counts equal the oracle's.
#[test]
fn postgres_counts_with_reads_by_message_id_equal_the_oracle() {
    counts_in_postgres_equal_the_oracle(Shape::JsonMessageIds);
}

/// A (conversation, reader) as the ids' text.
type Member = (String, String);

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// readstate's Avro, i64 ids.
    Avro,
    /// A service's JSON (`chat::json_topology_text`), `[ids]` string conversations and users.
    JsonStringIds,
    /// The same, the reads naming their message by id, produced before the messages.
    JsonMessageIds,
}

const STRING_IDS: &str = "\n[ids]\nconversation = \"string\"\nuser = \"string\"\n";

fn counts_in_postgres_equal_the_oracle(shape: Shape) {
    let db = Db::create();
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    let s = suffix();
    let app = format!("unread-pg-{s}");
    let t = ChatTopics::new(&s);
    for name in t.all() {
        mock.create_topic(name, PARTS, 1).unwrap();
    }
    for internal in readstate_testing::chat::INTERNAL_TOPICS {
        mock.create_topic(&format!("{app}-{internal}"), PARTS, 1)
            .unwrap();
    }
    mock.create_topic(&format!("{app}-dlq"), 1, 1).unwrap();
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("topology.toml");
    let text = match shape {
        Shape::Avro => topology_text(&app, state.path(), &t, PG_SINKS),
        Shape::JsonStringIds => {
            let extra = format!("{PG_SINKS}{STRING_IDS}");
            chat::json_topology_text(&app, state.path(), &t, &extra)
        }
        Shape::JsonMessageIds => {
            let extra = format!("{PG_SINKS}{STRING_IDS}");
            chat::json_message_id_topology_text(&app, state.path(), &t, "10m", &extra)
        }
    };
    let ids = readstate::topology::compile(&text).unwrap().ids;
    std::fs::write(&file, text).unwrap();
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
    let migrated = cli(&["migrate"]).status().unwrap();
    assert!(migrated.success(), "readstate migrate");
    let w = generate(&ChatSpec {
        seed: 21,
        conversations: 20,
        max_members: 120,
        max_messages: 100,
        ..Default::default()
    });
    let w = match shape {
        Shape::Avro => w,
        Shape::JsonStringIds => w.with_text_ids(),
        Shape::JsonMessageIds => w.with_text_ids().with_read_message_ids(),
    };
    match shape {
        Shape::Avro => produce(&brokers, &t, &w.arrivals),
        Shape::JsonStringIds => chat::produce_json(&brokers, &t, &w.arrivals),
        Shape::JsonMessageIds => {
            let (reads, messages): (Vec<_>, Vec<_>) =
                (w.arrivals.iter().cloned()).partition(|e| matches!(e, ChatEvent::Read(_)));
            chat::produce_json(&brokers, &t, &reads);
            chat::produce_json(&brokers, &t, &messages);
        }
    }
    let log = state.path().join("readstate.log");
    let mut child = cli(&["run", "--local-schemas"])
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn_guarded();
    let want = expected(&w);
    let last = std::cell::RefCell::new(None);
    let got = wait_until_explained(
        "PostgreSQL counts to converge to the oracle",
        Duration::from_secs(120),
        || {
            let got = counts_in_postgres(&db, &w, &ids);
            let done = got.as_ref() == Some(&want);
            *last.borrow_mut() = got;
            done.then(|| last.borrow().clone().unwrap())
        },
        || {
            let sinks = sink_positions(&db, &brokers, &app, &t);
            let diff = differences(&want, last.borrow().as_ref(), &log);
            format!("{sinks}\n{diff}")
        },
    );
    terminate(&mut child.0);
    assert!(
        got.values().any(|c| c.mentions > 0),
        "mentions were counted"
    );
    let c = db.connect(&db.url).unwrap();
    let heads: i64 = db
        .rt
        .block_on(c.query_one("SELECT count(*) FROM conversation_heads", &[]))
        .unwrap()
        .get(0);
    assert_eq!(heads, w.messages.len() as i64, "one row per conversation");
}

/// `readstate demo --unread`: messages and reads through both sinks; PASS means every
/// member's counts in PostgreSQL equal the generator's.
#[test]
fn the_unread_demo_passes() {
    use readstate_tools::demo::unread::{run_unread_demo, UnreadDemoConfig};
    let admin = std::env::var("READSTATE_TEST_DATABASE_URL").expect(
        "READSTATE_TEST_DATABASE_URL is not set: run scripts/test, which starts a private PostgreSQL",
    );
    let report = run_unread_demo(UnreadDemoConfig {
        spec: ChatSpec {
            seed: 5,
            conversations: 60,
            max_members: 200,
            max_messages: 200,
            ..Default::default()
        },
        partitions: 4,
        database_url: admin,
        database_name: format!("rs_unread_demo_{}", suffix()),
    })
    .expect("the demo runs");
    print!("{}", report.render());
    assert!(report.pass(), "demo FAILED");
    assert_eq!(report.head_rows, 60);
    assert!(
        report.members > 2_000 && report.messages > 2_000,
        "{report:?}"
    );
}
