//! Read by N of M (DESIGN.md §3c): per conversation, its members (from the members
//! source, read as a table) and an [`OrderStats`] over their read pointers, so that "how
//! many members have read position p" costs O(log M), and a read advance or a membership
//! change never scans the members.
//!
//! A group's value in the heads store (tag `g`, logged) holds its member list and, per
//! sender, the read-by figures last emitted; the pointers are not stored twice: they are
//! taken from the read states when the group is loaded, and followed as reads fold.
//! After a flush's keys, every conversation whose N or M may have moved yields, for each
//! sender of its window, one [`ReadBy`] for that sender's latest message when (message,
//! N, M) differs from the last emitted.

use hashbrown::{HashMap, HashSet};

use crate::ids::{ConversationId, ReaderId, SenderId};
use crate::model::{ReadBy, StateKey};
use crate::serde::members::MemberList;
use crate::state::codec::{EntryCodec, StoreKey, TAG_GROUP};
use crate::state::head::{ConversationHead, VarReader};
use crate::state::order_stats::OrderStats;

use super::read_state::StoreFlush;

/// Groups with more members than this get read-by aggregates only, no per-reader
/// receipts for senders (`large_group_members`).
pub const DEFAULT_LARGE_GROUP_MEMBERS: usize = 100;

/// The read-by figures last emitted for one sender's latest message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    pub sender: SenderId,
    pub seq: i64,
    pub read_by: i64,
    pub members: i64,
}

/// A group as stored: its members and what was emitted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupValue {
    /// Sorted, deduplicated.
    pub members: Vec<ReaderId>,
    pub emitted: Vec<Emitted>,
}

/// Group values: conversation → [`GroupValue`], tag `g`, in the heads store.
pub struct GroupCodec;

impl EntryCodec for GroupCodec {
    type Key = ConversationId;
    type Value = GroupValue;
    type KeyBytes = StoreKey;

    fn encode_key(key: &ConversationId) -> StoreKey {
        StoreKey::group(key)
    }

    fn decode_key(bytes: &[u8]) -> Option<ConversationId> {
        StoreKey::decode(bytes)
            .filter(|(tag, _)| *tag == TAG_GROUP)
            .map(|(_, k)| k.conversation)
    }

    fn encode_value(v: &GroupValue, out: &mut Vec<u8>) {
        use crate::serde::fast::put_long;
        out.push(FORMAT);
        put_long(out, v.members.len() as i64);
        for m in &v.members {
            m.0.encode_value(out);
        }
        put_long(out, v.emitted.len() as i64);
        for e in &v.emitted {
            e.sender.0.encode_value(out);
            for x in [e.seq, e.read_by, e.members] {
                put_long(out, x);
            }
        }
    }

    fn decode_value(bytes: &[u8]) -> Result<GroupValue, String> {
        let mut r = VarReader::new(bytes);
        let format = r.byte()?;
        if format != FORMAT {
            return Err(format!("unknown group format {format}"));
        }
        let mut v = GroupValue::default();
        for _ in 0..r.len()? {
            v.members.push(ReaderId::from(r.value_id()?));
        }
        for _ in 0..r.len()? {
            let sender = SenderId::from(r.value_id()?);
            let (seq, read_by, members) = (r.var()?, r.var()?, r.var()?);
            v.emitted.push(Emitted {
                sender,
                seq,
                read_by,
                members,
            });
        }
        if !r.is_done() {
            return Err("trailing bytes after the group".into());
        }
        Ok(v)
    }
}

const FORMAT: u8 = 1;

/// One loaded group: members with their pointers, ranked.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// Member → read pointer (`-1`: nothing read).
    pointers: HashMap<ReaderId, i64>,
    ranks: OrderStats,
    emitted: Vec<Emitted>,
}

impl Group {
    pub fn members(&self) -> usize {
        self.pointers.len()
    }

    /// N: members whose pointer is at or past `seq`.
    pub fn read_by(&self, seq: i64) -> usize {
        self.ranks.count_at_or_above(seq)
    }

    fn join(&mut self, member: ReaderId, pointer: i64) {
        if self.pointers.insert(member, pointer).is_none() {
            self.ranks.insert(pointer);
        }
    }

    fn leave(&mut self, member: &ReaderId) {
        if let Some(p) = self.pointers.remove(member) {
            self.ranks.remove(p);
        }
    }

    /// A member's pointer moved to `pointer` (only forward); whether N may have changed.
    fn advance(&mut self, member: &ReaderId, pointer: i64) -> bool {
        match self.pointers.get_mut(member) {
            Some(p) if pointer > *p => {
                self.ranks.remove(*p);
                self.ranks.insert(pointer);
                *p = pointer;
                true
            }
            _ => false,
        }
    }

    fn value(&self) -> GroupValue {
        let mut members: Vec<ReaderId> = self.pointers.keys().cloned().collect();
        members.sort_unstable();
        GroupValue {
            members,
            emitted: self.emitted.clone(),
        }
    }
}

/// What groups did; monotone over the task's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Member lists applied (records of the members source).
    pub member_lists: u64,
    pub joins: u64,
    pub leaves: u64,
    pub read_by_emitted: u64,
}

/// The groups of one task: loaded on demand from the heads store, `None` for a
/// conversation without a member list.
pub struct Groups {
    entries: HashMap<ConversationId, Option<Group>>,
    /// Conversations whose N or M may have moved since the last flush.
    changed: HashSet<ConversationId>,
    /// Conversations whose stored value must be written.
    dirty: HashSet<ConversationId>,
    large: usize,
    /// Members (summed over the loaded groups) kept between flushes.
    budget: usize,
    stats: GroupStats,
}

impl Groups {
    pub fn new(large: usize, budget: usize) -> Self {
        Self {
            entries: HashMap::new(),
            changed: HashSet::new(),
            dirty: HashSet::new(),
            large,
            budget: budget.max(1),
            stats: GroupStats::default(),
        }
    }

    pub fn stats(&self) -> GroupStats {
        self.stats
    }

    pub fn get(&self, conversation: &ConversationId) -> Option<&Group> {
        self.entries.get(conversation)?.as_ref()
    }

    /// Whether `conversation` is a group above the size where per-reader receipts stop.
    pub fn is_large(&self, conversation: &ConversationId) -> bool {
        self.get(conversation)
            .is_some_and(|g| g.members() > self.large)
    }

    /// The conversations of `conversations` not loaded yet (sorted, deduplicated).
    pub fn missing(
        &self,
        conversations: impl Iterator<Item = ConversationId>,
    ) -> Vec<ConversationId> {
        let mut v: Vec<ConversationId> = conversations
            .filter(|c| !self.entries.contains_key(c))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Install a loaded group: its stored value (if any) and its members' pointers (in
    /// member order). Its figures are compared with the last emitted at the next flush:
    /// the reads that load it may have moved them.
    pub fn install(&mut self, c: ConversationId, value: Option<GroupValue>, pointers: &[i64]) {
        if value.is_some() {
            self.changed.insert(c.clone());
        }
        let group = value.map(|v| {
            let mut g = Group {
                emitted: v.emitted,
                ..Group::default()
            };
            for (m, p) in v.members.into_iter().zip(pointers) {
                g.join(m, *p);
            }
            g
        });
        self.entries.insert(c, group);
    }

    /// A member list arrived: the group's members become `list` (joins at `pointers`,
    /// one per member of `list` not yet a member, in list order, from `joining`).
    pub fn apply(&mut self, list: &MemberList, pointer_of: impl Fn(&ReaderId) -> i64) {
        self.stats.member_lists += 1;
        let c = &list.conversation;
        let g = self
            .entries
            .entry(c.clone())
            .or_insert(None)
            .get_or_insert_with(Group::default);
        let leaving: Vec<ReaderId> = (g.pointers.keys())
            .filter(|m| list.members.binary_search(m).is_err())
            .cloned()
            .collect();
        for m in &leaving {
            g.leave(m);
        }
        self.stats.leaves += leaving.len() as u64;
        for m in &list.members {
            if !g.pointers.contains_key(m) {
                g.join(m.clone(), pointer_of(m));
                self.stats.joins += 1;
            }
        }
        self.changed.insert(c.clone());
        self.dirty.insert(c.clone());
    }

    /// Members whose ids are in `list` and not yet members of its group (loaded).
    pub fn joining(&self, list: &MemberList) -> Vec<ReaderId> {
        let g = self.get(&list.conversation);
        (list.members.iter())
            .filter(|m| g.is_none_or(|g| !g.pointers.contains_key(*m)))
            .cloned()
            .collect()
    }

    /// A reader's pointer is now `pointer` (after a fold).
    pub fn advance(&mut self, key: &StateKey, pointer: i64) {
        if let Some(Some(g)) = self.entries.get_mut(&key.conversation) {
            if g.advance(&key.reader, pointer) {
                self.changed.insert(key.conversation.clone());
            }
        }
    }

    /// A message arrived in `conversation`: its sender's latest message may be new.
    pub fn touch(&mut self, conversation: &ConversationId) {
        if self.get(conversation).is_some() {
            self.changed.insert(conversation.clone());
        }
    }

    /// The read-by records of the changed conversations (their heads from `head`),
    /// stamped `now_ms`, and their changed values into the heads store's flush.
    pub fn flush<'h>(
        &mut self,
        now_ms: i64,
        head: impl Fn(&ConversationId) -> Option<&'h ConversationHead>,
        out: &mut Vec<ReadBy>,
        store: &mut StoreFlush,
    ) {
        let mut changed: Vec<ConversationId> = self.changed.drain().collect();
        changed.sort_unstable();
        for c in changed {
            let Some(Some(g)) = self.entries.get_mut(&c) else {
                continue;
            };
            let before = out.len();
            let empty = ConversationHead::default();
            read_by(&c, g, head(&c).unwrap_or(&empty), now_ms, out);
            self.stats.read_by_emitted += (out.len() - before) as u64;
            if out.len() > before {
                self.dirty.insert(c);
            }
        }
        let mut dirty: Vec<ConversationId> = self.dirty.drain().collect();
        dirty.sort_unstable();
        for c in dirty {
            let Some(Some(g)) = self.entries.get(&c) else {
                continue;
            };
            let key = GroupCodec::encode_key(&c);
            let value = g.value();
            store.put_logged(key.as_ref(), |buf| GroupCodec::encode_value(&value, buf));
        }
    }

    /// After a committed flush: beyond the budget, drop all but the `pinned` groups.
    pub fn end_flush(&mut self, pinned: impl Iterator<Item = ConversationId>) {
        let held: usize = (self.entries.values())
            .map(|g| g.as_ref().map_or(1, |g| g.members() + 1))
            .sum();
        if held > self.budget {
            let keep: HashSet<ConversationId> = pinned.collect();
            self.entries.retain(|c, _| keep.contains(c));
        }
    }

    /// Forget everything not committed to the store.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.changed.clear();
        self.dirty.clear();
    }
}

/// For each sender of `head`'s window (newest first), its latest message's read-by
/// figures, appended to `out` when they differ from the last emitted; senders no longer
/// in the window are forgotten.
fn read_by(
    c: &ConversationId,
    g: &mut Group,
    head: &ConversationHead,
    now_ms: i64,
    out: &mut Vec<ReadBy>,
) {
    let mut seen: HashSet<&SenderId> = HashSet::new();
    let members = g.members() as i64;
    let mut emitted = Vec::with_capacity(g.emitted.len());
    for (i, p) in head.window.iter().enumerate().rev() {
        if !seen.insert(&p.sender) {
            continue;
        }
        let now = Emitted {
            sender: p.sender.clone(),
            seq: p.seq,
            read_by: g.read_by(p.seq) as i64,
            members,
        };
        let before = g.emitted.binary_search_by(|e| e.sender.cmp(&p.sender));
        if before.map_or(true, |at| g.emitted[at] != now) {
            let id = (head.index.get(i)).and_then(|r| r.id.as_ref());
            out.push(ReadBy {
                sender_id: p.sender.clone(),
                conversation_id: c.clone(),
                message_seq: p.seq,
                message_id: id.map(|id| id.to_string()),
                read_by: now.read_by,
                members,
                emitted_at_ms: now_ms,
            });
        }
        emitted.push(now);
    }
    emitted.sort_unstable_by(|a, b| a.sender.cmp(&b.sender));
    g.emitted = emitted;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_roundtrip() {
        let v = GroupValue {
            members: vec![ReaderId::from(1), ReaderId::from(5)],
            emitted: vec![Emitted {
                sender: SenderId::from(5),
                seq: 9,
                read_by: 1,
                members: 2,
            }],
        };
        let mut b = Vec::new();
        GroupCodec::encode_value(&v, &mut b);
        assert_eq!(GroupCodec::decode_value(&b).unwrap(), v);
        assert!(GroupCodec::decode_value(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn joins_leaves_and_advances_keep_n_exact() {
        let mut groups = Groups::new(2, 100);
        let c = ConversationId::from(1);
        let list = |ms: &[i64]| MemberList {
            conversation: c.clone(),
            members: ms.iter().map(|m| ReaderId::from(*m)).collect(),
        };
        groups.apply(&list(&[1, 2, 3]), |m| {
            if m.as_int() == Some(2) {
                10
            } else {
                -1
            }
        });
        let g = groups.get(&c).unwrap();
        assert_eq!((g.read_by(5), g.members()), (1, 3));
        assert!(groups.is_large(&c));
        let key = |r: i64| StateKey {
            conversation: c.clone(),
            reader: ReaderId::from(r),
        };
        groups.advance(&key(1), 7);
        groups.advance(&key(9), 70); // not a member
        assert_eq!(groups.get(&c).unwrap().read_by(5), 2);
        groups.apply(&list(&[1, 4]), |_| 6);
        let g = groups.get(&c).unwrap();
        assert_eq!((g.read_by(5), g.members()), (2, 2));
        assert!(!groups.is_large(&c));
    }
}
