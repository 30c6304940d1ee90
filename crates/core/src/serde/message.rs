//! Message events in (`message_event.avsc`) and conversation-head updates out
//! (`conversation_head.avsc`), over the same Confluent wire format as read events.

use std::sync::Arc;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::avro::{WireDecoder, WireEncoder, MAX_ID_LEN};
use super::fast::{put_id, put_long, put_opt_string};
use super::registry::SchemaResolver;
use super::{write_wire_header, DecodeError, SerdeError};
use crate::ids::{ConversationId, Id, ReaderId, SenderId};
use crate::model::{HeadUpdate, MessageEvent, ReadBy, SenderReceipt, MAX_MENTIONS};

/// Serde mirror of `message_event.avsc` (encoding: generators, tests, upstream examples).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename = "MessageEvent")]
pub struct AvroMessageEvent {
    /// Integers: `message_event.avsc` has `long` ids (encoding a text id fails).
    pub conversation_id: Id,
    pub message_seq: i64,
    pub message_id: Option<String>,
    pub sender_id: Id,
    pub sent_at: i64,
    pub mentioned_user_ids: Vec<Id>,
    pub mention_everyone: bool,
    pub trace_id: Option<String>,
}

impl From<&MessageEvent> for AvroMessageEvent {
    fn from(m: &MessageEvent) -> Self {
        Self {
            conversation_id: m.conversation_id.0.clone(),
            message_seq: m.message_seq,
            message_id: m.message_id.clone(),
            sender_id: m.sender_id.0.clone(),
            sent_at: m.sent_at_ms,
            mentioned_user_ids: m.mentions.iter().map(|r| r.0.clone()).collect(),
            mention_everyone: m.mention_everyone,
            trace_id: None,
        }
    }
}

/// What the decoder reads: the fields the processor needs, the rest skipped.
#[derive(Debug, Deserialize)]
#[serde(rename = "MessageEvent")]
struct DecodedMessageEvent {
    conversation_id: i64,
    message_seq: i64,
    message_id: Option<String>,
    sender_id: i64,
    sent_at: i64,
    #[serde(default)]
    mentioned_user_ids: Vec<i64>,
    #[serde(default)]
    mention_everyone: bool,
    #[serde(default)]
    #[allow(dead_code)]
    trace_id: Option<IgnoredAny>,
}

/// Check a decoded message against the domain rules.
pub fn validate_message(m: MessageEvent) -> Result<MessageEvent, DecodeError> {
    if m.message_seq < 0 {
        return Err(DecodeError::Invalid(format!(
            "message_seq {} is negative",
            m.message_seq
        )));
    }
    if m.mentions.len() > MAX_MENTIONS {
        return Err(DecodeError::Invalid(format!(
            "{} mentioned users exceed {MAX_MENTIONS}",
            m.mentions.len()
        )));
    }
    if let Some(id) = &m.message_id {
        if id.len() > MAX_ID_LEN {
            return Err(DecodeError::Invalid(format!(
                "message_id of {} bytes exceeds {MAX_ID_LEN}",
                id.len()
            )));
        }
    }
    Ok(m)
}

/// Decodes and validates message events (writer→reader schema resolution as for reads).
pub struct MessageDecoder {
    inner: WireDecoder<DecodedMessageEvent>,
}

impl MessageDecoder {
    pub fn with_max_record_bytes(
        resolver: Arc<dyn SchemaResolver>,
        max_record_bytes: usize,
    ) -> Result<Self, SerdeError> {
        Ok(Self {
            inner: WireDecoder::with_limit(
                resolver,
                super::MESSAGE_EVENT_SCHEMA,
                max_record_bytes,
            )?,
        })
    }

    pub fn max_record_bytes(&self) -> usize {
        self.inner.max_record_bytes()
    }

    pub async fn prepare<'a>(
        &mut self,
        payloads: impl Iterator<Item = Option<&'a [u8]>>,
    ) -> Result<(), SerdeError> {
        self.inner.prepare(payloads).await
    }

    pub async fn prepare_ids(&mut self, ids: &[u32]) -> Result<(), SerdeError> {
        self.inner.prepare_ids(ids).await
    }

    pub fn unknown_schema(&self, payload: Option<&[u8]>) -> Option<u32> {
        self.inner.unknown_schema(payload)
    }

    /// Whether writer schema `id` must be fetched.
    pub fn needs_fetch(&self, id: u32) -> bool {
        self.inner.needs_fetch(id)
    }

    /// The registry's answer for writer schema `id` (`None`: not found).
    pub fn install(&mut self, id: u32, text: Option<&str>) {
        self.inner.install(id, text)
    }

    pub fn decode(&self, payload: Option<&[u8]>) -> Result<MessageEvent, DecodeError> {
        let d = self.inner.decode(payload.ok_or(DecodeError::EmptyValue)?)?;
        validate_message(MessageEvent {
            conversation_id: ConversationId::from(d.conversation_id),
            message_seq: d.message_seq,
            message_id: d.message_id,
            sender_id: SenderId::from(d.sender_id),
            sent_at_ms: d.sent_at,
            mentions: d
                .mentioned_user_ids
                .into_iter()
                .map(ReaderId::from)
                .collect(),
            mention_everyone: d.mention_everyone,
        })
    }
}

/// Serde mirror of `conversation_head.avsc`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename = "ConversationHead")]
pub struct AvroConversationHead {
    /// Integers or strings, as the topology's id types (see
    /// [`super::conversation_head_schema`]).
    pub conversation_id: Id,
    pub head_seq: i64,
    pub message_count: i64,
    pub version: i64,
    pub window_floor_seq: i64,
    pub recent_seqs: Vec<i64>,
    pub recent_senders: Vec<Id>,
    pub mention_seqs: Vec<i64>,
    pub mention_user_ids: Vec<Id>,
    pub everyone_seqs: Vec<i64>,
    pub emitted_at: i64,
}

impl From<&HeadUpdate> for AvroConversationHead {
    fn from(u: &HeadUpdate) -> Self {
        Self {
            conversation_id: u.conversation_id.0.clone(),
            head_seq: u.head_seq,
            message_count: u.message_count,
            version: u.version,
            window_floor_seq: u.window_floor_seq,
            recent_seqs: u.recent_seqs.clone(),
            recent_senders: u.recent_senders.clone(),
            mention_seqs: u.mention_seqs.clone(),
            mention_user_ids: u.mention_user_ids.clone(),
            everyone_seqs: u.everyone_seqs.clone(),
            emitted_at: u.emitted_at_ms,
        }
    }
}

impl From<AvroConversationHead> for HeadUpdate {
    fn from(u: AvroConversationHead) -> Self {
        Self {
            conversation_id: ConversationId::from(u.conversation_id),
            head_seq: u.head_seq,
            message_count: u.message_count,
            version: u.version,
            window_floor_seq: u.window_floor_seq,
            recent_seqs: u.recent_seqs,
            recent_senders: u.recent_senders,
            mention_seqs: u.mention_seqs,
            mention_user_ids: u.mention_user_ids,
            everyone_seqs: u.everyone_seqs,
            emitted_at_ms: u.emitted_at,
        }
    }
}

/// Serde mirror of `sender_receipt.avsc` (consumers, tests).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename = "SenderReceipt")]
pub struct AvroSenderReceipt {
    pub sender_id: Id,
    pub conversation_id: Id,
    pub reader_id: Id,
    pub message_seq: i64,
    pub message_id: Option<String>,
    pub read_at: i64,
    pub device_id: Option<String>,
    pub covers_older: bool,
    pub emitted_at: i64,
}

impl From<AvroSenderReceipt> for SenderReceipt {
    fn from(r: AvroSenderReceipt) -> Self {
        Self {
            sender_id: SenderId::from(r.sender_id),
            conversation_id: ConversationId::from(r.conversation_id),
            reader_id: ReaderId::from(r.reader_id),
            message_seq: r.message_seq,
            message_id: r.message_id,
            read_at_ms: r.read_at,
            device_id: r.device_id,
            covers_older: r.covers_older,
            emitted_at_ms: r.emitted_at,
        }
    }
}

/// Encodes sender receipts for their output topic.
pub type SenderReceiptEncoder = WireEncoder<AvroSenderReceipt>;
/// Decodes sender receipts (push gateways, tests).
pub type SenderReceiptDecoder = WireDecoder<AvroSenderReceipt>;

impl SenderReceiptEncoder {
    /// Append the framed receipt to `out` (the bytes apache-avro writes for
    /// `sender_receipt.avsc` with the topology's id types).
    pub fn encode_receipt_into(&self, r: &SenderReceipt, out: &mut Vec<u8>) {
        write_wire_header(out, self.schema_id());
        put_id(out, &r.sender_id.0);
        put_id(out, &r.conversation_id.0);
        put_id(out, &r.reader_id.0);
        put_long(out, r.message_seq);
        put_opt_string(out, r.message_id.as_deref());
        put_long(out, r.read_at_ms);
        put_opt_string(out, r.device_id.as_deref());
        out.push(u8::from(r.covers_older));
        put_long(out, r.emitted_at_ms);
    }
}

/// Serde mirror of `read_by.avsc` (consumers, tests).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename = "ReadBy")]
pub struct AvroReadBy {
    pub sender_id: Id,
    pub conversation_id: Id,
    pub message_seq: i64,
    pub message_id: Option<String>,
    pub read_by: i64,
    pub members: i64,
    pub emitted_at: i64,
}

impl From<AvroReadBy> for ReadBy {
    fn from(r: AvroReadBy) -> Self {
        Self {
            sender_id: SenderId::from(r.sender_id),
            conversation_id: ConversationId::from(r.conversation_id),
            message_seq: r.message_seq,
            message_id: r.message_id,
            read_by: r.read_by,
            members: r.members,
            emitted_at_ms: r.emitted_at,
        }
    }
}

/// Encodes read-by records for their output topic.
pub type ReadByEncoder = WireEncoder<AvroReadBy>;
/// Decodes read-by records (gateways, tests).
pub type ReadByDecoder = WireDecoder<AvroReadBy>;

impl ReadByEncoder {
    /// Append the framed record to `out` (the bytes apache-avro writes for `read_by.avsc`
    /// with the topology's id types).
    pub fn encode_read_by_into(&self, r: &ReadBy, out: &mut Vec<u8>) {
        write_wire_header(out, self.schema_id());
        put_id(out, &r.sender_id.0);
        put_id(out, &r.conversation_id.0);
        put_long(out, r.message_seq);
        put_opt_string(out, r.message_id.as_deref());
        put_long(out, r.read_by);
        put_long(out, r.members);
        put_long(out, r.emitted_at_ms);
    }
}

/// Encodes conversation-head updates for their output topic.
pub type HeadEncoder = WireEncoder<AvroConversationHead>;
/// Decodes conversation-head updates (the PostgreSQL sink, tests).
pub type HeadDecoder = WireDecoder<AvroConversationHead>;
/// Encodes message events (generators, tests).
pub type MessageEncoder = WireEncoder<AvroMessageEvent>;

impl HeadEncoder {
    /// Append the framed update to `out` (the bytes apache-avro writes for
    /// `conversation_head.avsc`, see `tests::head_encoding_matches_apache_avro`).
    pub fn encode_head_into(&self, u: &HeadUpdate, out: &mut Vec<u8>) {
        write_wire_header(out, self.schema_id());
        put_id(out, &u.conversation_id.0);
        for v in [u.head_seq, u.message_count, u.version, u.window_floor_seq] {
            put_long(out, v);
        }
        // An Avro array: one block of items, then the empty block.
        fn array<T>(out: &mut Vec<u8>, items: &[T], put: impl Fn(&mut Vec<u8>, &T)) {
            if !items.is_empty() {
                put_long(out, items.len() as i64);
                for v in items {
                    put(out, v);
                }
            }
            put_long(out, 0);
        }
        let long = |out: &mut Vec<u8>, v: &i64| put_long(out, *v);
        array(out, &u.recent_seqs, long);
        array(out, &u.recent_senders, put_id);
        array(out, &u.mention_seqs, long);
        array(out, &u.mention_user_ids, put_id);
        array(out, &u.everyone_seqs, long);
        put_long(out, u.emitted_at_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serde::registry::LocalRegistry;

    fn message() -> MessageEvent {
        MessageEvent {
            conversation_id: ConversationId::from(4),
            message_seq: 17,
            message_id: Some("m-17".into()),
            sender_id: SenderId::from(2),
            sent_at_ms: 1_700_000_000_000,
            mentions: vec![ReaderId::from(5), ReaderId::from(6)],
            mention_everyone: true,
        }
    }

    #[test]
    fn message_round_trips_and_bad_ones_are_named() {
        let reg = Arc::new(LocalRegistry::new());
        let id = futures::executor::block_on(
            reg.register("m-value", crate::serde::MESSAGE_EVENT_SCHEMA),
        )
        .unwrap();
        let enc = MessageEncoder::new(crate::serde::MESSAGE_EVENT_SCHEMA, id).unwrap();
        let mut d = MessageDecoder::with_max_record_bytes(reg, 65536).unwrap();
        let m = message();
        let framed = enc.encode(&AvroMessageEvent::from(&m)).unwrap();
        futures::executor::block_on(d.prepare(std::iter::once(Some(&framed[..])))).unwrap();
        assert_eq!(d.decode(Some(&framed)).unwrap(), m);

        let mut neg = m.clone();
        neg.message_seq = -1;
        let framed = enc.encode(&AvroMessageEvent::from(&neg)).unwrap();
        assert_eq!(
            d.decode(Some(&framed)).unwrap_err().reason(),
            "invalid_event"
        );
        let mut many = m.clone();
        many.mentions = (0..=MAX_MENTIONS as i64).map(ReaderId::from).collect();
        let framed = enc.encode(&AvroMessageEvent::from(&many)).unwrap();
        let err = d.decode(Some(&framed)).unwrap_err();
        assert!(err.to_string().contains("1001 mentioned users"), "{err}");
        assert_eq!(d.decode(None).unwrap_err().reason(), "empty_value");
        assert_eq!(
            d.decode(Some(&[0, 0, 0])).unwrap_err().reason(),
            "not_wire_format"
        );
    }

    /// The fast encoder writes what apache-avro reads with the schema of the topology's
    /// id types: integer ids, and string ids with UUID message ids.
    #[test]
    fn sender_receipts_decode_with_their_generated_schemas() {
        use crate::ids::{IdType, IdTypes};
        let text = |s: &str| Id::text(s).unwrap();
        let uuid = "550e8400-e29b-41d4-a716-446655440000";
        let cases = [
            (IdTypes::default(), Id::int(7), Id::int(3), Some("m-9")),
            (
                IdTypes {
                    conversation: IdType::String,
                    user: IdType::String,
                    message: IdType::Uuid,
                },
                text("user123"),
                text("conv789"),
                Some(uuid),
            ),
        ];
        for (ids, user, conv, msg) in cases {
            let r = SenderReceipt {
                sender_id: SenderId(user.clone()),
                conversation_id: ConversationId(conv),
                reader_id: ReaderId(user),
                message_seq: 9,
                message_id: msg.map(str::to_owned),
                read_at_ms: 1_700_000_000_000,
                device_id: None,
                covers_older: true,
                emitted_at_ms: 5,
            };
            let schema = crate::serde::sender_receipt_schema(&ids);
            let enc = SenderReceiptEncoder::new(&schema, 11).unwrap();
            let mut out = Vec::new();
            enc.encode_receipt_into(&r, &mut out);
            let parsed = apache_avro::Schema::parse_str(&schema).unwrap();
            let reader = apache_avro::reader::datum::GenericDatumReader::builder(&parsed)
                .build()
                .unwrap();
            let mut datum = &out[5..];
            let v = reader.read_value(&mut datum).unwrap();
            assert!(datum.is_empty(), "{ids:?}: the whole record read");
            let apache_avro::types::Value::Record(fields) = v else {
                panic!("a record")
            };
            let field = |n: &str| fields.iter().find(|(k, _)| k == n).unwrap().1.clone();
            assert_eq!(field("message_seq"), apache_avro::types::Value::Long(9));
            assert_eq!(
                field("covers_older"),
                apache_avro::types::Value::Boolean(true)
            );
            if ids.message == IdType::Uuid {
                let apache_avro::types::Value::Union(1, m) = field("message_id") else {
                    panic!("a message id")
                };
                assert_eq!(*m, apache_avro::types::Value::Uuid(uuid.parse().unwrap()));
            }
        }
    }

    #[test]
    fn head_update_round_trips() {
        let u = HeadUpdate {
            conversation_id: ConversationId::from(3),
            head_seq: 9,
            message_count: 2,
            version: 2,
            window_floor_seq: -1,
            recent_seqs: vec![8, 9],
            recent_senders: vec![Id::int(1), Id::int(2)],
            mention_seqs: vec![9],
            mention_user_ids: vec![Id::int(4)],
            everyone_seqs: vec![8],
            emitted_at_ms: 5,
        };
        let reg = Arc::new(LocalRegistry::new());
        let id = futures::executor::block_on(
            reg.register("h-value", crate::serde::CONVERSATION_HEAD_SCHEMA),
        )
        .unwrap();
        let enc = HeadEncoder::new(crate::serde::CONVERSATION_HEAD_SCHEMA, id).unwrap();
        let mut out = Vec::new();
        enc.encode_head_into(&u, &mut out);
        assert_eq!(
            out,
            enc.encode(&AvroConversationHead::from(&u)).unwrap(),
            "the same bytes as apache-avro"
        );
        let empty = HeadUpdate::default();
        let mut out_empty = Vec::new();
        enc.encode_head_into(&empty, &mut out_empty);
        assert_eq!(
            out_empty,
            enc.encode(&AvroConversationHead::from(&empty)).unwrap()
        );
        let mut dec = HeadDecoder::new(reg, crate::serde::CONVERSATION_HEAD_SCHEMA).unwrap();
        futures::executor::block_on(dec.prepare(std::iter::once(Some(&out[..])))).unwrap();
        assert_eq!(HeadUpdate::from(dec.decode(&out).unwrap()), u);
    }
}
