//! The read-state processor: fold raw read events into one monotonic pointer per
//! (conversation, reader) and emit coalesced updates at flush.
//!
//! Rules (DESIGN.md §2):
//! - the pointer only moves forward: an event with `seq <= stored` is a no-op, counted stale,
//!   except that equal positions are ordered by message id (`(seq, message_id)` compared,
//!   no id lowest): timestamps tie, and the max must not depend on arrival order;
//! - the max carries its message id, sender, device and read time;
//! - `version` counts advances, so it is the same after a replay as before;
//! - each key remembers the highest source offset folded per origin partition and skips
//!   records at or below it, so counts stay exact when the source is replayed after a crash;
//! - at a flush, a key whose pointer advanced since its last emitted update yields exactly one
//!   update, unless the minimum emit interval holds it back; a held-back advance is recorded
//!   in the store's pending index and emitted at the first flush after its slot opens, also
//!   after a restart.

use compact_str::CompactString;
use hashbrown::HashMap;

use super::api::FlushOutput;
pub use super::api::StoreFlush;
use super::groups::{Group, GroupCodec, GroupStats, Groups};
use super::punctuation::DueQueue;
use super::resolve::{ResolveStats, Waiting, WaitingRead, UNRESOLVED_MESSAGE};
use super::unread::{positions_budget, Heads, MessageStats};
use super::ProcessorError;
use crate::ids::{ConversationId, Id, IdType, IdTypes, Origin, ReaderId, SenderId};
use crate::model::{
    EventRef, HeadUpdate, MessageEvent, ReadBy, ReadEvent, ReceiptUpdate, SenderReceipt, StateKey,
    UnreadCounts,
};
use crate::serde::json::UNRESOLVED_SEQ;
use crate::serde::members::MemberList;
use crate::state::cache::RecordCache;
use crate::state::codec::{self, EntryCodec, ReadStates, StoreKey, TAG_PENDING};
use crate::state::head::ConversationHead;
use crate::state::{write_all_flushed, KeyValueStore, ReadState, StoreBatch, StoreError};
use crate::task::DeadLetter;
use crate::topology::ResolveSpec;

/// When an advance may be emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EmitPolicy {
    /// At most one update per key per this many milliseconds (`0`: one per flush).
    pub min_emit_interval_ms: i64,
}

impl EmitPolicy {
    fn due_at(&self, state: &ReadState) -> i64 {
        if self.min_emit_interval_ms == 0 || state.last_emit_ms == i64::MIN {
            i64::MIN
        } else {
            state.last_emit_ms.saturating_add(self.min_emit_interval_ms)
        }
    }
}

/// Counters of what the processor did; monotone over the processor's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Events folded into state (advanced + stale).
    pub folded: u64,
    pub advanced: u64,
    pub stale: u64,
    /// Records skipped because their key had already folded that source offset.
    pub replayed: u64,
    pub updates_emitted: u64,
    /// Receipts for senders emitted (a sender-receipts sink).
    pub sender_receipts_emitted: u64,
    pub cache_misses: u64,
    pub flushes: u64,
}

/// What a flush produced, typed; the read-state node encodes `updates` and `heads` for its
/// sinks, and the task makes them and each store's changelog durable, then hands the
/// batches back to [`ReadStateProcessor::commit_flush`].
#[derive(Debug, Default)]
pub struct ReadStateFlush {
    pub updates: Vec<ReceiptUpdate>,
    /// Conversation-head updates (topologies with a message source).
    pub heads: Vec<HeadUpdate>,
    /// Read receipts for the senders of the messages each emitted advance passed
    /// (topologies with a sender-receipts sink).
    pub sender_receipts: Vec<SenderReceipt>,
    /// Read by N of M for the senders' latest messages (topologies with a members
    /// source).
    pub read_by: Vec<ReadBy>,
    /// The store parts, one per store of the task (indexed as `Topology::stores()`); its
    /// outputs are filled by the node that encodes `updates` and `heads`.
    pub flush: FlushOutput,
}

impl ReadStateFlush {
    /// An empty flush of `n` stores.
    pub fn for_stores(n: usize) -> Self {
        Self {
            flush: FlushOutput::for_stores(n),
            ..Self::default()
        }
    }
}

/// Index of the read-state store among a task's stores.
pub const STATE_STORE: usize = 0;
/// Index of the conversation-heads store (message source).
pub const HEADS_STORE: usize = 1;

pub struct ReadStateProcessor {
    store: Box<dyn KeyValueStore>,
    cache: RecordCache,
    /// Keys with an advance held back by the emit interval, and when their slot opens.
    pending: DueQueue<StateKey>,
    policy: EmitPolicy,
    stats: ProcessStats,
    /// Conversation heads, when the topology has a message source.
    heads: Option<Heads>,
    /// Reads waiting for the messages they name, when reads are positioned by message id.
    resolver: Option<Resolver>,
    /// With receipts for senders: the readers' id type (scans of a conversation's
    /// readers), and the receipts owed for messages that arrived after a read past them,
    /// held until the next flush.
    sender_receipts: Option<(IdType, Vec<SenderReceipt>)>,
    /// Members and read by N of M, when the topology has a members source.
    groups: Option<Groups>,
}

/// Resolution of reads positioned by message id (see [`super::resolve`]).
struct Resolver {
    waiting: Waiting,
    /// Whether a read's `read_at` stands in for a message that never came.
    fallback: bool,
    message_ids: IdType,
}

impl ReadStateProcessor {
    /// Open over a store, reloading the advances still waiting to be emitted.
    pub fn open(
        store: Box<dyn KeyValueStore>,
        policy: EmitPolicy,
        cache_capacity: usize,
    ) -> Result<Self, ProcessorError> {
        let mut p = Self {
            store,
            cache: RecordCache::new(cache_capacity),
            pending: DueQueue::new(),
            policy,
            stats: ProcessStats::default(),
            heads: None,
            resolver: None,
            sender_receipts: None,
            groups: None,
        };
        p.reload_pending()?;
        Ok(p)
    }

    /// Keep conversation heads (message source) in `store`: receipt updates carry unread
    /// and mention counts, each head keeping `cap` recent positions, and the heads cache
    /// holding up to `positions` of them (see [`positions_budget`]).
    pub fn enable_unread(
        &mut self,
        cap: usize,
        positions: usize,
        store: Box<dyn KeyValueStore>,
    ) -> Result<(), ProcessorError> {
        self.heads = Some(Heads::new(cap, positions_budget(positions, cap), store));
        self.reload_pending()
    }

    /// Resolve reads positioned by message id (message ids of type `message_ids`) through
    /// the heads' message index, the reads waiting for their messages kept in the heads
    /// store (reloaded from it here). Needs [`Self::enable_unread`] first.
    pub fn enable_resolve(
        &mut self,
        spec: &ResolveSpec,
        message_ids: IdType,
    ) -> Result<(), ProcessorError> {
        let heads = self.heads.as_mut().ok_or(ProcessorError::NoMessageSource)?;
        heads.enable_index(message_ids);
        let mut waiting = Waiting::new(spec);
        waiting.load(heads.store())?;
        self.resolver = Some(Resolver {
            waiting,
            fallback: spec.fallback_to_read_at,
            message_ids,
        });
        Ok(())
    }

    /// Emit, with each advance, a receipt for each sender of the messages it passed (their
    /// ids of type `ids.message` kept in the heads), and for a message that arrives after
    /// an emitted advance passed it, a receipt from each such reader (found by a scan of
    /// the conversation's readers, ids of type `ids.user`). Needs [`Self::enable_unread`]
    /// first.
    pub fn enable_sender_receipts(&mut self, ids: IdTypes) -> Result<(), ProcessorError> {
        let heads = self.heads.as_mut().ok_or(ProcessorError::NoMessageSource)?;
        heads.enable_index(ids.message);
        heads.enable_read_high();
        self.sender_receipts = Some((ids.user, Vec::new()));
        Ok(())
    }

    /// Keep the conversations' members (a members source) and count read by N of M for
    /// the senders' latest messages; groups above `large` members get no per-reader
    /// receipts for senders. Loaded groups hold up to `budget` members between flushes.
    /// Needs [`Self::enable_unread`] first.
    pub fn enable_groups(&mut self, large: usize, budget: usize) -> Result<(), ProcessorError> {
        if self.heads.is_none() {
            return Err(ProcessorError::NoMessageSource);
        }
        self.groups = Some(Groups::new(large, budget));
        Ok(())
    }

    pub fn group_stats(&self) -> Option<GroupStats> {
        self.groups.as_ref().map(Groups::stats)
    }

    /// The loaded group of a conversation (tests, queries).
    pub fn group(&self, conversation: &ConversationId) -> Option<&Group> {
        self.groups.as_ref()?.get(conversation)
    }

    /// Apply member lists (a members source's records, in order): each conversation's
    /// members become its list's.
    pub fn process_members(&mut self, lists: &[MemberList]) -> Result<(), ProcessorError> {
        if self.groups.is_none() {
            return Err(ProcessorError::NoMessageSource);
        }
        let convs = || lists.iter().map(|l| l.conversation.clone());
        if let Some(heads) = &mut self.heads {
            heads.ensure_loaded(convs())?;
        }
        self.load_groups(convs())?;
        for list in lists {
            let joining = self
                .groups
                .as_ref()
                .map(|g| g.joining(list))
                .unwrap_or_default();
            let pointers = self.pointers_of(&list.conversation, &joining)?;
            let at: HashMap<&ReaderId, i64> = joining.iter().zip(pointers).collect();
            if let Some(groups) = &mut self.groups {
                groups.apply(list, |m| at.get(m).copied().unwrap_or(-1));
            }
        }
        Ok(())
    }

    /// Load the groups of `conversations` not loaded yet: their stored values and their
    /// members' pointers (cached or stored read states).
    fn load_groups(
        &mut self,
        conversations: impl Iterator<Item = ConversationId>,
    ) -> Result<(), ProcessorError> {
        let (Some(groups), Some(heads)) = (&self.groups, &self.heads) else {
            return Ok(());
        };
        let missing = groups.missing(conversations);
        if missing.is_empty() {
            return Ok(());
        }
        let values = codec::load::<GroupCodec>(heads.store(), &missing)?;
        for (c, v) in missing.into_iter().zip(values) {
            let members = v.as_ref().map(|v| v.members.as_slice()).unwrap_or_default();
            let pointers = self.pointers_of(&c, members)?;
            if let Some(groups) = &mut self.groups {
                groups.install(c, v, &pointers);
            }
        }
        Ok(())
    }

    /// The read pointers of `members` in `conversation` (`-1` for none), from the cache or
    /// else the store (one `multi_get`).
    fn pointers_of(
        &self,
        conversation: &ConversationId,
        members: &[ReaderId],
    ) -> Result<Vec<i64>, ProcessorError> {
        let keys: Vec<StateKey> = (members.iter())
            .map(|m| StateKey {
                conversation: conversation.clone(),
                reader: m.clone(),
            })
            .collect();
        let uncached: Vec<StateKey> = (keys.iter())
            .filter(|k| self.cache.get(k).is_none())
            .cloned()
            .collect();
        let stored = codec::load::<ReadStates>(&*self.store, &uncached)?;
        let stored: HashMap<&StateKey, i64> = (uncached.iter())
            .zip(stored)
            .map(|(k, s)| (k, s.map_or(-1, |s| s.last_read_seq)))
            .collect();
        Ok(keys
            .iter()
            .map(|k| match self.cache.get(k) {
                Some(s) => s.last_read_seq,
                None => stored.get(k).copied().unwrap_or(-1),
            })
            .collect())
    }

    /// After reads folded: their members' pointers move in their groups.
    fn follow_groups(&mut self, keys: &[StateKey]) -> Result<(), ProcessorError> {
        if self.groups.is_none() {
            return Ok(());
        }
        self.load_groups(keys.iter().map(|k| k.conversation.clone()))?;
        let Some(groups) = &mut self.groups else {
            return Ok(());
        };
        for k in keys {
            if let Some(s) = self.cache.get(k) {
                groups.advance(k, s.last_read_seq);
            }
        }
        Ok(())
    }

    /// What resolving reads did, and how many wait now.
    pub fn resolve_stats(&self) -> Option<(ResolveStats, usize)> {
        let r = self.resolver.as_ref()?;
        Some((r.waiting.stats, r.waiting.len()))
    }

    /// Resolve the positions of reads that name their message by id: a read whose message
    /// is in its conversation's index takes that message's seq and stays in `events`; the
    /// others leave `events` to wait (`record(i)`: the time and dead-letter form of the
    /// record of `events[i]`). Without a resolver, nothing changes.
    pub fn resolve_reads(
        &mut self,
        events: &mut Vec<(EventRef<'_>, Origin)>,
        record: impl Fn(usize) -> (i64, DeadLetter),
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        let (Some(r), Some(heads)) = (&mut self.resolver, &mut self.heads) else {
            return Ok(());
        };
        let unresolved = |e: &EventRef<'_>| e.message_seq == UNRESOLVED_SEQ;
        heads.ensure_loaded(
            (events.iter().filter(|(e, _)| unresolved(e))).map(|(e, _)| e.conversation_id.clone()),
        )?;
        let mut at = 0;
        events.retain_mut(|(e, origin)| {
            let i = at;
            at += 1;
            if !unresolved(e) {
                return true;
            }
            let Some(id) = (e.message_id.as_deref()).and_then(|s| Id::parse(r.message_ids, s).ok())
            else {
                let (_, mut dl) = record(i);
                dl.reason = "invalid_event";
                dl.error = "a read positioned by message id without a valid message id".into();
                dead_letters.push(dl);
                return false;
            };
            match heads.get(&e.conversation_id).and_then(|h| h.seq_of(&id)) {
                Some(seq) => {
                    e.message_seq = seq;
                    r.waiting.stats.immediate += 1;
                    true
                }
                None => {
                    let (record_ms, record) = record(i);
                    let event = e.clone().into_owned();
                    let origin = *origin;
                    let message = id;
                    r.waiting.park(WaitingRead {
                        event,
                        message,
                        origin,
                        record_ms,
                        record,
                    });
                    false
                }
            }
        });
        let over = r.waiting.expired();
        self.stop_waiting(over, dead_letters)
    }

    /// Reads that stop waiting: resolved if their message is known now, else by their
    /// `read_at` (the newest window message sent by then) when the topology maps it, else
    /// dead letters.
    fn stop_waiting(
        &mut self,
        reads: Vec<WaitingRead>,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        let (Some(r), Some(heads)) = (&mut self.resolver, &mut self.heads) else {
            return Ok(());
        };
        if reads.is_empty() {
            return Ok(());
        }
        heads.ensure_loaded(reads.iter().map(|w| w.event.conversation_id.clone()))?;
        let mut resolved = Vec::with_capacity(reads.len());
        for mut w in reads {
            let head = heads.get(&w.event.conversation_id);
            if let Some(seq) = head.and_then(|h| h.seq_of(&w.message)) {
                w.event.message_seq = seq;
                r.waiting.stats.after_wait += 1;
                resolved.push(w.event);
                continue;
            }
            let by_time = head
                .filter(|_| r.fallback)
                .and_then(|h| h.message_sent_by(w.event.read_at_ms));
            match by_time {
                Some((seq, id)) => {
                    w.event.message_seq = seq;
                    w.event.message_id = id.map(|id| id.to_string());
                    r.waiting.stats.fallback += 1;
                    resolved.push(w.event);
                }
                None => {
                    r.waiting.stats.unresolved += 1;
                    dead_letters.push(unresolved_letter(w, r.fallback, r.waiting.wait()));
                }
            }
        }
        self.fold_resolved(resolved)
    }

    /// Fold reads whose positions were resolved after they arrived: without replay marks
    /// (a later record of the same key may have moved the marks past theirs; folding is
    /// a max, so folding one twice changes no pointer).
    fn fold_resolved(&mut self, reads: Vec<ReadEvent>) -> Result<(), ProcessorError> {
        if reads.is_empty() {
            return Ok(());
        }
        let misses = (self.cache).ensure_loaded(reads.iter().map(ReadEvent::key), &*self.store)?;
        self.stats.cache_misses += misses as u64;
        for e in &reads {
            let view = e.view();
            let state = (self.cache)
                .get_mut_dirty_ref(view.key_ref())
                .expect("ensure_loaded loaded every missing key");
            count(&mut self.stats, apply(state, &view));
        }
        if let Some(heads) = &mut self.heads {
            heads.ensure_loaded(reads.iter().map(|e| e.conversation_id.clone()))?;
        }
        if self.groups.is_some() {
            let keys: Vec<StateKey> = reads.iter().map(ReadEvent::key).collect();
            self.follow_groups(&keys)?;
        }
        Ok(())
    }

    pub fn message_stats(&self) -> Option<MessageStats> {
        self.heads.as_ref().map(Heads::stats)
    }

    /// Fold a batch of message events into their conversations' heads. With reads
    /// positioned by message id: the reads waiting for these messages are resolved, and
    /// message time advances to `time_ms` (the batch's highest record time), ending the
    /// waits it passes.
    pub fn process_messages(
        &mut self,
        messages: &[(MessageEvent, Origin)],
        time_ms: Option<i64>,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        let heads = self.heads.as_mut().ok_or(ProcessorError::NoMessageSource)?;
        heads.process(messages)?;
        if let Some((readers, owed)) = &mut self.sender_receipts {
            heads.receipts_read_before(&*self.store, *readers, owed)?;
        }
        if self.groups.is_some() {
            self.load_groups(messages.iter().map(|(m, _)| m.conversation_id.clone()))?;
            if let Some(groups) = &mut self.groups {
                for (m, _) in messages {
                    groups.touch(&m.conversation_id);
                }
            }
        }
        let Some(r) = &mut self.resolver else {
            return Ok(());
        };
        let mut resolved = Vec::new();
        for (m, _) in messages {
            let Some(id) = (m.message_id.as_deref()).and_then(|s| Id::parse(r.message_ids, s).ok())
            else {
                continue;
            };
            for mut w in r.waiting.take_for(&m.conversation_id, &id) {
                w.event.message_seq = m.message_seq;
                r.waiting.stats.after_wait += 1;
                resolved.push(w.event);
            }
        }
        if let Some(t) = time_ms {
            r.waiting.advance(t);
        }
        let expired = r.waiting.expired();
        self.fold_resolved(resolved)?;
        self.stop_waiting(expired, dead_letters)
    }

    fn reload_pending(&mut self) -> Result<(), ProcessorError> {
        self.pending.clear();
        let keys: Vec<StateKey> = StoreKey::scan_tag(&*self.store, TAG_PENDING)?
            .into_iter()
            .filter_map(|(k, _)| StoreKey::decode(&k).map(|(_, key)| key))
            .collect();
        self.cache
            .ensure_loaded(keys.iter().cloned(), &*self.store)?;
        for k in keys {
            if let Some(state) = self.cache.get(&k) {
                if state.has_unemitted_advance() {
                    self.pending.insert(k, self.policy.due_at(state));
                }
            }
        }
        if let Some(heads) = &mut self.heads {
            heads.ensure_loaded(self.pending.keys().map(|k| k.conversation.clone()))?;
        }
        Ok(())
    }

    /// Fold a batch of events. Events of cached keys fold at once (one hash lookup each);
    /// the others wait until their keys are loaded with one `multi_get`, then fold in
    /// order. A key missing from the cache misses for all its events of the batch, so each
    /// key's events still fold in order. No other store I/O.
    pub fn process(&mut self, events: &[(EventRef<'_>, Origin)]) -> Result<(), ProcessorError> {
        self.fold_events(events)?;
        if let Some(heads) = &mut self.heads {
            // The heads the flush derives these readers' counts from.
            heads.ensure_loaded(events.iter().map(|(e, _)| e.conversation_id.clone()))?;
        }
        if self.groups.is_some() {
            let keys: Vec<StateKey> = events.iter().map(|(e, _)| e.key()).collect();
            self.follow_groups(&keys)?;
        }
        Ok(())
    }

    fn fold_events(&mut self, events: &[(EventRef<'_>, Origin)]) -> Result<(), ProcessorError> {
        let mut deferred: Vec<usize> = Vec::new();
        for (i, (event, origin)) in events.iter().enumerate() {
            match self.cache.get_mut_dirty_ref(event.key_ref()) {
                Some(state) => count(&mut self.stats, fold(state, event, *origin)),
                None => deferred.push(i),
            }
        }
        if deferred.is_empty() {
            return Ok(());
        }
        let misses = self
            .cache
            .ensure_loaded(deferred.iter().map(|&i| events[i].0.key()), &*self.store)?;
        self.stats.cache_misses += misses as u64;
        for i in deferred {
            let (event, origin) = &events[i];
            let state = self
                .cache
                .get_mut_dirty_ref(event.key_ref())
                .expect("ensure_loaded loaded every missing key");
            count(&mut self.stats, fold(state, event, *origin));
        }
        Ok(())
    }

    /// Decide the updates of this flush and prepare the store batch. `now_ms` is wall-clock
    /// time; it stamps updates and drives the minimum emit interval.
    pub fn prepare_flush(&mut self, now_ms: i64) -> ReadStateFlush {
        let mut out = ReadStateFlush::for_stores(self.store_count());
        if let Some((_, owed)) = &mut self.sender_receipts {
            out.sender_receipts.append(owed);
            for r in &mut out.sender_receipts {
                r.emitted_at_ms = now_ms;
            }
            if let Some(groups) = &self.groups {
                // Large groups get the read-by aggregate only.
                (out.sender_receipts).retain(|r| !groups.is_large(&r.conversation_id));
            }
        }
        if let Some(r) = &mut self.resolver {
            r.waiting.flush(&mut out.flush.stores[HEADS_STORE]);
        }
        let mut dirty = self.cache.take_dirty();
        // In store-key order (StateKey's order is the encoded key's): the store batch is
        // then already sorted, which keeps its memtable inserts sequential.
        dirty.sort_unstable();
        for key in dirty {
            self.flush_key(key, now_ms, &mut out);
        }
        self.emit_due(now_ms, &mut out);
        if let (Some(groups), Some(heads)) = (&mut self.groups, &self.heads) {
            let store = &mut out.flush.stores[HEADS_STORE];
            groups.flush(now_ms, |c| heads.get(c), &mut out.read_by, store);
        }
        if let Some(heads) = &mut self.heads {
            // After the keys: their emitted pointers raise the heads' `read_high`.
            heads.flush(now_ms, &mut out.flush.stores[HEADS_STORE], &mut out.heads);
        }
        coalesce_sender_receipts(&mut out.sender_receipts);
        self.stats.updates_emitted += out.updates.len() as u64;
        self.stats.sender_receipts_emitted += out.sender_receipts.len() as u64;
        out
    }

    /// Punctuation: the advances held back by the emit interval whose slot opened by
    /// `now_ms`, popped from the due-time queue.
    pub fn emit_due(&mut self, now_ms: i64, out: &mut ReadStateFlush) {
        let n = self.store_count();
        if out.flush.stores.len() < n {
            out.flush.stores.resize_with(n, StoreFlush::default);
        }
        for key in self.pending.due(now_ms) {
            self.flush_key(key, now_ms, out);
        }
    }

    fn flush_key(&mut self, key: StateKey, now_ms: i64, out: &mut ReadStateFlush) {
        let Some(state) = self.cache.get_mut_clean(&key) else {
            return;
        };
        let store = &mut out.flush.stores[STATE_STORE];
        if state.has_unemitted_advance() {
            let due = self.policy.due_at(state);
            if due <= now_ms {
                let mut update = state.to_update(key.clone(), now_ms);
                if let Some(heads) = &mut self.heads {
                    update.counts =
                        Some(heads.counts(&key.conversation, &key.reader, state.last_read_seq));
                    if self.sender_receipts.is_some() {
                        let large =
                            (self.groups.as_ref()).is_some_and(|g| g.is_large(&key.conversation));
                        if !large {
                            let from = state.emitted_seq;
                            let receipts = &mut out.sender_receipts;
                            heads.sender_receipts(&key, from, state, now_ms, receipts);
                        }
                        heads.note_emitted(&key.conversation, state.last_read_seq);
                    }
                }
                state.emitted_seq = state.last_read_seq;
                out.updates.push(update);
                state.emitted_version = state.version;
                state.last_emit_ms = now_ms;
                state.events_since_emit = 0;
                state.stale_since_emit = 0;
                if self.pending.remove(&key) {
                    store.batch.delete(StoreKey::pending(&key).as_bytes());
                }
            } else if self.pending.insert(key.clone(), due) {
                store.batch.put(StoreKey::pending(&key).as_bytes(), b"");
            }
        }
        let k = ReadStates::encode_key(&key);
        store.put_logged(k.as_ref(), |buf| ReadStates::encode_value(state, buf));
    }

    /// Apply a prepared flush to the stores (`batches` indexed as the task's stores), each
    /// with the changelog position it reflects.
    pub fn commit_flush(
        &mut self,
        batches: Vec<StoreBatch>,
        checkpoints: &[Option<i64>],
    ) -> Result<(), ProcessorError> {
        // The read-state store, then the heads' (HEADS_STORE).
        let heads = self.heads.as_mut().map(Heads::store_mut);
        let stores = std::iter::once(&mut *self.store).chain(heads);
        write_all_flushed(stores, batches, checkpoints)?;
        self.stats.flushes += 1;
        let pending = &self.pending;
        self.cache.end_flush(|k| pending.contains(k));
        if let Some(heads) = &mut self.heads {
            heads.end_flush(self.pending.keys().map(|k| k.conversation.clone()));
        }
        if let Some(groups) = &mut self.groups {
            groups.end_flush(self.pending.keys().map(|k| k.conversation.clone()));
        }
        Ok(())
    }

    /// Drop everything not committed to the store (after a flush whose outputs could not be
    /// made durable): the task continues from its store as after a crash.
    pub fn reset_to_store(&mut self) -> Result<(), ProcessorError> {
        self.cache.clear();
        if let Some((_, owed)) = &mut self.sender_receipts {
            owed.clear();
        }
        if let Some(groups) = &mut self.groups {
            groups.clear();
        }
        if let Some(heads) = &mut self.heads {
            heads.clear();
            if let Some(r) = &mut self.resolver {
                r.waiting.load(heads.store())?;
            }
        }
        self.reload_pending()
    }

    /// The state of a key: cached (possibly not yet flushed) or stored.
    pub fn state(&self, key: &StateKey) -> Result<Option<ReadState>, StoreError> {
        if let Some(s) = self.cache.get(key) {
            return Ok(Some(s.clone()));
        }
        codec::get::<ReadStates>(&*self.store, key)
    }

    /// A reader's unread and mention counts now (message source only): from the cached or
    /// stored head and pointer.
    pub fn unread_counts(&self, key: &StateKey) -> Result<Option<UnreadCounts>, StoreError> {
        let Some(heads) = &self.heads else {
            return Ok(None);
        };
        let pointer = self.state(key)?.map_or(-1, |s| s.last_read_seq);
        let head = match heads.get(&key.conversation) {
            Some(h) => Some(h.clone()),
            None => self.stored_head(&key.conversation)?,
        };
        Ok(Some(
            head.map(|h| h.counts(&key.reader, pointer))
                .unwrap_or_default(),
        ))
    }

    /// The head of a conversation: cached (possibly not yet flushed) or stored.
    pub fn head(
        &self,
        conversation: &ConversationId,
    ) -> Result<Option<ConversationHead>, StoreError> {
        match self.heads.as_ref().and_then(|h| h.get(conversation)) {
            Some(h) => Ok(Some(h.clone())),
            None => self.stored_head(conversation),
        }
    }

    fn stored_head(
        &self,
        conversation: &ConversationId,
    ) -> Result<Option<ConversationHead>, StoreError> {
        match &self.heads {
            Some(heads) => heads.stored(conversation),
            None => Ok(None),
        }
    }

    fn store_count(&self) -> usize {
        1 + usize::from(self.heads.is_some())
    }

    /// The task's stores, indexed as `Topology::stores()`.
    pub fn stores(&self) -> Vec<&dyn KeyValueStore> {
        std::iter::once(&*self.store)
            .chain(self.heads.as_ref().map(Heads::store))
            .collect()
    }

    /// Give the stores back (closing the task), indexed as `Topology::stores()`.
    pub fn into_stores(self) -> Vec<Box<dyn KeyValueStore>> {
        std::iter::once(self.store)
            .chain(self.heads.map(Heads::into_store))
            .collect()
    }

    pub fn stats(&self) -> ProcessStats {
        self.stats
    }

    /// Keys the record cache keeps between flushes (its share of the instance's budget).
    pub fn cache_capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// This task's shares of the record cache (read states) and of the heads cache
    /// (window positions).
    pub fn set_cache_capacity(&mut self, entries: usize, positions: usize) {
        self.cache.set_capacity(entries);
        if let Some(h) = &mut self.heads {
            h.set_budget(positions_budget(positions, h.cap()));
        }
    }

    pub fn dirty_len(&self) -> usize {
        self.cache.dirty_len()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

/// At most one receipt per (sender, conversation, reader) in a flush: the highest message
/// (a message that arrived after a read past it can be owed beside a later advance's).
fn coalesce_sender_receipts(receipts: &mut Vec<SenderReceipt>) {
    if receipts.len() < 2 {
        return;
    }
    let mut best: hashbrown::HashMap<(&SenderId, &ConversationId, &ReaderId), (usize, i64)> =
        hashbrown::HashMap::with_capacity(receipts.len());
    for (i, r) in receipts.iter().enumerate() {
        let k = (&r.sender_id, &r.conversation_id, &r.reader_id);
        let e = best.entry(k).or_insert((i, r.message_seq));
        if r.message_seq > e.1 {
            *e = (i, r.message_seq);
        }
    }
    if best.len() == receipts.len() {
        return;
    }
    let keep: hashbrown::HashSet<usize> = best.into_values().map(|(i, _)| i).collect();
    let mut i = 0;
    receipts.retain(|_| {
        i += 1;
        keep.contains(&(i - 1))
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    Advanced,
    Stale,
    Replayed,
}

/// Fold one event into its key's state.
pub fn fold(state: &mut ReadState, event: &EventRef<'_>, origin: Origin) -> Fold {
    match state
        .marks
        .iter_mut()
        .find(|(src, _)| *src == origin.source)
    {
        Some((_, off)) if origin.offset <= *off => return Fold::Replayed,
        Some((_, off)) => *off = origin.offset,
        None => state.marks.push((origin.source, origin.offset)),
    }
    apply(state, event)
}

/// Fold one event whose record was not checked against the replay marks.
fn apply(state: &mut ReadState, event: &EventRef<'_>) -> Fold {
    state.events_total += 1;
    state.events_since_emit += 1;
    if ahead(event, state) {
        state.last_read_seq = event.message_seq;
        assign(&mut state.message_id, event.message_id.as_deref());
        state.sender_id.clone_from(&event.sender_id);
        assign(&mut state.device_id, event.device_id.as_deref());
        state.read_at_ms = event.read_at_ms;
        state.version += 1;
        Fold::Advanced
    } else {
        state.stale_total += 1;
        state.stale_since_emit += 1;
        Fold::Stale
    }
}

/// The dead letter of a read whose message did not come within the wait.
fn unresolved_letter(w: WaitingRead, fallback: bool, wait: std::time::Duration) -> DeadLetter {
    let e = &w.event;
    let why = match fallback {
        true => format!(
            "and no message of the window was sent by its read_at ({} ms)",
            e.read_at_ms
        ),
        false => "and the source maps no read_at to stand in".to_owned(),
    };
    DeadLetter {
        reason: UNRESOLVED_MESSAGE,
        error: format!(
            "message {} of conversation {} (read by {}) did not arrive within {wait:?} of message time after the read, {why}",
            w.message, e.conversation_id, e.reader_id
        ),
        ..w.record
    }
}

/// Whether `event` is past `state`'s pointer: a higher position, or an equal one with a
/// higher message id.
fn ahead(event: &EventRef<'_>, state: &ReadState) -> bool {
    match event.message_seq.cmp(&state.last_read_seq) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => event.message_id.as_deref() > state.message_id.as_deref(),
        std::cmp::Ordering::Less => false,
    }
}

fn count(stats: &mut ProcessStats, f: Fold) {
    match f {
        Fold::Advanced => {
            stats.folded += 1;
            stats.advanced += 1;
        }
        Fold::Stale => {
            stats.folded += 1;
            stats.stale += 1;
        }
        Fold::Replayed => stats.replayed += 1,
    }
}

/// Overwrite an optional id, reusing the existing allocation when there is one.
fn assign(dst: &mut Option<CompactString>, src: Option<&str>) {
    match (dst.as_mut(), src) {
        (Some(d), Some(s)) => {
            d.clear();
            d.push_str(s);
        }
        (None, Some(s)) => *dst = Some(CompactString::from(s)),
        (_, None) => *dst = None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConversationId, ReaderId};
    use crate::model::ReadEvent;

    fn ev(seq: i64, dev: &str) -> ReadEvent {
        ReadEvent {
            reader_id: ReaderId::from(1),
            conversation_id: ConversationId::from(2),
            message_seq: seq,
            device_id: Some(dev.into()),
            ..Default::default()
        }
    }

    fn ev_view(seq: i64, dev: &str) -> EventRef<'static> {
        ev(seq, dev).into()
    }

    fn at(off: i64) -> Origin {
        Origin {
            source: 9,
            offset: off,
        }
    }

    #[test]
    fn fold_is_monotonic_and_counts() {
        let mut s = ReadState::default();
        assert_eq!(fold(&mut s, &ev_view(5, "a"), at(0)), Fold::Advanced);
        assert_eq!(fold(&mut s, &ev_view(3, "b"), at(1)), Fold::Stale);
        assert_eq!(fold(&mut s, &ev_view(5, "b"), at(2)), Fold::Stale);
        assert_eq!(fold(&mut s, &ev_view(9, "b"), at(3)), Fold::Advanced);
        assert_eq!(fold(&mut s, &ev_view(9, "c"), at(3)), Fold::Replayed);
        assert_eq!(
            fold(
                &mut s,
                &ev_view(1, "c"),
                Origin {
                    source: 8,
                    offset: 0
                }
            ),
            Fold::Stale
        );
        assert_eq!(s.last_read_seq, 9);
        assert_eq!(s.device_id.as_deref(), Some("b"));
        assert_eq!((s.version, s.events_total, s.stale_total), (2, 5, 3));
    }

    /// Equal positions (timestamps) are ordered by message id, so the max is the same
    /// whatever order the events arrive in.
    #[test]
    fn equal_positions_are_ordered_by_message_id() {
        let with_id = |id: Option<&str>, dev: &str| ReadEvent {
            message_id: id.map(str::to_owned),
            ..ev(7, dev)
        };
        let events = [
            with_id(None, "a"),
            with_id(Some("m-2"), "b"),
            with_id(Some("m-1"), "c"),
        ];
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [2, 0, 1]] {
            let mut s = ReadState::default();
            for (off, i) in order.iter().enumerate() {
                fold(&mut s, &events[*i].view(), at(off as i64));
            }
            assert_eq!(
                (s.message_id.as_deref(), s.device_id.as_deref()),
                (Some("m-2"), Some("b")),
                "{order:?}"
            );
        }
    }
}
