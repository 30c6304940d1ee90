//! [`Id`]: one domain id value (a conversation, a user), as a topology declares it.
//!
//! A topology declares one [`IdType`] per kind of id (`[ids]` in the topology file): `i64`
//! (snowflakes, database sequences), `uuid`, or `string` (UTF-8, at most [`MAX_ID_BYTES`]
//! bytes; a longer id makes its record a dead letter with reason `invalid_event`).
//!
//! Representation is canonical, so two ids are equal exactly when their text is equal:
//! an integer is `Int`, a UUID is its 16 bytes, and any other text is kept verbatim
//! (inline up to 24 bytes, no allocation). Text in the canonical UUID form (lowercase,
//! hyphenated, 36 characters) is always held as a UUID, whichever type was declared; other
//! spellings of a UUID stay text unless the declared type is `uuid`.
//!
//! Store keys ([`Id::encode_key`]) are order-preserving and self-delimiting: a type byte,
//! then the integer big-endian with its sign bit flipped, or the 16 UUID bytes, or the text
//! with `0x00` escaped as `0x00 0xff` and ended by `0x00 0x01`. Among ids of one type, byte
//! order is the ids' order, and one id is never a prefix of another.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest string id, in bytes of UTF-8.
pub const MAX_ID_BYTES: usize = 255;

/// The declared type of one kind of id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IdType {
    #[default]
    I64,
    String,
    Uuid,
}

impl IdType {
    pub const ALL: [IdType; 3] = [IdType::I64, IdType::String, IdType::Uuid];

    pub fn name(self) -> &'static str {
        match self {
            IdType::I64 => "i64",
            IdType::String => "string",
            IdType::Uuid => "uuid",
        }
    }

    pub fn parse(name: &str) -> Option<IdType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The Avro type of an id of this type.
    pub fn avro(self) -> &'static str {
        match self {
            IdType::I64 => r#""long""#,
            IdType::String => r#""string""#,
            IdType::Uuid => r#"{"type":"string","logicalType":"uuid"}"#,
        }
    }

    /// The PostgreSQL column type.
    pub fn sql(self) -> &'static str {
        match self {
            IdType::I64 => "bigint",
            IdType::String => "text",
            IdType::Uuid => "uuid",
        }
    }

    /// The array type a batch of ids is bound as (`unnest` parameters); text for UUIDs,
    /// cast in SQL.
    pub fn sql_param(self) -> &'static str {
        match self {
            IdType::I64 => "int8",
            IdType::String | IdType::Uuid => "text",
        }
    }
}

impl fmt::Display for IdType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a value is not an id of the declared type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0:?} is not a 64-bit integer (ids are declared i64)")]
    NotInt(String),
    #[error("{0:?} is not a UUID (ids are declared uuid)")]
    NotUuid(String),
    #[error("an id of {0} bytes is longer than {MAX_ID_BYTES} bytes")]
    TooLong(usize),
    #[error("the number {0} is not a {1} id")]
    Number(i64, IdType),
}

#[derive(Clone, Eq, PartialOrd, Ord)]
enum Repr {
    Int(i64),
    Uuid([u8; 16]),
    Text(CompactString),
}

/// One id value; see the module documentation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Id(Repr);

impl PartialEq for Repr {
    /// Inlined, integers first: the hot path compares two ids per cache lookup.
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Repr::Int(a), Repr::Int(b)) => a == b,
            (Repr::Uuid(a), Repr::Uuid(b)) => a == b,
            (Repr::Text(a), Repr::Text(b)) => a.as_bytes() == b.as_bytes(),
            _ => false,
        }
    }
}

/// An integer hashes as the `i64` ids of earlier versions did (one write, no variant tag: the
/// hot path hashes two ids per event); ids of different kinds never meet in one topology,
/// and equality still tells them apart.
impl std::hash::Hash for Id {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match &self.0 {
            Repr::Int(v) => state.write_i64(*v),
            Repr::Uuid(b) => state.write(b),
            Repr::Text(s) => s.as_str().hash(state),
        }
    }
}

const KEY_INT: u8 = 1;
const KEY_UUID: u8 = 2;
const KEY_TEXT: u8 = 3;

impl Id {
    #[inline]
    pub const fn int(v: i64) -> Id {
        Id(Repr::Int(v))
    }

    pub fn uuid(bytes: [u8; 16]) -> Id {
        Id(Repr::Uuid(bytes))
    }

    /// Text as an id: canonical UUID text becomes a UUID, anything else is kept verbatim.
    pub fn text(s: &str) -> Result<Id, IdError> {
        if s.len() > MAX_ID_BYTES {
            return Err(IdError::TooLong(s.len()));
        }
        Ok(match canonical_uuid(s) {
            Some(b) => Id(Repr::Uuid(b)),
            None => Id(Repr::Text(CompactString::from(s))),
        })
    }

    /// Text as an id of the declared type (a JSON string, a header).
    pub fn parse(ty: IdType, s: &str) -> Result<Id, IdError> {
        match ty {
            IdType::I64 => s
                .parse::<i64>()
                .map(Id::int)
                .map_err(|_| IdError::NotInt(clip(s))),
            IdType::String => Id::text(s),
            IdType::Uuid => uuid::Uuid::try_parse(s)
                .map(|u| Id::uuid(*u.as_bytes()))
                .map_err(|_| IdError::NotUuid(clip(s))),
        }
    }

    /// A number as an id of the declared type: only `i64` ids are numbers.
    pub fn number(ty: IdType, v: i64) -> Result<Id, IdError> {
        match ty {
            IdType::I64 => Ok(Id::int(v)),
            other => Err(IdError::Number(v, other)),
        }
    }

    /// The integer, for `i64` ids.
    #[inline]
    pub fn as_int(&self) -> Option<i64> {
        match self.0 {
            Repr::Int(v) => Some(v),
            _ => None,
        }
    }

    /// Whether this id can be of the declared type (canonical UUID text may be a string).
    pub fn fits(&self, ty: IdType) -> bool {
        matches!(
            (&self.0, ty),
            (Repr::Int(_), IdType::I64)
                | (Repr::Uuid(_), IdType::Uuid | IdType::String)
                | (Repr::Text(_), IdType::String)
        )
    }

    /// Append the order-preserving, self-delimiting key form.
    pub fn encode_key(&self, out: &mut impl Extend<u8>) {
        match &self.0 {
            Repr::Int(v) => {
                out.extend([KEY_INT]);
                out.extend(((*v as u64) ^ (1 << 63)).to_be_bytes());
            }
            Repr::Uuid(b) => {
                out.extend([KEY_UUID]);
                out.extend(*b);
            }
            Repr::Text(s) => {
                out.extend([KEY_TEXT]);
                for &b in s.as_bytes() {
                    match b {
                        0 => out.extend([0, 0xff]),
                        b => out.extend([b]),
                    }
                }
                out.extend([0, 1]);
            }
        }
    }

    /// Read a key form from the start of `bytes`: the id and the bytes it took.
    pub fn decode_key(bytes: &[u8]) -> Option<(Id, usize)> {
        let (&ty, rest) = bytes.split_first()?;
        match ty {
            KEY_INT => {
                let v = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) ^ (1 << 63);
                Some((Id::int(v as i64), 9))
            }
            KEY_UUID => Some((Id::uuid(rest.get(..16)?.try_into().ok()?), 17)),
            KEY_TEXT => {
                let mut text = Vec::new();
                let mut i = 0;
                loop {
                    match (rest.get(i)?, rest.get(i + 1)) {
                        (0, Some(1)) => break,
                        (0, Some(0xff)) => (text.push(0), i += 2),
                        (0, _) => return None,
                        (&b, _) => (text.push(b), i += 1),
                    };
                }
                let s = std::str::from_utf8(&text).ok()?;
                let id = Id::text(s).ok()?;
                matches!(id.0, Repr::Text(_)).then_some((id, i + 3))
            }
            _ => None,
        }
    }

    /// Append the compact value form (state values, changelogs): a type byte, then a
    /// zig-zag-free 8-byte integer, 16 UUID bytes, or a length byte and the text.
    pub fn encode_value(&self, out: &mut Vec<u8>) {
        match &self.0 {
            Repr::Int(v) => {
                out.push(KEY_INT);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Repr::Uuid(b) => {
                out.push(KEY_UUID);
                out.extend_from_slice(b);
            }
            Repr::Text(s) => {
                out.push(KEY_TEXT);
                out.push(s.len() as u8);
                out.extend_from_slice(s.as_bytes());
            }
        }
    }

    /// Read a value form from the start of `bytes`: the id and the bytes it took.
    pub fn decode_value(bytes: &[u8]) -> Result<(Id, usize), String> {
        let short = || format!("truncated id in {} bytes", bytes.len());
        match bytes.first() {
            Some(&KEY_INT) => {
                let b = bytes.get(1..9).ok_or_else(short)?;
                Ok((Id::int(i64::from_le_bytes(b.try_into().expect("8"))), 9))
            }
            Some(&KEY_UUID) => {
                let b = bytes.get(1..17).ok_or_else(short)?;
                Ok((Id::uuid(b.try_into().expect("16")), 17))
            }
            Some(&KEY_TEXT) => {
                let n = usize::from(*bytes.get(1).ok_or_else(short)?);
                let b = bytes.get(2..2 + n).ok_or_else(short)?;
                let s = std::str::from_utf8(b).map_err(|e| format!("id: {e}"))?;
                Ok((Id::text(s).map_err(|e| e.to_string())?, 2 + n))
            }
            Some(t) => Err(format!("unknown id type {t}")),
            None => Err(short()),
        }
    }

    /// Write the text form (integers in decimal, UUIDs canonical) to `out`.
    pub fn write_text(&self, out: &mut impl fmt::Write) -> fmt::Result {
        match &self.0 {
            Repr::Int(v) => write!(out, "{v}"),
            Repr::Uuid(b) => write!(out, "{}", uuid::Uuid::from_bytes(*b).hyphenated()),
            Repr::Text(s) => out.write_str(s),
        }
    }

    /// Append the text form's bytes: the record key on output and repartition topics, and
    /// what a source's partitioner hashes. No allocation beyond `out`.
    pub fn write_key(&self, out: &mut Vec<u8>) {
        match &self.0 {
            Repr::Int(v) => out.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes()),
            Repr::Uuid(b) => {
                let mut buf = uuid::Uuid::encode_buffer();
                let s = uuid::Uuid::from_bytes(*b)
                    .hyphenated()
                    .encode_lower(&mut buf);
                out.extend_from_slice(s.as_bytes());
            }
            Repr::Text(s) => out.extend_from_slice(s.as_bytes()),
        }
    }
}

impl Default for Id {
    fn default() -> Self {
        Id::int(0)
    }
}

impl From<i64> for Id {
    fn from(v: i64) -> Self {
        Id::int(v)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_text(f)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Int(v) => write!(f, "{v}"),
            _ => write!(f, "{:?}", self.to_string()),
        }
    }
}

/// Integers as Avro/JSON numbers, UUIDs and text as strings.
impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Repr::Int(v) => s.serialize_i64(*v),
            Repr::Text(t) => s.serialize_str(t),
            Repr::Uuid(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or string id")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id::int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Id, E> {
                i64::try_from(v).map(Id::int).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Id, E> {
                Id::text(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The 16 bytes of `s` when it is a UUID in canonical form (lowercase, hyphenated).
fn canonical_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibbles = b.iter().filter(|&&c| c != b'-');
    for byte in &mut out {
        let hi = lower_hex(*nibbles.next()?)?;
        let lo = lower_hex(*nibbles.next()?)?;
        *byte = hi << 4 | lo;
    }
    nibbles.next().is_none().then_some(out)
}

fn lower_hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
