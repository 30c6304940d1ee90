//! Byte layout of the read-state store and its changelog.
//!
//! Keys are a tag, then conversation id and reader id in an order-preserving encoding
//! ([`StoreKey`]). All readers of one conversation therefore share the prefix
//! `tag ‖ conversation`, and a prefix scan lists them in reader order.
//!
//! Values are a compact versioned binary record ([`ReadState::encode`]), the same bytes in
//! the store and in the changelog topic.
//!
//! Every cache, flush and restore reads and writes entries through an [`EntryCodec`]:
//! the key type, its bytes and the value's bytes of one kind of entry ([`ReadStates`],
//! [`Heads`]).

use compact_str::CompactString;
use smallvec::SmallVec;

use crate::ids::{ConversationId, Id, IdType, ReaderId, SenderId};
use crate::model::{ReceiptUpdate, StateKey};

/// Tag of a read-state entry.
pub const TAG_STATE: u8 = b's';
/// Tag of the pending-emit index (advances held back by the minimum emit interval).
pub const TAG_PENDING: u8 = b'p';
/// Tag of a conversation head (`state::head`); the reader half of its key is zero.
pub const TAG_HEAD: u8 = b'h';
/// Tag of a conversation's members and its last emitted read-by figures
/// (`processor::groups`); the reader half of its key is zero.
pub const TAG_GROUP: u8 = b'g';

const SIGN: u64 = 1 << 63;
/// Set on the tag of a key whose ids are not both integers (see [`StoreKey`]).
const EXTENDED: u8 = 0x80;

/// Encoded store key. When both ids are integers: 17 bytes, the tag, then conversation and
/// reader as order-preserving big-endian integers (sign bit flipped), the layout of every
/// earlier version. Otherwise the tag with its high bit set, then each id's
/// self-delimiting, order-preserving key form ([`Id::encode_key`]). Either way all readers
/// of one conversation share a prefix ([`StoreKey::conversation_prefix`]) and a prefix
/// scan lists them in reader order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(SmallVec<[u8; 40]>);

impl StoreKey {
    pub fn new(tag: u8, key: &StateKey) -> Self {
        Self::of(tag, &key.conversation.0, &key.reader.0)
    }

    fn of(tag: u8, conversation: &Id, reader: &Id) -> Self {
        let mut b = SmallVec::new();
        match (conversation.as_int(), reader.as_int()) {
            (Some(c), Some(r)) => {
                b.push(tag);
                b.extend_from_slice(&((c as u64) ^ SIGN).to_be_bytes());
                b.extend_from_slice(&((r as u64) ^ SIGN).to_be_bytes());
            }
            _ => {
                b.push(tag | EXTENDED);
                conversation.encode_key(&mut b);
                reader.encode_key(&mut b);
            }
        }
        Self(b)
    }

    pub fn state(key: &StateKey) -> Self {
        Self::new(TAG_STATE, key)
    }

    pub fn pending(key: &StateKey) -> Self {
        Self::new(TAG_PENDING, key)
    }

    pub fn head(conversation: &ConversationId) -> Self {
        Self::of(TAG_HEAD, &conversation.0, &Id::int(0))
    }

    pub fn group(conversation: &ConversationId) -> Self {
        Self::of(TAG_GROUP, &conversation.0, &Id::int(0))
    }

    /// The prefix shared by every reader of `conversation` under `tag`, where readers'
    /// ids are of type `readers`.
    pub fn conversation_prefix(tag: u8, conversation: &ConversationId, readers: IdType) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        match (conversation.as_int(), readers) {
            (Some(c), IdType::I64) => {
                b.push(tag);
                b.extend_from_slice(&((c as u64) ^ SIGN).to_be_bytes());
            }
            _ => {
                b.push(tag | EXTENDED);
                conversation.0.encode_key(&mut b);
            }
        }
        b
    }

    /// Decode a key; `None` when the bytes are not a key in either layout.
    pub fn decode(bytes: &[u8]) -> Option<(u8, StateKey)> {
        let (&tag, rest) = bytes.split_first()?;
        let (conversation, reader) = if tag & EXTENDED == 0 {
            if rest.len() != 16 {
                return None;
            }
            let c = u64::from_be_bytes(rest[..8].try_into().ok()?) ^ SIGN;
            let r = u64::from_be_bytes(rest[8..].try_into().ok()?) ^ SIGN;
            (Id::int(c as i64), Id::int(r as i64))
        } else {
            let (c, n) = Id::decode_key(rest)?;
            let (r, m) = Id::decode_key(&rest[n..])?;
            let canonical = c.as_int().is_none() || r.as_int().is_none();
            if n + m != rest.len() || !canonical {
                return None;
            }
            (c, r)
        };
        Some((
            tag & !EXTENDED,
            StateKey {
                conversation: ConversationId::from(conversation),
                reader: ReaderId::from(reader),
            },
        ))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Every entry under `tag`, in both key layouts.
    pub fn scan_tag(
        store: &dyn super::KeyValueStore,
        tag: u8,
    ) -> Result<Vec<super::Entry>, super::StoreError> {
        let mut entries = store.scan_prefix(&[tag])?;
        entries.extend(store.scan_prefix(&[tag | EXTENDED])?);
        Ok(entries)
    }
}

/// How one kind of store entry becomes bytes, in the store and in its changelog alike.
pub trait EntryCodec {
    type Key: Clone;
    type Value;
    /// The encoded key (tag first): fixed-size for integer ids, owned bytes for strings.
    type KeyBytes: AsRef<[u8]>;

    fn encode_key(key: &Self::Key) -> Self::KeyBytes;
    /// `None` when the bytes are not a key of this entry.
    fn decode_key(bytes: &[u8]) -> Option<Self::Key>;
    fn encode_value(value: &Self::Value, out: &mut Vec<u8>);
    fn decode_value(bytes: &[u8]) -> Result<Self::Value, String>;
}

/// Read states: (conversation, reader) → [`ReadState`], tag `s`.
pub struct ReadStates;

impl EntryCodec for ReadStates {
    type Key = StateKey;
    type Value = ReadState;
    type KeyBytes = StoreKey;

    fn encode_key(key: &StateKey) -> StoreKey {
        StoreKey::state(key)
    }

    fn decode_key(bytes: &[u8]) -> Option<StateKey> {
        StoreKey::decode(bytes)
            .filter(|(tag, _)| *tag == TAG_STATE)
            .map(|(_, k)| k)
    }

    fn encode_value(value: &ReadState, out: &mut Vec<u8>) {
        value.encode(out)
    }

    fn decode_value(bytes: &[u8]) -> Result<ReadState, String> {
        ReadState::decode(bytes)
    }
}

/// Conversation heads: conversation → [`ConversationHead`](super::head::ConversationHead),
/// tag `h`.
pub struct Heads;

impl EntryCodec for Heads {
    type Key = ConversationId;
    type Value = super::head::ConversationHead;
    type KeyBytes = StoreKey;

    fn encode_key(key: &ConversationId) -> StoreKey {
        StoreKey::head(key)
    }

    fn decode_key(bytes: &[u8]) -> Option<ConversationId> {
        StoreKey::decode(bytes)
            .filter(|(tag, _)| *tag == TAG_HEAD)
            .map(|(_, k)| k.conversation)
    }

    fn encode_value(value: &Self::Value, out: &mut Vec<u8>) {
        value.encode(out)
    }

    fn decode_value(bytes: &[u8]) -> Result<Self::Value, String> {
        super::head::ConversationHead::decode(bytes)
    }
}

/// Load the entries of `keys` from `store` with one `multi_get`; an undecodable value is
/// a [`StoreError::Corrupt`](super::StoreError::Corrupt) naming the store and key.
pub fn load<C: EntryCodec>(
    store: &dyn super::KeyValueStore,
    keys: &[C::Key],
) -> Result<Vec<Option<C::Value>>, super::StoreError> {
    let encoded: Vec<C::KeyBytes> = keys.iter().map(C::encode_key).collect();
    let refs: Vec<&[u8]> = encoded.iter().map(AsRef::as_ref).collect();
    let values = store.multi_get(&refs)?;
    encoded
        .iter()
        .zip(values)
        .map(|(k, v)| match v {
            None => Ok(None),
            Some(b) => C::decode_value(&b)
                .map(Some)
                .map_err(|reason| super::StoreError::Corrupt {
                    store: store.name().clone(),
                    key: k.as_ref().to_vec(),
                    reason,
                }),
        })
        .collect()
}

/// Load one entry (see [`load`]).
pub fn get<C: EntryCodec>(
    store: &dyn super::KeyValueStore,
    key: &C::Key,
) -> Result<Option<C::Value>, super::StoreError> {
    Ok(load::<C>(store, std::slice::from_ref(key))?.pop().flatten())
}

impl AsRef<[u8]> for StoreKey {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Replay mark: the highest offset folded from one origin topic-partition.
pub type Mark = (u32, i64);
/// A key's replay marks: one, inline, unless its events came from several partitions.
pub type Marks = SmallVec<[Mark; 1]>;

/// The state of one (conversation, reader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadState {
    /// The pointer: every message with seq <= this is read. `-1` before the first event.
    pub last_read_seq: i64,
    /// Ids up to 24 bytes are stored inline (no allocation per cached key).
    pub message_id: Option<CompactString>,
    pub sender_id: Option<SenderId>,
    pub device_id: Option<CompactString>,
    pub read_at_ms: i64,
    /// Number of advances so far.
    pub version: i64,
    /// Version of the last emitted update (`0`: none yet).
    pub emitted_version: i64,
    /// The pointer of the last emitted update (`-1`: none yet): an emitted advance went
    /// from it to `last_read_seq` (sender receipts name the messages in between).
    pub emitted_seq: i64,
    /// Wall-clock millis of the last emitted update (`i64::MIN`: never).
    pub last_emit_ms: i64,
    pub events_total: i64,
    pub stale_total: i64,
    pub events_since_emit: i64,
    pub stale_since_emit: i64,
    /// Highest source offset folded, per origin topic-partition (see `ids::Origin`).
    pub marks: Marks,
}

impl Default for ReadState {
    fn default() -> Self {
        Self {
            last_read_seq: -1,
            message_id: None,
            sender_id: None,
            device_id: None,
            read_at_ms: 0,
            version: 0,
            emitted_version: 0,
            emitted_seq: -1,
            last_emit_ms: i64::MIN,
            events_total: 0,
            stale_total: 0,
            events_since_emit: 0,
            stale_since_emit: 0,
            marks: Marks::new(),
        }
    }
}

/// Sender id as a little-endian integer (every earlier version).
const FORMAT_V1: u8 = 1;
/// Sender id in [`Id`]'s value form (any id type).
const FORMAT_V2: u8 = 2;
/// Added to the format when `emitted_seq` follows the marks: only while an advance is
/// held back (otherwise it is the pointer, or -1 before the first emit).
const WITH_EMITTED_SEQ: u8 = 2;

impl ReadState {
    /// True when the pointer advanced beyond what was last emitted.
    pub fn has_unemitted_advance(&self) -> bool {
        self.version > self.emitted_version
    }

    /// The update describing this state now.
    pub fn to_update(&self, key: StateKey, emitted_at_ms: i64) -> ReceiptUpdate {
        ReceiptUpdate {
            conversation_id: key.conversation,
            reader_id: key.reader,
            last_read_seq: self.last_read_seq,
            message_id: self.message_id.as_deref().map(str::to_owned),
            sender_id: self.sender_id.clone(),
            device_id: self.device_id.as_deref().map(str::to_owned),
            read_at_ms: Some(self.read_at_ms),
            version: self.version,
            events_folded: self.events_since_emit,
            stale_events: self.stale_since_emit,
            events_total: self.events_total,
            stale_total: self.stale_total,
            emitted_at_ms,
            counts: None,
        }
    }

    /// Append the binary form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let int_sender = self.sender_id.as_ref().is_none_or(|s| s.as_int().is_some());
        let derived = self.emitted_seq
            == derived_emitted_seq(self.version, self.emitted_version, self.last_read_seq);
        let format = if int_sender { FORMAT_V1 } else { FORMAT_V2 };
        out.push(if derived {
            format
        } else {
            format + WITH_EMITTED_SEQ
        });
        for v in [
            self.last_read_seq,
            self.read_at_ms,
            self.version,
            self.emitted_version,
            self.last_emit_ms,
            self.events_total,
            self.stale_total,
            self.events_since_emit,
            self.stale_since_emit,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        match &self.sender_id {
            Some(s) => {
                out.push(1);
                match s.as_int() {
                    Some(v) if int_sender => out.extend_from_slice(&v.to_le_bytes()),
                    _ => s.0.encode_value(out),
                }
            }
            None => out.push(0),
        }
        put_opt_str(out, self.message_id.as_deref());
        put_opt_str(out, self.device_id.as_deref());
        out.extend_from_slice(&(self.marks.len() as u32).to_le_bytes());
        for (src, off) in &self.marks {
            out.extend_from_slice(&src.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        if !derived {
            out.extend_from_slice(&self.emitted_seq.to_le_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(128);
        self.encode(&mut v);
        v
    }

    /// Decode the binary form.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let v = ValueView::parse(bytes)?;
        Ok(ReadState {
            last_read_seq: v.nums[0],
            read_at_ms: v.nums[1],
            version: v.nums[2],
            emitted_version: v.nums[3],
            last_emit_ms: v.nums[4],
            events_total: v.nums[5],
            stale_total: v.nums[6],
            events_since_emit: v.nums[7],
            stale_since_emit: v.nums[8],
            emitted_seq: v
                .emitted_seq
                .unwrap_or_else(|| derived_emitted_seq(v.nums[2], v.nums[3], v.nums[0])),
            sender_id: v.sender_id.clone(),
            message_id: v.message_id.map(CompactString::from),
            device_id: v.device_id.map(CompactString::from),
            marks: v.marks().collect(),
        })
    }

    /// Check the binary form and read only whether it holds an unemitted advance, without
    /// allocating (restore needs no more).
    pub fn peek_unemitted_advance(bytes: &[u8]) -> Result<bool, String> {
        let v = ValueView::parse(bytes)?;
        Ok(v.nums[2] > v.nums[3])
    }
}

/// A checked, borrowed reading of an encoded [`ReadState`].
struct ValueView<'a> {
    /// last_read_seq, read_at_ms, version, emitted_version, last_emit_ms, events_total,
    /// stale_total, events_since_emit, stale_since_emit: the encoding's order.
    nums: [i64; 9],
    /// Written only while an advance is held back.
    emitted_seq: Option<i64>,
    sender_id: Option<SenderId>,
    message_id: Option<&'a str>,
    device_id: Option<&'a str>,
    marks: &'a [u8],
}

impl<'a> ValueView<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        let mut r = Reader { b: bytes, pos: 0 };
        let written = r.u8()?;
        let with_emitted_seq = written > FORMAT_V2;
        let fmt = if with_emitted_seq {
            written - WITH_EMITTED_SEQ
        } else {
            written
        };
        if fmt != FORMAT_V1 && fmt != FORMAT_V2 {
            return Err(format!("unknown state format {written}"));
        }
        let mut nums = [0i64; 9];
        for n in &mut nums {
            *n = r.i64()?;
        }
        let sender_id = match r.u8()? {
            0 => None,
            _ if fmt == FORMAT_V1 => Some(SenderId::from(r.i64()?)),
            _ => Some(SenderId::from(r.id()?)),
        };
        let message_id = r.opt_str()?;
        let device_id = r.opt_str()?;
        let n = r.u32()? as usize;
        if n > (bytes.len() - r.pos) / 12 {
            return Err(format!("mark count {n} exceeds value size"));
        }
        let marks = r.take(n * 12)?;
        let emitted_seq = match with_emitted_seq {
            true => Some(r.i64()?),
            false => None,
        };
        if r.pos != bytes.len() {
            return Err(format!("{} trailing bytes", bytes.len() - r.pos));
        }
        Ok(Self {
            nums,
            emitted_seq,
            sender_id,
            message_id,
            device_id,
            marks,
        })
    }

    fn marks(&self) -> impl Iterator<Item = Mark> + 'a {
        self.marks.chunks_exact(12).map(|m| {
            (
                u32::from_le_bytes(m[..4].try_into().expect("4 bytes")),
                i64::from_le_bytes(m[4..].try_into().expect("8 bytes")),
            )
        })
    }
}

/// `emitted_seq` where the value does not carry it: the pointer once everything was
/// emitted, else -1 (nothing emitted yet, or a value written before it was kept).
fn derived_emitted_seq(version: i64, emitted_version: i64, last_read_seq: i64) -> i64 {
    match version == emitted_version && emitted_version > 0 {
        true => last_read_seq,
        false => -1,
    }
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.extend_from_slice(&(s.len() as u32 + 1).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        None => out.extend_from_slice(&0u32.to_le_bytes()),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() - self.pos < n {
            return Err(format!("truncated at byte {}", self.pos));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn id(&mut self) -> Result<Id, String> {
        let (id, n) = Id::decode_value(&self.b[self.pos..])?;
        self.pos += n;
        Ok(id)
    }
    fn opt_str(&mut self) -> Result<Option<&'a str>, String> {
        let n = self.u32()? as usize;
        if n == 0 {
            return Ok(None);
        }
        let bytes = self.take(n - 1)?;
        std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|e| format!("invalid utf-8: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(c: i64, r: i64) -> StateKey {
        StateKey {
            conversation: ConversationId::from(c),
            reader: ReaderId::from(r),
        }
    }

    fn text_key(c: &str, r: &str) -> StateKey {
        StateKey {
            conversation: ConversationId::from(Id::text(c).unwrap()),
            reader: ReaderId::from(Id::text(r).unwrap()),
        }
    }

    #[test]
    fn key_roundtrip_and_prefix() {
        let k = key(-5, 7);
        let enc = StoreKey::state(&k);
        assert_eq!(
            enc.as_bytes().len(),
            17,
            "integer ids keep the 17-byte layout"
        );
        assert_eq!(StoreKey::decode(enc.as_bytes()), Some((TAG_STATE, k)));
        let prefix =
            StoreKey::conversation_prefix(TAG_STATE, &ConversationId::from(-5), IdType::I64);
        assert!(enc.as_bytes().starts_with(&prefix));
        assert!(!StoreKey::state(&key(-4, 7)).as_bytes().starts_with(&prefix));
    }

    #[test]
    fn string_and_uuid_keys_roundtrip_and_share_a_conversation_prefix() {
        let uuid = "550e8400-e29b-41d4-a716-446655440000";
        for (c, r) in [
            ("conv789", "user456"),
            (uuid, "user456"),
            ("conv", uuid),
            ("a\0b", ""),
        ] {
            let k = text_key(c, r);
            let enc = StoreKey::pending(&k);
            assert_eq!(
                StoreKey::decode(enc.as_bytes()),
                Some((TAG_PENDING, k.clone()))
            );
            let prefix =
                StoreKey::conversation_prefix(TAG_PENDING, &k.conversation, IdType::String);
            assert!(enc.as_bytes().starts_with(&prefix), "{c} {r}");
            let other = text_key(&format!("{c}x"), r);
            assert!(!StoreKey::pending(&other).as_bytes().starts_with(&prefix));
        }
        let head = StoreKey::head(&ConversationId::from(Id::text("conv789").unwrap()));
        assert_eq!(StoreKey::decode(head.as_bytes()).unwrap().0, TAG_HEAD);
    }

    proptest! {
        #[test]
        fn key_order_matches_integer_order(a in any::<(i64, i64)>(), b in any::<(i64, i64)>()) {
            let ka = StoreKey::state(&key(a.0, a.1));
            let kb = StoreKey::state(&key(b.0, b.1));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }

        #[test]
        fn text_key_order_matches_text_order(a in ("[a-z]{0,6}", "[a-z]{1,6}"), b in ("[a-z]{0,6}", "[a-z]{1,6}")) {
            let ka = StoreKey::state(&text_key(&a.0, &a.1));
            let kb = StoreKey::state(&text_key(&b.0, &b.1));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(StoreKey::decode(ka.as_bytes()).map(|(_, k)| k), Some(text_key(&a.0, &a.1)));
        }

        #[test]
        fn key_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..60)) {
            let _ = StoreKey::decode(&bytes);
        }

        #[test]
        fn value_roundtrip(seq in any::<i64>(), v in 0i64..1000, mid in proptest::option::of(".{0,40}"),
                           dev in proptest::option::of("[a-z0-9]{0,12}"), sender in proptest::option::of(any::<i64>()),
                           text_sender in proptest::option::of("[a-z0-9]{0,12}"),
                           marks in proptest::collection::vec(any::<(u32, i64)>(), 0..5),
                           emitted in prop_oneof![Just(-1i64), any::<i64>()], emitted_all in any::<bool>()) {
            // Everything emitted (emitted_seq then derived, not written) or an advance held.
            let (version, emitted_version) = if emitted_all { (v, v) } else { (v, v / 2) };
            let emitted_seq = if emitted_all && v > 0 { seq } else { emitted };
            let s = ReadState {
                last_read_seq: seq, message_id: mid.map(Into::into), sender_id: sender.map(SenderId::from), device_id: dev.map(Into::into),
                read_at_ms: 17, version, emitted_version, emitted_seq, last_emit_ms: -3,
                events_total: 9, stale_total: 2, events_since_emit: 4, stale_since_emit: 1, marks: marks.into(),
            };
            prop_assert_eq!(ReadState::decode(&s.to_bytes()).unwrap(), s.clone());
            let with_text = ReadState { sender_id: text_sender.map(|t| SenderId::from(Id::text(&t).unwrap())), ..s };
            prop_assert_eq!(ReadState::decode(&with_text.to_bytes()).unwrap(), with_text);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ReadState::decode(&bytes);
        }
    }
}
