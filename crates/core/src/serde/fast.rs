//! The fast path for the common case: a read event written with exactly the reader schema.
//!
//! Avro's binary encoding of `read_event.avsc` is a fixed sequence of zig-zag varints,
//! union branch indexes and length-prefixed strings, so it can be read in one pass that
//! borrows the ids from the record's bytes instead of allocating them. This path only ever
//! *accepts* a record it has read completely and exactly; anything else (an unexpected
//! branch, an overlong varint, invalid UTF-8, trailing bytes) returns `None`, and the caller
//! hands the record to apache-avro, which decides and explains. So the fast path can be
//! stricter than apache-avro, never more lenient; `tests::agrees_with_apache_avro` checks it
//! against apache-avro on valid and corrupted records.

use std::borrow::Cow;

use crate::ids::{ConversationId, Id, ReaderId, SenderId};
use crate::model::{EventRef, ReceiptUpdate};

/// Reads the Avro binary encoding of the fields, in schema order.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A zig-zag varint `long` of at most 10 bytes.
    #[inline]
    fn long(&mut self) -> Option<i64> {
        let mut v: u64 = 0;
        for (i, &b) in self.buf.iter().enumerate().take(10) {
            if i == 9 && b > 1 {
                return None; // more than 64 bits
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Some((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        None
    }

    /// A string: a `long` length, then that many bytes of UTF-8.
    #[inline]
    fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.long()?).ok()?;
        if len > self.buf.len() {
            return None;
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        std::str::from_utf8(s).ok()
    }

    /// The branch of a `["null", T]` union: `false` for null, `true` for `T`.
    #[inline]
    fn present(&mut self) -> Option<bool> {
        match self.long()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    #[inline]
    fn opt_long(&mut self) -> Option<Option<i64>> {
        Some(if self.present()? {
            Some(self.long()?)
        } else {
            None
        })
    }

    #[inline]
    fn opt_string(&mut self) -> Option<Option<&'a str>> {
        Some(if self.present()? {
            Some(self.string()?)
        } else {
            None
        })
    }
}

/// Decode the Avro datum (without the wire header) of a read event written with the reader
/// schema, or `None` if it is not exactly such a datum.
#[inline]
pub fn decode_read_event(datum: &[u8]) -> Option<EventRef<'_>> {
    let mut c = Cursor { buf: datum };
    let reader_id = c.long()?;
    let conversation_id = c.long()?;
    let message_seq = c.long()?;
    let message_id = c.opt_string()?;
    let sender_id = c.opt_long()?;
    let device_id = c.opt_string()?;
    let read_at_ms = c.long()?;
    let _client = c.opt_string()?;
    let _trace_id = c.opt_string()?;
    if !c.buf.is_empty() {
        return None;
    }
    Some(EventRef {
        reader_id: ReaderId::from(reader_id),
        conversation_id: ConversationId::from(conversation_id),
        message_seq,
        message_id: message_id.map(Cow::Borrowed),
        sender_id: sender_id.map(SenderId::from),
        device_id: device_id.map(Cow::Borrowed),
        read_at_ms,
    })
}

/// Append the Avro binary encoding of `u` under `receipt_update.avsc` (without the wire
/// header): the same bytes apache-avro writes (`tests::update_encoding_matches_apache_avro`),
/// without building its serde record or cloning the ids.
pub fn encode_receipt_update(u: &ReceiptUpdate, out: &mut Vec<u8>) {
    put_id(out, &u.conversation_id.0);
    put_id(out, &u.reader_id.0);
    put_long(out, u.last_read_seq);
    put_opt_string(out, u.message_id.as_deref());
    match &u.sender_id {
        Some(s) => {
            put_long(out, 1);
            put_id(out, &s.0);
        }
        None => put_long(out, 0),
    }
    put_opt_string(out, u.device_id.as_deref());
    put_opt_long(out, u.read_at_ms);
    for v in [
        u.version,
        u.events_folded,
        u.stale_events,
        u.events_total,
        u.stale_total,
        u.emitted_at_ms,
    ] {
        put_long(out, v);
    }
    put_opt_long(out, u.counts.map(|c| c.unread));
    put_opt_long(out, u.counts.map(|c| c.mentions));
    out.push(u8::from(u.counts.is_some_and(|c| c.capped)));
}

/// Append `v` as an Avro long (zigzag varint).
#[inline]
pub(crate) fn put_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// An id as the schema of the topology's id types has it: a `long` for integers, else a
/// `string` (the logical type `uuid` is a string too).
#[inline]
pub(crate) fn put_id(out: &mut Vec<u8>, id: &Id) {
    match id.as_int() {
        Some(v) => put_long(out, v),
        None => {
            let at = out.len();
            out.push(0);
            id.write_key(out);
            let len = out.len() - at - 1;
            if len < 64 {
                out[at] = (len as u8) << 1;
            } else {
                let text = out.split_off(at + 1);
                out.truncate(at);
                put_long(out, len as i64);
                out.extend_from_slice(&text);
            }
        }
    }
}

#[inline]
fn put_opt_long(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => {
            put_long(out, 1);
            put_long(out, v);
        }
        None => put_long(out, 0),
    }
}

#[inline]
pub(crate) fn put_opt_string(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(s) => {
            put_long(out, 1);
            put_long(out, s.len() as i64);
            out.extend_from_slice(s.as_bytes());
        }
        None => put_long(out, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReadEvent;
    use crate::serde::avro::{AvroReadEvent, DecodedReadEvent, EventEncoder};
    use crate::serde::registry::LOCAL_READ_EVENT_ID;
    use crate::serde::READ_EVENT_SCHEMA;
    use proptest::prelude::*;

    fn avro_event() -> impl Strategy<Value = AvroReadEvent> {
        let id = proptest::option::of("[a-z0-9\\-é]{0,40}");
        (
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            id.clone(),
            proptest::option::of(any::<i64>()),
            id.clone(),
            any::<i64>(),
            id.clone(),
            id,
        )
            .prop_map(|(r, c, s, m, snd, d, at, cl, tr)| AvroReadEvent {
                reader_id: Id::int(r),
                conversation_id: Id::int(c),
                message_seq: s,
                message_id: m,
                sender_id: snd.map(Id::int),
                device_id: d,
                read_at: at,
                client: cl,
                trace_id: tr,
            })
    }

    /// apache-avro's reading of the datum, as the fast path's fields.
    fn reference(datum: &[u8]) -> Option<ReadEvent> {
        let schema = apache_avro::Schema::parse_str(READ_EVENT_SCHEMA).unwrap();
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap();
        let mut rest = datum;
        let d: DecodedReadEvent = reader.read_deser(&mut rest).ok()?;
        if !rest.is_empty() {
            return None;
        }
        Some(d.into_event())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn update_encoding_matches_apache_avro(
            ids in any::<(i64, i64, i64, i64, i64, i64, i64, i64, i64)>(),
            message_id in proptest::option::of("[a-z0-9\\-é]{0,40}"),
            device_id in proptest::option::of("[a-z0-9\\-é]{0,40}"),
            sender in proptest::option::of(any::<i64>()),
            read_at in proptest::option::of(any::<i64>()),
            counts in proptest::option::of(any::<(i64, i64, bool)>()),
            text in proptest::option::of(("[a-zA-Z0-9_\\-é]{0,70}", any::<u128>())),
        ) {
            use crate::ids::{IdType, IdTypes};
            use crate::serde::avro::{AvroReceiptUpdate, UpdateEncoder};
            // Integer ids under the bundled schema; or string conversations, uuid users and
            // message ids under the generated one.
            let (conversation, reader, sender_id, message_id, ids_types) = match &text {
                None => (Id::int(ids.0), Id::int(ids.1), sender.map(Id::int), message_id, IdTypes::default()),
                Some((t, u)) => {
                    let uuid = |n: u128| Id::uuid(n.to_be_bytes());
                    let types = IdTypes { conversation: IdType::String, user: IdType::Uuid, message: IdType::Uuid };
                    (Id::text(t).unwrap(), uuid(*u), sender.map(|s| uuid(s as u128)), Some(uuid(!u).to_string()), types)
                }
            };
            let u = ReceiptUpdate {
                conversation_id: ConversationId(conversation),
                reader_id: ReaderId(reader),
                last_read_seq: ids.2,
                message_id,
                sender_id: sender_id.map(SenderId),
                device_id,
                read_at_ms: read_at,
                version: ids.3,
                events_folded: ids.4,
                stale_events: ids.5,
                events_total: ids.6,
                stale_total: ids.7,
                emitted_at_ms: ids.8,
                counts: counts.map(|(unread, mentions, capped)| crate::model::UnreadCounts { unread, mentions, capped }),
            };
            let schema = crate::serde::receipt_update_schema(&ids_types);
            let reference = UpdateEncoder::new(&schema, 3)
                .unwrap()
                .encode(&AvroReceiptUpdate::from(&u))
                .unwrap();
            let mut ours = Vec::new();
            encode_receipt_update(&u, &mut ours);
            prop_assert_eq!(&ours[..], &reference[5..]);
            // And back, through apache-avro's reading of the generated schema.
            let reg = std::sync::Arc::new(crate::serde::LocalRegistry::new().with_schema(3, &schema));
            let dec = crate::serde::avro::UpdateDecoder::new(reg, &schema).unwrap();
            let mut dec = dec;
            futures::executor::block_on(dec.prepare(std::iter::once(Some(&reference[..])))).unwrap();
            prop_assert_eq!(ReceiptUpdate::from(dec.decode(&reference).unwrap()), u);
        }

        #[test]
        fn agrees_with_apache_avro(e in avro_event(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
            let enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID).unwrap();
            let framed = enc.encode(&e).unwrap();
            let mut datum = framed[5..].to_vec();
            // Valid records decode identically.
            let fast = decode_read_event(&datum).map(EventRef::into_owned);
            prop_assert_eq!(fast.clone(), reference(&datum));
            prop_assert!(fast.is_some());
            // Corrupted ones: whatever the fast path accepts, apache-avro accepts the same.
            for (i, b) in flips {
                let at = i.index(datum.len());
                datum[at] = b;
            }
            if truncate {
                datum.truncate(cut.index(datum.len() + 1));
            }
            if let Some(f) = decode_read_event(&datum) {
                prop_assert_eq!(Some(f.into_owned()), reference(&datum));
            }
        }
    }

    #[test]
    fn rejects_what_it_does_not_fully_read() {
        let enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID).unwrap();
        let e = AvroReadEvent {
            reader_id: Id::int(1),
            conversation_id: Id::int(2),
            message_seq: 3,
            message_id: Some("m".into()),
            sender_id: None,
            device_id: Some("d".into()),
            read_at: 4,
            client: None,
            trace_id: None,
        };
        let datum = enc.encode(&e).unwrap()[5..].to_vec();
        let got = decode_read_event(&datum).unwrap();
        assert_eq!(got.message_id.as_deref(), Some("m"));
        assert!(matches!(got.device_id, Some(Cow::Borrowed("d"))));
        let mut long = datum.clone();
        long.push(0);
        assert!(decode_read_event(&long).is_none(), "trailing byte");
        assert!(decode_read_event(&datum[..datum.len() - 1]).is_none());
        let mut bad_branch = datum.clone();
        bad_branch[3] = 4; // message_id's union index: 2 is not a branch
        assert!(decode_read_event(&bad_branch).is_none());
        assert!(
            decode_read_event(&[0xff; 11]).is_none(),
            "varint over 10 bytes"
        );
    }
}
