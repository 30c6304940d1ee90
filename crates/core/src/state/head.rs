//! The conversation head: per conversation, the message count, the head (max seq) and a
//! bounded window of the most recent message positions, from which any reader's unread
//! and mention counts are derived (DESIGN.md §3b).
//!
//! A message costs one write (this value), whatever the conversation's size: no state is
//! kept per member. A reader's counts are computed from the window and the reader's
//! pointer: unread = window messages after the pointer not sent by the reader; mentions =
//! those that mention the reader or everyone. Both are exact while the pointer is inside
//! the window (at most `cap` messages behind the head); a pointer behind the window gets
//! the window's counts, a lower bound, flagged `capped`.
//!
//! Order does not matter: a read that arrives before the message it points to, and a
//! message that arrives after a read past it, give the same counts as in-order arrival,
//! because counts are derived when asked, never incremented per member. A message already
//! in the window is a duplicate and changes nothing; one below the window's floor is
//! treated as already counted (a duplicate or a message more than `cap` positions late;
//! counted in `late`).

use smallvec::SmallVec;

use super::codec::{Mark, Marks};
use crate::ids::{ConversationId, Id, Origin, ReaderId, SenderId};
use crate::model::{HeadUpdate, MessageEvent, UnreadCounts};

/// One message in the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub seq: i64,
    pub sender: SenderId,
    pub everyone: bool,
    /// Mentioned users, sorted and deduplicated.
    pub mentions: SmallVec<[ReaderId; 2]>,
}

impl Position {
    fn mentions_reader(&self, reader: &ReaderId) -> bool {
        self.everyone || self.mentions.binary_search(reader).is_ok()
    }
}

/// A window message's id and send time, kept beside the window (same order) when reads
/// name messages by id: the bounded index `processor::resolve` resolves them through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef {
    pub id: Option<Id>,
    pub sent_at_ms: i64,
}

impl MessageRef {
    /// A window message folded before messages were indexed.
    pub const UNKNOWN: MessageRef = MessageRef {
        id: None,
        sent_at_ms: i64::MAX,
    };
}

/// What folding a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageFold {
    /// A new message: counted, in the window.
    Counted,
    /// Already in the window.
    Duplicate,
    /// Below the window's floor: treated as already counted.
    Late,
    /// This origin offset was already folded (a replay after a crash).
    Replayed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationHead {
    /// Highest seq seen; `-1` before the first message.
    pub head_seq: i64,
    pub message_count: i64,
    /// Number of changes (messages counted) so far.
    pub version: i64,
    /// Version of the last emitted head update (`0`: none).
    pub emitted_version: i64,
    /// Highest seq evicted from the window; `-1` while nothing was.
    pub floor_seq: i64,
    /// Messages that arrived below the floor (not counted).
    pub late: i64,
    /// The most recent messages, ascending by seq, at most the cap.
    pub window: Vec<Position>,
    /// When messages are indexed: each window message's id and send time (same order
    /// and length as `window`); else empty.
    pub index: Vec<MessageRef>,
    /// Highest message-topic offset folded per origin partition.
    pub marks: Marks,
    /// With receipts for senders: the highest pointer any reader's emitted update reached
    /// (`-1`: none). A message folded at or below it arrived after a read past it: its
    /// sender's receipts are found by a scan of the conversation's readers.
    pub read_high: i64,
}

impl Default for ConversationHead {
    fn default() -> Self {
        Self {
            head_seq: -1,
            message_count: 0,
            version: 0,
            emitted_version: 0,
            floor_seq: -1,
            late: 0,
            window: Vec::new(),
            index: Vec::new(),
            marks: Marks::new(),
            read_high: -1,
        }
    }
}

impl ConversationHead {
    /// Fold one message, keeping at most `cap` positions.
    pub fn fold(&mut self, m: &MessageEvent, origin: Origin, cap: usize) -> MessageFold {
        self.fold_indexed(m, origin, cap, None)
    }

    /// Fold one message; with `index` (the message id's parsed form) also keep its id and
    /// send time in the window's index.
    pub fn fold_indexed(
        &mut self,
        m: &MessageEvent,
        origin: Origin,
        cap: usize,
        index: Option<Option<Id>>,
    ) -> MessageFold {
        match self.marks.iter_mut().find(|(s, _)| *s == origin.source) {
            Some((_, off)) if origin.offset <= *off => return MessageFold::Replayed,
            Some((_, off)) => *off = origin.offset,
            None => self.marks.push((origin.source, origin.offset)),
        }
        if m.message_seq <= self.floor_seq {
            self.late += 1;
            return MessageFold::Late;
        }
        let i = match self.window.binary_search_by_key(&m.message_seq, |p| p.seq) {
            Ok(_) => return MessageFold::Duplicate,
            Err(i) => i,
        };
        let mut mentions: SmallVec<[ReaderId; 2]> = m.mentions.iter().cloned().collect();
        mentions.sort_unstable();
        mentions.dedup();
        self.window.insert(
            i,
            Position {
                seq: m.message_seq,
                sender: m.sender_id.clone(),
                everyone: m.mention_everyone,
                mentions,
            },
        );
        if let Some(id) = index {
            self.index
                .resize(self.window.len() - 1, MessageRef::UNKNOWN);
            let sent_at_ms = m.sent_at_ms;
            self.index.insert(i, MessageRef { id, sent_at_ms });
        } else if !self.index.is_empty() {
            // Indexed before (another topology): keep the index aligned with the window.
            self.index.insert(i, MessageRef::UNKNOWN);
        }
        self.message_count += 1;
        self.version += 1;
        self.head_seq = self.head_seq.max(m.message_seq);
        self.evict(cap, !m.mentions.is_empty());
        MessageFold::Counted
    }

    /// Drop the oldest positions beyond `cap`, and (after a message with mentions) while
    /// the window's mentions exceed [`mention_budget`]; the newest position always stays.
    fn evict(&mut self, cap: usize, mentioned: bool) {
        let cap = cap.max(1);
        let mut n = self.window.len().saturating_sub(cap);
        if mentioned {
            let budget = mention_budget(cap);
            let mut total: usize = self.window[n..].iter().map(|p| p.mentions.len()).sum();
            while total > budget && n + 1 < self.window.len() {
                total -= self.window[n].mentions.len();
                n += 1;
            }
        }
        if n > 0 {
            self.floor_seq = self.floor_seq.max(self.window[n - 1].seq);
            self.window.drain(..n);
            if !self.index.is_empty() {
                self.index.drain(..n);
            }
        }
    }

    /// The seq of message `id`, when it is in the window (newest first: reads name
    /// recent messages).
    pub fn seq_of(&self, id: &Id) -> Option<i64> {
        let i = self.index.iter().rposition(|r| r.id.as_ref() == Some(id))?;
        Some(self.window[i].seq)
    }

    /// The senders (other than `reader`) of the window's messages in `(from, to]`, each with
    /// the highest of its messages there and that message's id (when indexed), newest
    /// first; and whether `(from, to]` reaches below the window (older messages were read
    /// too, their senders unknown here).
    pub fn read_senders(
        &self,
        reader: &ReaderId,
        from: i64,
        to: i64,
    ) -> (Vec<(SenderId, i64, Option<Id>)>, bool) {
        let start = self.window.partition_point(|p| p.seq <= from);
        let end = self.window.partition_point(|p| p.seq <= to);
        let mut out: Vec<(SenderId, i64, Option<Id>)> = Vec::new();
        // Long ranges: a set, so that a read over many messages stays linear in them.
        let mut seen: Option<hashbrown::HashSet<&SenderId>> =
            (end - start > 16).then(hashbrown::HashSet::new);
        for i in (start..end).rev() {
            let p = &self.window[i];
            let repeat = match &mut seen {
                Some(set) => !set.insert(&p.sender),
                None => out.iter().any(|(s, _, _)| *s == p.sender),
            };
            if p.sender.0 == reader.0 || repeat {
                continue;
            }
            let id = self.index.get(i).and_then(|r| r.id.clone());
            out.push((p.sender.clone(), p.seq, id));
        }
        (out, from < self.floor_seq)
    }

    /// The highest of `sender`'s window messages at or below `upto`, and its id (when
    /// indexed).
    pub fn highest_of_sender(&self, sender: &SenderId, upto: i64) -> Option<(i64, Option<Id>)> {
        let end = self.window.partition_point(|p| p.seq <= upto);
        let i = self.window[..end]
            .iter()
            .rposition(|p| p.sender == *sender)?;
        Some((
            self.window[i].seq,
            self.index.get(i).and_then(|r| r.id.clone()),
        ))
    }

    /// A reader's emitted pointer reached `pointer`: raise [`Self::read_high`]; whether it
    /// rose.
    pub fn note_emitted(&mut self, pointer: i64) -> bool {
        let rose = pointer > self.read_high;
        self.read_high = self.read_high.max(pointer);
        rose
    }

    /// The highest seq of a window message sent at or before `read_at_ms`, and its id (a
    /// read's time standing in for the message it names).
    pub fn message_sent_by(&self, read_at_ms: i64) -> Option<(i64, Option<&Id>)> {
        let i = self
            .index
            .iter()
            .rposition(|r| r.sent_at_ms <= read_at_ms)?;
        Some((self.window[i].seq, self.index[i].id.as_ref()))
    }

    /// The counts of `reader` whose pointer is `pointer` (`-1`: nothing read).
    pub fn counts(&self, reader: &ReaderId, pointer: i64) -> UnreadCounts {
        let start = self.window.partition_point(|p| p.seq <= pointer);
        let mut c = UnreadCounts {
            capped: pointer < self.floor_seq,
            ..Default::default()
        };
        for p in &self.window[start..] {
            if p.sender.0 == reader.0 {
                continue;
            }
            c.unread += 1;
            if p.mentions_reader(reader) {
                c.mentions += 1;
            }
        }
        c
    }

    pub fn has_unemitted_change(&self) -> bool {
        self.version > self.emitted_version
    }

    /// The update describing this head now.
    pub fn to_update(&self, conversation: ConversationId, emitted_at_ms: i64) -> HeadUpdate {
        let mut u = HeadUpdate {
            conversation_id: conversation,
            head_seq: self.head_seq,
            message_count: self.message_count,
            version: self.version,
            window_floor_seq: self.floor_seq,
            emitted_at_ms,
            ..Default::default()
        };
        u.recent_seqs.reserve(self.window.len());
        u.recent_senders.reserve(self.window.len());
        for p in &self.window {
            u.recent_seqs.push(p.seq);
            u.recent_senders.push(p.sender.0.clone());
            if p.everyone {
                u.everyone_seqs.push(p.seq);
            }
            for r in &p.mentions {
                u.mention_seqs.push(p.seq);
                u.mention_user_ids.push(r.0.clone());
            }
        }
        u
    }

    /// Append the binary form to `out`: a format byte, then zigzag varints; window seqs
    /// as deltas from the previous one. Ids are varints when all are integers
    /// ([`FORMAT_V1`], every earlier version), else in [`Id`]'s value form ([`FORMAT_V2`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let ints = self.window.iter().all(|p| {
            p.sender.as_int().is_some() && p.mentions.iter().all(|r| r.as_int().is_some())
        });
        let format = match (ints, self.index.is_empty()) {
            _ if self.read_high >= 0 => FORMAT_V4,
            (_, false) => FORMAT_V3,
            (true, true) => FORMAT_V1,
            (false, true) => FORMAT_V2,
        };
        let ints = format == FORMAT_V1;
        out.push(format);
        let put_id = |out: &mut Vec<u8>, id: &Id| match id.as_int() {
            Some(v) if ints => put_var(out, v),
            _ => id.encode_value(out),
        };
        for v in [
            self.head_seq,
            self.message_count,
            self.version,
            self.emitted_version,
            self.floor_seq,
            self.late,
        ] {
            put_var(out, v);
        }
        put_var(out, self.marks.len() as i64);
        for (src, off) in &self.marks {
            put_var(out, i64::from(*src));
            put_var(out, *off);
        }
        put_var(out, self.window.len() as i64);
        let mut prev = 0i64;
        for p in &self.window {
            put_var(out, p.seq.wrapping_sub(prev));
            prev = p.seq;
            put_id(out, &p.sender.0);
            put_var(out, (p.mentions.len() as i64) << 1 | i64::from(p.everyone));
            for r in &p.mentions {
                put_id(out, &r.0);
            }
        }
        if format < FORMAT_V3 {
            return;
        }
        let unknown = std::iter::repeat(&MessageRef::UNKNOWN);
        let index = self.index.iter().chain(unknown).take(self.window.len());
        for r in index {
            match &r.id {
                Some(id) => {
                    out.push(1);
                    id.encode_value(out);
                }
                None => out.push(0),
            }
            put_var(out, r.sent_at_ms);
        }
        if format == FORMAT_V4 {
            put_var(out, self.read_high);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.window.len() * 4);
        self.encode(&mut v);
        v
    }

    /// Decode the binary form, checking every length against the bytes left.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = VarReader::new(bytes);
        let format = r.byte()?;
        if !(FORMAT_V1..=FORMAT_V4).contains(&format) {
            return Err(format!("unknown conversation-head format {format}"));
        }
        let mut h = ConversationHead {
            head_seq: r.var()?,
            message_count: r.var()?,
            version: r.var()?,
            emitted_version: r.var()?,
            floor_seq: r.var()?,
            late: r.var()?,
            ..Default::default()
        };
        for _ in 0..r.len()? {
            let src = u32::try_from(r.var()?).map_err(|_| "replay mark source out of range")?;
            let mark: Mark = (src, r.var()?);
            h.marks.push(mark);
        }
        let n = r.len()?;
        h.window.reserve(n);
        let mut prev = 0i64;
        for _ in 0..n {
            let seq = prev.wrapping_add(r.var()?);
            prev = seq;
            let sender = SenderId::from(r.id(format)?);
            let flags = r.var()?;
            let count = usize::try_from(flags >> 1).map_err(|_| "negative mention count")?;
            r.check_len(count)?;
            let mut mentions = SmallVec::with_capacity(count);
            for _ in 0..count {
                mentions.push(ReaderId::from(r.id(format)?));
            }
            h.window.push(Position {
                seq,
                sender,
                everyone: flags & 1 == 1,
                mentions,
            });
        }
        if format >= FORMAT_V3 {
            h.index.reserve(n);
            for _ in 0..n {
                let id = match r.byte()? {
                    0 => None,
                    1 => Some(r.id(format)?),
                    b => return Err(format!("message id flag {b}")),
                };
                let sent_at_ms = r.var()?;
                h.index.push(MessageRef { id, sent_at_ms });
            }
        }
        if format == FORMAT_V4 {
            h.read_high = r.var()?;
        }
        if r.at != bytes.len() {
            return Err(format!(
                "{} trailing bytes after the conversation head",
                bytes.len() - r.at
            ));
        }
        if h.window.windows(2).any(|w| w[0].seq >= w[1].seq) {
            return Err("window positions are not ascending".into());
        }
        Ok(h)
    }
}

/// Integer ids as varints.
const FORMAT_V1: u8 = 1;
/// Ids in [`Id`]'s value form.
const FORMAT_V2: u8 = 2;
/// As [`FORMAT_V2`], then each window message's id (a flag byte, then the id) and send
/// time: the message index.
const FORMAT_V3: u8 = 3;
/// As [`FORMAT_V3`] (the index always present, one entry per window message), then the
/// highest emitted read pointer ([`ConversationHead::read_high`]): receipts for senders.
const FORMAT_V4: u8 = 4;

/// The most mentioned users a window keeps (bounding a head's memory when messages name
/// many users): four per position, and at least one message's worth.
pub fn mention_budget(cap: usize) -> usize {
    cap.saturating_mul(4).max(crate::model::MAX_MENTIONS)
}

/// Zigzag varints, as Avro's longs.
use crate::serde::fast::put_long as put_var;

/// Reads the varints, ids and byte strings of a binary value, checking every length.
pub(crate) struct VarReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> VarReader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// Whether every byte was read.
    pub(crate) fn is_done(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// A length-prefixed byte string; length `-1` is none.
    pub(crate) fn optional_bytes(&mut self) -> Result<Option<&'a [u8]>, String> {
        let n = self.var()?;
        if n == -1 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| "negative length")?;
        self.check_len(n)?;
        let b = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(Some(b))
    }

    /// An id in its value form.
    pub(crate) fn value_id(&mut self) -> Result<Id, String> {
        self.id(FORMAT_V2)
    }

    fn id(&mut self, format: u8) -> Result<Id, String> {
        if format == FORMAT_V1 {
            return self.var().map(Id::int);
        }
        let (id, n) = Id::decode_value(&self.bytes[self.at..])?;
        self.at += n;
        Ok(id)
    }

    pub(crate) fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or("truncated conversation head")?;
        self.at += 1;
        Ok(b)
    }

    pub(crate) fn var(&mut self) -> Result<i64, String> {
        let mut z: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    /// A count of items of at least one byte each, checked against the bytes left.
    pub(crate) fn len(&mut self) -> Result<usize, String> {
        let n = usize::try_from(self.var()?).map_err(|_| "negative length")?;
        self.check_len(n)?;
        Ok(n)
    }

    fn check_len(&self, n: usize) -> Result<(), String> {
        if n > self.bytes.len() - self.at {
            return Err(format!("length {n} exceeds the bytes left"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(seq: i64, sender: i64, mentions: &[i64], everyone: bool) -> MessageEvent {
        MessageEvent {
            conversation_id: ConversationId::from(1),
            message_seq: seq,
            sender_id: SenderId::from(sender),
            mentions: mentions.iter().map(|m| ReaderId::from(*m)).collect(),
            mention_everyone: everyone,
            ..Default::default()
        }
    }

    fn at(offset: i64) -> Origin {
        Origin { source: 3, offset }
    }

    #[test]
    fn counts_exclude_own_messages_and_fall_as_the_pointer_passes() {
        let mut h = ConversationHead::default();
        h.fold(&msg(10, 1, &[], false), at(0), 100);
        h.fold(&msg(11, 2, &[7], false), at(1), 100);
        h.fold(&msg(12, 7, &[7], false), at(2), 100);
        h.fold(&msg(13, 1, &[], true), at(3), 100);
        let c = |p| h.counts(&ReaderId::from(7), p);
        assert_eq!((c(-1).unread, c(-1).mentions), (3, 2));
        assert_eq!((c(11).unread, c(11).mentions), (1, 1));
        assert_eq!((c(13).unread, c(13).mentions), (0, 0));
        assert!(!c(-1).capped);
        assert_eq!((h.head_seq, h.message_count, h.version), (13, 4, 4));
    }

    #[test]
    fn many_mentions_shrink_the_window_instead_of_growing_the_head() {
        let mut h = ConversationHead::default();
        let many: Vec<i64> = (0..600).collect();
        for (i, seq) in [1, 2, 3].into_iter().enumerate() {
            h.fold(&msg(seq, 1, &many, false), at(i as i64), 10);
        }
        // Budget max(40, 1000): two messages of 600 mentions do not fit.
        assert_eq!(h.window.len(), 1);
        assert_eq!(h.floor_seq, 2);
        assert!(
            h.counts(&ReaderId::from(5), 0).capped,
            "readers behind the floor are capped"
        );
        assert_eq!(h.counts(&ReaderId::from(5), 2).mentions, 1);
    }

    #[test]
    fn duplicates_replays_and_late_messages_change_nothing() {
        let mut h = ConversationHead::default();
        for (i, seq) in [5, 6, 7].into_iter().enumerate() {
            assert_eq!(
                h.fold(&msg(seq, 1, &[], false), at(i as i64), 2),
                MessageFold::Counted
            );
        }
        assert_eq!((h.floor_seq, h.window.len()), (5, 2));
        assert_eq!(
            h.fold(&msg(6, 1, &[], false), at(9), 2),
            MessageFold::Duplicate
        );
        assert_eq!(h.fold(&msg(4, 1, &[], false), at(10), 2), MessageFold::Late);
        assert_eq!(
            h.fold(&msg(8, 1, &[], false), at(10), 2),
            MessageFold::Replayed
        );
        assert_eq!((h.message_count, h.late), (3, 1));
        let c = h.counts(&ReaderId::from(9), 0);
        assert_eq!((c.unread, c.capped), (2, true));
        assert!(!h.counts(&ReaderId::from(9), 5).capped);
    }

    fn arb_head() -> impl Strategy<Value = ConversationHead> {
        let msgs = proptest::collection::vec(
            (
                0i64..1 << 40,
                any::<i64>(),
                proptest::collection::vec(any::<i64>(), 0..4),
                any::<bool>(),
            ),
            0..30,
        );
        (msgs, 1usize..20).prop_map(|(msgs, cap)| {
            let mut h = ConversationHead::default();
            for (i, (seq, sender, mentions, everyone)) in msgs.into_iter().enumerate() {
                h.fold(&msg(seq, sender, &mentions, everyone), at(i as i64), cap);
            }
            h
        })
    }

    proptest! {
        #[test]
        fn value_roundtrip(h in arb_head()) {
            prop_assert_eq!(ConversationHead::decode(&h.to_bytes()).unwrap(), h);
        }

        /// With the message index: it stays beside the window through evictions, every
        /// window message is found by id, and the value (format 3) roundtrips.
        #[test]
        fn indexed_heads_find_window_messages_and_roundtrip(
            seqs in proptest::collection::vec(0i64..500, 1..60),
            cap in 1usize..20,
            unindexed in 0usize..5,
        ) {
            let mut h = ConversationHead::default();
            for (i, seq) in seqs.iter().enumerate() {
                let id = Id::text(&format!("m-{seq}")).unwrap();
                let mut m = msg(*seq, 1, &[], false);
                m.sent_at_ms = seq * 10;
                let index = (i >= unindexed).then_some(Some(id));
                h.fold_indexed(&m, at(i as i64), cap, index);
            }
            prop_assert!(h.index.is_empty() || h.index.len() == h.window.len());
            for (p, r) in h.window.iter().zip(&h.index) {
                if let Some(id) = &r.id {
                    prop_assert_eq!(h.seq_of(id), Some(p.seq));
                    prop_assert_eq!(h.message_sent_by(p.seq * 10).map(|x| x.0), Some(p.seq));
                }
            }
            prop_assert_eq!(ConversationHead::decode(&h.to_bytes()).unwrap(), h);
        }

        /// With receipts for senders (format 4): the highest emitted read pointer follows
        /// an index of one entry per window message (unindexed ones read back unknown).
        #[test]
        fn read_high_roundtrips_with_the_index(h in arb_head(), high in 0i64..1 << 40) {
            let mut h = h;
            h.read_high = high;
            let back = ConversationHead::decode(&h.to_bytes()).unwrap();
            prop_assert_eq!(back.read_high, high);
            prop_assert_eq!(back.index.len(), h.window.len());
            prop_assert!(back.index.iter().all(|r| *r == MessageRef::UNKNOWN));
            h.index = back.index.clone();
            prop_assert_eq!(back, h);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ConversationHead::decode(&bytes);
        }

        /// Against a naive oracle that keeps every message: any arrival order, with
        /// duplicates, gives the exact counts while the pointer is inside the window.
        #[test]
        fn counts_match_an_oracle_in_any_order(
            seqs in proptest::collection::btree_set(0i64..200, 1..60),
            senders in proptest::collection::vec(0i64..4, 60),
            mentioned in proptest::collection::vec(0i64..6, 60),
            order in any::<proptest::sample::Index>(),
            pointer in -1i64..200,
            cap in 1usize..80,
        ) {
            let all: Vec<MessageEvent> = seqs.iter().enumerate().map(|(i, s)| {
                let m = mentioned[i];
                msg(*s, senders[i], if m < 4 { &[1, 2][..(m as usize % 3).min(2)] } else { &[] }, m == 5)
            }).collect();
            // A rotation of the in-order list, with every third message sent twice.
            let k = order.index(all.len());
            let mut arrivals: Vec<&MessageEvent> = all[k..].iter().chain(&all[..k]).collect();
            let dups: Vec<&MessageEvent> = all.iter().step_by(3).collect();
            arrivals.extend(dups);
            let mut h = ConversationHead::default();
            for (i, m) in arrivals.iter().enumerate() {
                h.fold(m, at(i as i64), cap);
            }
            for reader in 0..4 {
                let r = ReaderId::from(reader);
                let after: Vec<&MessageEvent> = all.iter().filter(|m| m.message_seq > pointer && m.sender_id.as_int() != Some(reader)).collect();
                let unread = after.len() as i64;
                let mentions = after.iter().filter(|m| m.mention_everyone || m.mentions.contains(&r)).count() as i64;
                let c = h.counts(&r, pointer);
                if !c.capped {
                    prop_assert_eq!((c.unread, c.mentions), (unread, mentions));
                } else {
                    prop_assert!(c.unread <= unread && c.mentions <= mentions);
                }
                if all.len() <= cap {
                    prop_assert!(!c.capped);
                }
            }
            prop_assert!(h.window.len() <= cap);
        }
    }
}
