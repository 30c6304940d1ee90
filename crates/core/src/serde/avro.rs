//! Avro decoding and encoding for the Confluent wire format.
//!
//! A [`WireDecoder`] keeps one decoding plan per writer schema id, fetched once from the
//! [`SchemaResolver`] and cached. When the writer schema is the reader schema (the common
//! case) it uses apache-avro's schema-aware serde reader; otherwise it decodes with the
//! writer schema and resolves to the reader schema (added fields take their defaults,
//! removed optional fields are dropped), then maps to the record type.
//!
//! Schemas are leaked to get `'static` decoders: there is one per schema id ever seen, a
//! handful per deployment.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

use super::registry::SchemaResolver;
use super::{split_wire, write_wire_header, DecodeError, SerdeError};
use crate::ids::{ConversationId, Id, ReaderId, SenderId};
use crate::model::{EventRef, ReadEvent, ReceiptUpdate, UnreadCounts};

/// Largest record accepted by default (bytes); larger ones are dead letters. A topology
/// sets its own with `[application] max_record_bytes`.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// How long a registry's "schema not found" is believed before asking again (a schema
/// registered late, or a registry restored from a backup, starts being used).
pub const NOT_FOUND_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest message id or device id accepted.
pub const MAX_ID_LEN: usize = 256;

/// The largest `max_record_bytes` a topology may set: below librdkafka's default
/// `message.max.bytes` (1,000,000), so that a record readstate accepts can be produced.
pub const MAX_RECORD_BYTES_CEILING: usize = 900_000;

pub(super) fn leak_schema(text: &str) -> Result<&'static Schema, SerdeError> {
    // Bound what a corrupt length prefix may make apache-avro allocate (process-wide, once):
    // no single field of an accepted record can be longer than the record.
    apache_avro::util::max_allocation_bytes(MAX_RECORD_BYTES_CEILING);
    let s = Schema::parse_str(text).map_err(|e| SerdeError::Schema(e.to_string()))?;
    Ok(Box::leak(Box::new(s)))
}

struct Plan {
    reader: GenericDatumReader<'static>,
    /// Writer schema equals the reader schema: decode straight into the record type.
    direct: bool,
}

/// What a decoder made of each writer schema id it asked the registry for: a plan `P`, or
/// why records of that id cannot be decoded. A "not found" is asked again after a while.
pub(super) struct WriterSchemas<P> {
    plans: HashMap<u32, Result<P, DecodeError>>,
    /// When the registry said "not found" for an id; asked again after `not_found_retry`.
    not_found_at: HashMap<u32, std::time::Instant>,
    pub(super) not_found_retry: std::time::Duration,
}

impl<P> WriterSchemas<P> {
    pub(super) fn new() -> Self {
        Self {
            plans: HashMap::new(),
            not_found_at: HashMap::new(),
            not_found_retry: NOT_FOUND_RETRY,
        }
    }

    /// Whether schema `id` must be fetched: never seen, or "not found" long enough ago.
    pub(super) fn needs_fetch(&self, id: u32) -> bool {
        match self.plans.get(&id) {
            None => true,
            Some(Err(DecodeError::UnknownSchema(_))) => self
                .not_found_at
                .get(&id)
                .is_none_or(|t| t.elapsed() >= self.not_found_retry),
            Some(_) => false,
        }
    }

    /// The registry's answer for `id` (`None`: not found), planned by `plan`.
    pub(super) fn install(
        &mut self,
        id: u32,
        text: Option<&str>,
        plan: impl FnOnce(&str) -> Result<P, DecodeError>,
    ) {
        let plan = match text {
            None => {
                self.not_found_at.insert(id, std::time::Instant::now());
                Err(DecodeError::UnknownSchema(id))
            }
            Some(text) => {
                self.not_found_at.remove(&id);
                plan(text)
            }
        };
        self.plans.insert(id, plan);
    }

    /// The plan of `payload`'s writer schema, and its datum.
    pub(super) fn plan_of<'p>(
        &self,
        payload: &'p [u8],
    ) -> Result<(u32, &P, &'p [u8]), DecodeError> {
        let (id, datum) = split_wire(payload)?;
        match self.plans.get(&id) {
            Some(Ok(p)) => Ok((id, p, datum)),
            Some(Err(e)) => Err(e.clone()),
            None => Err(DecodeError::UnknownSchema(id)),
        }
    }

    /// The writer schema id of `payload` when it has not been resolved yet.
    pub(super) fn unknown_schema(&self, payload: Option<&[u8]>) -> Option<u32> {
        let (id, _) = split_wire(payload?).ok()?;
        self.needs_fetch(id).then_some(id)
    }

    fn get(&self, id: u32) -> Option<&Result<P, DecodeError>> {
        self.plans.get(&id)
    }
}

/// Decodes Confluent-framed Avro into `T` (a serde mirror of the reader schema).
pub struct WireDecoder<T> {
    resolver: Arc<dyn SchemaResolver>,
    reader_schema: &'static Schema,
    reader_canonical: String,
    schemas: WriterSchemas<Plan>,
    max_record_bytes: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> WireDecoder<T> {
    /// A decoder accepting records up to [`MAX_RECORD_BYTES`].
    pub fn new(resolver: Arc<dyn SchemaResolver>, reader_schema: &str) -> Result<Self, SerdeError> {
        Self::with_limit(resolver, reader_schema, MAX_RECORD_BYTES)
    }

    /// A decoder accepting records up to `max_record_bytes`.
    pub fn with_limit(
        resolver: Arc<dyn SchemaResolver>,
        reader_schema: &str,
        max_record_bytes: usize,
    ) -> Result<Self, SerdeError> {
        let reader_schema = leak_schema(reader_schema)?;
        Ok(Self {
            resolver,
            reader_canonical: reader_schema.canonical_form(),
            reader_schema,
            schemas: WriterSchemas::new(),
            max_record_bytes,
            _t: PhantomData,
        })
    }

    /// Records larger than this are `too_large`.
    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    /// Whether schema `id` must be fetched: never seen, or "not found" long enough ago.
    pub fn needs_fetch(&self, id: u32) -> bool {
        self.schemas.needs_fetch(id)
    }

    /// Fetch the writer schemas of `payloads` not seen before. An error here means the
    /// registry is unreachable: the caller retries later; records are not dead-lettered.
    pub async fn prepare<'a>(
        &mut self,
        payloads: impl Iterator<Item = Option<&'a [u8]>>,
    ) -> Result<(), SerdeError> {
        let mut missing: Vec<u32> = Vec::new();
        for p in payloads.flatten() {
            if let Ok((id, _)) = split_wire(p) {
                if self.needs_fetch(id) && !missing.contains(&id) {
                    missing.push(id);
                }
            }
        }
        self.prepare_ids(&missing).await
    }

    /// The writer schema id of `payload` when it has not been resolved yet.
    pub fn unknown_schema(&self, payload: Option<&[u8]>) -> Option<u32> {
        self.schemas.unknown_schema(payload)
    }

    /// Fetch the writer schemas `ids` not seen before (or not found a while ago).
    pub async fn prepare_ids(&mut self, ids: &[u32]) -> Result<(), SerdeError> {
        for &id in ids {
            if !self.needs_fetch(id) {
                continue;
            }
            let text = self.resolver.schema_by_id(id).await?;
            self.install(id, text.as_deref());
        }
        Ok(())
    }

    /// The registry's answer for writer schema `id` (`None`: not found). A decoder shared
    /// behind a lock fetches with [`WireDecoder::resolver`] without holding it, then
    /// installs the answer.
    pub fn install(&mut self, id: u32, text: Option<&str>) {
        let (reader_schema, reader_canonical) = (self.reader_schema, &self.reader_canonical);
        (self.schemas).install(id, text, |text| {
            plan_for(reader_schema, reader_canonical, id, text)
        });
    }

    /// Where writer schemas are fetched from.
    pub fn resolver(&self) -> &Arc<dyn SchemaResolver> {
        &self.resolver
    }

    /// True when records with writer schema `id` were written with the reader schema itself
    /// (prepared, compatible and identical in canonical form).
    pub fn writes_reader_schema(&self, id: u32) -> bool {
        matches!(self.schemas.get(id), Some(Ok(p)) if p.direct)
    }

    /// Decode one record. The writer schema must have been [`prepare`](Self::prepare)d;
    /// an unprepared id is reported as unknown.
    pub fn decode(&self, payload: &[u8]) -> Result<T, DecodeError> {
        if payload.len() > self.max_record_bytes {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                limit: self.max_record_bytes,
            });
        }
        let (id, plan, mut datum) = self.schemas.plan_of(payload)?;
        let malformed = |e: apache_avro::Error| DecodeError::Malformed {
            id,
            reason: e.to_string(),
        };
        let value: T = if plan.direct {
            plan.reader.read_deser(&mut datum).map_err(malformed)?
        } else {
            let v = plan.reader.read_value(&mut datum).map_err(malformed)?;
            apache_avro::from_value(&v).map_err(malformed)?
        };
        if !datum.is_empty() {
            return Err(DecodeError::Malformed {
                id,
                reason: format!("{} bytes after the datum", datum.len()),
            });
        }
        Ok(value)
    }
}

/// How records of writer schema `text` (id `id`) are read as `reader_schema`.
fn plan_for(
    reader_schema: &'static Schema,
    reader_canonical: &str,
    id: u32,
    text: &str,
) -> Result<Plan, DecodeError> {
    let incompatible = |reason: String| DecodeError::IncompatibleSchema { id, reason };
    let writer = leak_schema(text).map_err(|e| incompatible(e.to_string()))?;
    SchemaCompatibility::can_read(writer, reader_schema)
        .map_err(|e| incompatible(e.to_string()))?;
    let direct = writer.canonical_form() == reader_canonical;
    let reader = if direct {
        GenericDatumReader::builder(writer).build()
    } else {
        GenericDatumReader::builder(writer)
            .reader_schema(reader_schema)
            .build()
    }
    .map_err(|e| incompatible(e.to_string()))?;
    Ok(Plan { reader, direct })
}

/// Encodes `T` as Confluent-framed Avro under a fixed schema id.
pub struct WireEncoder<T> {
    schema_id: u32,
    writer: GenericDatumWriter<'static>,
    _t: PhantomData<fn(&T)>,
}

impl<T: Serialize> WireEncoder<T> {
    pub fn new(schema: &str, schema_id: u32) -> Result<Self, SerdeError> {
        let schema = leak_schema(schema)?;
        let writer = GenericDatumWriter::builder(schema)
            .build()
            .map_err(|e| SerdeError::Schema(e.to_string()))?;
        Ok(Self {
            schema_id,
            writer,
            _t: PhantomData,
        })
    }

    /// Register `schema` under `subject` and build an encoder for the id it gets.
    pub async fn register(
        resolver: &dyn SchemaResolver,
        subject: &str,
        schema: &str,
    ) -> Result<Self, SerdeError> {
        let id = resolver.register(subject, schema).await?;
        Self::new(schema, id)
    }

    pub fn schema_id(&self) -> u32 {
        self.schema_id
    }

    /// Append the framed record to `out`.
    pub fn encode_into(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerdeError> {
        write_wire_header(out, self.schema_id);
        self.writer
            .write_ser(out, value)
            .map(|_| ())
            .map_err(|e| SerdeError::Encode(e.to_string()))
    }

    pub fn encode(&self, value: &T) -> Result<Vec<u8>, SerdeError> {
        let mut out = Vec::with_capacity(96);
        self.encode_into(value, &mut out)?;
        Ok(out)
    }
}

/// Serde mirror of `read_event.avsc`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename = "ReadEvent")]
pub struct AvroReadEvent {
    /// Integers: `read_event.avsc` has `long` ids (encoding a text id fails).
    pub reader_id: Id,
    pub conversation_id: Id,
    pub message_seq: i64,
    pub message_id: Option<String>,
    pub sender_id: Option<Id>,
    pub device_id: Option<String>,
    pub read_at: i64,
    pub client: Option<String>,
    pub trace_id: Option<String>,
}

/// What the general path decodes: the fields the processor needs, the rest skipped without
/// allocating. (Records written with the reader schema take [`super::fast`] instead.)
#[derive(Debug, Deserialize)]
#[serde(rename = "ReadEvent")]
pub struct DecodedReadEvent {
    reader_id: i64,
    conversation_id: i64,
    message_seq: i64,
    message_id: Option<String>,
    sender_id: Option<i64>,
    device_id: Option<String>,
    read_at: i64,
    #[serde(default)]
    #[allow(dead_code)]
    client: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    trace_id: Option<IgnoredAny>,
}

impl From<&ReadEvent> for AvroReadEvent {
    fn from(e: &ReadEvent) -> Self {
        Self {
            reader_id: e.reader_id.0.clone(),
            conversation_id: e.conversation_id.0.clone(),
            message_seq: e.message_seq,
            message_id: e.message_id.clone(),
            sender_id: e.sender_id.as_ref().map(|s| s.0.clone()),
            device_id: e.device_id.clone(),
            read_at: e.read_at_ms,
            client: None,
            trace_id: None,
        }
    }
}

impl DecodedReadEvent {
    /// The event as decoded, not yet validated.
    pub fn into_event(self) -> ReadEvent {
        ReadEvent {
            reader_id: ReaderId::from(self.reader_id),
            conversation_id: ConversationId::from(self.conversation_id),
            message_seq: self.message_seq,
            message_id: self.message_id,
            sender_id: self.sender_id.map(SenderId::from),
            device_id: self.device_id,
            read_at_ms: self.read_at,
        }
    }
}

/// Check a decoded event against the domain rules.
#[inline]
pub fn validate(e: EventRef<'_>) -> Result<EventRef<'_>, DecodeError> {
    if e.message_seq < 0 {
        return Err(DecodeError::Invalid(format!(
            "message_seq {} is negative",
            e.message_seq
        )));
    }
    for (name, v) in [("message_id", &e.message_id), ("device_id", &e.device_id)] {
        if let Some(s) = v.as_deref() {
            if s.len() > MAX_ID_LEN {
                return Err(DecodeError::Invalid(format!(
                    "{name} of {} bytes exceeds {MAX_ID_LEN}",
                    s.len()
                )));
            }
        }
    }
    Ok(e)
}

/// Decodes and validates read events.
pub struct EventDecoder {
    inner: WireDecoder<DecodedReadEvent>,
}

impl EventDecoder {
    /// A decoder accepting records up to [`MAX_RECORD_BYTES`].
    pub fn new(resolver: Arc<dyn SchemaResolver>) -> Result<Self, SerdeError> {
        Self::with_max_record_bytes(resolver, MAX_RECORD_BYTES)
    }

    /// A decoder accepting records up to `max_record_bytes` (larger ones are `too_large`).
    pub fn with_max_record_bytes(
        resolver: Arc<dyn SchemaResolver>,
        max_record_bytes: usize,
    ) -> Result<Self, SerdeError> {
        Ok(Self {
            inner: WireDecoder::with_limit(resolver, super::READ_EVENT_SCHEMA, max_record_bytes)?,
        })
    }

    pub fn max_record_bytes(&self) -> usize {
        self.inner.max_record_bytes
    }

    /// How long "schema not found" is believed ([`NOT_FOUND_RETRY`] by default).
    pub fn set_not_found_retry(&mut self, d: std::time::Duration) {
        self.inner.schemas.not_found_retry = d;
    }

    pub async fn prepare<'a>(
        &mut self,
        payloads: impl Iterator<Item = Option<&'a [u8]>>,
    ) -> Result<(), SerdeError> {
        self.inner.prepare(payloads).await
    }

    /// The writer schema id of `payload` when it has not been resolved yet.
    pub fn unknown_schema(&self, payload: Option<&[u8]>) -> Option<u32> {
        self.inner.unknown_schema(payload)
    }

    /// Fetch the writer schemas `ids` not seen before.
    pub async fn prepare_ids(&mut self, ids: &[u32]) -> Result<(), SerdeError> {
        self.inner.prepare_ids(ids).await
    }

    /// Whether writer schema `id` must be fetched (see [`WireDecoder::install`]).
    pub fn needs_fetch(&self, id: u32) -> bool {
        self.inner.needs_fetch(id)
    }

    /// The registry's answer for writer schema `id` (`None`: not found).
    pub fn install(&mut self, id: u32, text: Option<&str>) {
        self.inner.install(id, text)
    }

    /// Decode and validate one record, borrowing its ids from `payload` when it was written
    /// with the reader schema (no allocation); other writers go through apache-avro's
    /// schema resolution.
    pub fn decode_ref<'a>(&self, payload: Option<&'a [u8]>) -> Result<EventRef<'a>, DecodeError> {
        let payload = payload.ok_or(DecodeError::EmptyValue)?;
        if payload.len() <= self.inner.max_record_bytes {
            if let Ok((id, datum)) = split_wire(payload) {
                if self.inner.writes_reader_schema(id) {
                    if let Some(e) = super::fast::decode_read_event(datum) {
                        return validate(e);
                    }
                }
            }
        }
        // Evolved writers, and anything the fast path does not accept: apache-avro decides
        // and explains.
        validate(EventRef::from(self.inner.decode(payload)?.into_event()))
    }

    pub fn decode(&self, payload: Option<&[u8]>) -> Result<ReadEvent, DecodeError> {
        self.decode_ref(payload).map(EventRef::into_owned)
    }
}

/// Serde mirror of `receipt_update.avsc`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename = "ReceiptUpdate")]
pub struct AvroReceiptUpdate {
    /// Integers or strings, as the topology's id types (see [`super::receipt_update_schema`]).
    pub conversation_id: Id,
    pub reader_id: Id,
    pub last_read_seq: i64,
    pub message_id: Option<String>,
    pub sender_id: Option<Id>,
    pub device_id: Option<String>,
    pub read_at: Option<i64>,
    pub version: i64,
    pub events_folded: i64,
    pub stale_events: i64,
    pub events_total: i64,
    pub stale_total: i64,
    pub emitted_at: i64,
    #[serde(default)]
    pub unread_count: Option<i64>,
    #[serde(default)]
    pub mention_count: Option<i64>,
    #[serde(default)]
    pub counts_capped: bool,
}

impl From<&ReceiptUpdate> for AvroReceiptUpdate {
    fn from(u: &ReceiptUpdate) -> Self {
        Self {
            conversation_id: u.conversation_id.0.clone(),
            reader_id: u.reader_id.0.clone(),
            last_read_seq: u.last_read_seq,
            message_id: u.message_id.clone(),
            sender_id: u.sender_id.as_ref().map(|s| s.0.clone()),
            device_id: u.device_id.clone(),
            read_at: u.read_at_ms,
            version: u.version,
            events_folded: u.events_folded,
            stale_events: u.stale_events,
            events_total: u.events_total,
            stale_total: u.stale_total,
            emitted_at: u.emitted_at_ms,
            unread_count: u.counts.map(|c| c.unread),
            mention_count: u.counts.map(|c| c.mentions),
            counts_capped: u.counts.is_some_and(|c| c.capped),
        }
    }
}

impl From<AvroReceiptUpdate> for ReceiptUpdate {
    fn from(u: AvroReceiptUpdate) -> Self {
        Self {
            conversation_id: ConversationId::from(u.conversation_id),
            reader_id: ReaderId::from(u.reader_id),
            last_read_seq: u.last_read_seq,
            message_id: u.message_id,
            sender_id: u.sender_id.map(SenderId::from),
            device_id: u.device_id,
            read_at_ms: u.read_at,
            version: u.version,
            events_folded: u.events_folded,
            stale_events: u.stale_events,
            events_total: u.events_total,
            stale_total: u.stale_total,
            emitted_at_ms: u.emitted_at,
            counts: match (u.unread_count, u.mention_count) {
                (Some(unread), Some(mentions)) => Some(UnreadCounts {
                    unread,
                    mentions,
                    capped: u.counts_capped,
                }),
                _ => None,
            },
        }
    }
}

/// Encodes receipt updates for the output topic.
pub type UpdateEncoder = WireEncoder<AvroReceiptUpdate>;

impl WireEncoder<AvroReceiptUpdate> {
    /// Append the framed update to `out` through the fast encoder (same bytes as
    /// [`encode_into`](Self::encode_into) of the serde record; the encoder's schema is
    /// `receipt_update.avsc`).
    pub fn encode_update_into(&self, u: &ReceiptUpdate, out: &mut Vec<u8>) {
        write_wire_header(out, self.schema_id);
        super::fast::encode_receipt_update(u, out);
    }
}
/// Encodes read events (load generator, tests, upstream examples).
pub type EventEncoder = WireEncoder<AvroReadEvent>;
/// Decodes receipt updates (the Postgres sink, tests, analysts' tools).
pub type UpdateDecoder = WireDecoder<AvroReceiptUpdate>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serde::registry::{LocalRegistry, LOCAL_READ_EVENT_ID};
    use crate::serde::READ_EVENT_SCHEMA;

    fn event() -> ReadEvent {
        ReadEvent {
            reader_id: ReaderId::from(7),
            conversation_id: ConversationId::from(-3),
            message_seq: 99,
            message_id: Some("m-99".into()),
            sender_id: Some(SenderId::from(5)),
            device_id: Some("ios-1".into()),
            read_at_ms: 1_700_000_000_000,
        }
    }

    fn decoder(reg: LocalRegistry) -> EventDecoder {
        EventDecoder::new(Arc::new(reg)).unwrap()
    }

    fn decode_one(d: &mut EventDecoder, p: &[u8]) -> Result<ReadEvent, DecodeError> {
        futures::executor::block_on(d.prepare(std::iter::once(Some(p)))).unwrap();
        d.decode(Some(p))
    }

    #[test]
    fn schema_not_found_is_asked_again_after_a_while_not_cached_for_good() {
        let reg = Arc::new(LocalRegistry::new());
        let enc = EventEncoder::new(READ_EVENT_SCHEMA, 77).unwrap();
        let bytes = enc.encode(&AvroReadEvent::from(&event())).unwrap();
        let mut believing = EventDecoder::new(reg.clone()).unwrap();
        let mut asking = EventDecoder::new(reg.clone()).unwrap();
        asking.set_not_found_retry(std::time::Duration::ZERO);
        for d in [&mut believing, &mut asking] {
            assert_eq!(decode_one(d, &bytes), Err(DecodeError::UnknownSchema(77)));
        }
        reg.insert(77, READ_EVENT_SCHEMA); // registered late
        assert_eq!(
            decode_one(&mut believing, &bytes),
            Err(DecodeError::UnknownSchema(77)),
            "within the retry time the answer is believed"
        );
        assert_eq!(decode_one(&mut asking, &bytes), Ok(event()));
    }

    #[test]
    fn same_schema_roundtrip() {
        let enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID).unwrap();
        let bytes = enc.encode(&AvroReadEvent::from(&event())).unwrap();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);
        let mut d = decoder(LocalRegistry::new());
        assert_eq!(decode_one(&mut d, &bytes).unwrap(), event());
    }

    #[test]
    fn evolved_writers_resolve() {
        // v0: a writer without the optional fields; v2: a writer with an extra field.
        let v0 = r#"{"type":"record","name":"ReadEvent","namespace":"chat.readstate.v1","fields":[
            {"name":"reader_id","type":"long"},{"name":"conversation_id","type":"long"},
            {"name":"message_seq","type":"long"},
            {"name":"read_at","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
        let mut v2: serde_json::Value = serde_json::from_str(READ_EVENT_SCHEMA).unwrap();
        v2["fields"].as_array_mut().unwrap().push(serde_json::json!(
            {"name":"thread_id","type":["null","long"],"default":null}));
        let v2 = v2.to_string();
        let reg = LocalRegistry::new()
            .with_schema(10, v0)
            .with_schema(12, &v2);
        let mut d = decoder(reg);

        #[derive(Serialize)]
        #[serde(rename = "ReadEvent")]
        struct V0 {
            reader_id: i64,
            conversation_id: i64,
            message_seq: i64,
            read_at: i64,
        }
        let b0 = WireEncoder::<V0>::new(v0, 10)
            .unwrap()
            .encode(&V0 {
                reader_id: 1,
                conversation_id: 2,
                message_seq: 3,
                read_at: 4,
            })
            .unwrap();
        let got = decode_one(&mut d, &b0).unwrap();
        assert_eq!(
            (
                got.reader_id.as_int().unwrap(),
                got.message_seq,
                got.device_id
            ),
            (1, 3, None)
        );

        #[derive(Serialize)]
        #[serde(rename = "ReadEvent")]
        struct V2 {
            #[serde(flatten)]
            base: AvroReadEvent,
            thread_id: Option<i64>,
        }
        let b2 = WireEncoder::<V2>::new(&v2, 12)
            .unwrap()
            .encode(&V2 {
                base: AvroReadEvent::from(&event()),
                thread_id: Some(8),
            })
            .unwrap();
        assert_eq!(decode_one(&mut d, &b2).unwrap(), event());
    }

    #[test]
    fn bad_records_are_classified() {
        let mut d = decoder(LocalRegistry::new());
        let enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID).unwrap();
        let mut neg = event();
        neg.message_seq = -1;
        let neg = enc.encode(&AvroReadEvent::from(&neg)).unwrap();
        assert_eq!(
            decode_one(&mut d, &neg).unwrap_err().reason(),
            "invalid_event"
        );
        assert_eq!(
            decode_one(&mut d, b"hello world").unwrap_err().reason(),
            "not_wire_format"
        );
        assert_eq!(
            decode_one(&mut d, &[0, 0, 0, 0, 77, 1])
                .unwrap_err()
                .reason(),
            "unknown_schema"
        );
        let good = enc.encode(&AvroReadEvent::from(&event())).unwrap();
        assert_eq!(
            decode_one(&mut d, &good[..good.len() - 3])
                .unwrap_err()
                .reason(),
            "malformed"
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode_one(&mut d, &long).unwrap_err().reason(), "malformed");
        let huge = vec![0u8; MAX_RECORD_BYTES + 1];
        assert_eq!(decode_one(&mut d, &huge).unwrap_err().reason(), "too_large");
        assert_eq!(d.decode(None).unwrap_err().reason(), "empty_value");
        // A writer whose field types do not match.
        let bad = r#"{"type":"record","name":"ReadEvent","fields":[{"name":"reader_id","type":"string"}]}"#;
        let mut d = decoder(LocalRegistry::new().with_schema(20, bad));
        assert_eq!(
            decode_one(&mut d, &[0, 0, 0, 0, 20, 2, b'x'])
                .unwrap_err()
                .reason(),
            "incompatible_schema"
        );
    }
}
