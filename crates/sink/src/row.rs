//! What the sink writes: a [`SinkRow`] is a keyed, versioned record of an output topic with
//! its table's upsert. Receipt updates go to `read_receipts`, conversation-head updates to
//! `conversation_heads`, receipts for senders to `sender_receipts`; batching, fencing and
//! retries are the same for all.

use std::hash::Hash;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use tokio_postgres::types::ToSql;

use crate::serde::avro::WireDecoder;
use crate::serde::registry::SchemaResolver;
use crate::serde::{DecodeError, SerdeError};

use crate::ids::{ConversationId, Id, IdType, IdTypes};
use crate::ids::{ReaderId, SenderId};
use crate::model::{HeadUpdate, ReceiptUpdate, SenderReceipt, StateKey};
use crate::serde::avro::AvroReceiptUpdate;
use crate::serde::message::{AvroConversationHead, AvroSenderReceipt};

/// Column arrays bound to an upsert (the shape `unnest` takes).
pub type Columns = Vec<Box<dyn ToSql + Sync + Send>>;

/// How the sink reads its topic's records into rows.
pub trait RowDecoder<R>: Send {
    /// Fetch what decoding `value` needs (an Avro writer schema).
    fn prepare<'a>(&'a mut self, value: &'a [u8]) -> BoxFuture<'a, Result<(), SerdeError>>;
    /// The row of the record at `offset` (`value` `None`: a tombstone).
    fn decode(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        offset: i64,
    ) -> Result<R, DecodeError>;
}

/// Rows of an Avro output topic (Confluent wire format), through the serde mirror `A`.
pub struct AvroRows<A> {
    inner: WireDecoder<A>,
}

impl<A: DeserializeOwned> AvroRows<A> {
    /// Boxed, for [`SinkRow::decoder`]: `schema` is the topic's reader schema.
    pub fn boxed<R>(
        resolver: Arc<dyn SchemaResolver>,
        schema: &str,
    ) -> Result<Box<dyn RowDecoder<R>>, SerdeError>
    where
        A: Into<R> + Send + 'static,
    {
        Ok(Box::new(Self {
            inner: WireDecoder::new(resolver, schema)?,
        }))
    }
}

impl<R, A: DeserializeOwned + Into<R> + Send> RowDecoder<R> for AvroRows<A> {
    fn prepare<'a>(&'a mut self, value: &'a [u8]) -> BoxFuture<'a, Result<(), SerdeError>> {
        Box::pin(self.inner.prepare(std::iter::once(Some(value))))
    }

    fn decode(&self, _: Option<&[u8]>, value: Option<&[u8]>, _: i64) -> Result<R, DecodeError> {
        let value = value.ok_or(DecodeError::EmptyValue)?;
        self.inner.decode(value).map(Into::into)
    }
}

pub trait SinkRow: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// One row per key: the highest version wins.
    type Key: Hash + Eq + Clone + Send + Sync + std::fmt::Debug;
    /// The migrations its table needs.
    const MIGRATIONS: &'static [super::migrate::Migration];

    /// How its topic's records are read, for the topology's id types.
    fn decoder(
        resolver: Arc<dyn SchemaResolver>,
        ids: &IdTypes,
    ) -> Result<Box<dyn RowDecoder<Self>>, SerdeError>;
    /// The table's id columns and their declared types (checked against an existing table).
    fn id_columns(ids: &IdTypes) -> Vec<(&'static str, IdType)>;
    fn key(&self) -> Self::Key;
    fn version(&self) -> i64;
    /// The record key on its topic (a rejected row's dead letter carries it).
    fn record_key(&self) -> String;
    /// The version-guarded set-based upsert into `table` (parameters: [`Self::columns`]).
    fn upsert_sql(table: &str, ids: &IdTypes) -> String;
    fn columns(rows: &[Self], ids: &IdTypes) -> Columns;
    /// The row as JSON, for a rejected row's dead letter.
    fn to_json(&self) -> String;
}

impl SinkRow for ReceiptUpdate {
    type Key = StateKey;
    const MIGRATIONS: &'static [super::migrate::Migration] = super::migrate::MIGRATIONS;

    fn decoder(
        resolver: Arc<dyn SchemaResolver>,
        ids: &IdTypes,
    ) -> Result<Box<dyn RowDecoder<Self>>, SerdeError> {
        AvroRows::<AvroReceiptUpdate>::boxed(resolver, &crate::serde::receipt_update_schema(ids))
    }

    fn id_columns(ids: &IdTypes) -> Vec<(&'static str, IdType)> {
        vec![
            ("conversation_id", ids.conversation),
            ("reader_id", ids.user),
            ("sender_id", ids.user),
            ("message_id", ids.message),
        ]
    }

    fn key(&self) -> StateKey {
        ReceiptUpdate::key(self)
    }

    fn record_key(&self) -> String {
        self.conversation_id.to_string()
    }

    fn version(&self) -> i64 {
        self.version
    }

    fn upsert_sql(table: &str, ids: &IdTypes) -> String {
        let (c, u, m) = (
            param(1, ids.conversation),
            param(2, ids.user),
            param(4, ids.message),
        );
        let sd = param(5, ids.user);
        format!(
            "INSERT INTO {table} AS r (conversation_id, reader_id, last_read_seq, message_id, sender_id,
                device_id, read_at, version, events_total, stale_total, updated_at)
         SELECT c, rd, s, m, sd, d,
                CASE WHEN ra IS NULL THEN NULL
                     ELSE timestamptz 'epoch' + ra * interval '1 millisecond' END,
                v, et, st, now()
         FROM unnest({c}, {u}, $3::int8[], {m}, {sd}, $6::text[],
                     $7::int8[], $8::int8[], $9::int8[], $10::int8[])
              AS t(c, rd, s, m, sd, d, ra, v, et, st)
         ON CONFLICT (conversation_id, reader_id) DO UPDATE SET
                last_read_seq = EXCLUDED.last_read_seq, message_id = EXCLUDED.message_id,
                sender_id = EXCLUDED.sender_id, device_id = EXCLUDED.device_id,
                read_at = EXCLUDED.read_at, version = EXCLUDED.version,
                events_total = EXCLUDED.events_total, stale_total = EXCLUDED.stale_total,
                updated_at = EXCLUDED.updated_at
         WHERE r.version < EXCLUDED.version"
        )
    }

    fn columns(rows: &[Self], ids: &IdTypes) -> Columns {
        let owned = |f: fn(&ReceiptUpdate) -> Option<String>| -> Vec<Option<String>> {
            rows.iter().map(f).collect()
        };
        let longs = |f: fn(&ReceiptUpdate) -> i64| -> Vec<i64> { rows.iter().map(f).collect() };
        vec![
            id_column(
                ids.conversation,
                rows.iter().map(|u| Some(&u.conversation_id.0)),
            ),
            id_column(ids.user, rows.iter().map(|u| Some(&u.reader_id.0))),
            Box::new(longs(|u| u.last_read_seq)),
            text_id_column(ids.message, rows.iter().map(|u| u.message_id.as_deref())),
            id_column(
                ids.user,
                rows.iter().map(|u| u.sender_id.as_ref().map(|s| &s.0)),
            ),
            Box::new(owned(|u| u.device_id.clone())),
            Box::new(rows.iter().map(|u| u.read_at_ms).collect::<Vec<_>>()),
            Box::new(longs(|u| u.version)),
            Box::new(longs(|u| u.events_total)),
            Box::new(longs(|u| u.stale_total)),
        ]
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "conversation_id": self.conversation_id.0,
            "reader_id": self.reader_id.0,
            "last_read_seq": self.last_read_seq,
            "message_id": self.message_id,
            "sender_id": self.sender_id.as_ref().map(|s| &s.0),
            "device_id": self.device_id,
            "read_at_ms": self.read_at_ms,
            "version": self.version,
            "events_total": self.events_total,
            "stale_total": self.stale_total,
        })
        .to_string()
    }
}

impl SinkRow for HeadUpdate {
    type Key = ConversationId;
    const MIGRATIONS: &'static [super::migrate::Migration] = super::migrate::HEAD_MIGRATIONS;

    fn decoder(
        resolver: Arc<dyn SchemaResolver>,
        ids: &IdTypes,
    ) -> Result<Box<dyn RowDecoder<Self>>, SerdeError> {
        let schema = crate::serde::conversation_head_schema(ids);
        AvroRows::<AvroConversationHead>::boxed(resolver, &schema)
    }

    fn id_columns(ids: &IdTypes) -> Vec<(&'static str, IdType)> {
        vec![("conversation_id", ids.conversation)]
    }

    fn key(&self) -> ConversationId {
        self.conversation_id.clone()
    }

    fn record_key(&self) -> String {
        self.conversation_id.to_string()
    }

    fn version(&self) -> i64 {
        self.version
    }

    /// The window travels as arrays (one row per conversation, never per member); arrays
    /// of arrays do not unnest, so each row's arrays are passed as one JSON document.
    fn upsert_sql(table: &str, ids: &IdTypes) -> String {
        let c = param(1, ids.conversation);
        let users = ids.user.sql();
        format!(
            "INSERT INTO {table} AS h (conversation_id, head_seq, message_count, version,
                window_floor_seq, recent_seqs, recent_senders, mention_seqs, mention_user_ids,
                everyone_seqs, updated_at)
         SELECT c, hs, mc, v, f,
                ARRAY(SELECT jsonb_array_elements_text(w->'recent_seqs')::int8),
                ARRAY(SELECT jsonb_array_elements_text(w->'recent_senders')::{users}),
                ARRAY(SELECT jsonb_array_elements_text(w->'mention_seqs')::int8),
                ARRAY(SELECT jsonb_array_elements_text(w->'mention_user_ids')::{users}),
                ARRAY(SELECT jsonb_array_elements_text(w->'everyone_seqs')::int8),
                now()
         FROM unnest({c}, $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::jsonb[])
              AS t(c, hs, mc, v, f, w)
         ON CONFLICT (conversation_id) DO UPDATE SET
                head_seq = EXCLUDED.head_seq, message_count = EXCLUDED.message_count,
                version = EXCLUDED.version, window_floor_seq = EXCLUDED.window_floor_seq,
                recent_seqs = EXCLUDED.recent_seqs, recent_senders = EXCLUDED.recent_senders,
                mention_seqs = EXCLUDED.mention_seqs,
                mention_user_ids = EXCLUDED.mention_user_ids,
                everyone_seqs = EXCLUDED.everyone_seqs, updated_at = EXCLUDED.updated_at
         WHERE h.version < EXCLUDED.version"
        )
    }

    fn columns(rows: &[Self], ids: &IdTypes) -> Columns {
        let longs = |f: fn(&HeadUpdate) -> i64| -> Vec<i64> { rows.iter().map(f).collect() };
        let windows: Vec<serde_json::Value> = rows
            .iter()
            .map(|u| {
                serde_json::json!({
                    "recent_seqs": u.recent_seqs,
                    "recent_senders": u.recent_senders,
                    "mention_seqs": u.mention_seqs,
                    "mention_user_ids": u.mention_user_ids,
                    "everyone_seqs": u.everyone_seqs,
                })
            })
            .collect();
        vec![
            id_column(
                ids.conversation,
                rows.iter().map(|u| Some(&u.conversation_id.0)),
            ),
            Box::new(longs(|u| u.head_seq)),
            Box::new(longs(|u| u.message_count)),
            Box::new(longs(|u| u.version)),
            Box::new(longs(|u| u.window_floor_seq)),
            Box::new(windows),
        ]
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "conversation_id": self.conversation_id.0,
            "head_seq": self.head_seq,
            "message_count": self.message_count,
            "version": self.version,
            "window_floor_seq": self.window_floor_seq,
            "recent_seqs": self.recent_seqs.len(),
        })
        .to_string()
    }
}

impl SinkRow for SenderReceipt {
    type Key = (SenderId, ConversationId, ReaderId);
    const MIGRATIONS: &'static [super::migrate::Migration] =
        super::migrate::SENDER_RECEIPT_MIGRATIONS;

    fn decoder(
        resolver: Arc<dyn SchemaResolver>,
        ids: &IdTypes,
    ) -> Result<Box<dyn RowDecoder<Self>>, SerdeError> {
        let schema = crate::serde::sender_receipt_schema(ids);
        AvroRows::<AvroSenderReceipt>::boxed(resolver, &schema)
    }

    fn id_columns(ids: &IdTypes) -> Vec<(&'static str, IdType)> {
        vec![
            ("sender_id", ids.user),
            ("conversation_id", ids.conversation),
            ("reader_id", ids.user),
            ("message_id", ids.message),
        ]
    }

    fn key(&self) -> Self::Key {
        (
            self.sender_id.clone(),
            self.conversation_id.clone(),
            self.reader_id.clone(),
        )
    }

    /// The highest of the sender's messages read only grows with the reader's pointer.
    fn version(&self) -> i64 {
        self.message_seq
    }

    fn record_key(&self) -> String {
        self.sender_id.to_string()
    }

    fn upsert_sql(table: &str, ids: &IdTypes) -> String {
        let (sd, c, rd) = (
            param(1, ids.user),
            param(2, ids.conversation),
            param(3, ids.user),
        );
        let m = param(5, ids.message);
        format!(
            "INSERT INTO {table} AS s (sender_id, conversation_id, reader_id, message_seq,
                message_id, read_at, device_id, covers_older, updated_at)
         SELECT sd, c, rd, q, m, timestamptz 'epoch' + ra * interval '1 millisecond', d, co,
                now()
         FROM unnest({sd}, {c}, {rd}, $4::int8[], {m}, $6::int8[], $7::text[], $8::bool[])
              AS t(sd, c, rd, q, m, ra, d, co)
         ON CONFLICT (sender_id, conversation_id, reader_id) DO UPDATE SET
                message_seq = EXCLUDED.message_seq, message_id = EXCLUDED.message_id,
                read_at = EXCLUDED.read_at, device_id = EXCLUDED.device_id,
                covers_older = EXCLUDED.covers_older, updated_at = EXCLUDED.updated_at
         WHERE s.message_seq < EXCLUDED.message_seq"
        )
    }

    fn columns(rows: &[Self], ids: &IdTypes) -> Columns {
        vec![
            id_column(ids.user, rows.iter().map(|r| Some(&r.sender_id.0))),
            id_column(
                ids.conversation,
                rows.iter().map(|r| Some(&r.conversation_id.0)),
            ),
            id_column(ids.user, rows.iter().map(|r| Some(&r.reader_id.0))),
            Box::new(rows.iter().map(|r| r.message_seq).collect::<Vec<_>>()),
            text_id_column(ids.message, rows.iter().map(|r| r.message_id.as_deref())),
            Box::new(rows.iter().map(|r| r.read_at_ms).collect::<Vec<_>>()),
            Box::new(rows.iter().map(|r| r.device_id.clone()).collect::<Vec<_>>()),
            Box::new(rows.iter().map(|r| r.covers_older).collect::<Vec<_>>()),
        ]
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "sender_id": self.sender_id.0,
            "conversation_id": self.conversation_id.0,
            "reader_id": self.reader_id.0,
            "message_seq": self.message_seq,
            "message_id": self.message_id,
            "read_at_ms": self.read_at_ms,
            "device_id": self.device_id,
            "covers_older": self.covers_older,
        })
        .to_string()
    }
}

/// A conversation's member list, from the members source (JSON): one row per
/// conversation, its version the record's offset (a conversation's lists are in one
/// partition, in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberListRow {
    pub conversation_id: ConversationId,
    pub members: Vec<ReaderId>,
    pub offset: i64,
}

/// Member lists (JSON, conversation from the key), for the members table.
pub struct MemberListRows {
    ids: IdTypes,
}

impl RowDecoder<MemberListRow> for MemberListRows {
    fn prepare<'a>(&'a mut self, _: &'a [u8]) -> BoxFuture<'a, Result<(), SerdeError>> {
        Box::pin(async { Ok(()) })
    }

    fn decode(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        offset: i64,
    ) -> Result<MemberListRow, DecodeError> {
        let max = crate::processor::node::MAX_MEMBERS;
        let list = crate::serde::members::decode_members(key, value, &self.ids, max)?;
        Ok(MemberListRow {
            conversation_id: list.conversation,
            members: list.members,
            offset,
        })
    }
}

impl SinkRow for MemberListRow {
    type Key = ConversationId;
    const MIGRATIONS: &'static [super::migrate::Migration] = super::migrate::MEMBER_MIGRATIONS;

    fn decoder(
        _: Arc<dyn SchemaResolver>,
        ids: &IdTypes,
    ) -> Result<Box<dyn RowDecoder<Self>>, SerdeError> {
        Ok(Box::new(MemberListRows { ids: *ids }))
    }

    fn id_columns(ids: &IdTypes) -> Vec<(&'static str, IdType)> {
        vec![("conversation_id", ids.conversation)]
    }

    fn key(&self) -> ConversationId {
        self.conversation_id.clone()
    }

    fn version(&self) -> i64 {
        self.offset
    }

    fn record_key(&self) -> String {
        self.conversation_id.to_string()
    }

    /// Arrays of arrays do not unnest: each row's members travel as one JSON document.
    fn upsert_sql(table: &str, ids: &IdTypes) -> String {
        let c = param(1, ids.conversation);
        let users = ids.user.sql();
        format!(
            "INSERT INTO {table} AS m (conversation_id, members, version, updated_at)
         SELECT c, ARRAY(SELECT jsonb_array_elements_text(ms)::{users}), v, now()
         FROM unnest({c}, $2::jsonb[], $3::int8[]) AS t(c, ms, v)
         ON CONFLICT (conversation_id) DO UPDATE SET
                members = EXCLUDED.members, version = EXCLUDED.version,
                updated_at = EXCLUDED.updated_at
         WHERE m.version < EXCLUDED.version"
        )
    }

    fn columns(rows: &[Self], ids: &IdTypes) -> Columns {
        let lists: Vec<serde_json::Value> = (rows.iter())
            .map(|r| serde_json::json!(r.members.iter().map(|m| m.to_string()).collect::<Vec<_>>()))
            .collect();
        vec![
            id_column(
                ids.conversation,
                rows.iter().map(|r| Some(&r.conversation_id.0)),
            ),
            Box::new(lists),
            Box::new(rows.iter().map(|r| r.offset).collect::<Vec<_>>()),
        ]
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "conversation_id": self.conversation_id.0,
            "members": self.members.len(),
            "offset": self.offset,
        })
        .to_string()
    }
}

/// A column of ids carried as text (message ids), bound as `ty`'s parameter type: integer
/// ids parsed (text that is not one binds NULL, refused by no column).
fn text_id_column<'a>(
    ty: IdType,
    ids: impl Iterator<Item = Option<&'a str>>,
) -> Box<dyn ToSql + Sync + Send> {
    match ty {
        IdType::I64 => Box::new(
            ids.map(|i| i.and_then(|s| s.parse::<i64>().ok()))
                .collect::<Vec<_>>(),
        ),
        IdType::String | IdType::Uuid => {
            Box::new(ids.map(|i| i.map(str::to_owned)).collect::<Vec<_>>())
        }
    }
}

/// The `unnest` parameter `$n` for ids of type `ty`: bound as `int8[]` or `text[]`, and
/// UUIDs cast from text.
fn param(n: usize, ty: IdType) -> String {
    match ty {
        IdType::I64 => format!("${n}::int8[]"),
        IdType::String => format!("${n}::text[]"),
        IdType::Uuid => format!("${n}::text[]::uuid[]"),
    }
}

/// A column of ids bound as `ty`'s parameter type (see [`param`]).
fn id_column<'a>(
    ty: IdType,
    ids: impl Iterator<Item = Option<&'a Id>>,
) -> Box<dyn ToSql + Sync + Send> {
    match ty {
        IdType::I64 => Box::new(ids.map(|i| i.and_then(Id::as_int)).collect::<Vec<_>>()),
        IdType::String | IdType::Uuid => {
            Box::new(ids.map(|i| i.map(Id::to_string)).collect::<Vec<_>>())
        }
    }
}
