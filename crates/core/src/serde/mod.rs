//! Avro in the Confluent schema-registry wire format: magic byte `0`, 4-byte big-endian
//! schema id, Avro binary datum.
//!
//! - [`registry`]: the [`registry::SchemaResolver`] seam (Confluent HTTP registry, or the
//!   local schemas in `schemas/` with fixed ids);
//! - [`avro`]: decoding read events with writer→reader schema resolution, encoding receipt
//!   updates;
//! - [`json`]: read events in a source's own JSON shape, found by field paths;
//!   [`ReadEventDecoder`] is a source's decoder by its format.

pub mod avro;
pub mod avro_mapped;
pub mod fast;
pub mod json;
pub mod members;
pub mod message;
pub mod registry;

use crate::ids::{IdType, IdTypes};

pub use avro::{EventDecoder, UpdateEncoder};
pub use message::{HeadEncoder, MessageDecoder};
pub use registry::{ConfluentRegistry, LocalRegistry, SchemaResolver};

/// The Avro schema of read events (the reader schema).
pub const READ_EVENT_SCHEMA: &str = include_str!("../../../../schemas/read_event.avsc");
/// The Avro schema of receipt updates (the writer schema of the output topic).
pub const RECEIPT_UPDATE_SCHEMA: &str = include_str!("../../../../schemas/receipt_update.avsc");

/// The Avro schema of message events (the reader schema of a message source).
pub const MESSAGE_EVENT_SCHEMA: &str = include_str!("../../../../schemas/message_event.avsc");
/// The Avro schema of conversation-head updates (the writer schema of their output topic).
pub const CONVERSATION_HEAD_SCHEMA: &str =
    include_str!("../../../../schemas/conversation_head.avsc");

/// The Avro schema of sender receipts (the writer schema of their output topic).
pub const SENDER_RECEIPT_SCHEMA: &str = include_str!("../../../../schemas/sender_receipt.avsc");

/// The sender-receipt schema for a topology's id types (see [`receipt_update_schema`]).
pub fn sender_receipt_schema(ids: &IdTypes) -> String {
    retype(
        SENDER_RECEIPT_SCHEMA,
        ids,
        &[
            ("sender_id", ids.user, Shape::Plain),
            ("conversation_id", ids.conversation, Shape::Plain),
            ("reader_id", ids.user, Shape::Plain),
            ("message_id", ids.message, Shape::Nullable),
        ],
    )
}

/// Read by N of M (`schemas/read_by.avsc`).
pub const READ_BY_SCHEMA: &str = include_str!("../../../../schemas/read_by.avsc");

/// The read-by schema for a topology's id types (see [`receipt_update_schema`]).
pub fn read_by_schema(ids: &IdTypes) -> String {
    retype(
        READ_BY_SCHEMA,
        ids,
        &[
            ("sender_id", ids.user, Shape::Plain),
            ("conversation_id", ids.conversation, Shape::Plain),
            ("message_id", ids.message, Shape::Nullable),
        ],
    )
}

/// The receipt-update schema for a topology's id types: [`RECEIPT_UPDATE_SCHEMA`] itself
/// for the default types, else with `conversation_id`, `reader_id`, `sender_id` and
/// `message_id` of the declared types (strings, `uuid` as Avro's logical type).
pub fn receipt_update_schema(ids: &IdTypes) -> String {
    retype(
        RECEIPT_UPDATE_SCHEMA,
        ids,
        &[
            ("conversation_id", ids.conversation, Shape::Plain),
            ("reader_id", ids.user, Shape::Plain),
            ("sender_id", ids.user, Shape::Nullable),
            ("message_id", ids.message, Shape::Nullable),
        ],
    )
}

/// The conversation-head schema for a topology's id types (see [`receipt_update_schema`]).
pub fn conversation_head_schema(ids: &IdTypes) -> String {
    retype(
        CONVERSATION_HEAD_SCHEMA,
        ids,
        &[
            ("conversation_id", ids.conversation, Shape::Plain),
            ("recent_senders", ids.user, Shape::Array),
            ("mention_user_ids", ids.user, Shape::Array),
        ],
    )
}

enum Shape {
    Plain,
    Nullable,
    Array,
}

fn retype(schema: &str, ids: &IdTypes, fields: &[(&str, IdType, Shape)]) -> String {
    if *ids == IdTypes::default() {
        return schema.to_owned();
    }
    let mut v: serde_json::Value = serde_json::from_str(schema).expect("bundled schema");
    let id_type = |t: IdType| serde_json::from_str::<serde_json::Value>(t.avro()).expect("avro");
    for f in v["fields"].as_array_mut().expect("record fields") {
        let Some((_, t, shape)) = fields.iter().find(|(n, _, _)| f["name"] == *n) else {
            continue;
        };
        f["type"] = match shape {
            Shape::Plain => id_type(*t),
            Shape::Nullable => serde_json::json!(["null", id_type(*t)]),
            Shape::Array => serde_json::json!({"type": "array", "items": id_type(*t)}),
        };
    }
    v.to_string()
}

/// Why a record could not become a read event. Each variant is a dead-letter reason with a
/// bounded label (see [`DecodeError::reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value")]
    EmptyValue,
    #[error("not in the Confluent wire format: {0}")]
    NotWireFormat(String),
    #[error("record of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("schema id {0} is unknown to the registry")]
    UnknownSchema(u32),
    #[error("writer schema {id} cannot be read with the source's reader schema: {reason}")]
    IncompatibleSchema { id: u32, reason: String },
    #[error("avro datum does not match writer schema {id}: {reason}")]
    Malformed { id: u32, reason: String },
    #[error("not a JSON object: {0}")]
    MalformedJson(String),
    #[error("invalid read event: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// A bounded label for metrics and the dead-letter header.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::EmptyValue => "empty_value",
            DecodeError::NotWireFormat(_) => "not_wire_format",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::UnknownSchema(_) => "unknown_schema",
            DecodeError::IncompatibleSchema { .. } => "incompatible_schema",
            DecodeError::Malformed { .. } | DecodeError::MalformedJson(_) => "malformed",
            DecodeError::Invalid(_) => "invalid_event",
        }
    }
}

/// Errors of the serde layer that are not about one record.
#[derive(Debug, thiserror::Error)]
pub enum SerdeError {
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    #[error("schema registry rejected the request: {0}")]
    Registry(String),
    #[error("invalid schema: {0}")]
    Schema(String),
    #[error("avro encoding failed: {0}")]
    Encode(String),
}

/// A source's decoder by its format: Avro through the schema registry (`A`), or JSON
/// through a field mapping.
pub enum SourceDecoder<A> {
    Avro(A),
    Json(Box<json::JsonDecoder>),
    /// Avro of the users' own schema, through a field mapping.
    AvroMapped(Box<avro_mapped::AvroMappedDecoder>),
}

/// The read events' decoder of a source.
pub type ReadEventDecoder = SourceDecoder<EventDecoder>;
/// The message events' decoder of a message source.
pub type MessageEventDecoder = SourceDecoder<MessageDecoder>;

/// What the schema gate asks of an Avro source decoder (writer schemas by id).
pub trait AvroSource {
    fn max_record_bytes(&self) -> usize;
    fn needs_fetch(&self, id: u32) -> bool;
    fn install(&mut self, id: u32, text: Option<&str>);
    fn unknown_schema(&self, payload: Option<&[u8]>) -> Option<u32>;
}

impl<A: AvroSource> SourceDecoder<A> {
    pub fn max_record_bytes(&self) -> usize {
        match self {
            Self::Avro(d) => d.max_record_bytes(),
            Self::Json(d) => d.max_record_bytes(),
            Self::AvroMapped(d) => d.max_record_bytes(),
        }
    }

    /// Whether writer schema `id` must be fetched (never for JSON: no schema is read).
    pub fn needs_fetch(&self, id: u32) -> bool {
        match self {
            Self::Avro(d) => d.needs_fetch(id),
            Self::AvroMapped(d) => d.needs_fetch(id),
            Self::Json(_) => false,
        }
    }

    /// The registry's answer for writer schema `id`.
    pub fn install(&mut self, id: u32, text: Option<&str>) {
        match self {
            Self::Avro(d) => d.install(id, text),
            Self::AvroMapped(d) => d.install(id, text),
            Self::Json(_) => {}
        }
    }

    /// The writer schema id of `payload` when it has not been resolved yet.
    pub fn unknown_schema(&self, payload: Option<&[u8]>) -> Option<u32> {
        match self {
            Self::Avro(d) => d.unknown_schema(payload),
            Self::AvroMapped(d) => d.unknown_schema(payload),
            Self::Json(_) => None,
        }
    }
}

impl ReadEventDecoder {
    /// Decode and validate one record, borrowing ids from `payload` where it can.
    pub fn decode_ref<'a>(
        &self,
        payload: Option<&'a [u8]>,
    ) -> Result<crate::model::EventRef<'a>, DecodeError> {
        match self {
            Self::Avro(d) => d.decode_ref(payload),
            Self::Json(d) => d.decode_ref(payload),
            Self::AvroMapped(d) => d.decode_ref(payload),
        }
    }
}

impl MessageEventDecoder {
    /// Decode and validate one record.
    pub fn decode(
        &self,
        payload: Option<&[u8]>,
    ) -> Result<crate::model::MessageEvent, DecodeError> {
        match self {
            Self::Avro(d) => d.decode(payload),
            Self::Json(d) => d.decode_message(payload),
            Self::AvroMapped(d) => d.decode_message(payload),
        }
    }
}

macro_rules! avro_source {
    ($t:ty) => {
        impl AvroSource for $t {
            fn max_record_bytes(&self) -> usize {
                <$t>::max_record_bytes(self)
            }
            fn needs_fetch(&self, id: u32) -> bool {
                <$t>::needs_fetch(self, id)
            }
            fn install(&mut self, id: u32, text: Option<&str>) {
                <$t>::install(self, id, text)
            }
            fn unknown_schema(&self, payload: Option<&[u8]>) -> Option<u32> {
                <$t>::unknown_schema(self, payload)
            }
        }
    };
}
avro_source!(EventDecoder);
avro_source!(MessageDecoder);

/// Split a Confluent-framed payload into (schema id, datum).
pub fn split_wire(payload: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    if payload.len() < 5 {
        return Err(DecodeError::NotWireFormat(format!(
            "{} bytes, need at least 5",
            payload.len()
        )));
    }
    if payload[0] != 0 {
        return Err(DecodeError::NotWireFormat(format!(
            "magic byte {:#04x}, expected 0x00",
            payload[0]
        )));
    }
    let id = u32::from_be_bytes(payload[1..5].try_into().expect("4 bytes"));
    Ok((id, &payload[5..]))
}

/// Write the Confluent frame header for `schema_id`.
pub fn write_wire_header(out: &mut Vec<u8>, schema_id: u32) {
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_roundtrip_and_errors() {
        let mut b = Vec::new();
        write_wire_header(&mut b, 0x01020304);
        b.extend_from_slice(b"xyz");
        assert_eq!(b[..5], [0, 1, 2, 3, 4]);
        assert_eq!(split_wire(&b).unwrap(), (0x01020304, &b"xyz"[..]));
        assert!(matches!(
            split_wire(&[0, 1]),
            Err(DecodeError::NotWireFormat(_))
        ));
        assert!(matches!(
            split_wire(&[1, 0, 0, 0, 1, 2]),
            Err(DecodeError::NotWireFormat(_))
        ));
    }
}
