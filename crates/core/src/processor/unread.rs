//! Unread and mention counts (DESIGN.md §3b): the conversation heads of one task, folded
//! from the co-partitioned message source and flushed beside the read state.
//!
//! A message folds into its conversation's head only (one cached entry, one store write
//! and one changelog record per flush), never into per-member state. A reader's counts
//! are derived from the head and the reader's pointer when their receipt update is emitted
//! ([`Heads::counts`]); consumers derive them the same way from the conversation-heads
//! output, and PostgreSQL from the `conversation_heads` table.

use hashbrown::{HashMap, HashSet};

use super::read_state::StoreFlush;
use crate::ids::{ConversationId, Id, IdType, Origin, ReaderId, SenderId};
use crate::model::{HeadUpdate, MessageEvent, SenderReceipt, StateKey, UnreadCounts};
use crate::state::codec::{self, EntryCodec, StoreKey, TAG_STATE};
use crate::state::head::{ConversationHead, MessageFold};
use crate::state::ReadState;
use crate::state::{KeyValueStore, StoreError};

/// How many recent message positions a conversation head keeps (the topology's
/// `unread_cap`): counts are exact for pointers up to this many messages behind the head.
pub const DEFAULT_UNREAD_CAP: usize = 1000;

/// The heads' memory budget for a task whose share of the heads store's
/// `cache_max_entries` is `positions` window positions (~56 bytes each with their
/// mentions): that share, and at least four full windows.
pub fn positions_budget(positions: usize, cap: usize) -> usize {
    positions.max(cap.saturating_mul(4))
}

/// Counters of what message folding did; monotone over the task's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageStats {
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
    pub replayed: u64,
    /// Messages that arrived after an emitted read had passed them (receipts for senders
    /// only): each one scans its conversation's readers at most once.
    pub read_before: u64,
    /// Conversation-head updates emitted.
    pub heads_emitted: u64,
    /// Head values written (store and changelog), one per dirty conversation per flush.
    pub head_writes: u64,
}

/// The conversation heads of one task: a cache in front of the task's heads store (its
/// own changelog; keys tagged `h`).
pub struct Heads {
    store: Box<dyn KeyValueStore>,
    cap: usize,
    entries: HashMap<ConversationId, ConversationHead>,
    dirty: HashSet<ConversationId>,
    /// Window positions (summed over the cached heads) kept between flushes; beyond it
    /// the unpinned heads are dropped after a flush. Sized from the task's record-cache
    /// share ([`positions_budget`]).
    budget: usize,
    /// When reads name messages by id: the message id type, and every window message's
    /// id is kept (the message index).
    index: Option<IdType>,
    /// With receipts for senders: each head keeps the highest emitted read pointer, and
    /// the messages folded at or below it since the last flush are listed here.
    read_before: Option<Vec<ReadBefore>>,
    stats: MessageStats,
}

/// A message that arrived after some reader's emitted update had passed it: its sender is
/// owed receipts by those readers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBefore {
    pub conversation: ConversationId,
    pub sender: SenderId,
    pub seq: i64,
}

impl Heads {
    pub fn new(cap: usize, budget: usize, store: Box<dyn KeyValueStore>) -> Self {
        Self {
            store,
            cap: cap.max(1),
            entries: HashMap::new(),
            dirty: HashSet::new(),
            budget: budget.max(1),
            index: None,
            read_before: None,
            stats: MessageStats::default(),
        }
    }

    /// Keep every window message's id (parsed as `ty`) and send time: reads name
    /// messages by id.
    pub fn enable_index(&mut self, ty: IdType) {
        self.index = Some(ty);
    }

    /// Keep each head's highest emitted read pointer ([`Self::note_emitted`]) and list the
    /// messages that arrive at or below it ([`Self::take_read_before`]).
    pub fn enable_read_high(&mut self) {
        self.read_before = Some(Vec::new());
    }

    /// A reader's update emitted `pointer` in `conversation` (its head loaded).
    pub fn note_emitted(&mut self, conversation: &ConversationId, pointer: i64) {
        if self.read_before.is_none() {
            return;
        }
        if let Some(h) = self.entries.get_mut(conversation) {
            if h.note_emitted(pointer) {
                self.dirty.insert(conversation.clone());
            }
        }
    }

    /// The messages folded since the last call at or below a pointer already emitted.
    pub fn take_read_before(&mut self) -> Vec<ReadBefore> {
        self.read_before
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The index form of a message's id (`None` without an index).
    fn index_id(&self, m: &MessageEvent) -> Option<Option<Id>> {
        let ty = self.index?;
        Some(m.message_id.as_deref().and_then(|s| Id::parse(ty, s).ok()))
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn store(&self) -> &dyn KeyValueStore {
        &*self.store
    }

    pub fn store_mut(&mut self) -> &mut (dyn KeyValueStore + 'static) {
        &mut *self.store
    }

    pub fn into_store(self) -> Box<dyn KeyValueStore> {
        self.store
    }

    /// The head of `conversation` as stored (not cached).
    pub fn stored(
        &self,
        conversation: &ConversationId,
    ) -> Result<Option<ConversationHead>, StoreError> {
        codec::get::<codec::Heads>(&*self.store, conversation)
    }

    /// Follow the task's share of the heads store's cache budget (see
    /// [`positions_budget`]).
    pub fn set_budget(&mut self, positions: usize) {
        self.budget = positions.max(1);
    }

    /// Window positions held by the cached heads.
    pub fn positions(&self) -> usize {
        self.entries.values().map(|h| h.window.len() + 1).sum()
    }

    pub fn stats(&self) -> MessageStats {
        self.stats
    }

    /// Load the heads of `conversations` not cached, with one `multi_get`.
    pub fn ensure_loaded(
        &mut self,
        conversations: impl Iterator<Item = ConversationId>,
    ) -> Result<(), StoreError> {
        let mut missing: Vec<ConversationId> = conversations
            .filter(|c| !self.entries.contains_key(c))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        let heads = codec::load::<codec::Heads>(&*self.store, &missing)?;
        for (c, head) in missing.into_iter().zip(heads) {
            self.entries.insert(c, head.unwrap_or_default());
        }
        Ok(())
    }

    /// Fold a batch of messages (one multi_get for the heads not cached).
    pub fn process(&mut self, messages: &[(MessageEvent, Origin)]) -> Result<(), StoreError> {
        self.ensure_loaded(messages.iter().map(|(m, _)| m.conversation_id.clone()))?;
        for (m, origin) in messages {
            let index = self.index_id(m);
            let head = self
                .entries
                .get_mut(&m.conversation_id)
                .expect("ensure_loaded loaded every conversation");
            match head.fold_indexed(m, *origin, self.cap, index) {
                MessageFold::Counted => {
                    self.stats.counted += 1;
                    if let Some(late) =
                        (self.read_before.as_mut()).filter(|_| m.message_seq <= head.read_high)
                    {
                        self.stats.read_before += 1;
                        late.push(ReadBefore {
                            conversation: m.conversation_id.clone(),
                            sender: m.sender_id.clone(),
                            seq: m.message_seq,
                        });
                    }
                    self.dirty.insert(m.conversation_id.clone());
                }
                MessageFold::Duplicate => {
                    self.stats.duplicates += 1;
                    self.dirty.insert(m.conversation_id.clone());
                }
                MessageFold::Late => {
                    self.stats.late += 1;
                    self.dirty.insert(m.conversation_id.clone());
                }
                MessageFold::Replayed => self.stats.replayed += 1,
            }
        }
        Ok(())
    }

    /// The counts of `reader` at `pointer`; the head must be loaded (a conversation with
    /// no head yet has no messages: zero).
    pub fn counts(
        &self,
        conversation: &ConversationId,
        reader: &ReaderId,
        pointer: i64,
    ) -> UnreadCounts {
        self.entries
            .get(conversation)
            .map(|h| h.counts(reader, pointer))
            .unwrap_or_default()
    }

    /// The sender receipts of `reader`'s advance in `conversation` from `from` to the
    /// pointer of `state`, emitted at `now_ms`, appended to `out` (one per sender of the
    /// messages passed; the head must be loaded).
    pub fn sender_receipts(
        &self,
        key: &StateKey,
        from: i64,
        state: &ReadState,
        now_ms: i64,
        out: &mut Vec<SenderReceipt>,
    ) {
        let Some(head) = self.entries.get(&key.conversation) else {
            return;
        };
        let (senders, covers_older) = head.read_senders(&key.reader, from, state.last_read_seq);
        for (sender, seq, id) in senders {
            out.push(receipt(key, sender, seq, id, state, covers_older, now_ms));
        }
    }

    /// The receipts owed for the messages that arrived after a read past them (listed
    /// since the last call, see [`Self::enable_read_high`]), appended to `out`: one scan of
    /// the read-state `states` (readers' ids of type `readers`) per conversation. Reader R
    /// owes sender S a receipt for such a message when R's emitted pointer passed it and
    /// it is now the highest of S's messages R read (a later one was named already).
    /// `emitted_at_ms` is left for the flush to stamp.
    pub fn receipts_read_before(
        &mut self,
        states: &dyn KeyValueStore,
        readers: IdType,
        out: &mut Vec<SenderReceipt>,
    ) -> Result<(), StoreError> {
        let mut late = self.take_read_before();
        if late.is_empty() {
            return Ok(());
        }
        late.sort_unstable_by(|a, b| (&a.conversation, a.seq).cmp(&(&b.conversation, b.seq)));
        for group in late.chunk_by(|a, b| a.conversation == b.conversation) {
            let c = &group[0].conversation;
            let Some(head) = self.entries.get(c) else {
                continue;
            };
            let prefix = StoreKey::conversation_prefix(TAG_STATE, c, readers);
            for (k, v) in states.scan_prefix(&prefix)? {
                let Some((TAG_STATE, key)) = StoreKey::decode(&k) else {
                    continue;
                };
                let state =
                    codec::ReadStates::decode_value(&v).map_err(|reason| StoreError::Corrupt {
                        store: states.name().clone(),
                        key: k.clone(),
                        reason,
                    })?;
                owed_receipts(head, group, &key, &state, out);
            }
        }
        Ok(())
    }

    /// Write the dirty heads into the heads store's flush (sorted by key, every one
    /// logged) and emit one update per changed conversation.
    pub fn flush(&mut self, now_ms: i64, out: &mut StoreFlush, updates: &mut Vec<HeadUpdate>) {
        let mut dirty: Vec<ConversationId> = self.dirty.drain().collect();
        dirty.sort_unstable();
        for c in dirty {
            let Some(head) = self.entries.get_mut(&c) else {
                continue;
            };
            if head.has_unemitted_change() {
                updates.push(head.to_update(c.clone(), now_ms));
                head.emitted_version = head.version;
                self.stats.heads_emitted += 1;
            }
            let key = codec::Heads::encode_key(&c);
            out.put_logged(key.as_ref(), |buf| codec::Heads::encode_value(head, buf));
            self.stats.head_writes += 1;
        }
    }

    /// After a committed flush: beyond the budget, drop all but the `pinned` heads
    /// (conversations with an emit held back, whose flush will need their head).
    pub fn end_flush(&mut self, pinned: impl Iterator<Item = ConversationId>) {
        if self.positions() > self.budget {
            let keep: HashSet<ConversationId> = pinned.collect();
            self.entries.retain(|c, _| keep.contains(c));
        }
    }

    /// Forget everything not committed to the store.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.dirty.clear();
        self.take_read_before();
    }

    pub fn get(&self, conversation: &ConversationId) -> Option<&ConversationHead> {
        self.entries.get(conversation)
    }
}

/// What reader `key.reader` (state `state`) owes the senders of `late` (messages of its
/// conversation, ascending), by [`Heads::receipts_read_before`]'s rule.
fn owed_receipts(
    head: &ConversationHead,
    late: &[ReadBefore],
    key: &StateKey,
    state: &ReadState,
    out: &mut Vec<SenderReceipt>,
) {
    let pointer = state.emitted_seq;
    for (i, m) in late.iter().enumerate() {
        let repeat = late[..i].iter().any(|o| o.sender == m.sender);
        if m.seq > pointer || m.sender.0 == key.reader.0 || repeat {
            continue;
        }
        let Some((seq, id)) = head.highest_of_sender(&m.sender, pointer) else {
            continue;
        };
        if late.iter().any(|o| o.sender == m.sender && o.seq == seq) {
            out.push(receipt(key, m.sender.clone(), seq, id, state, false, 0));
        }
    }
}

/// A receipt for `sender` from the reader of `key` at `state`.
fn receipt(
    key: &StateKey,
    sender: SenderId,
    seq: i64,
    id: Option<Id>,
    state: &ReadState,
    covers_older: bool,
    now_ms: i64,
) -> SenderReceipt {
    SenderReceipt {
        sender_id: sender,
        conversation_id: key.conversation.clone(),
        reader_id: key.reader.clone(),
        message_seq: seq,
        message_id: id.map(|id| id.to_string()),
        read_at_ms: state.read_at_ms,
        device_id: state.device_id.as_deref().map(str::to_owned),
        covers_older,
        emitted_at_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::memory::InMemoryStore;

    #[test]
    fn heads_beyond_the_budget_are_dropped_after_a_flush_except_pinned_ones() {
        let store = Box::new(InMemoryStore::new("heads".into()));
        let mut heads = Heads::new(10, 5, store);
        let msgs: Vec<(MessageEvent, Origin)> = (0..9)
            .map(|i| {
                let m = MessageEvent {
                    conversation_id: ConversationId::from(i % 3),
                    message_seq: i,
                    sender_id: SenderId::from(1),
                    ..Default::default()
                };
                (
                    m,
                    Origin {
                        source: 1,
                        offset: i,
                    },
                )
            })
            .collect();
        heads.process(&msgs).unwrap();
        assert_eq!(
            heads.positions(),
            12,
            "3 heads of 3 positions, plus one each"
        );
        let (mut out, mut updates) = (StoreFlush::default(), Vec::new());
        heads.flush(0, &mut out, &mut updates);
        assert_eq!((out.changelog_len(), updates.len()), (3, 3));
        heads.end_flush([ConversationId::from(1)].into_iter());
        assert!(heads.get(&ConversationId::from(1)).is_some(), "pinned");
        assert!(
            heads.get(&ConversationId::from(0)).is_none()
                && heads.get(&ConversationId::from(2)).is_none()
        );
        heads.set_budget(100);
        heads.end_flush(std::iter::empty());
        assert!(
            heads.get(&ConversationId::from(1)).is_some(),
            "within the budget: kept"
        );
    }
}
