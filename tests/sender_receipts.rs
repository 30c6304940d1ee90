//! Read receipts for senders (issue 24, part 1) through the TopologyTestDriver: each
//! emitted advance of reader R in conversation C yields, for every sender S (not R) of the
//! messages it passed, one receipt keyed by S naming the highest of S's messages now read.
//! The oracle is the chat generator's: every sender learns, for every reader, exactly the
//! highest of its messages at or below that reader's final pointer, and never more; across
//! flushes, crashes (outputs re-emitted, at least once) and restarts.

use std::collections::HashMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use readstate::ids::{ConversationId, ReaderId, SenderId};
use readstate::topology::compile;
use readstate_testing::chat::{self, ChatTopics};
use readstate_testing::{DriverStores, TopologyTestDriver};
use readstate_tools::loadgen::chat::{generate, ChatEvent, ChatSpec};

const PARTS: i32 = 3;

const SENDERS_SINK: &str = r#"
[[sink]]
name = "senders"
kind = "kafka"
input = "read-state"
output = "sender-receipts"
topic = "senders"
"#;

fn partition(c: &ConversationId) -> i32 {
    c.as_int().unwrap().rem_euclid(i64::from(PARTS)) as i32
}

type Triple = (SenderId, ConversationId, ReaderId);

#[test]
fn every_sender_learns_the_highest_of_its_messages_each_reader_read() {
    // Without and with a minimum emit interval: an advance held back over flushes (and
    // crashes) still names every message from the last emitted pointer on. With
    // reordering, reads arrive before the messages they cover: a message that arrives
    // after an emitted read passed it is owed by that reader to its sender.
    let runs = [
        (31, "0s", 0.0),
        (32, "0s", 0.0),
        (33, "3s", 0.0),
        (34, "3s", 0.0),
        (35, "0s", 0.3),
        (36, "0s", 0.3),
        (37, "3s", 0.3),
        (38, "3s", 0.3),
    ];
    let mut read_before = 0;
    for (seed, min_emit, reorder_rate) in runs {
        let w = generate(&ChatSpec {
            seed,
            conversations: 16,
            max_members: 12,
            max_messages: 60,
            reorder_rate,
            duplicate_rate: 0.05,
            ..Default::default()
        });
        let dir = std::path::Path::new("./unused");
        let text = chat::fixture("senders", dir, &ChatTopics::new("t"))
            .with_tables(SENDERS_SINK)
            .set("processor.read-state.min_emit_interval", min_emit)
            .text();
        let mut d = TopologyTestDriver::with(
            compile(&text).unwrap(),
            DriverStores::Memory,
            std::sync::Arc::new(readstate::serde::LocalRegistry::new()),
        );
        let mut rng = StdRng::seed_from_u64(seed);
        let crashes = seed % 2 == 0;
        // Each arrival's log (is message, partition) and offset there, in arrival order.
        let mut next: HashMap<(bool, i32), i64> = HashMap::new();
        let at: Vec<((bool, i32), i64)> = (w.arrivals.iter())
            .map(|e| {
                let log = (
                    matches!(e, ChatEvent::Message(_)),
                    partition(e.conversation()),
                );
                let n = next.entry(log).or_insert(0);
                *n += 1;
                (log, *n - 1)
            })
            .collect();
        let pipe = |d: &mut TopologyTestDriver, i: usize| {
            let ((_, p), offset) = at[i];
            match &w.arrivals[i] {
                ChatEvent::Message(m) => d.pipe_message(p, offset, m),
                ChatEvent::Read(r) => d.pipe_event(p, offset, r),
            }
        };
        let mut got: Vec<readstate::model::SenderReceipt> = Vec::new();
        for i in 0..w.arrivals.len() {
            pipe(&mut d, i);
            match rng.gen_range(0..30) {
                0..=2 => d.advance_wall_clock(Duration::from_secs(1)),
                3 if crashes => {
                    // A crash after the outputs: they stay (at least once); every log is
                    // consumed again from its committed offset, in arrival order.
                    d.crash_after_output();
                    for (j, &((is_message, p), offset)) in at.iter().enumerate().take(i + 1) {
                        let committed = match is_message {
                            true => d.committed_message_offset(p),
                            false => d.committed_offset(p),
                        };
                        if offset >= committed {
                            pipe(&mut d, j);
                        }
                    }
                }
                _ => {}
            }
            got.extend(d.read_sender_receipts());
        }
        // Past every held-back slot.
        d.advance_wall_clock(Duration::from_secs(10));
        d.flush();
        got.extend(d.read_sender_receipts());
        check(&w, &got);
        read_before += d.message_stats().read_before;
        if !crashes {
            // Without replays each receipt is news: a sender hears of a reader's progress
            // over its messages once, never the same message twice.
            let mut last: HashMap<Triple, i64> = HashMap::new();
            for r in &got {
                let t = (
                    r.sender_id.clone(),
                    r.conversation_id.clone(),
                    r.reader_id.clone(),
                );
                let prev = last.insert(t, r.message_seq).unwrap_or(-1);
                assert!(r.message_seq > prev, "{r:?} repeats or regresses ({prev})");
            }
        }
    }
    assert!(
        read_before > 50,
        "{read_before} messages arrived after a read past them"
    );
}

fn check(
    w: &readstate_tools::loadgen::chat::ChatWorkload,
    got: &[readstate::model::SenderReceipt],
) {
    let mut best: HashMap<Triple, i64> = HashMap::new();
    for r in got {
        let key = readstate::model::StateKey {
            conversation: r.conversation_id.clone(),
            reader: r.reader_id.clone(),
        };
        let pointer = w.pointers.get(&key).copied().unwrap_or(-1);
        assert!(
            r.message_seq <= pointer,
            "{r:?} beyond the reader's pointer {pointer}"
        );
        assert_ne!(
            r.sender_id.0, r.reader_id.0,
            "no receipt for one's own read: {r:?}"
        );
        let m = w.messages[&r.conversation_id]
            .iter()
            .find(|m| m.message_seq == r.message_seq)
            .unwrap_or_else(|| panic!("{r:?} names no message"));
        assert_eq!(
            m.sender_id, r.sender_id,
            "{r:?} names another sender's message"
        );
        assert_eq!(r.message_id, m.message_id, "{r:?}");
        assert!(!r.covers_older, "every message is in the window: {r:?}");
        let b = best
            .entry((
                r.sender_id.clone(),
                r.conversation_id.clone(),
                r.reader_id.clone(),
            ))
            .or_insert(-1);
        *b = (*b).max(r.message_seq);
    }
    let mut want: HashMap<Triple, i64> = HashMap::new();
    for (key, pointer) in &w.pointers {
        for m in &w.messages[&key.conversation] {
            if m.message_seq <= *pointer && m.sender_id.0 != key.reader.0 {
                let b = want
                    .entry((
                        m.sender_id.clone(),
                        key.conversation.clone(),
                        key.reader.clone(),
                    ))
                    .or_insert(-1);
                *b = (*b).max(m.message_seq);
            }
        }
    }
    assert!(
        want.len() > 100,
        "{} (sender, conversation, reader) triples",
        want.len()
    );
    assert_eq!(best, want);
}

/// Sender receipts need the messages' senders: without a message source the sink is
/// refused, named by its place in the file.
#[test]
fn a_sender_receipts_sink_needs_a_message_source() {
    let dir = std::path::Path::new("./unused");
    let without = chat::fixture("senders", dir, &ChatTopics::new("t"))
        .with_tables(SENDERS_SINK)
        .without("source.message-events")
        .set("processor.read-state.inputs", vec!["read-events"])
        .text();
    let errs = compile(&without).unwrap_err();
    let sink = errs
        .iter()
        .find(|e| e.message.contains("sender-receipts needs"));
    assert!(sink.is_some_and(|e| e.at.ends_with(".output")), "{errs:?}");
}
