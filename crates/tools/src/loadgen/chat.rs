//! A chat workload with both sources: messages sent to conversations (senders, mentions,
//! @everyone) and members reading them, arriving interleaved, reordered and duplicated;
//! and the oracle of every member's unread and mention counts.
//!
//! The oracle keeps every message, so it is independent of readstate's bounded window:
//! unread = messages after the member's max read seq not sent by the member; mentions =
//! those naming the member or everyone.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use readstate::ids::{ConversationId, ReaderId, SenderId};
use readstate::model::{MessageEvent, ReadEvent, StateKey, UnreadCounts};

/// The shape of a chat workload.
#[derive(Debug, Clone)]
pub struct ChatSpec {
    pub seed: u64,
    pub conversations: u64,
    /// Members per conversation: uniform in 2..=max_members.
    pub max_members: u64,
    /// Messages per conversation: uniform in 1..=max_messages.
    pub max_messages: u64,
    /// Read events per member: uniform in 0..=max_reads (a member may never read).
    pub max_reads: u64,
    /// Share of messages mentioning 1-3 members, and mentioning everyone.
    pub mention_rate: f64,
    pub everyone_rate: f64,
    /// Share of events held back and delivered up to `reorder_window` events later.
    pub reorder_rate: f64,
    pub reorder_window: usize,
    /// Share of events delivered twice.
    pub duplicate_rate: f64,
}

impl Default for ChatSpec {
    fn default() -> Self {
        Self {
            seed: 7,
            conversations: 40,
            max_members: 200,
            max_messages: 150,
            max_reads: 3,
            mention_rate: 0.1,
            everyone_rate: 0.02,
            reorder_rate: 0.2,
            reorder_window: 50,
            duplicate_rate: 0.05,
        }
    }
}

/// One record of either source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    Message(MessageEvent),
    Read(ReadEvent),
}

impl ChatEvent {
    pub fn conversation(&self) -> &ConversationId {
        match self {
            ChatEvent::Message(m) => &m.conversation_id,
            ChatEvent::Read(r) => &r.conversation_id,
        }
    }
}

/// A generated workload: the records in arrival order, and what they mean.
#[derive(Debug, Clone, Default)]
pub struct ChatWorkload {
    pub arrivals: Vec<ChatEvent>,
    pub members: HashMap<ConversationId, Vec<ReaderId>>,
    /// Every distinct message, per conversation.
    pub messages: HashMap<ConversationId, Vec<MessageEvent>>,
    /// Max read seq per (conversation, reader) over the distinct read events.
    pub pointers: HashMap<StateKey, i64>,
}

impl ChatWorkload {
    /// The counts `reader` must have in `conversation` once every record arrived.
    pub fn expected(&self, conversation: &ConversationId, reader: &ReaderId) -> UnreadCounts {
        let key = StateKey {
            conversation: conversation.clone(),
            reader: reader.clone(),
        };
        let pointer = self.pointers.get(&key).copied().unwrap_or(-1);
        let mut c = UnreadCounts::default();
        for m in self.messages.get(conversation).into_iter().flatten() {
            if m.message_seq > pointer && m.sender_id.0 != reader.0 {
                c.unread += 1;
                if m.mention_everyone || m.mentions.contains(reader) {
                    c.mentions += 1;
                }
            }
        }
        c
    }

    /// The same workload with string ids (`conv1000`, `user10000`), as a service with
    /// string ids would produce it (`[ids] conversation = "string", user = "string"`).
    pub fn with_text_ids(&self) -> ChatWorkload {
        let text = |prefix: &str, id: &readstate::ids::Id| {
            readstate::ids::Id::text(&format!("{prefix}{id}")).expect("short id")
        };
        let conv = |c: &ConversationId| ConversationId(text("conv", &c.0));
        let user = |r: &ReaderId| ReaderId(text("user", &r.0));
        let message = |m: &MessageEvent| MessageEvent {
            conversation_id: conv(&m.conversation_id),
            sender_id: SenderId(text("user", &m.sender_id.0)),
            mentions: m.mentions.iter().map(user).collect(),
            ..m.clone()
        };
        let arrival = |e: &ChatEvent| match e {
            ChatEvent::Message(m) => ChatEvent::Message(message(m)),
            ChatEvent::Read(r) => ChatEvent::Read(ReadEvent {
                conversation_id: conv(&r.conversation_id),
                reader_id: user(&r.reader_id),
                sender_id: r.sender_id.as_ref().map(|s| SenderId(text("user", &s.0))),
                ..r.clone()
            }),
        };
        ChatWorkload {
            arrivals: self.arrivals.iter().map(arrival).collect(),
            members: (self.members.iter())
                .map(|(c, rs)| (conv(c), rs.iter().map(user).collect()))
                .collect(),
            messages: (self.messages.iter())
                .map(|(c, ms)| (conv(c), ms.iter().map(message).collect()))
                .collect(),
            pointers: (self.pointers.iter())
                .map(|(k, p)| {
                    let key = StateKey {
                        conversation: conv(&k.conversation),
                        reader: user(&k.reader),
                    };
                    (key, *p)
                })
                .collect(),
        }
    }

    /// The same workload with each read naming its message by id (what a service with no
    /// sequence sends: `position = "message_id"`).
    pub fn with_read_message_ids(&self) -> ChatWorkload {
        let id_of = |r: &ReadEvent| {
            let sent = self.messages.get(&r.conversation_id).into_iter().flatten();
            let mut at = sent.filter(|m| m.message_seq == r.message_seq);
            at.next().and_then(|m| m.message_id.clone())
        };
        let arrival = |e: &ChatEvent| match e {
            ChatEvent::Read(r) => ChatEvent::Read(ReadEvent {
                message_id: Some(id_of(r).expect("every read points at a sent message")),
                ..r.clone()
            }),
            m => m.clone(),
        };
        ChatWorkload {
            arrivals: self.arrivals.iter().map(arrival).collect(),
            ..self.clone()
        }
    }

    /// The workload as far as its first `n` arrivals: what must hold once they are in.
    pub fn prefix(&self, n: usize) -> ChatWorkload {
        let arrivals = self.arrivals[..n.min(self.arrivals.len())].to_vec();
        let mut w = ChatWorkload {
            members: self.members.clone(),
            ..Default::default()
        };
        let mut seen: std::collections::HashSet<(ConversationId, i64)> = Default::default();
        for e in &arrivals {
            match e {
                ChatEvent::Message(m) => {
                    if seen.insert((m.conversation_id.clone(), m.message_seq)) {
                        w.messages
                            .entry(m.conversation_id.clone())
                            .or_default()
                            .push(m.clone());
                    }
                }
                ChatEvent::Read(r) => {
                    let p = w.pointers.entry(r.key()).or_insert(-1);
                    *p = (*p).max(r.message_seq);
                }
            }
        }
        w.arrivals = arrivals;
        w
    }

    /// Messages after `reader`'s pointer, own ones included (how far behind the head).
    pub fn behind(&self, conversation: &ConversationId, reader: &ReaderId) -> usize {
        let key = StateKey {
            conversation: conversation.clone(),
            reader: reader.clone(),
        };
        let pointer = self.pointers.get(&key).copied().unwrap_or(-1);
        self.messages
            .get(conversation)
            .into_iter()
            .flatten()
            .filter(|m| m.message_seq > pointer)
            .count()
    }
}

/// Generate a workload: per conversation, members, messages (seqs with gaps, like
/// snowflakes) and reads pointing at sent messages; then one arrival order mixing all
/// conversations, reordered and with duplicates.
pub fn generate(spec: &ChatSpec) -> ChatWorkload {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut w = ChatWorkload::default();
    let mut timeline: Vec<ChatEvent> = Vec::new();
    for c in 0..spec.conversations {
        let conv = ConversationId::from(1_000 + c as i64);
        let n_members = rng.gen_range(2..=spec.max_members.max(2));
        let members: Vec<ReaderId> = (0..n_members)
            .map(|i| ReaderId::from(10_000 + (c as i64) * 1_000 + i as i64))
            .collect();
        let n_messages = rng.gen_range(1..=spec.max_messages.max(1));
        let mut seq = 0i64;
        let mut sent: Vec<MessageEvent> = Vec::new();
        for _ in 0..n_messages {
            seq += rng.gen_range(1..=5);
            let m = message(&mut rng, spec, &conv, seq, &members);
            sent.push(m.clone());
            timeline.push(ChatEvent::Message(m));
            // Some members read right after a message, up to a recent one.
            for r in &members {
                if rng.gen_bool((spec.max_reads as f64 / n_messages as f64).min(1.0) * 0.5) {
                    let upto = &sent[rng.gen_range(sent.len().saturating_sub(5)..sent.len())];
                    let e = read(&conv, r, upto.message_seq);
                    let key = e.key();
                    let p = w.pointers.entry(key).or_insert(-1);
                    *p = (*p).max(e.message_seq);
                    timeline.push(ChatEvent::Read(e));
                }
            }
        }
        w.members.insert(conv.clone(), members);
        w.messages.insert(conv, sent);
    }
    // Conversations interleave: a random merge that keeps each conversation's own order,
    // then reordering and duplicates on top.
    w.arrivals = interleave(&mut rng, timeline, spec.conversations as usize);
    disorder(&mut rng, &mut w.arrivals, spec);
    w
}

fn message(
    rng: &mut StdRng,
    spec: &ChatSpec,
    conv: &ConversationId,
    seq: i64,
    members: &[ReaderId],
) -> MessageEvent {
    let sender = members[rng.gen_range(0..members.len())].clone();
    let mentions = if rng.gen_bool(spec.mention_rate) {
        (0..rng.gen_range(1..=3))
            .map(|_| members[rng.gen_range(0..members.len())].clone())
            .collect()
    } else {
        Vec::new()
    };
    MessageEvent {
        conversation_id: conv.clone(),
        message_seq: seq,
        message_id: Some(format!("m-{}-{seq}", conv.0)),
        sender_id: SenderId(sender.0),
        sent_at_ms: 1_700_000_000_000 + seq,
        mentions,
        mention_everyone: rng.gen_bool(spec.everyone_rate),
    }
}

fn read(conv: &ConversationId, reader: &ReaderId, seq: i64) -> ReadEvent {
    ReadEvent {
        reader_id: reader.clone(),
        conversation_id: conv.clone(),
        message_seq: seq,
        message_id: None,
        sender_id: None,
        device_id: Some("phone".into()),
        read_at_ms: 1_700_000_000_000 + seq,
    }
}

/// Merge the per-conversation timelines at random, keeping each one's order.
fn interleave(rng: &mut StdRng, timeline: Vec<ChatEvent>, conversations: usize) -> Vec<ChatEvent> {
    let mut queues: HashMap<ConversationId, std::collections::VecDeque<ChatEvent>> =
        HashMap::with_capacity(conversations);
    let mut order: Vec<ConversationId> = Vec::new();
    for e in timeline {
        let c = e.conversation().clone();
        if !queues.contains_key(&c) {
            order.push(c.clone());
        }
        queues.entry(c).or_default().push_back(e);
    }
    let mut out = Vec::new();
    let mut live = order;
    while !live.is_empty() {
        let i = rng.gen_range(0..live.len());
        let q = queues.get_mut(&live[i]).expect("queued");
        out.push(q.pop_front().expect("non-empty"));
        if q.is_empty() {
            live.swap_remove(i);
        }
    }
    out
}

/// Hold some events back (a read may then arrive before the message it points to) and
/// deliver some twice.
fn disorder(rng: &mut StdRng, events: &mut Vec<ChatEvent>, spec: &ChatSpec) {
    let n = events.len();
    for i in 0..n {
        if rng.gen_bool(spec.reorder_rate) {
            let j = (i + rng.gen_range(1..=spec.reorder_window.max(1))).min(n - 1);
            events[i..=j].rotate_left(1);
        }
    }
    // Each duplicate lands at or after its original: before the event at index `at` of the
    // original order (`n`: at the end). Merged in one pass (inserting one by one is
    // quadratic, and dominated the benchmarks' set-up).
    let mut dups: Vec<(usize, ChatEvent)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if rng.gen_bool(spec.duplicate_rate) {
            dups.push((rng.gen_range(i..=n), e.clone()));
        }
    }
    dups.sort_by_key(|(at, _)| *at);
    let mut dups = dups.into_iter().peekable();
    let mut merged = Vec::with_capacity(n + dups.len());
    for (k, e) in std::mem::take(events).into_iter().enumerate() {
        while let Some((_, d)) = dups.next_if(|(at, _)| *at == k) {
            merged.push(d);
        }
        merged.push(e);
    }
    merged.extend(dups.map(|(_, d)| d));
    *events = merged;
    // A few far-flung duplicates too (a producer retry long after).
    let extra: Vec<ChatEvent> = events
        .choose_multiple(rng, (n as f64 * spec.duplicate_rate / 5.0) as usize)
        .cloned()
        .collect();
    events.extend(extra);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_point_at_sent_messages_and_some_arrive_before_them() {
        let w = generate(&ChatSpec::default());
        let mut seen: std::collections::HashSet<(ConversationId, i64)> = Default::default();
        let mut early = 0;
        for e in &w.arrivals {
            match e {
                ChatEvent::Message(m) => {
                    seen.insert((m.conversation_id.clone(), m.message_seq));
                }
                ChatEvent::Read(r) => {
                    let sent = &w.messages[&r.conversation_id];
                    assert!(sent.iter().any(|m| m.message_seq == r.message_seq));
                    if !seen.contains(&(r.conversation_id.clone(), r.message_seq)) {
                        early += 1;
                    }
                }
            }
        }
        assert!(
            early > 0,
            "reordering delivers some reads before their message"
        );
        let total: usize = w.messages.values().map(Vec::len).sum();
        let delivered = w
            .arrivals
            .iter()
            .filter(|e| matches!(e, ChatEvent::Message(_)))
            .count();
        assert!(delivered > total, "some messages are delivered twice");
        let whole = w.prefix(w.arrivals.len());
        assert_eq!(whole.pointers, w.pointers);
        let total_prefix: usize = whole.messages.values().map(Vec::len).sum();
        assert_eq!(total_prefix, total);
        assert!(w.prefix(10).pointers.len() <= 10);
    }
}
