//! The domain records: a raw read event in, a coalesced receipt update out.
//!
//! These mirror `schemas/read_event.avsc` and `schemas/receipt_update.avsc`; the Avro
//! mapping lives in `serde/`.

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
