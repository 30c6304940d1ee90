//! Read by N of M (issue 24, part 2) through the TopologyTestDriver: a members source (a
//! table of member lists keyed by conversation) beside the reads and messages. After
//! every membership change (joins, leaves, members who never read, a conversation whose
//! list is deleted) and at checkpoints in between, each sender's latest read-by record per
//! conversation equals an independent oracle computed from the records piped so far: its
//! latest message, N = members whose pointer is at or past it, M = members. Groups above
//! `large_group_members` get no per-reader receipts for senders. With crashes (outputs
//! repeated, every topic consumed again from its committed offset) and restarts.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use readstate::ids::{ConversationId, ReaderId, SenderId};
use readstate::model::{MessageEvent, ReadBy, ReadEvent, SenderReceipt, StateKey};
use readstate::topology::compile;
use readstate_testing::chat::{self, ChatTopics};
use readstate_testing::{DriverStores, TopologyTestDriver};
use readstate_tools::loadgen::chat::{generate, ChatEvent, ChatSpec};

const PARTS: i32 = 3;
const LARGE: usize = 20;
/// The topology's `unread_cap`: read-by is sent for senders with a message among the
/// conversation's latest this many.
const WINDOW: usize = 1000;

fn partition(c: &ConversationId) -> i32 {
    c.as_int().unwrap().rem_euclid(i64::from(PARTS)) as i32
}

fn text() -> String {
    let extra = r#"
[[source]]
name = "members"
topic = "t-members"
records = "members"
[[sink]]
name = "senders"
kind = "kafka"
input = "read-state"
output = "sender-receipts"
topic = "senders"
[[sink]]
name = "read-by"
kind = "kafka"
input = "read-state"
output = "read-by"
topic = "read-by"
"#;
    let dir = std::path::Path::new("./unused");
    chat::fixture("groups", dir, &ChatTopics::new("t"))
        .with_tables(extra)
        .set(
            "processor.read-state.inputs",
            vec!["read-events", "message-events", "members"],
        )
        .set("processor.read-state.large_group_members", LARGE as i64)
        .text()
}

/// One arrival: a chat event, or a member list (`None`: deleted).
#[derive(Clone)]
enum Arrival {
    Chat(ChatEvent),
    Members(ConversationId, Option<Vec<ReaderId>>),
}

impl Arrival {
    fn log(&self) -> (u8, i32) {
        match self {
            Arrival::Chat(ChatEvent::Read(r)) => (0, partition(&r.conversation_id)),
            Arrival::Chat(ChatEvent::Message(m)) => (1, partition(&m.conversation_id)),
            Arrival::Members(c, _) => (2, partition(c)),
        }
    }
}

/// The oracle after the first `n` arrivals: per (sender, conversation) of a conversation
/// with a member list and a sender with a message in its window, (latest message, N, M).
fn oracle(arrivals: &[Arrival]) -> HashMap<(SenderId, ConversationId), (i64, i64, i64)> {
    let mut members: HashMap<ConversationId, BTreeSet<ReaderId>> = HashMap::new();
    let mut pointers: HashMap<StateKey, i64> = HashMap::new();
    let mut latest: HashMap<(SenderId, ConversationId), i64> = HashMap::new();
    let mut seqs: HashMap<ConversationId, BTreeSet<i64>> = HashMap::new();
    for a in arrivals {
        match a {
            Arrival::Members(c, list) => {
                let set = list.iter().flatten().cloned().collect();
                members.insert(c.clone(), set);
            }
            Arrival::Chat(ChatEvent::Read(r)) => {
                let p = pointers.entry(r.key()).or_insert(-1);
                *p = (*p).max(r.message_seq);
            }
            Arrival::Chat(ChatEvent::Message(m)) => {
                let k = (m.sender_id.clone(), m.conversation_id.clone());
                let l = latest.entry(k).or_insert(-1);
                *l = (*l).max(m.message_seq);
                (seqs.entry(m.conversation_id.clone()).or_default()).insert(m.message_seq);
            }
        }
    }
    let mut want = HashMap::new();
    for ((s, c), seq) in latest {
        let Some(ms) = members.get(&c) else {
            continue;
        };
        // Only senders with a message among the window's `unread_cap` latest.
        let window = &seqs[&c];
        if window.len() > WINDOW && seq < *window.iter().nth_back(WINDOW - 1).unwrap() {
            continue;
        }
        let n = ms
            .iter()
            .filter(|m| {
                let key = StateKey {
                    conversation: c.clone(),
                    reader: (*m).clone(),
                };
                pointers.get(&key).is_some_and(|p| *p >= seq)
            })
            .count();
        want.insert((s, c), (seq, n as i64, ms.len() as i64));
    }
    want
}

fn latest_emitted(got: &[ReadBy]) -> HashMap<(SenderId, ConversationId), (i64, i64, i64)> {
    got.iter()
        .map(|r| {
            let k = (r.sender_id.clone(), r.conversation_id.clone());
            (k, (r.message_seq, r.read_by, r.members))
        })
        .collect()
}

/// The arrivals: every conversation's member list first (its members and one who never
/// reads), then the chat events with membership changes among them: joins of members who
/// never read, leaves, and one conversation's list deleted.
fn arrivals(seed: u64) -> (Vec<Arrival>, HashMap<ConversationId, usize>) {
    let w = generate(&ChatSpec {
        seed,
        conversations: 18,
        max_members: 40,
        max_messages: 50,
        reorder_rate: 0.2,
        duplicate_rate: 0.05,
        ..Default::default()
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let mut current: HashMap<ConversationId, Vec<ReaderId>> = HashMap::new();
    let mut out = Vec::new();
    let mut convs: Vec<&ConversationId> = w.members.keys().collect();
    convs.sort();
    for c in &convs {
        let mut ms = w.members[*c].clone();
        ms.push(ReaderId::from(900_000 + c.as_int().unwrap()));
        current.insert((*c).clone(), ms.clone());
        out.push(Arrival::Members((*c).clone(), Some(ms)));
    }
    let initial: HashMap<ConversationId, usize> =
        current.iter().map(|(c, m)| (c.clone(), m.len())).collect();
    for (i, e) in w.arrivals.iter().enumerate() {
        out.push(Arrival::Chat(e.clone()));
        if i % 40 == 39 {
            let c = convs[rng.gen_range(0..convs.len())].clone();
            let ms = current.get_mut(&c).unwrap();
            if rng.gen_bool(0.5) && ms.len() > 2 {
                ms.remove(rng.gen_range(0..ms.len()));
            } else {
                ms.push(ReaderId::from(950_000 + i as i64));
            }
            out.push(Arrival::Members(c, Some(ms.clone())));
        }
    }
    out.push(Arrival::Members(convs[0].clone(), None));
    (out, initial)
}

/// Pipe `arrivals` through a driver, checking after every membership change (and every
/// 97 arrivals) that each sender's last read-by per conversation equals the oracle of the
/// arrivals so far; with `crashes`, crashes after the outputs and replays from the
/// committed offsets; restarts at random. The sender receipts emitted, and the number of
/// membership changes checked.
fn drive(arrivals: &[Arrival], seed: u64, crashes: bool) -> (Vec<SenderReceipt>, usize) {
    let mut d = TopologyTestDriver::with(
        compile(&text()).unwrap(),
        DriverStores::Memory,
        std::sync::Arc::new(readstate::serde::LocalRegistry::new()),
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next: HashMap<(u8, i32), i64> = HashMap::new();
    let at: Vec<((u8, i32), i64)> = (arrivals.iter())
        .map(|a| {
            let n = next.entry(a.log()).or_insert(0);
            *n += 1;
            (a.log(), *n - 1)
        })
        .collect();
    let pipe = |d: &mut TopologyTestDriver, i: usize| {
        let ((_, p), offset) = at[i];
        match &arrivals[i] {
            Arrival::Chat(ChatEvent::Message(m)) => d.pipe_message(p, offset, m),
            Arrival::Chat(ChatEvent::Read(r)) => d.pipe_event(p, offset, r),
            Arrival::Members(c, list) => d.pipe_members(p, offset, c, list.as_deref()),
        }
    };
    let (mut got, mut receipts, mut changes) = (Vec::new(), Vec::new(), 0);
    for i in 0..arrivals.len() {
        pipe(&mut d, i);
        let membership = matches!(arrivals[i], Arrival::Members(..));
        if membership || i % 97 == 0 {
            d.flush();
            got.extend(d.read_read_by());
            let want = oracle(&arrivals[..=i]);
            let emitted = latest_emitted(&got);
            let wrong: Vec<_> = (want.iter())
                .filter(|(k, v)| emitted.get(*k) != Some(*v))
                .take(5)
                .collect();
            assert!(
                wrong.is_empty(),
                "seed {seed}, after arrival {i}: {wrong:?}"
            );
            changes += usize::from(membership);
        }
        if crashes && rng.gen_range(0..60) == 0 {
            d.crash_after_output();
            got.extend(d.read_read_by());
            for (j, &((log, p), offset)) in at.iter().enumerate().take(i + 1) {
                let committed = match log {
                    0 => d.committed_offset(p),
                    1 => d.committed_message_offset(p),
                    _ => d.committed_members_offset(p),
                };
                if offset >= committed {
                    pipe(&mut d, j);
                }
            }
        }
        if rng.gen_range(0..200) == 0 {
            d.flush();
            got.extend(d.read_read_by());
            d.restart();
        }
        d.advance_wall_clock(Duration::from_millis(50));
        got.extend(d.read_read_by());
        receipts.extend(d.read_sender_receipts());
    }
    (receipts, changes)
}

#[test]
fn read_by_n_of_m_equals_the_oracle_after_every_membership_change() {
    let mut changes = 0;
    for seed in [41, 42, 43] {
        let (arrivals, initial) = arrivals(seed);
        let (receipts, n) = drive(&arrivals, seed, seed != 41);
        changes += n;
        // Groups always above the threshold (a leave takes at most a few) get no per-reader
        // receipts; the small ones do.
        let large: BTreeSet<&ConversationId> = (initial.iter())
            .filter(|(_, n)| **n > LARGE + 6)
            .map(|(c, _)| c)
            .collect();
        let small: BTreeSet<&ConversationId> = (initial.iter())
            .filter(|(_, n)| **n <= LARGE - 6)
            .map(|(c, _)| c)
            .collect();
        assert!(!large.is_empty() && !small.is_empty(), "seed {seed}");
        assert!(receipts.iter().all(|r| !large.contains(&r.conversation_id)));
        assert!(receipts.iter().any(|r| small.contains(&r.conversation_id)));
    }
    assert!(changes > 60, "{changes} membership changes checked");
}

/// One group of 1,000 members: 50 of them send, any of them reads up to one of the ten
/// latest messages (often before it arrives), members leave and join; read by N of M stays
/// exact, and no per-reader receipt is sent (above `large_group_members`).
#[test]
fn a_group_of_a_thousand_members() {
    let mut rng = StdRng::seed_from_u64(7);
    let c = ConversationId::from(5);
    let mut members: Vec<ReaderId> = (0..1000).map(|i| ReaderId::from(20_000 + i)).collect();
    let mut arrivals = vec![Arrival::Members(c.clone(), Some(members.clone()))];
    let mut seq = 0;
    for step in 0..6_000i64 {
        if step % 3 == 0 {
            seq += 1;
            let sender = &members[rng.gen_range(0..50)];
            let m = MessageEvent {
                conversation_id: c.clone(),
                message_seq: seq,
                message_id: Some(format!("m-{seq}")),
                sender_id: SenderId(sender.0.clone()),
                ..Default::default()
            };
            arrivals.push(Arrival::Chat(ChatEvent::Message(m)));
        } else {
            let r = ReadEvent {
                reader_id: members[rng.gen_range(0..members.len())].clone(),
                conversation_id: c.clone(),
                message_seq: rng.gen_range((seq - 10).max(1)..=seq + 2),
                ..Default::default()
            };
            arrivals.push(Arrival::Chat(ChatEvent::Read(r)));
        }
        if step % 250 == 249 {
            if rng.gen_bool(0.5) {
                members.remove(rng.gen_range(0..members.len()));
            } else {
                members.push(ReaderId::from(90_000 + step));
            }
            arrivals.push(Arrival::Members(c.clone(), Some(members.clone())));
        }
    }
    let (receipts, changes) = drive(&arrivals, 7, true);
    assert!(changes >= 20, "{changes}");
    assert!(
        receipts.is_empty(),
        "{} per-reader receipts",
        receipts.len()
    );
}

/// A members record that is not a member list is a dead letter, and processing goes on.
#[test]
fn a_bad_member_list_is_a_dead_letter() {
    let mut d = TopologyTestDriver::with(
        compile(&text()).unwrap(),
        DriverStores::Memory,
        std::sync::Arc::new(readstate::serde::LocalRegistry::new()),
    );
    d.pipe_members_raw(0, 0, Some(b"3"), Some(b"{\"members\": \"nobody\"}"));
    d.pipe_members_raw(0, 1, None, Some(b"[1, 2]"));
    let c = ConversationId::from(3);
    d.pipe_members(0, 2, &c, Some(&[ReaderId::from(1), ReaderId::from(2)]));
    d.flush();
    let letters = d.dead_letters();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters.iter().all(|l| l.reason == "invalid_event"),
        "{letters:?}"
    );
}
