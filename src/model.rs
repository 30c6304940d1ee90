//! The domain records: a raw read event in, a coalesced receipt update out.
//!
//! These mirror `schemas/read_event.avsc` and `schemas/receipt_update.avsc`; the Avro
//! mapping lives in `serde/`.

use std::borrow::Cow;

use crate::ids::{ConversationId, ReaderId, SenderId};

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
            conversation: self.conversation_id,
            reader: self.reader_id,
        }
    }

    /// Borrow as the hot path's view.
    pub fn view(&self) -> EventRef<'_> {
        EventRef {
            reader_id: self.reader_id,
            conversation_id: self.conversation_id,
            message_seq: self.message_seq,
            message_id: self.message_id.as_deref().map(Cow::Borrowed),
            sender_id: self.sender_id,
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
            conversation: self.conversation_id,
            reader: self.reader_id,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey {
    pub conversation: ConversationId,
    pub reader: ReaderId,
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
}

impl ReceiptUpdate {
    pub fn key(&self) -> StateKey {
        StateKey {
            conversation: self.conversation_id,
            reader: self.reader_id,
        }
    }
}
