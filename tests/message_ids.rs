//! Reads positioned by message id (`position = "message_id"`) through the
//! TopologyTestDriver: JSON reads that name their message, resolved through the
//! co-partitioned message source whether the message arrives before or after the read,
//! across flushes, crashes and restarts; a read whose message never comes falls back to its
//! `read_at` or is an `unresolved_message` dead letter. The oracle is the chat generator's,
//! which knows every read's seq.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use readstate::ids::{ConversationId, ReaderId};
use readstate::model::StateKey;
use readstate::processor::resolve::ResolveStats;
use readstate::topology::{compile, Topology};
use readstate_testing::chat::{
    chat_json, json_message_id_fixture, json_message_id_topology_text, ChatTopics,
};
use readstate_testing::{DriverStores, TopologyTestDriver};
use readstate_tools::loadgen::chat::{generate, ChatEvent, ChatSpec, ChatWorkload};

const PARTS: i32 = 3;

fn topology(wait: &str) -> Topology {
    let dir = std::path::Path::new("./unused");
    let text = json_message_id_topology_text("msgid", dir, &ChatTopics::new("t"), wait, "");
    compile(&text).expect("the message-id topology compiles")
}

fn driver(t: Topology) -> TopologyTestDriver {
    TopologyTestDriver::with(
        t,
        DriverStores::Memory,
        std::sync::Arc::new(readstate::serde::LocalRegistry::new()),
    )
}

fn partition(c: &ConversationId) -> i32 {
    c.as_int()
        .expect("integer ids")
        .rem_euclid(i64::from(PARTS)) as i32
}

fn pipe(d: &mut TopologyTestDriver, p: i32, offset: i64, e: &ChatEvent) {
    let json = chat_json(e);
    match e {
        ChatEvent::Read(_) => d.pipe_raw(p, offset, Some(json.as_bytes())),
        ChatEvent::Message(_) => d.pipe_message_raw(p, offset, Some(json.as_bytes())),
    }
}

/// Each topic-partition's records in offset order; partitions interleaved at random, so
/// a read often arrives before its message (and a message before its reads).
struct Logs {
    logs: Vec<(i32, Vec<ChatEvent>, i64)>,
    rng: StdRng,
}

impl Logs {
    fn new(w: &ChatWorkload, seed: u64) -> Self {
        let mut logs: Vec<(i32, Vec<ChatEvent>, i64)> = Vec::new();
        for is_message in [false, true] {
            for p in 0..PARTS {
                let records = (w.arrivals.iter())
                    .filter(|e| matches!(e, ChatEvent::Message(_)) == is_message)
                    .filter(|e| partition(e.conversation()) == p)
                    .cloned()
                    .collect();
                logs.push((p, records, 0));
            }
        }
        Self {
            logs,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn done(&self) -> bool {
        self.logs
            .iter()
            .all(|(_, r, next)| *next as usize >= r.len())
    }

    fn step(&mut self, d: &mut TopologyTestDriver) {
        let live: Vec<usize> = (0..self.logs.len())
            .filter(|i| (self.logs[*i].2 as usize) < self.logs[*i].1.len())
            .collect();
        let i = live[self.rng.gen_range(0..live.len())];
        let n = self.rng.gen_range(1..=12);
        let (p, records, next) = &mut self.logs[i];
        for _ in 0..n {
            let Some(e) = records.get(*next as usize) else {
                break;
            };
            pipe(d, *p, *next, e);
            *next += 1;
        }
    }

    /// After a crash or restart: every log continues from its committed offset.
    fn rewind(&mut self, d: &TopologyTestDriver) {
        for (i, (p, _, next)) in self.logs.iter_mut().enumerate() {
            *next = match i < PARTS as usize {
                true => d.committed_offset(*p),
                false => d.committed_message_offset(*p),
            };
        }
    }
}

/// Every reader's pointer and counts equal the oracle's; the last update of each key
/// carries its pointer and the id of the message there.
fn assert_oracle(d: &TopologyTestDriver, w: &ChatWorkload) {
    for (key, want) in &w.pointers {
        let got = d.state(key).map(|s| s.last_read_seq);
        assert_eq!(got, Some(*want), "pointer of {key:?}");
        let counts = d.unread_counts(partition(&key.conversation), key).unwrap();
        let expected = w.expected(&key.conversation, &key.reader);
        assert_eq!(
            (counts.unread, counts.mentions),
            (expected.unread, expected.mentions)
        );
    }
}

#[test]
fn reads_before_and_after_their_messages_resolve_to_the_oracle_across_crashes() {
    for seed in [3, 4, 5] {
        let w = generate(&ChatSpec {
            seed,
            conversations: 20,
            max_members: 30,
            max_messages: 80,
            ..Default::default()
        })
        .with_read_message_ids();
        let mut d = driver(topology("1h"));
        let mut logs = Logs::new(&w, seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0xfeed);
        let mut updates = Vec::new();
        // What resolving did, over the processors' lives (a restart opens new ones).
        let mut total = ResolveStats::default();
        let add = |total: &mut ResolveStats, d: &TopologyTestDriver| {
            let s = d.resolve_stats().0;
            total.immediate += s.immediate;
            total.after_wait += s.after_wait;
            total.fallback += s.fallback;
            total.unresolved += s.unresolved;
        };
        while !logs.done() {
            logs.step(&mut d);
            match rng.gen_range(0..40) {
                0..=3 => d.advance_wall_clock(Duration::from_secs(1)),
                4 => {
                    d.crash();
                    logs.rewind(&d);
                }
                5 => {
                    d.flush();
                    add(&mut total, &d);
                    d.restart();
                    logs.rewind(&d);
                }
                _ => {}
            }
            updates.extend(d.read_output());
        }
        d.flush();
        updates.extend(d.read_output());
        add(&mut total, &d);
        let (stats, waiting) = (total, d.resolve_stats().1);
        assert_eq!(
            waiting, 0,
            "every message arrived: no read waits ({stats:?})"
        );
        assert!(
            stats.immediate > 0 && stats.after_wait > 0,
            "reads came both after and before their messages: {stats:?}"
        );
        assert_eq!((stats.fallback, stats.unresolved), (0, 0), "{stats:?}");
        assert!(d.dead_letters().is_empty(), "{:?}", d.dead_letters());
        assert_oracle(&d, &w);
        let mut last = std::collections::HashMap::new();
        for u in &updates {
            let prev = last.insert(u.key(), u.clone());
            assert!(prev.is_none_or(|p| p.last_read_seq <= u.last_read_seq));
        }
        for (key, seq) in &w.pointers {
            let u = &last[key];
            assert_eq!(u.last_read_seq, *seq, "{key:?}");
            let want_id = format!("m-{}-{seq}", key.conversation);
            assert_eq!(u.message_id.as_deref(), Some(want_id.as_str()));
        }
    }
}

fn read_json(reader: i64, msg: &str, read_at_ms: i64) -> String {
    format!(r#"{{"user":{reader},"conv":"7","msg":"{msg}","device":"phone","at":{read_at_ms}}}"#)
}

fn message_json(seq: i64, sent_at_ms: i64) -> String {
    format!(
        r#"{{"conv":"7","seq":{seq},"id":"m-{seq}","from":{{"id":1}},"sent_at":{sent_at_ms},"mentions":[],"everyone":false}}"#
    )
}

fn key(reader: i64) -> StateKey {
    StateKey {
        conversation: ConversationId::from(7),
        reader: ReaderId::from(reader),
    }
}

/// The message source's time, not the wall clock, ends a wait: reads wait while message
/// time stays within `message_wait` of theirs, then stand on their `read_at` (the newest
/// message sent by then) or, with nothing sent by then, become dead letters.
#[test]
fn a_read_whose_message_never_comes_falls_back_to_read_at_or_is_a_dead_letter() {
    let mut d = driver(topology("10s"));
    let p = partition(&ConversationId::from(7));
    let t0 = d.now_ms();
    d.pipe_message_raw(p, 0, Some(message_json(10, t0 + 1_000).as_bytes()));
    d.pipe_message_raw(p, 1, Some(message_json(20, t0 + 5_000).as_bytes()));
    let reads = [
        read_json(2, "m-missing", t0 + 6_000),
        read_json(3, "m-missing", t0 + 2_000),
        read_json(4, "m-missing", t0),
        read_json(5, "m-20", t0 + 9_000),
    ];
    for (i, r) in reads.iter().enumerate() {
        d.pipe_raw(p, i as i64, Some(r.as_bytes()));
    }
    assert_eq!(
        d.state(&key(5)).unwrap().last_read_seq,
        20,
        "known: at once"
    );
    // Wall-clock time alone ends no wait.
    d.advance_wall_clock(Duration::from_secs(30));
    d.flush();
    assert_eq!(d.resolve_stats().1, 3, "three reads wait");
    // A message 31 s after the reads: message time passed their wait.
    d.pipe_message_raw(p, 2, Some(message_json(30, t0 + 100_000).as_bytes()));
    let (stats, waiting) = d.resolve_stats();
    assert_eq!(waiting, 0);
    assert_eq!(
        (stats.fallback, stats.unresolved, stats.immediate),
        (2, 1, 1)
    );
    let reader2 = d.state(&key(2)).unwrap();
    assert_eq!(
        (reader2.last_read_seq, reader2.message_id.as_deref()),
        (20, Some("m-20"))
    );
    assert_eq!(d.state(&key(3)).unwrap().last_read_seq, 10);
    assert!(d.state(&key(4)).is_none_or(|s| s.version == 0));
    let letters = d.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "unresolved_message");
    assert_eq!((letters[0].partition, letters[0].offset), (p, 2));
    assert_eq!(letters[0].value.as_deref(), Some(reads[2].as_bytes()));
    assert!(
        letters[0].error.contains("m-missing"),
        "{}",
        letters[0].error
    );
}

/// Without `read_at` mapped, a read whose message never comes is a dead letter.
#[test]
fn without_read_at_an_unresolved_read_is_a_dead_letter() {
    let text = json_message_id_fixture("m", ".".as_ref(), &ChatTopics::new("t"), "5s")
        .set_toml(
            "source.read-events.fields",
            r#"{ reader = "user", conversation = "conv", message_id = "msg", device = "device" }"#,
        )
        .text();
    let mut d = driver(compile(&text).unwrap());
    let p = partition(&ConversationId::from(7));
    let t0 = d.now_ms();
    d.pipe_message_raw(p, 0, Some(message_json(10, t0).as_bytes()));
    d.pipe_raw(p, 0, Some(read_json(2, "m-missing", t0 + 1_000).as_bytes()));
    d.advance_wall_clock(Duration::from_secs(6));
    d.pipe_message_raw(p, 1, Some(message_json(11, t0).as_bytes()));
    assert_eq!(d.resolve_stats().0.unresolved, 1);
    assert_eq!(d.dead_letters()[0].reason, "unresolved_message");
    assert!(d.dead_letters()[0].error.contains("no read_at"));
}

/// A waiting read is kept in the heads store: after a flush it survives a restart (and is
/// resolved by its message then); one not yet flushed is lost with the crash, and its
/// record, read again from the committed offset, waits again.
#[test]
fn waiting_reads_survive_restarts_and_crashes() {
    let mut d = driver(topology("1h"));
    let p = partition(&ConversationId::from(7));
    let t0 = d.now_ms();
    d.pipe_raw(p, 0, Some(read_json(2, "m-5", t0).as_bytes()));
    d.flush();
    d.restart();
    assert_eq!(d.resolve_stats().1, 1, "reloaded from the store");
    d.pipe_raw(p, 1, Some(read_json(3, "m-5", t0).as_bytes()));
    d.crash();
    assert_eq!(d.resolve_stats().1, 1, "the unflushed wait is gone");
    assert_eq!(d.committed_offset(p), 1);
    d.pipe_raw(p, 1, Some(read_json(3, "m-5", t0).as_bytes()));
    d.pipe_message_raw(p, 0, Some(message_json(5, t0).as_bytes()));
    for reader in [2, 3] {
        assert_eq!(d.state(&key(reader)).unwrap().last_read_seq, 5);
    }
    d.flush();
    d.restart();
    assert_eq!(
        d.resolve_stats().1,
        0,
        "resolved waits are deleted from the store"
    );
}
