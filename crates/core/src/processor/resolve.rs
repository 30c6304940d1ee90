//! Reads positioned by message id (`position = "message_id"`): the reads waiting for the
//! message they name.
//!
//! A read names a message; its position is that message's seq, found in the conversation
//! head's message index (`state::head`: the window's ids, bounded by `unread_cap`). A
//! read whose message is not there yet waits here, because messages may arrive after the
//! reads that name them. It is resolved when the message arrives; else, once the message
//! source's time (the highest record time of the task's message input) has passed the
//! read's record time by `message_wait`, it stops waiting: its `read_at` (when mapped)
//! stands in for the message (the newest window message sent by then), else it is a dead
//! letter with reason [`UNRESOLVED_MESSAGE`].
//!
//! Waiting reads are kept in the heads store (tag `w`, keyed by the read's origin), so
//! they survive restarts and are restored from its changelog like every entry; at most
//! `max_waiting_reads` per task, beyond which the oldest stop waiting early. Message time,
//! not wall-clock time, decides: a backlog replayed after an outage resolves the same way,
//! and a read never stops waiting while the messages sent after it are still unread.

use std::time::Duration;

use hashbrown::HashMap;
use smallvec::SmallVec;

use super::api::StoreFlush;
use super::punctuation::DueQueue;
use crate::ids::{ConversationId, Id, Origin, ReaderId, SenderId};
use crate::model::ReadEvent;
use crate::serde::fast::put_long as put_var;
use crate::state::head::VarReader;
use crate::state::{KeyValueStore, StoreError};
use crate::task::DeadLetter;
use crate::topology::ResolveSpec;

/// How far message time passes a read's before it stops waiting, by default.
pub const DEFAULT_MESSAGE_WAIT: Duration = Duration::from_secs(30);
/// Reads a task keeps waiting at most, by default (~0.5 KiB each).
pub const DEFAULT_MAX_WAITING_READS: usize = 10_000;
/// The dead-letter reason of a read whose message never arrived (and no `read_at`).
pub const UNRESOLVED_MESSAGE: &str = "unresolved_message";
/// Tag of a waiting read in the heads store.
pub const TAG_WAITING: u8 = b'w';

/// A waiting read's key: its origin (source, offset), unique per record.
type WaitKey = (u32, i64);

/// A read waiting for its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingRead {
    /// The read, its position not resolved.
    pub event: ReadEvent,
    /// The message it names, parsed as the topology's message id type.
    pub message: Id,
    pub origin: Origin,
    /// The read record's time (epoch ms): it waits until message time passes this by
    /// `message_wait`.
    pub record_ms: i64,
    /// The record as a dead letter would carry it (reason and error set when it is one).
    pub record: DeadLetter,
}

impl WaitingRead {
    fn key(&self) -> WaitKey {
        (self.origin.source, self.origin.offset)
    }

    /// The store key: the tag, then the origin's source and offset, big-endian.
    pub fn encode_key(key: WaitKey) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[0] = TAG_WAITING;
        b[1..5].copy_from_slice(&key.0.to_be_bytes());
        b[5..].copy_from_slice(&key.1.to_be_bytes());
        b
    }

    /// `None` when the bytes are not a waiting read's key.
    pub fn decode_key(bytes: &[u8]) -> Option<WaitKey> {
        let (&tag, rest) = bytes.split_first()?;
        if tag != TAG_WAITING || rest.len() != 12 {
            return None;
        }
        let source = u32::from_be_bytes(rest[..4].try_into().ok()?);
        let offset = i64::from_be_bytes(rest[4..].try_into().ok()?);
        Some((source, offset))
    }

    /// The value: a format byte, then varints, ids in their value form and
    /// length-prefixed byte strings (an absent one as length `-1`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let e = &self.event;
        out.push(1);
        put_var(out, self.record_ms);
        self.message.encode_value(out);
        e.conversation_id.0.encode_value(out);
        e.reader_id.0.encode_value(out);
        put_text(out, e.message_id.as_deref().map(str::as_bytes));
        match &e.sender_id {
            Some(s) => {
                out.push(1);
                s.0.encode_value(out);
            }
            None => out.push(0),
        }
        put_text(out, e.device_id.as_deref().map(str::as_bytes));
        put_var(out, e.read_at_ms);
        let r = &self.record;
        put_text(out, Some(r.topic.as_bytes()));
        put_var(out, i64::from(r.partition));
        put_var(out, r.offset);
        put_text(out, r.key.as_deref());
        put_text(out, r.value.as_deref());
        for t in [r.key_truncated_from, r.value_truncated_from] {
            put_var(out, t.map_or(-1, |n| n as i64));
        }
    }

    /// Decode a value stored under `key`, checking every length.
    pub fn decode(key: WaitKey, bytes: &[u8]) -> Result<Self, String> {
        let mut r = VarReader::new(bytes);
        if r.byte()? != 1 {
            return Err("unknown waiting-read format".into());
        }
        let record_ms = r.var()?;
        let message = r.value_id()?;
        let event = ReadEvent {
            conversation_id: ConversationId(r.value_id()?),
            reader_id: ReaderId(r.value_id()?),
            message_seq: crate::serde::json::UNRESOLVED_SEQ,
            message_id: text(&mut r)?,
            sender_id: match r.byte()? {
                0 => None,
                _ => Some(SenderId(r.value_id()?)),
            },
            device_id: text(&mut r)?,
            read_at_ms: r.var()?,
        };
        let topic = text(&mut r)?.ok_or("a waiting read without its topic")?;
        let partition = i32::try_from(r.var()?).map_err(|_| "partition out of range")?;
        let offset = r.var()?;
        let key_bytes = optional_bytes(&mut r)?;
        let value = optional_bytes(&mut r)?;
        let mut truncated = || r.var().map(|n| usize::try_from(n).ok());
        let (key_truncated_from, value_truncated_from) = (truncated()?, truncated()?);
        if !r.is_done() {
            return Err("trailing bytes after a waiting read".into());
        }
        Ok(Self {
            event,
            message,
            origin: Origin {
                source: key.0,
                offset: key.1,
            },
            record_ms,
            record: DeadLetter {
                topic,
                partition,
                offset,
                key: key_bytes,
                value,
                reason: UNRESOLVED_MESSAGE,
                error: String::new(),
                key_truncated_from,
                value_truncated_from,
            },
        })
    }
}

fn put_text(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            put_var(out, b.len() as i64);
            out.extend_from_slice(b);
        }
        None => put_var(out, -1),
    }
}

fn optional_bytes(r: &mut VarReader<'_>) -> Result<Option<Vec<u8>>, String> {
    Ok(r.optional_bytes()?.map(<[u8]>::to_vec))
}

fn text(r: &mut VarReader<'_>) -> Result<Option<String>, String> {
    optional_bytes(r)?
        .map(|b| String::from_utf8(b).map_err(|_| "a waiting read's text is not UTF-8".into()))
        .transpose()
}

/// What waiting did; monotone over the task's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResolveStats {
    /// Reads whose message was in the index when they arrived.
    pub immediate: u64,
    /// Reads that had to wait.
    pub waited: u64,
    /// Waiting reads resolved by their message's arrival.
    pub after_wait: u64,
    /// Waiting reads resolved by their `read_at` (the message never came).
    pub fallback: u64,
    /// Waiting reads dead-lettered (no message, no usable `read_at`).
    pub unresolved: u64,
}

/// The reads of one task waiting for their messages, and the message time that ends the
/// waits.
pub struct Waiting {
    wait_ms: i64,
    max: usize,
    /// Each waiting read, and whether the store holds it.
    reads: HashMap<WaitKey, (WaitingRead, bool)>,
    by_message: HashMap<(ConversationId, Id), SmallVec<[WaitKey; 1]>>,
    /// When each stops waiting, in message time.
    expiry: DueQueue<WaitKey>,
    /// Waiting since the last flush (to store), and stored ones that stopped (to delete).
    unstored: Vec<WaitKey>,
    deletes: Vec<WaitKey>,
    /// The highest record time of the message input (`i64::MIN` before the first).
    message_time_ms: i64,
    pub stats: ResolveStats,
}

impl Waiting {
    pub fn new(spec: &ResolveSpec) -> Self {
        Self {
            wait_ms: i64::try_from(spec.wait.as_millis()).unwrap_or(i64::MAX),
            max: spec.max_waiting.max(1),
            reads: HashMap::new(),
            by_message: HashMap::new(),
            expiry: DueQueue::new(),
            unstored: Vec::new(),
            deletes: Vec::new(),
            message_time_ms: i64::MIN,
            stats: ResolveStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.reads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }

    /// Forget everything, then load the waiting reads `store` holds.
    pub fn load(&mut self, store: &dyn KeyValueStore) -> Result<(), StoreError> {
        self.reads.clear();
        self.by_message.clear();
        self.expiry.clear();
        self.unstored.clear();
        self.deletes.clear();
        for (k, v) in store.scan_prefix(&[TAG_WAITING])? {
            let corrupt = |reason: String| StoreError::Corrupt {
                store: store.name().clone(),
                key: k.to_vec(),
                reason,
            };
            let key = WaitingRead::decode_key(&k)
                .ok_or_else(|| corrupt("not a waiting-read key".into()))?;
            let read = WaitingRead::decode(key, &v).map_err(corrupt)?;
            self.insert(read, true);
        }
        Ok(())
    }

    /// Wait for `read`'s message (a replayed read already waiting stays as it is).
    pub fn park(&mut self, read: WaitingRead) {
        self.stats.waited += 1;
        if !self.reads.contains_key(&read.key()) {
            self.unstored.push(read.key());
            self.insert(read, false);
        }
    }

    fn insert(&mut self, read: WaitingRead, stored: bool) {
        let key = read.key();
        let names = (read.event.conversation_id.clone(), read.message.clone());
        self.by_message.entry(names).or_default().push(key);
        self.expiry
            .insert(key, read.record_ms.saturating_add(self.wait_ms));
        self.reads.insert(key, (read, stored));
    }

    fn remove(&mut self, key: WaitKey) -> Option<WaitingRead> {
        let (read, stored) = self.reads.remove(&key)?;
        self.expiry.remove(&key);
        let names = (read.event.conversation_id.clone(), read.message.clone());
        if let Some(keys) = self.by_message.get_mut(&names) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                self.by_message.remove(&names);
            }
        }
        if stored {
            self.deletes.push(key);
        }
        Some(read)
    }

    /// The reads waiting for message `id` of `conversation` (it arrived): no longer waiting.
    pub fn take_for(&mut self, conversation: &ConversationId, id: &Id) -> Vec<WaitingRead> {
        if self.reads.is_empty() {
            return Vec::new();
        }
        let names = (conversation.clone(), id.clone());
        let keys = self.by_message.get(&names).cloned().unwrap_or_default();
        keys.into_iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Message time reached `ms` (a message record's time).
    pub fn advance(&mut self, ms: i64) {
        self.message_time_ms = self.message_time_ms.max(ms);
    }

    /// The reads that stop waiting now: message time passed their wait, or, beyond the
    /// most a task keeps, the oldest.
    pub fn expired(&mut self) -> Vec<WaitingRead> {
        let mut out: Vec<WaitingRead> = (self.expiry.due(self.message_time_ms).into_iter())
            .filter_map(|k| self.remove(k))
            .collect();
        while self.reads.len() > self.max {
            let Some(&k) = self.expiry.first() else { break };
            out.extend(self.remove(k));
        }
        out
    }

    /// Write the reads that began waiting since the last flush, and delete the stored ones
    /// that stopped, into the heads store's flush (both logged).
    pub fn flush(&mut self, out: &mut StoreFlush) {
        for k in self.deletes.drain(..) {
            out.delete_logged(&WaitingRead::encode_key(k));
        }
        for k in self.unstored.drain(..) {
            if let Some((read, stored)) = self.reads.get_mut(&k) {
                if !*stored {
                    out.put_logged(&WaitingRead::encode_key(k), |b| read.encode(b));
                    *stored = true;
                }
            }
        }
    }

    /// The wait, for messages that name it.
    pub fn wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms.max(0) as u64)
    }
}

#[cfg(test)]
mod tests;
