//! Unread and mention counts through `readstate run` on MockCluster: a read-event topic and
//! a co-partitioned message topic, instances joining and leaving (eager range rebalances,
//! tasks restored from the changelog, heads included), a kill -9 of a real process and a
//! restart; the final counts of every member equal the chat generator's oracle.

use readstate_testing::chat;
use readstate_testing::kafka;
use readstate_testing::process;
use readstate_testing::process::SpawnGuarded;
use readstate_testing::wait;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use chat::{produce, topology_text, ChatTopics};
use kafka::suffix;
use process::{signal, terminate, wait_log};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::Message;
use readstate::ids::ConversationId;
use readstate::kafka::KafkaSettings;
use readstate::model::{HeadUpdate, ReceiptUpdate, StateKey};
use readstate::runtime::{run, RunConfig, RunSummary};
use readstate::serde::avro::UpdateDecoder;
use readstate::serde::message::HeadDecoder;
use readstate::serde::registry::{LOCAL_CONVERSATION_HEAD_ID, LOCAL_RECEIPT_UPDATE_ID};
use readstate::serde::{LocalRegistry, CONVERSATION_HEAD_SCHEMA, RECEIPT_UPDATE_SCHEMA};
use readstate::state::head::ConversationHead;
use readstate::state::rocks::{RocksDbOptions, RocksDbStore};
use readstate::state::{put_checkpoint, KeyValueStore, ReadState, StoreBatch, StoreKey};
use readstate::topology::compile;
use readstate_tools::loadgen::chat::{generate, ChatEvent, ChatSpec, ChatWorkload};

const PARTS: i32 = 4;

struct Env {
    /// The in-process broker; `None` on the real Apache Kafka of `scripts/test`.
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
    brokers: String,
    app: String,
    t: ChatTopics,
    state: tempfile::TempDir,
    /// librdkafka properties of every instance ("key=value").
    props: Vec<&'static str>,
}

impl Env {
    fn new(message_partitions: i32) -> Self {
        let mock = MockCluster::new(1).unwrap();
        let env = Self::on(mock.bootstrap_servers(), Some(mock));
        let mock = env._mock.as_ref().expect("mock");
        // The mock broker does not answer CreateTopics: every topic is made here.
        for t in [&env.t.reads, &env.t.updates, &env.t.heads] {
            mock.create_topic(t, PARTS, 1).unwrap();
        }
        mock.create_topic(&env.t.messages, message_partitions, 1)
            .unwrap();
        for internal in readstate_testing::chat::INTERNAL_TOPICS {
            let topic = format!("{}-{internal}", env.app);
            mock.create_topic(&topic, PARTS, 1).unwrap();
        }
        mock.create_topic(&format!("{}-dlq", env.app), 1, 1)
            .unwrap();
        env
    }

    /// On the real broker: only the two source topics exist; readstate creates its
    /// changelog, dead-letter and output topics through the admin API.
    fn real() -> Self {
        let brokers = std::env::var("READSTATE_TEST_KAFKA").expect(
            "READSTATE_TEST_KAFKA is not set: run scripts/test, which starts a private Apache Kafka",
        );
        let env = Self::on(brokers, None);
        for t in [&env.t.reads, &env.t.messages] {
            kafka::create_topic(&env.brokers, t, PARTS, &[]);
        }
        env
    }

    fn on(brokers: String, mock: Option<MockCluster<'static, DefaultProducerContext>>) -> Self {
        readstate_testing::fixtures::capture_logs();
        let s = suffix();
        Env {
            _mock: mock,
            brokers,
            app: format!("unread-{s}"),
            t: ChatTopics::new(&s),
            state: tempfile::tempdir().unwrap(),
            props: Vec::new(),
        }
    }

    fn topology_text(&self, state_dir: &std::path::Path) -> String {
        topology_text(&self.app, state_dir, &self.t, "")
    }

    fn config(&self, state_dir: &std::path::Path) -> RunConfig {
        self.config_of(&self.topology_text(state_dir), state_dir)
    }

    fn config_of(&self, text: &str, state_dir: &std::path::Path) -> RunConfig {
        let topology = compile(text).unwrap();
        let props: Vec<String> = self.props.iter().map(|p| p.to_string()).collect();
        let kafka = KafkaSettings::new(self.brokers.clone())
            .with_properties(&props)
            .unwrap();
        let mut cfg = RunConfig::new(topology, kafka, Arc::new(LocalRegistry::new()));
        cfg.state_dir = state_dir.to_path_buf();
        cfg
    }

    fn produce(&self, events: &[ChatEvent]) {
        produce(&self.brokers.clone(), &self.t, events);
    }

    /// Wait (bounded) until the conversation-heads topic shows every message.
    fn await_heads(&self, w: &ChatWorkload) -> Vec<HeadUpdate> {
        self.await_heads_of(w, |_| true)
    }

    /// As [`Self::await_heads`], for the conversations `of` selects.
    fn await_heads_of(
        &self,
        w: &ChatWorkload,
        of: impl Fn(&ConversationId) -> bool,
    ) -> Vec<HeadUpdate> {
        let reg = Arc::new(LocalRegistry::new());
        let mut hdec = HeadDecoder::new(reg, CONVERSATION_HEAD_SCHEMA).unwrap();
        let mut h = vec![0u8];
        h.extend_from_slice(&LOCAL_CONVERSATION_HEAD_ID.to_be_bytes());
        futures::executor::block_on(hdec.prepare(std::iter::once(Some(h.as_slice())))).unwrap();
        kafka::read_until(
            &self.brokers,
            &self.t.heads,
            |m| HeadUpdate::from(hdec.decode(m.payload().unwrap()).unwrap()),
            |hs: &[HeadUpdate]| {
                let mut count: HashMap<ConversationId, i64> = HashMap::new();
                for h in hs {
                    let e = count.entry(h.conversation_id.clone()).or_insert(0);
                    *e = (*e).max(h.message_count);
                }
                (w.messages.iter())
                    .filter(|(c, _)| of(c))
                    .all(|(c, ms)| count.get(c) == Some(&(ms.len() as i64)))
            },
        )
    }

    /// Wait (bounded) until the outputs show every pointer and every message: each key's
    /// last receipt has the oracle's pointer, each conversation's last head its count.
    fn await_outputs(&self, w: &ChatWorkload) -> (Vec<ReceiptUpdate>, Vec<HeadUpdate>) {
        (self.await_pointers(w), self.await_heads(w))
    }

    /// Wait (bounded) until each key's last receipt update has the oracle's pointer.
    fn await_pointers(&self, w: &ChatWorkload) -> Vec<ReceiptUpdate> {
        let brokers = self.brokers.clone();
        let reg = Arc::new(LocalRegistry::new());
        let mut dec = UpdateDecoder::new(reg, RECEIPT_UPDATE_SCHEMA).unwrap();
        let mut u = vec![0u8];
        u.extend_from_slice(&LOCAL_RECEIPT_UPDATE_ID.to_be_bytes());
        futures::executor::block_on(dec.prepare(std::iter::once(Some(u.as_slice())))).unwrap();
        kafka::read_until(
            &brokers,
            &self.t.updates,
            |m| ReceiptUpdate::from(dec.decode(m.payload().unwrap()).unwrap()),
            |us: &[ReceiptUpdate]| {
                let mut last: HashMap<StateKey, i64> = HashMap::new();
                for u in us {
                    let e = last.entry(u.key()).or_insert(-1);
                    *e = (*e).max(u.last_read_seq);
                }
                w.pointers.iter().all(|(k, p)| last.get(k) == Some(p))
            },
        )
    }
}

/// An instance started in-process through the binary's composition root.
struct Instance(readstate_cli::RunningApp);

fn launch(cfg: RunConfig) -> Instance {
    Instance(
        readstate_cli::App::new(cfg)
            .start()
            .expect("instance starts"),
    )
}

impl Instance {
    fn stop(self) -> RunSummary {
        self.0.stop().expect("instance runs")
    }
}

/// Heads and pointers from the RocksDB stores under `app_dir` (each task's `head-state` and
/// `read-state` stores; each holds only its own entries).
fn stored(
    app_dir: &std::path::Path,
) -> (
    HashMap<ConversationId, ConversationHead>,
    HashMap<StateKey, ReadState>,
) {
    let (mut heads, mut states) = (HashMap::new(), HashMap::new());
    // Task directories (`<sub-topology>_<partition>`: 1_p behind a repartition).
    let tasks = std::fs::read_dir(app_dir).into_iter().flatten().flatten();
    for task in tasks.filter(|t| t.file_name().to_string_lossy().contains('_')) {
        let open = |store: &str| {
            let path = task.path().join(store);
            path.exists().then(|| {
                RocksDbStore::open(store.into(), &path, &RocksDbOptions::default()).unwrap()
            })
        };
        let (Some(h), Some(s)) = (open("head-state"), open("read-state")) else {
            continue;
        };
        assert!(
            h.scan_prefix(b"s").unwrap().is_empty(),
            "no pointer among the heads"
        );
        assert!(
            s.scan_prefix(b"h").unwrap().is_empty(),
            "no head among the pointers"
        );
        for (k, v) in h.scan_prefix(b"h").unwrap() {
            let (_, key) = StoreKey::decode(&k).unwrap();
            heads.insert(key.conversation, ConversationHead::decode(&v).unwrap());
        }
        for (k, v) in s.scan_prefix(b"s").unwrap() {
            let (_, key) = StoreKey::decode(&k).unwrap();
            states.insert(key, ReadState::decode(&v).unwrap());
        }
    }
    (heads, states)
}

/// Every member's counts, derived from the stored heads and pointers, equal the oracle's.
fn check_stored_counts(app_dir: &std::path::Path, w: &ChatWorkload) {
    let (heads, states) = stored(app_dir);
    assert_eq!(heads.len(), w.messages.len(), "one head per conversation");
    let mut checked = 0;
    for (conv, members) in &w.members {
        let head = &heads[conv];
        assert_eq!(head.message_count, w.messages[conv].len() as i64);
        for r in members {
            let key = StateKey {
                conversation: conv.clone(),
                reader: r.clone(),
            };
            let pointer = states.get(&key).map_or(-1, |s| s.last_read_seq);
            assert_eq!(
                Some(&pointer),
                w.pointers.get(&key).or(Some(&-1)),
                "{key:?}"
            );
            let got = head.counts(r, pointer);
            let want = w.expected(conv, r);
            assert_eq!(
                (got.unread, got.mentions, got.capped),
                (want.unread, want.mentions, false),
                "{key:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked} members checked");
}

/// Receipt updates never go backwards per key, and their counts are never above the
/// member's counts with no read at all (a sanity bound that needs no timing).
fn check_receipts(updates: &[ReceiptUpdate], w: &ChatWorkload) {
    let mut last: HashMap<StateKey, i64> = HashMap::new();
    for u in updates {
        let prev = last.insert(u.key(), u.version).unwrap_or(0);
        assert!(
            u.version >= prev,
            "version went backwards for {:?}",
            u.key()
        );
        let c = u.counts.expect("receipts carry counts");
        let all = w.messages[&u.conversation_id].len() as i64;
        assert!(c.unread >= 0 && c.unread <= all && c.mentions <= c.unread);
    }
}

fn spec(seed: u64) -> ChatSpec {
    ChatSpec {
        seed,
        conversations: 30,
        max_members: 150,
        max_messages: 120,
        ..Default::default()
    }
}

#[test]
fn instances_joining_and_leaving_keep_every_count_exact() {
    instances_joining_and_leaving(Env::new(PARTS));
}

/// The same on Apache Kafka: topics created by readstate, a compacted changelog, the
/// group coordinator's real range assignment.
#[test]
fn real_broker_instances_joining_and_leaving_keep_every_count_exact() {
    instances_joining_and_leaving(Env::real());
}

/// The same under the consumer group protocol of KIP-848: the coordinator's range
/// assignor, incremental assignments in which a task starts once it holds both halves of
/// its pair (issue 26).
#[test]
fn real_broker_consumer_protocol_instances_joining_and_leaving_keep_every_count_exact() {
    let mut env = Env::real();
    env.props = vec!["group.protocol=consumer"];
    instances_joining_and_leaving(env);
}

fn instances_joining_and_leaving(env: Env) {
    let w = generate(&spec(11));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let chunks: Vec<&[ChatEvent]> = w.arrivals.chunks(w.arrivals.len() / 3 + 1).collect();
    let (cfg_a, cfg_b) = (env.config(dir_a.path()), env.config(dir_b.path()));
    let (pa, pb) = (cfg_a.progress.clone(), cfg_b.progress.clone());
    let a = launch(cfg_a);
    env.produce(chunks[0]);
    let (running, emitted) = (
        |p: &Arc<readstate::telemetry::Progress>| {
            readstate::telemetry::Progress::get(&p.tasks_running)
        },
        |p: &Arc<readstate::telemetry::Progress>| {
            readstate::telemetry::Progress::get(&p.updates_emitted)
        },
    );
    // A alone has committed updates of its own before B joins: its changelog holds what
    // B must restore. (B launched at once joined A's first generation at times; when A's
    // commits of that generation were refused by the rebalance and A kept its partitions,
    // it had nothing new to emit, and the wait for its updates could not end.)
    wait::wait_for(
        "A to commit updates",
        std::time::Duration::from_secs(90),
        || emitted(&pa) > 0,
    );
    let b = launch(cfg_b);
    env.produce(chunks[1]);
    // Both run tasks (under KIP-848, B holds both halves of a pair before its task runs).
    wait::wait_for(
        "A and B to share the tasks",
        std::time::Duration::from_secs(90),
        || {
            let shared = running(&pa) > 0 && running(&pb) > 0;
            shared && running(&pa) + running(&pb) == PARTS as u64
        },
    );
    let sa = a.stop();
    env.produce(chunks[2]);
    let (updates, _) = env.await_outputs(&w);
    let sb = b.stop();
    assert!(
        sa.lifecycle.tasks_opened > 0 && sb.lifecycle.tasks_opened > 0,
        "{sa:?} {sb:?}"
    );
    assert!(
        sb.lifecycle.restored_records > 0,
        "B restored A's tasks, heads included: {sb:?}"
    );
    check_receipts(&updates, &w);
    // B owned every partition at the end: its stores hold every head and pointer.
    check_stored_counts(&dir_b.path().join(&env.app), &w);
}

/// Read receipts for senders (issue 24, part 1) through `readstate run` on Apache Kafka,
/// killed with SIGKILL mid-stream and restarted: the messages first (every read then finds
/// its messages' senders), then the reads. On the sender-receipts topic, keyed by sender,
/// every sender learns for every reader exactly the highest of its messages at or below
/// that reader's pointer, and no receipt names more than the reader read or another
/// sender's message (at least once: the kill may repeat some).
#[test]
fn real_broker_sender_receipts_across_a_kill_9_equal_the_oracle() {
    let env = Env::real();
    let w = generate(&ChatSpec {
        conversations: 20,
        max_members: 20,
        ..spec(17)
    });
    let senders = format!("senders-{}", env.app);
    let file = env.state.path().join("topology.toml");
    let sink = format!(
        "[[sink]]\nname = \"senders\"\nkind = \"kafka\"\ninput = \"read-state\"\noutput = \"sender-receipts\"\ntopic = \"{senders}\"\n"
    );
    let text = topology_text(&env.app, env.state.path(), &env.t, &sink);
    std::fs::write(&file, text).unwrap();
    let spawn = || spawn_run(&env, &file);
    let (messages, reads): (Vec<ChatEvent>, Vec<ChatEvent>) =
        (w.arrivals.iter().cloned()).partition(|e| matches!(e, ChatEvent::Message(_)));
    // A third of the conversations get their messages only after every read of them was
    // emitted: each such message is owed to its sender by the readers already past it.
    let late = |c: &ConversationId| c.as_int().unwrap() % 3 == 0;
    let (late_messages, messages): (Vec<ChatEvent>, Vec<ChatEvent>) =
        messages.into_iter().partition(|e| late(e.conversation()));
    assert!(!late_messages.is_empty() && !messages.is_empty());
    let mut child = spawn();
    env.produce(&messages);
    env.await_heads_of(&w, |c| !late(c));
    let (first, second) = reads.split_at(reads.len() / 2);
    env.produce(first);
    kafka::read_until(&env.brokers, &senders, |_| (), |d: &[()]| d.len() >= 50);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    env.produce(second);
    let mut child = spawn();
    env.await_pointers(&w);
    env.produce(&late_messages);
    env.await_heads(&w);
    let want = readstate_testing::chat::sender_oracle(&w);
    let schema = apache_avro::Schema::parse_str(readstate::serde::SENDER_RECEIPT_SCHEMA).unwrap();
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .unwrap();
    let got = kafka::read_until(
        &env.brokers,
        &senders,
        |m| {
            let mut datum = &m.payload().unwrap()[5..];
            let v = reader.read_value(&mut datum).unwrap();
            let r: readstate::serde::message::AvroSenderReceipt =
                apache_avro::from_value(&v).unwrap();
            let key = std::str::from_utf8(m.key().unwrap()).unwrap().to_owned();
            (key, m.partition(), readstate::model::SenderReceipt::from(r))
        },
        |got: &[(String, i32, readstate::model::SenderReceipt)]| {
            let mut best: HashMap<(i64, i64, i64), i64> = HashMap::new();
            for (_, _, r) in got {
                let t = (
                    r.sender_id.as_int().unwrap(),
                    r.conversation_id.as_int().unwrap(),
                    r.reader_id.as_int().unwrap(),
                );
                let b = best.entry(t).or_insert(-1);
                *b = (*b).max(r.message_seq);
            }
            best == want
        },
    );
    terminate(&mut child.0);
    // A gateway consuming one partition sees all of its senders' receipts and no other
    // sender's: each sender's receipts are on one partition.
    let mut home: HashMap<i64, i32> = HashMap::new();
    for (_, p, r) in &got {
        let at = *home.entry(r.sender_id.as_int().unwrap()).or_insert(*p);
        assert_eq!(at, *p, "sender {} on partitions {at} and {p}", r.sender_id);
    }
    assert!(
        home.values()
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1,
        "senders spread over partitions"
    );
    for (key, _, r) in &got {
        assert_eq!(key, &r.sender_id.to_string(), "keyed by sender");
        let pointer = w.pointers[&StateKey {
            conversation: r.conversation_id.clone(),
            reader: r.reader_id.clone(),
        }];
        assert!(r.message_seq <= pointer, "{r:?}");
        let m = (w.messages[&r.conversation_id].iter())
            .find(|m| m.message_seq == r.message_seq)
            .unwrap();
        assert_eq!((&m.sender_id, &m.message_id), (&r.sender_id, &r.message_id));
    }
    eprintln!(
        "{} sender receipts for {} (sender, conversation, reader)",
        got.len(),
        want.len()
    );
}

/// `readstate run` of `file` against `env`'s broker, its stdout discarded.
fn spawn_run(env: &Env, file: &std::path::Path) -> process::KillOnDrop {
    std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args(["run", "--local-schemas", "--topology"])
        .arg(file)
        .env("KAFKA_BROKERS", env.brokers.clone())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn_guarded()
}

#[test]
fn kill_9_mid_stream_then_restart_keeps_every_count_exact() {
    let env = Env::new(PARTS);
    let w = generate(&spec(12));
    let file = env.state.path().join("topology.toml");
    std::fs::write(&file, env.topology_text(env.state.path())).unwrap();
    let spawn = || spawn_run(&env, &file);
    let (first, second) = w.arrivals.split_at(w.arrivals.len() / 2);
    env.produce(first);
    let mut child = spawn();
    kafka::read_until(
        &env.brokers.clone(),
        &env.t.heads,
        |_| (),
        |d: &[()]| d.len() >= 20,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    env.produce(second);
    let mut child = spawn();
    let (updates, _) = env.await_outputs(&w);
    terminate(&mut child);
    check_receipts(&updates, &w);
    check_stored_counts(&env.state.path().join(&env.app), &w);
}

/// Both sources in a service's own JSON shape (nested sender, mentions as an array, ids as
/// numbers and as strings), mapped by fields: every member's counts equal the oracle's.
#[test]
fn json_reads_and_messages_keep_every_count_exact() {
    let env = Env::new(PARTS);
    let w = generate(&spec(14));
    chat::produce_json(&env.brokers, &env.t, &w.arrivals);
    let dir = tempfile::tempdir().unwrap();
    let text = chat::json_topology_text(&env.app, dir.path(), &env.t, "");
    let topology = compile(&text).unwrap();
    let kafka = KafkaSettings::new(env.brokers.clone());
    let mut cfg = RunConfig::new(topology, kafka, Arc::new(LocalRegistry::new()));
    cfg.state_dir = dir.path().to_path_buf();
    let inst = launch(cfg);
    let (updates, _) = env.await_outputs(&w);
    let summary = inst.stop();
    assert_eq!(summary.dead_letters, 0, "{summary:?}");
    check_receipts(&updates, &w);
    check_stored_counts(&dir.path().join(&env.app), &w);
}

/// Reads naming their message by id (issue 23), on Apache Kafka: JSON reads with no seq
/// (`position = "message_id"`), keyed by reader and produced by Sarama (Go, FNV-1a), so
/// readstate repartitions them by conversation; messages keyed by conversation. Reads are
/// produced before the messages of their batch, and a third of the conversations' messages
/// only after the kill: those reads wait for their messages across a SIGKILL of one of two
/// `readstate run` processes (their waits in the heads store, restored by the survivor).
/// Every pointer, every member's counts and each key's last update (with the id of the
/// message there) equal the oracle; no read falls back or is a dead letter.
#[test]
fn real_broker_reads_by_message_id_with_one_of_two_instances_killed() {
    let env = Env::real();
    let w = generate(&spec(16)).with_read_message_ids();
    let held = |e: &ChatEvent| matches!(e, ChatEvent::Message(m) if m.conversation_id.as_int().unwrap() % 3 == 0);
    let (late, early): (Vec<ChatEvent>, Vec<ChatEvent>) =
        w.arrivals.iter().cloned().partition(held);
    let (first, second) = early.split_at(early.len() / 2);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spawn = |dir: &std::path::Path| {
        let text = chat::json_message_id_fixture(&env.app, dir, &env.t, "10m")
            .set("source.read-events.keyed_by", "reader_id")
            .text();
        spawn_failing_over(&env, dir, &text)
    };
    let mut a = spawn(dir_a.path());
    let mut b = spawn(dir_b.path());
    produce_by_message_id(&env, first);
    kafka::read_until(
        &env.brokers,
        &env.t.updates,
        |_| (),
        |d: &[()]| d.len() >= 50,
    );
    a.kill().unwrap();
    a.wait().unwrap();
    produce_by_message_id(&env, second);
    produce_by_message_id(&env, &late);
    let (updates, _) = env.await_outputs(&w);
    terminate(&mut b);
    check_receipts(&updates, &w);
    let last: HashMap<StateKey, &ReceiptUpdate> = updates.iter().map(|u| (u.key(), u)).collect();
    for (key, seq) in &w.pointers {
        let want = format!("m-{}-{seq}", key.conversation);
        assert_eq!(
            last[key].message_id.as_deref(),
            Some(want.as_str()),
            "{key:?}"
        );
    }
    check_stored_counts(&dir_b.path().join(&env.app), &w);
    let dlq = format!("{}-dlq", env.app);
    assert!(
        !kafka::topic_exists(&env.brokers, &dlq) || kafka::count_records(&env.brokers, &dlq) == 0,
        "no read fell out: every message came"
    );
}

/// A `readstate run` of `text` in `dir` (its log there) whose group notices a killed
/// member within seconds, not 45.
fn spawn_failing_over(env: &Env, dir: &std::path::Path, text: &str) -> process::KillOnDrop {
    let file = dir.join("topology.toml");
    std::fs::write(&file, text).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args(["run", "--local-schemas", "--topology"])
        .arg(&file)
        .args(readstate_testing::process::QUICK_FAILOVER)
        .env("KAFKA_BROKERS", env.brokers.clone())
        .env("RUST_LOG", "warn,readstate=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("readstate.log")).unwrap())
        .spawn_guarded()
}

/// Reads (JSON, keyed by reader) with Sarama, then messages (JSON, keyed by conversation).
fn produce_by_message_id(env: &Env, events: &[ChatEvent]) {
    let (reads, messages): (Vec<ChatEvent>, Vec<ChatEvent>) = events
        .iter()
        .cloned()
        .partition(|e| matches!(e, ChatEvent::Read(_)));
    let records: Vec<(String, String)> = reads
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Read(r) => Some((r.reader_id.to_string(), chat::chat_json(e))),
            ChatEvent::Message(_) => None,
        })
        .collect();
    kafka::sarama_produce(&env.brokers, &env.t.reads, &records);
    chat::produce_json(&env.brokers, &env.t, &messages);
}

/// The chat topology with misrouted reads and messages rerouted.
fn rerouting(t: readstate_testing::fixtures::Shipped) -> readstate_testing::fixtures::Shipped {
    t.set("source.read-events.on_misrouted", "repartition")
        .set("source.message-events.on_misrouted", "repartition")
}

/// Where each message went, read back from the topics: the conversations whose messages
/// landed on another partition than their reads, and the messages of those.
fn misrouted_messages(env: &Env) -> (std::collections::HashSet<i64>, usize) {
    let partition_of = |topic: &str| -> Vec<(i64, i32)> {
        kafka::read_all(&env.brokers, topic, |m| {
            let key = std::str::from_utf8(m.key().unwrap()).unwrap();
            (key.parse().unwrap(), m.partition())
        })
    };
    let reads: HashMap<i64, i32> = partition_of(&env.t.reads).into_iter().collect();
    let messages = partition_of(&env.t.messages);
    let misrouted: std::collections::HashSet<i64> = messages
        .iter()
        .filter(|(c, p)| reads.get(c).is_some_and(|r| r != p))
        .map(|(c, _)| *c)
        .collect();
    let n = (messages.iter())
        .filter(|(c, _)| misrouted.contains(c))
        .count();
    (misrouted, n)
}

/// Messages produced with librdkafka's default partitioner (CRC-32) and reads with
/// murmur2: most conversations' messages land on another partition than their reads.
/// With `on_misrouted = "repartition"` on both sources, each such message is produced to
/// the partition its conversation belongs on (the message source's rerouted topic) and
/// folded there: every count and pointer equals the oracle over all messages, and nothing
/// is a dead letter.
#[test]
fn misrouted_messages_are_rerouted_and_counts_are_exact() {
    let env = Env::new(PARTS);
    let w = generate(&ChatSpec {
        conversations: 100,
        ..spec(13)
    });
    chat::produce_with(&env.brokers, &env.t, &w.arrivals, "consistent_random");
    let (misrouted, n) = misrouted_messages(&env);
    assert!(
        !misrouted.is_empty() && misrouted.len() < w.messages.len(),
        "the partitioners disagree on some conversations, not all: {misrouted:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let text = rerouting(chat::fixture(&env.app, dir.path(), &env.t)).text();
    let inst = launch(env.config_of(&text, dir.path()));
    env.await_outputs(&w);
    let summary = inst.stop();
    // At least once: a record rerouted again after a rewind is folded once (its origin).
    assert!(
        summary.records_rerouted >= n as u64,
        "{n} misrouted: {summary:?}"
    );
    assert_eq!(summary.dead_letters, 0, "{summary:?}");
    let rerouted = format!("{}-message-events-rerouted", env.app);
    let through: i64 = kafka::end_offsets(&env.brokers, &rerouted).iter().sum();
    assert!(
        through >= n as i64,
        "{through} offsets for {n} misrouted messages"
    );
    let (heads, _) = stored(&dir.path().join(&env.app));
    for c in &misrouted {
        assert!(heads.contains_key(&ConversationId::from(*c)), "head of {c}");
    }
    check_stored_counts(&dir.path().join(&env.app), &w);
}

/// The same on Apache Kafka under exactly_once_v2, with one of two `readstate run`
/// processes killed (SIGKILL) halfway: the rerouted messages go out in the transactions
/// that commit the offsets they were found at, and the survivor folds every one of them
/// once. Every pointer and every member's counts equal the oracle over all messages; no
/// message is a dead letter.
#[test]
fn real_broker_exactly_once_rerouted_messages_across_a_kill_9_keep_counts_exact() {
    let env = Env::real();
    let w = generate(&ChatSpec {
        conversations: 100,
        ..spec(17)
    });
    let (first, second) = w.arrivals.split_at(w.arrivals.len() / 2);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spawn = |dir: &std::path::Path| {
        let text = rerouting(chat::fixture(&env.app, dir, &env.t))
            .set("application.processing_guarantee", "exactly_once_v2")
            .text();
        spawn_failing_over(&env, dir, &text)
    };
    let mut a = spawn(dir_a.path());
    let mut b = spawn(dir_b.path());
    chat::produce_with(&env.brokers, &env.t, first, "consistent_random");
    kafka::read_until(
        &env.brokers,
        &env.t.updates,
        |_| (),
        |d: &[()]| d.len() >= 50,
    );
    a.kill().unwrap();
    a.wait().unwrap();
    chat::produce_with(&env.brokers, &env.t, second, "consistent_random");
    let (updates, _) = env.await_outputs(&w);
    terminate(&mut b);
    let (misrouted, n) = misrouted_messages(&env);
    assert!(!misrouted.is_empty(), "the partitioners disagree on some");
    // Records of the rerouted topic below the committed offsets are purged (as a
    // repartition topic's): its end offsets say what went through it.
    let rerouted = format!("{}-message-events-rerouted", env.app);
    let through: i64 = kafka::end_offsets(&env.brokers, &rerouted).iter().sum();
    assert!(
        through >= n as i64,
        "{through} offsets for {n} misrouted messages"
    );
    check_receipts(&updates, &w);
    check_stored_counts(&dir_b.path().join(&env.app), &w);
    let dlq = format!("{}-dlq", env.app);
    assert!(
        !kafka::topic_exists(&env.brokers, &dlq) || kafka::count_records(&env.brokers, &dlq) == 0,
        "no message is a dead letter"
    );
}

/// The same with `on_misrouted = "dead-letter"` (the default): every misrouted message is a `misrouted`
/// dead letter, none is folded into a task that does not own its conversation: the
/// conversations placed alike get exact counts, the others no head at all (never wrong
/// counts), and every pointer is exact.
#[test]
fn misrouted_messages_are_dead_letters_never_folded() {
    let env = Env::new(PARTS);
    let w = generate(&ChatSpec {
        conversations: 100,
        ..spec(13)
    });
    chat::produce_with(&env.brokers, &env.t, &w.arrivals, "consistent_random");
    let (misrouted, dead) = misrouted_messages(&env);
    assert!(
        !misrouted.is_empty() && misrouted.len() < w.messages.len(),
        "the partitioners disagree on some conversations, not all: {misrouted:?}"
    );
    // The oracle without the misrouted conversations' messages.
    let mut routed = w.prefix(w.arrivals.len());
    routed
        .messages
        .retain(|c, _| !misrouted.contains(&c.as_int().unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let text = chat::fixture(&env.app, dir.path(), &env.t)
        .set("source.message-events.on_misrouted", "dead-letter")
        .text();
    let mut cfg = env.config_of(&text, dir.path());
    cfg.topology.bad_records.max_ratio = 1.0;
    let inst = launch(cfg);
    env.await_outputs(&routed);
    let dlq = format!("{}-dlq", env.app);
    let letters = wait::wait_until(
        "every misrouted message in the DLQ",
        std::time::Duration::from_secs(60),
        || {
            let got = kafka::read_all(&env.brokers, &dlq, |m| {
                let header = |name: &str| {
                    let h = m.headers().unwrap();
                    (0..h.count())
                        .map(|i| h.get(i))
                        .find(|h| h.key == name)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                (
                    header("readstate.source.topic"),
                    header("readstate.error.reason"),
                    header("readstate.source.partition"),
                    header("readstate.source.offset"),
                )
            });
            let at: std::collections::HashSet<_> = got.iter().map(|l| (&l.2, &l.3)).collect();
            (at.len() >= dead).then_some((at.len(), got.clone()))
        },
    );
    let summary = inst.stop();
    // At least once, like every output: counted by source position.
    let (distinct, letters) = letters;
    assert_eq!(distinct, dead, "a dead letter for each misrouted message");
    for (topic, reason, _, _) in &letters {
        assert_eq!(topic.as_deref(), Some(env.t.messages.as_str()));
        assert_eq!(reason.as_deref(), Some("misrouted"));
    }
    assert!(summary.lifecycle.tasks_opened > 0, "{summary:?}");
    let (heads, states) = stored(&dir.path().join(&env.app));
    for c in &misrouted {
        assert!(
            !heads.contains_key(&ConversationId::from(*c)),
            "no head for misrouted conversation {c}"
        );
    }
    for (key, pointer) in &w.pointers {
        assert_eq!(
            states.get(key).map(|s| s.last_read_seq),
            Some(*pointer),
            "{key:?}"
        );
    }
    routed
        .members
        .retain(|c, _| !misrouted.contains(&c.as_int().unwrap()));
    check_stored_counts(&dir.path().join(&env.app), &routed);
}

#[test]
fn a_message_topic_with_another_partition_count_is_refused_by_name() {
    let env = Env::new(PARTS - 1);
    let err = run(
        env.config(env.state.path()),
        Arc::new(AtomicBool::new(false)),
    )
    .expect_err("co-partitioning is checked at start");
    let msg = err.to_string();
    assert!(
        msg.contains(&env.t.messages) && msg.contains("3 partitions") && msg.contains(&env.t.reads),
        "{msg}"
    );
}

/// `readstate run` as a child process with its own state directory, a short session
/// timeout, and its log in `<state_dir>/readstate.log`.
fn spawn_in(env: &Env, file: &std::path::Path, state_dir: &std::path::Path) -> process::KillOnDrop {
    std::process::Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args(["run", "--local-schemas", "--topology"])
        .arg(file)
        .arg("--state-dir")
        .arg(state_dir)
        .args(readstate_testing::process::QUICK_FAILOVER)
        .env("KAFKA_BROKERS", &env.brokers)
        .env("RUST_LOG", "warn,readstate=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(state_dir.join("readstate.log")).unwrap())
        .spawn_guarded()
}

/// A paused past its session timeout while B takes its tasks over, then resumed: A must
/// learn it lost them (closing them dirty), and the counts stay exact. The final state is
/// checked in a third instance that restores every task from the changelog.
#[test]
fn sigstop_past_the_session_timeout_then_sigcont_keeps_every_count_exact() {
    let env = Env::new(PARTS);
    let w = generate(&spec(13));
    let file = env.state.path().join("topology.toml");
    std::fs::write(&file, env.topology_text(env.state.path())).unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let n = w.arrivals.len();
    let cuts = [n / 3, 2 * n / 3];
    let mut a = spawn_in(&env, &file, dir_a.path());
    env.produce(&w.arrivals[..cuts[0]]);
    env.await_outputs(&w.prefix(cuts[0]));
    let mut b = spawn_in(&env, &file, dir_b.path());
    wait_log(
        &dir_b.path().join("readstate.log"),
        "assigned partitions=[(",
    );
    signal(&a, "STOP");
    env.produce(&w.arrivals[cuts[0]..cuts[1]]);
    // Only reachable once B owns A's tasks too (A's session timed out).
    let stopped_at = std::time::Instant::now();
    env.await_outputs(&w.prefix(cuts[1]));
    let taken_over = stopped_at.elapsed();
    signal(&a, "CONT");
    env.produce(&w.arrivals[cuts[1]..]);
    let (updates, _) = env.await_outputs(&w);
    process::terminate_logged_past_upstream_abort(&mut a, "A", process::log_in(dir_a.path()));
    process::terminate_logged_past_upstream_abort(&mut b, "B", process::log_in(dir_b.path()));
    assert!(
        taken_over >= std::time::Duration::from_secs(3),
        "B took A's tasks only after A's session timed out ({taken_over:?})"
    );
    let log_a = std::fs::read_to_string(dir_a.path().join("readstate.log")).unwrap();
    assert!(
        log_a.contains("tasks lost"),
        "A closed its lost tasks dirty:\n{log_a}"
    );
    check_receipts(&updates, &w);
    // A fresh instance restores every task (heads included) from the changelog.
    let dir_c = tempfile::tempdir().unwrap();
    let cfg = env.config(dir_c.path());
    let health = cfg.health.clone();
    let c = launch(cfg);
    wait::wait_for("C to restore", std::time::Duration::from_secs(90), || {
        health.is_ready()
    });
    let sc = c.stop();
    assert!(sc.lifecycle.restored_records > 0, "{sc:?}");
    check_stored_counts(&dir_c.path().join(&env.app), &w);
}

/// Each store is judged against its own changelog: a head-state store whose checkpoint
/// lies beyond its changelog's end (as after the changelog was recreated) is wiped and
/// restored from it alone, the read-state store beside it kept; the counts stay exact.
#[test]
fn a_head_store_that_does_not_match_its_changelog_is_wiped_and_restored_alone() {
    let env = Env::new(PARTS);
    let w = generate(&spec(14));
    let (first, second) = w.arrivals.split_at(w.arrivals.len() / 2);
    env.produce(first);
    let a = launch(env.config(env.state.path()));
    env.await_outputs(&w.prefix(first.len()));
    let sa = a.stop();
    assert_eq!(sa.lifecycle.tasks_corrupted, 0, "{sa:?}");
    // Every head store claims a changelog position far beyond the end, and holds a head
    // no message made (it must not survive the wipe).
    let app_dir = env.state.path().join(&env.app);
    let stray = ConversationId::from(-42);
    let kept = StateKey {
        conversation: stray.clone(),
        reader: readstate::ids::ReaderId::from(1),
    };
    for p in 0..PARTS {
        let path = app_dir.join(format!("0_{p}")).join("head-state");
        let mut s =
            RocksDbStore::open("head-state".into(), &path, &RocksDbOptions::default()).unwrap();
        let mut batch = StoreBatch::default();
        put_checkpoint(&mut batch, 1_000_000);
        let mut bytes = Vec::new();
        ConversationHead::default().encode(&mut bytes);
        batch.put(StoreKey::head(&stray).as_bytes(), &bytes);
        s.write(batch).unwrap();
        // And the read-state store beside it a value no event made (it must survive).
        let path = app_dir.join(format!("0_{p}")).join("read-state");
        let mut s =
            RocksDbStore::open("read-state".into(), &path, &RocksDbOptions::default()).unwrap();
        let mut batch = StoreBatch::default();
        batch.put(
            StoreKey::state(&kept).as_bytes(),
            ReadState::default().to_bytes(),
        );
        s.write(batch).unwrap();
    }
    env.produce(second);
    let b = launch(env.config(env.state.path()));
    env.await_outputs(&w);
    let sb = b.stop();
    assert_eq!(
        sb.lifecycle.tasks_corrupted, PARTS as u64,
        "only the head stores were wiped: {sb:?}"
    );
    assert!(sb.lifecycle.restored_records > 0, "{sb:?}");
    let (heads, _) = stored(&app_dir);
    assert!(
        !heads.contains_key(&stray),
        "the wiped store kept a stray head"
    );
    check_stored_counts(&app_dir, &w);
}
