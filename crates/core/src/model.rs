//! The domain records: raw read and message events in, coalesced receipt and
//! conversation-head updates out.
//!
//! These mirror `schemas/read_event.avsc`, `schemas/message_event.avsc`,
//! `schemas/receipt_update.avsc` and `schemas/conversation_head.avsc`; the Avro mapping lives
//! in `serde/`.

use std::borrow::Cow;

use crate::ids::{ConversationId, Id, ReaderId, SenderId};

/// A read receipt for a sender (`schemas/sender_receipt.avsc`): `reader_id` has read
/// `sender_id`'s messages in `conversation_id` up to `message_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SenderReceipt {
    pub sender_id: SenderId,
    pub conversation_id: ConversationId,
    pub reader_id: ReaderId,
    /// The highest of the sender's messages the reader's pointer passed.
    pub message_seq: i64,
    pub message_id: Option<String>,
    pub read_at_ms: i64,
    pub device_id: Option<String>,
    /// The advance reached past the window of recent messages (older messages of the
    /// sender were read too, not named here).
    pub covers_older: bool,
    pub emitted_at_ms: i64,
}

/// Read by N of M (`schemas/read_by.avsc`): of the `members` of `conversation_id`,
/// `read_by` have read `sender_id`'s latest message there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadBy {
    pub sender_id: SenderId,
    pub conversation_id: ConversationId,
    pub message_seq: i64,
    pub message_id: Option<String>,
    pub read_by: i64,
    pub members: i64,
    pub emitted_at_ms: i64,
}

/// "Reader R read conversation C up to message S, on device D."
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadEvent {
    pub reader_id: ReaderId,
    pub conversation_id: ConversationId,
    /// Position in the conversation's total order. Validated `>= 0` at decode.
    pub message_seq: i64,
    pub message_id: Option<String>,
    pub sender_id: Option<SenderId>,
    pub device_id: Option<String>,
    /// Client wall-clock time in epoch milliseconds; carried, never used for ordering.
    pub read_at_ms: i64,
}

impl ReadEvent {
    pub fn key(&self) -> StateKey {
        StateKey {
            conversation: self.conversation_id.clone(),
            reader: self.reader_id.clone(),
        }
    }

    /// Borrow as the hot path's view.
    pub fn view(&self) -> EventRef<'_> {
        EventRef {
            reader_id: self.reader_id.clone(),
            conversation_id: self.conversation_id.clone(),
            message_seq: self.message_seq,
            message_id: self.message_id.as_deref().map(Cow::Borrowed),
            sender_id: self.sender_id.clone(),
            device_id: self.device_id.as_deref().map(Cow::Borrowed),
            read_at_ms: self.read_at_ms,
        }
    }
}

/// A read event as the hot path sees it: the ids borrow from the record's bytes when the
/// record was written with the reader schema (the common case), so decoding and folding
/// allocate nothing per event. Owned (`Cow::Owned`) after schema resolution.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventRef<'a> {
    pub reader_id: ReaderId,
    pub conversation_id: ConversationId,
    pub message_seq: i64,
    pub message_id: Option<Cow<'a, str>>,
    pub sender_id: Option<SenderId>,
    pub device_id: Option<Cow<'a, str>>,
    pub read_at_ms: i64,
}

impl EventRef<'_> {
    pub fn key(&self) -> StateKey {
        StateKey {
            conversation: self.conversation_id.clone(),
            reader: self.reader_id.clone(),
        }
    }

    /// The key, borrowed (the hot path's lookup).
    pub fn key_ref(&self) -> StateKeyRef<'_> {
        StateKeyRef {
            conversation: &self.conversation_id,
            reader: &self.reader_id,
        }
    }

    pub fn into_owned(self) -> ReadEvent {
        ReadEvent {
            reader_id: self.reader_id,
            conversation_id: self.conversation_id,
            message_seq: self.message_seq,
            message_id: self.message_id.map(Cow::into_owned),
            sender_id: self.sender_id,
            device_id: self.device_id.map(Cow::into_owned),
            read_at_ms: self.read_at_ms,
        }
    }
}

impl From<ReadEvent> for EventRef<'static> {
    fn from(e: ReadEvent) -> Self {
        Self {
            reader_id: e.reader_id,
            conversation_id: e.conversation_id,
            message_seq: e.message_seq,
            message_id: e.message_id.map(Cow::Owned),
            sender_id: e.sender_id,
            device_id: e.device_id.map(Cow::Owned),
            read_at_ms: e.read_at_ms,
        }
    }
}

/// The key of read state: one pointer per (conversation, reader).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey {
    pub conversation: ConversationId,
    pub reader: ReaderId,
}

impl StateKey {
    pub fn as_ref(&self) -> StateKeyRef<'_> {
        StateKeyRef {
            conversation: &self.conversation,
            reader: &self.reader,
        }
    }
}

/// A borrowed [`StateKey`]: finds a key in a hash map without cloning its ids (it hashes
/// exactly as `StateKey`'s derived `Hash`: conversation, then reader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateKeyRef<'a> {
    pub conversation: &'a ConversationId,
    pub reader: &'a ReaderId,
}

impl StateKeyRef<'_> {
    pub fn to_key(self) -> StateKey {
        StateKey {
            conversation: self.conversation.clone(),
            reader: self.reader.clone(),
        }
    }
}

impl std::hash::Hash for StateKeyRef<'_> {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.conversation.hash(state);
        self.reader.hash(state);
    }
}

impl hashbrown::Equivalent<StateKey> for StateKeyRef<'_> {
    #[inline]
    fn equivalent(&self, key: &StateKey) -> bool {
        *self.conversation == key.conversation && *self.reader == key.reader
    }
}

/// A coalesced update of one key's read pointer, as emitted on the output topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptUpdate {
    pub conversation_id: ConversationId,
    pub reader_id: ReaderId,
    pub last_read_seq: i64,
    pub message_id: Option<String>,
    pub sender_id: Option<SenderId>,
    pub device_id: Option<String>,
    pub read_at_ms: Option<i64>,
    /// Number of advances of this pointer so far; strictly increasing per key.
    pub version: i64,
    /// Raw events folded since the previous emitted update (stale ones included).
    pub events_folded: i64,
    /// Of those, events that did not advance the pointer.
    pub stale_events: i64,
    pub events_total: i64,
    pub stale_total: i64,
    pub emitted_at_ms: i64,
    /// Unread and mention counts as of this update (topologies with a message source).
    pub counts: Option<UnreadCounts>,
}

impl ReceiptUpdate {
    pub fn key(&self) -> StateKey {
        StateKey {
            conversation: self.conversation_id.clone(),
            reader: self.reader_id.clone(),
        }
    }
}

/// "Message S was sent to conversation C by U, mentioning M."
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageEvent {
    pub conversation_id: ConversationId,
    /// Position in the conversation's total order, the order read pointers point into.
    pub message_seq: i64,
    pub message_id: Option<String>,
    pub sender_id: SenderId,
    /// Service wall-clock time in epoch milliseconds; carried, never used for ordering.
    pub sent_at_ms: i64,
    /// Users the message mentions (validated: at most [`MAX_MENTIONS`]).
    pub mentions: Vec<ReaderId>,
    /// An @everyone / @here mention: a mention of every member.
    pub mention_everyone: bool,
}

/// The most users one message may mention; a message naming more is a dead letter.
pub const MAX_MENTIONS: usize = 1000;

/// A reader's unread and mention counts in one conversation, derived from the
/// conversation's head and the reader's pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnreadCounts {
    /// Messages after the pointer, not sent by the reader.
    pub unread: i64,
    /// Of those, the messages that mention the reader or everyone.
    pub mentions: i64,
    /// The pointer is behind the conversation's window of recent messages: the counts are
    /// what the window holds, a lower bound (show e.g. "999+").
    pub capped: bool,
}

/// A coalesced update of one conversation's head: enough to derive any member's unread
/// and mention counts from their pointer, with no per-member write when a message is sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeadUpdate {
    pub conversation_id: ConversationId,
    /// Highest message seq seen (`-1`: none).
    pub head_seq: i64,
    /// Messages counted so far (duplicates and replays are not counted).
    pub message_count: i64,
    /// Number of changes of this head so far; strictly increasing per conversation.
    pub version: i64,
    /// Highest seq that left the window (`-1`: none). A pointer below it gets capped counts.
    pub window_floor_seq: i64,
    /// The window: seqs of the most recent messages, ascending, and their senders.
    pub recent_seqs: Vec<i64>,
    pub recent_senders: Vec<Id>,
    /// Mentions in the window, as parallel (seq, user) lists.
    pub mention_seqs: Vec<i64>,
    pub mention_user_ids: Vec<Id>,
    /// Seqs in the window that mention everyone.
    pub everyone_seqs: Vec<i64>,
    pub emitted_at_ms: i64,
}
