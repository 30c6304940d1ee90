//! Unread and mention counts through the TopologyTestDriver (the same task, processor,
//! store and Avro code as `readstate run`), against the chat generator's oracle, which
//! keeps every message: random interleavings of messages and reads, reordering (reads
//! before their message), duplicates, crashes with replays, and restarts.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use readstate::ids::{ConversationId, Id, ReaderId, SenderId};
use readstate::model::{MessageEvent, StateKey};
use readstate::topology::Topology;
use readstate_testing::chat::{self, ChatTopics};
use readstate_testing::{DriverStores, TopologyTestDriver};
use readstate_tools::loadgen::chat::{generate, ChatEvent, ChatSpec, ChatWorkload};

const PARTS: i32 = 3;

/// `topologies/read_state_with_unread.toml` with `unread_cap` and `min_emit_interval`
/// set (commit interval 1 s, as shipped).
fn unread_topology(cap: usize, min_emit: &str) -> Topology {
    chat::fixture("unread-test", "./state".as_ref(), &ChatTopics::new("t"))
        .set("application.commit_interval", "1s")
        .set("processor.read-state.unread_cap", cap as i64)
        .set("processor.read-state.min_emit_interval", min_emit)
        .compile()
}

fn partition(c: &ConversationId) -> i32 {
    let c = c.as_int().expect("integer test ids");
    c.rem_euclid(i64::from(PARTS)) as i32
}

/// The records of one topic-partition in offset order, and the next offset to pipe.
#[derive(Default)]
struct Log {
    records: Vec<ChatEvent>,
    next: i64,
}

/// Feeds the workload as a consumer would: each (topic, partition) in its own order,
/// partitions interleaved at random, flushes at random, crashes and restarts at random
/// (each rewinding every log to its committed offset).
struct Feeder {
    logs: Vec<(bool, i32, Log)>,
    rng: StdRng,
}

impl Feeder {
    fn new(w: &ChatWorkload, seed: u64) -> Self {
        let mut logs: Vec<(bool, i32, Log)> = Vec::new();
        for is_message in [false, true] {
            for p in 0..PARTS {
                logs.push((is_message, p, Log::default()));
            }
        }
        for e in &w.arrivals {
            let is_message = matches!(e, ChatEvent::Message(_));
            let p = partition(e.conversation());
            let log = logs
                .iter_mut()
                .find(|(m, q, _)| *m == is_message && *q == p)
                .expect("every log exists");
            log.2.records.push(e.clone());
        }
        Self {
            logs,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn done(&self) -> bool {
        self.logs
            .iter()
            .all(|(_, _, l)| l.next as usize >= l.records.len())
    }

    /// Pipe a few records of one random log.
    fn step(&mut self, d: &mut TopologyTestDriver) {
        let live: Vec<usize> = (0..self.logs.len())
            .filter(|i| (self.logs[*i].2.next as usize) < self.logs[*i].2.records.len())
            .collect();
        let i = live[self.rng.gen_range(0..live.len())];
        let n = self.rng.gen_range(1..=8);
        let (_, p, log) = &mut self.logs[i];
        for _ in 0..n {
            let Some(e) = log.records.get(log.next as usize) else {
                break;
            };
            match e {
                ChatEvent::Message(m) => d.pipe_message(*p, log.next, m),
                ChatEvent::Read(r) => d.pipe_event(*p, log.next, r),
            }
            log.next += 1;
        }
    }

    /// After a crash or restart: every log continues from its committed offset.
    fn rewind(&mut self, d: &TopologyTestDriver) {
        for (is_message, p, log) in &mut self.logs {
            log.next = match is_message {
                true => d.committed_message_offset(*p),
                false => d.committed_offset(*p),
            };
        }
    }
}

/// Every member of every conversation (readers and those who never read) has the
/// oracle's counts: exact while within the window, a flagged lower bound beyond it.
fn assert_counts(d: &TopologyTestDriver, w: &ChatWorkload, cap: usize) -> (usize, usize) {
    let (mut exact, mut capped) = (0, 0);
    for (conv, members) in &w.members {
        for r in members {
            let key = StateKey {
                conversation: conv.clone(),
                reader: r.clone(),
            };
            let got = d
                .unread_counts(partition(conv), &key)
                .expect("the task exists and has a message source");
            let want = w.expected(conv, r);
            if got.capped {
                capped += 1;
                assert!(
                    w.behind(conv, r) > cap,
                    "{key:?}: capped only beyond the window"
                );
                assert!(got.unread <= want.unread && got.mentions <= want.mentions);
            } else {
                exact += 1;
                assert_eq!(
                    (got.unread, got.mentions),
                    (want.unread, want.mentions),
                    "{key:?} (pointer {:?})",
                    w.pointers.get(&key)
                );
            }
        }
    }
    (exact, capped)
}

/// Messages replayed (skipped by their replay marks) and duplicates, over the whole run.
#[derive(Debug, Default)]
struct Seen {
    replayed: u64,
    duplicates: u64,
}

impl Seen {
    fn add(&mut self, d: &TopologyTestDriver) {
        let s = d.message_stats();
        self.replayed += s.replayed;
        self.duplicates += s.duplicates;
    }
}

fn run(seed: u64, cap: usize, stores: DriverStores) -> (TopologyTestDriver, ChatWorkload, Seen) {
    let spec = ChatSpec {
        seed,
        conversations: 24,
        max_members: 60,
        max_messages: 120,
        ..Default::default()
    };
    let w = generate(&spec);
    let mut d = TopologyTestDriver::with(
        unread_topology(cap, "0s"),
        stores,
        std::sync::Arc::new(readstate::serde::LocalRegistry::new()),
    );
    let mut f = Feeder::new(&w, seed);
    let (mut crashes, mut restarts) = (0, 0);
    let mut seen = Seen::default();
    while !f.done() {
        f.step(&mut d);
        match f.rng.gen_range(0..100) {
            0..=9 => d.advance_wall_clock(Duration::from_secs(1)),
            10 => {
                d.crash();
                f.rewind(&d);
                crashes += 1;
            }
            11 => {
                d.crash_after_output();
                f.rewind(&d);
                crashes += 1;
            }
            12 => {
                d.crash_after_store();
                f.rewind(&d);
                crashes += 1;
            }
            13 => {
                d.flush();
                seen.add(&d);
                d.restart();
                f.rewind(&d);
                restarts += 1;
            }
            _ => {}
        }
    }
    d.flush();
    seen.add(&d);
    assert!(crashes > 0 && restarts > 0, "the run crashed and restarted");
    (d, w, seen)
}

#[test]
fn counts_match_the_oracle_through_crashes_replays_and_restarts() {
    for seed in [1, 2, 3] {
        let (d, w, seen) = run(seed, 1000, DriverStores::Memory);
        let (exact, capped) = assert_counts(&d, &w, 1000);
        assert_eq!(capped, 0, "no conversation outgrows a window of 1000");
        assert!(exact > 500, "{exact} members checked");
        assert!(seen.replayed > 0, "crashes replayed messages: {seen:?}");
        assert!(seen.duplicates > 0, "duplicates were delivered: {seen:?}");
        // Each conversation's head counts every distinct message once.
        for (conv, msgs) in &w.messages {
            let h = d.head(partition(conv), conv).expect("head stored");
            assert_eq!(h.message_count, msgs.len() as i64, "conversation {conv}");
            assert_eq!(
                h.head_seq,
                msgs.iter().map(|m| m.message_seq).max().unwrap()
            );
        }
    }
}

#[test]
fn a_small_window_is_exact_within_it_and_flags_what_is_beyond() {
    let dir = tempfile::tempdir().unwrap();
    let (d, w, _) = run(4, 20, DriverStores::RocksDb(dir.path().to_owned()));
    let (exact, capped) = assert_counts(&d, &w, 20);
    assert!(
        exact > 100 && capped > 100,
        "{exact} exact, {capped} capped"
    );
}

#[test]
fn head_updates_follow_the_messages_and_receipts_carry_counts_as_of_the_update() {
    let mut d = TopologyTestDriver::new(unread_topology(1000, "0s"));
    let conv = ConversationId::from(9);
    let msg = |seq, sender: i64, mentions: Vec<i64>| MessageEvent {
        conversation_id: conv.clone(),
        message_seq: seq,
        sender_id: SenderId::from(sender),
        mentions: mentions.into_iter().map(ReaderId::from).collect(),
        ..Default::default()
    };
    // A read arrives before the messages it covers.
    d.pipe_event(0, 0, &common_read(conv.clone(), 7, 20));
    for (i, m) in [
        msg(10, 1, vec![7]),
        msg(20, 7, vec![]),
        msg(30, 1, vec![7, 8]),
        msg(40, 2, vec![]),
    ]
    .iter()
    .enumerate()
    {
        d.pipe_message(0, i as i64, m);
    }
    d.advance_wall_clock(Duration::from_secs(1));
    let out = d.read_output();
    assert_eq!(out.len(), 1);
    let c = out[0].counts.expect("counts in the update");
    assert_eq!((c.unread, c.mentions, c.capped), (2, 1, false));
    let heads = d.read_heads();
    assert_eq!(heads.len(), 1, "one head update per conversation per flush");
    let h = &heads[0];
    assert_eq!((h.head_seq, h.message_count, h.version), (40, 4, 4));
    assert_eq!(h.recent_seqs, vec![10, 20, 30, 40]);
    assert_eq!(h.recent_senders, [1, 7, 1, 2].map(Id::int));
    assert_eq!(
        (h.mention_seqs.clone(), h.mention_user_ids.clone()),
        (vec![10, 30, 30], [7, 7, 8].map(Id::int).to_vec())
    );
    // A duplicate message changes nothing that is emitted.
    d.pipe_message(0, 4, &msg(30, 1, vec![7, 8]));
    d.advance_wall_clock(Duration::from_secs(1));
    assert!(
        d.read_heads().is_empty(),
        "a duplicate emits no head update"
    );
    // Reading further: the mention falls away.
    d.pipe_event(0, 1, &common_read(conv.clone(), 7, 30));
    d.advance_wall_clock(Duration::from_secs(1));
    let c = d.read_output()[0].counts.unwrap();
    assert_eq!((c.unread, c.mentions), (1, 0));
}

/// A message to a 1,000-member conversation costs one state write (its head), however
/// many members: nothing is written per member.
#[test]
fn a_message_costs_one_write_whatever_the_conversation_size() {
    let mut d = TopologyTestDriver::new(unread_topology(1000, "0s"));
    let conv = ConversationId::from(5);
    for i in 0..100i64 {
        let m = MessageEvent {
            conversation_id: conv.clone(),
            message_seq: i + 1,
            sender_id: SenderId::from(i % 1000),
            mentions: vec![
                ReaderId::from((i * 7) % 1000),
                ReaderId::from((i * 13) % 1000),
            ],
            ..Default::default()
        };
        d.pipe_message(0, i, &m);
        if i % 10 == 9 {
            d.advance_wall_clock(Duration::from_secs(1));
        }
    }
    let stats = d.message_stats();
    assert_eq!(stats.head_writes, 10, "one head write per flush: {stats:?}");
    let stores = d.stores(0);
    let [state, heads] = stores.as_slice() else {
        panic!("a read-state and a head-state store: {}", stores.len());
    };
    assert_eq!(
        (state.name().as_str(), heads.name().as_str()),
        ("read-state", "head-state")
    );
    assert!(
        state.scan_prefix(b"").unwrap().is_empty(),
        "no per-member state was written, and no head in the read-state store"
    );
    assert_eq!(
        heads.scan_prefix(b"h").unwrap().len(),
        1,
        "the conversation's head, in its own store"
    );
    // Every member's counts are still known.
    let c = d
        .unread_counts(
            0,
            &StateKey {
                conversation: conv,
                reader: ReaderId::from(999),
            },
        )
        .unwrap();
    // Member 999 sent none of them and is mentioned in none.
    assert_eq!((c.unread, c.mentions), (100, 0));
}

fn common_read(conv: ConversationId, reader: i64, seq: i64) -> readstate::model::ReadEvent {
    readstate::model::ReadEvent {
        reader_id: ReaderId::from(reader),
        conversation_id: conv,
        message_seq: seq,
        device_id: Some("phone".into()),
        ..Default::default()
    }
}
