//! Avro sources in the users' own schema: a Confluent-framed Avro record (any writer
//! schema the registry has) read through a `[source.fields]` mapping, as JSON sources are.
//!
//! Each record is decoded with its writer schema into apache-avro's generic value, then
//! each mapped path is looked up (record fields by name, map entries by key, through
//! unions) and read by the same role rules as JSON (`json::Captured`): ids of the
//! declared `[ids]` types (`long`, `string`, `uuid`), positions, times in the declared
//! unit (`long` or `timestamp-*` logical types in that unit), mentions as an array.
//! Slower than the built-in schema's fast path: mapped sources are for events readstate
//! does not define.

use std::borrow::Cow;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;

use super::avro::{leak_schema, WriterSchemas};
use super::json::{Captured, FieldMapping, Scalar, ROLES};
use super::DecodeError;
use crate::model::{EventRef, MessageEvent};

/// Decodes Confluent-framed Avro records of any writer schema through a field mapping.
pub struct AvroMappedDecoder {
    mapping: FieldMapping,
    schemas: WriterSchemas<GenericDatumReader<'static>>,
    max_record_bytes: usize,
}

impl AvroMappedDecoder {
    pub fn new(mapping: FieldMapping, max_record_bytes: usize) -> Self {
        Self {
            mapping,
            schemas: WriterSchemas::new(),
            max_record_bytes,
        }
    }

    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    /// Whether writer schema `id` must be fetched.
    pub fn needs_fetch(&self, id: u32) -> bool {
        self.schemas.needs_fetch(id)
    }

    /// The registry's answer for writer schema `id` (`None`: not found).
    pub fn install(&mut self, id: u32, text: Option<&str>) {
        self.schemas.install(id, text, |text| {
            let bad = |reason: String| DecodeError::IncompatibleSchema { id, reason };
            let writer = leak_schema(text).map_err(|e| bad(e.to_string()))?;
            GenericDatumReader::builder(writer)
                .build()
                .map_err(|e| bad(e.to_string()))
        });
    }

    /// The writer schema id of `payload` when it has not been resolved yet.
    pub fn unknown_schema(&self, payload: Option<&[u8]>) -> Option<u32> {
        self.schemas.unknown_schema(payload)
    }

    /// Decode and validate one read event.
    pub fn decode_ref<'a>(&self, payload: Option<&[u8]>) -> Result<EventRef<'a>, DecodeError> {
        let value = self.datum(payload)?;
        Captured::new(self.found(&value), &self.mapping).read_event()
    }

    /// Decode and validate one message event.
    pub fn decode_message(&self, payload: Option<&[u8]>) -> Result<MessageEvent, DecodeError> {
        let value = self.datum(payload)?;
        Captured::new(self.found(&value), &self.mapping).message_event()
    }

    /// The record's generic value, decoded with its writer schema.
    fn datum(&self, payload: Option<&[u8]>) -> Result<Value, DecodeError> {
        let payload = payload.ok_or(DecodeError::EmptyValue)?;
        if payload.len() > self.max_record_bytes {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                limit: self.max_record_bytes,
            });
        }
        let (id, reader, mut datum) = self.schemas.plan_of(payload)?;
        let malformed = |reason: String| DecodeError::Malformed { id, reason };
        let value = (reader.read_value(&mut datum)).map_err(|e| malformed(e.to_string()))?;
        if !datum.is_empty() {
            return Err(malformed(format!("{} bytes after the datum", datum.len())));
        }
        Ok(value)
    }

    /// Each mapped role's value in `record`.
    fn found(&self, record: &Value) -> [Option<Scalar<'static>>; ROLES] {
        std::array::from_fn(|i| {
            let path = self.mapping.paths[i].as_ref()?;
            at(record, path).map(scalar)
        })
    }
}

/// The value at `path` below `v`: record fields by name, map entries by key, through
/// unions.
fn at<'v>(v: &'v Value, path: &[String]) -> Option<&'v Value> {
    let v = match v {
        Value::Union(_, inner) => inner,
        v => v,
    };
    let Some((first, rest)) = path.split_first() else {
        return Some(v);
    };
    let child = match v {
        Value::Record(fields) => fields.iter().find(|(n, _)| n == first).map(|(_, v)| v),
        Value::Map(entries) => entries.get(first),
        _ => None,
    }?;
    at(child, rest)
}

/// A field as the role rules read it: integers (with the date and time logical types),
/// floating point, text (strings, enum symbols, UUIDs), booleans, null, arrays.
fn scalar(v: &Value) -> Scalar<'static> {
    match v {
        Value::Union(_, inner) => scalar(inner),
        Value::Null => Scalar::Null,
        Value::Boolean(b) => Scalar::Bool(*b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => Scalar::Int(i64::from(*i)),
        Value::Long(i)
        | Value::TimeMicros(i)
        | Value::TimestampMillis(i)
        | Value::TimestampMicros(i)
        | Value::TimestampNanos(i)
        | Value::LocalTimestampMillis(i)
        | Value::LocalTimestampMicros(i)
        | Value::LocalTimestampNanos(i) => Scalar::Int(*i),
        Value::Float(f) => Scalar::Float(f64::from(*f)),
        Value::Double(f) => Scalar::Float(*f),
        Value::String(s) | Value::Enum(_, s) => Scalar::Str(Cow::Owned(s.clone())),
        Value::Uuid(u) => Scalar::Str(Cow::Owned(u.to_string())),
        Value::Array(items) => Scalar::List(items.iter().map(scalar).collect()),
        _ => Scalar::Nested,
    }
}

#[cfg(test)]
mod tests;
