//! Read events in the users' own JSON shape: each role of a read event (reader,
//! conversation, position, ...) is found at a field path of the record, as a source's
//! `[source.fields]` maps it.
//!
//! Decoding walks the JSON object once with serde_json's streaming deserializer: fields on
//! a mapped path are captured (strings borrowed from the record when they hold no escape),
//! every other field is skipped without being built. No per-record allocation in the
//! common case.
//!
//! Positions are a `seq` (an integer), or a `timestamp` (seconds, milliseconds or
//! microseconds since the epoch, or an RFC 3339 string) kept in microseconds, so that a
//! pointer of any unit orders the same way. Ids are 64-bit integers, written as JSON
//! numbers or as strings of digits (as JavaScript-safe APIs write snowflakes).

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::message::validate_message;
use super::DecodeError;
use crate::ids::{ConversationId, Id, IdType, IdTypes, ReaderId, SenderId};
use crate::model::{EventRef, MessageEvent};

/// What a mapped field means in a read event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Reader,
    Conversation,
    Position,
    MessageId,
    Device,
    Sender,
    ReadAt,
    /// A message's mentioned users: an array of ids.
    Mentions,
    /// A message mentions everyone (`@everyone`, `@here`): a boolean.
    MentionEveryone,
    /// When a message was sent (carried, never used for ordering).
    SentAt,
}

/// How many roles there are (the length of a mapping's per-role arrays).
pub const ROLES: usize = 10;

impl Role {
    pub const ALL: [Role; ROLES] = [
        Role::Reader,
        Role::Conversation,
        Role::Position,
        Role::MessageId,
        Role::Device,
        Role::Sender,
        Role::ReadAt,
        Role::Mentions,
        Role::MentionEveryone,
        Role::SentAt,
    ];

    /// The roles of a read event (the first seven), and those a mapping must name.
    pub const READ: &'static [Role] = Role::ALL.split_at(7).0;
    pub const READ_REQUIRED: [Role; 3] = [Role::Reader, Role::Conversation, Role::Position];

    /// The roles of a message event, and those a mapping must name.
    pub const MESSAGE: &'static [Role] = &[
        Role::Conversation,
        Role::Position,
        Role::MessageId,
        Role::Sender,
        Role::SentAt,
        Role::Mentions,
        Role::MentionEveryone,
    ];
    pub const MESSAGE_REQUIRED: [Role; 3] = [Role::Conversation, Role::Position, Role::Sender];

    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Conversation => "conversation",
            Role::Position => "position",
            Role::MessageId => "message_id",
            Role::Device => "device",
            Role::Sender => "sender",
            Role::ReadAt => "read_at",
            Role::Mentions => "mentions",
            Role::MentionEveryone => "mention_everyone",
            Role::SentAt => "sent_at",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a time field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeUnit {
    Seconds,
    #[default]
    Millis,
    Micros,
    /// An RFC 3339 string (`2024-01-01T00:00:00.250Z`, `...+02:00`).
    Rfc3339,
}

impl TimeUnit {
    pub const NAMES: &'static str = "s, ms, us, rfc3339";

    pub fn name(self) -> &'static str {
        match self {
            TimeUnit::Seconds => "s",
            TimeUnit::Millis => "ms",
            TimeUnit::Micros => "us",
            TimeUnit::Rfc3339 => "rfc3339",
        }
    }

    pub fn parse(name: &str) -> Option<TimeUnit> {
        Some(match name {
            "s" => TimeUnit::Seconds,
            "ms" => TimeUnit::Millis,
            "us" => TimeUnit::Micros,
            "rfc3339" | "iso8601" => TimeUnit::Rfc3339,
            _ => return None,
        })
    }
}

/// What orders a source's reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PositionKind {
    /// An integer of the conversation's total order (a sequence, a snowflake).
    #[default]
    Seq,
    /// A time (the client's clock orders the reads), kept in microseconds since the
    /// epoch; equal times are ordered by message id.
    Timestamp,
    /// The message read, by id: its seq is resolved through the co-partitioned message
    /// source (`processor::resolve`); decoded reads carry [`UNRESOLVED_SEQ`].
    MessageId,
}

/// The position of a decoded read whose position is a message id not yet resolved (a
/// value no decoded seq can have: seqs are never negative).
pub const UNRESOLVED_SEQ: i64 = i64::MIN;

/// A value a mapping gives a role the record does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldDefault {
    Int(i64),
    Str(String),
}

/// Where each role of a read event is found in a JSON record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMapping {
    /// Per role (indexed as [`Role::ALL`]): its path, split at dots.
    pub paths: [Option<Vec<String>>; ROLES],
    /// Per role: the value when the record lacks the field (or holds null).
    pub defaults: [Option<FieldDefault>; ROLES],
    pub position: PositionKind,
    /// The unit of the time fields (a timestamp position, `read_at`).
    pub time_unit: TimeUnit,
    /// Confluent's JSON Schema wire format: a 5-byte header (magic 0, schema id) first.
    pub wire_header: bool,
    /// The topology's id types: what an id field must hold.
    pub ids: IdTypes,
}

impl FieldMapping {
    /// A mapping of `role = "path"` pairs (paths split at dots).
    pub fn new(pairs: &[(Role, &str)]) -> Self {
        let mut paths: [Option<Vec<String>>; ROLES] = none();
        for (role, path) in pairs {
            paths[role.index()] = Some(path.split('.').map(str::to_owned).collect());
        }
        Self {
            paths,
            defaults: none(),
            position: PositionKind::Seq,
            time_unit: TimeUnit::Millis,
            wire_header: false,
            ids: IdTypes::default(),
        }
    }
}

/// One empty slot per role.
fn none<T>() -> [Option<T>; ROLES] {
    std::array::from_fn(|_| None)
}

/// Mapped paths as a tree: a record is walked once, descending only into mapped objects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trie {
    children: Vec<(String, Trie)>,
    role: Option<Role>,
}

impl Trie {
    fn of(paths: &[Option<Vec<String>>; ROLES]) -> Self {
        let mut root = Trie {
            children: Vec::new(),
            role: None,
        };
        for (role, path) in Role::ALL.iter().zip(paths) {
            let Some(path) = path else { continue };
            let mut node = &mut root;
            for part in path {
                let i = match node.children.iter().position(|(k, _)| k == part) {
                    Some(i) => i,
                    None => {
                        node.children.push((
                            part.clone(),
                            Trie {
                                children: Vec::new(),
                                role: None,
                            },
                        ));
                        node.children.len() - 1
                    }
                };
                node = &mut node.children[i].1;
            }
            node.role = Some(*role);
        }
        root
    }

    fn child(&self, key: &str) -> Option<&Trie> {
        self.children.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }
}

/// Decodes read or message events from JSON records through a [`FieldMapping`].
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    mapping: FieldMapping,
    trie: Trie,
    max_record_bytes: usize,
}

/// A mapped field as found in a record (JSON, or an Avro datum: `super::avro_mapped`).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar<'a> {
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Bool(bool),
    Null,
    /// An array of values (an array of arrays or objects is `Nested`).
    List(Vec<Scalar<'a>>),
    /// An object or array where a value was expected.
    Nested,
}

impl JsonDecoder {
    pub fn new(mapping: FieldMapping, max_record_bytes: usize) -> Self {
        Self {
            trie: Trie::of(&mapping.paths),
            mapping,
            max_record_bytes,
        }
    }

    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    /// The mapped fields of one record (one pass; strings borrowed where they can be).
    fn capture<'a>(&self, payload: Option<&'a [u8]>) -> Result<Captured<'a, '_>, DecodeError> {
        let payload = payload.ok_or(DecodeError::EmptyValue)?;
        if payload.len() > self.max_record_bytes {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                limit: self.max_record_bytes,
            });
        }
        let json = match self.mapping.wire_header {
            true => super::split_wire(payload)?.1,
            false => payload,
        };
        let mut found: [Option<Scalar<'a>>; ROLES] = none();
        let mut de = serde_json::Deserializer::from_slice(json);
        ObjectSeed {
            trie: &self.trie,
            found: &mut found,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
        Ok(Captured {
            found,
            mapping: &self.mapping,
        })
    }

    /// Decode and validate one read event; ids borrow from `payload` where they can.
    pub fn decode_ref<'a>(&self, payload: Option<&'a [u8]>) -> Result<EventRef<'a>, DecodeError> {
        self.capture(payload)?.read_event()
    }

    /// Decode and validate one message event (positions are seqs).
    pub fn decode_message(&self, payload: Option<&[u8]>) -> Result<MessageEvent, DecodeError> {
        self.capture(payload)?.message_event()
    }
}

impl<'a, 'm> Captured<'a, 'm> {
    /// The fields of one record as found (JSON, or an Avro datum), read through `mapping`.
    pub(super) fn new(found: [Option<Scalar<'a>>; ROLES], mapping: &'m FieldMapping) -> Self {
        Self { found, mapping }
    }

    /// The read event these fields make, validated.
    pub(super) fn read_event(self) -> Result<EventRef<'a>, DecodeError> {
        let mut c = self;
        let ids = c.mapping.ids;
        let reader = typed_id(Role::Reader, c.required(Role::Reader)?, ids.user)?;
        let conversation = typed_id(
            Role::Conversation,
            c.required(Role::Conversation)?,
            ids.conversation,
        )?;
        let unit = c.mapping.time_unit;
        let message_seq = match c.mapping.position {
            PositionKind::Seq => seq(Role::Position, c.required(Role::Position)?)?,
            PositionKind::Timestamp => micros(Role::Position, c.required(Role::Position)?, unit)?,
            PositionKind::MessageId => 0,
        };
        let read_at_ms = match c.take(Role::ReadAt) {
            Some(v) => micros(Role::ReadAt, v, unit)?.div_euclid(1000),
            None if c.mapping.position == PositionKind::Timestamp => message_seq.div_euclid(1000),
            None => 0,
        };
        let message_id = c.message_id()?;
        if c.mapping.position == PositionKind::MessageId && message_id.is_none() {
            return Err(c.missing(Role::MessageId));
        }
        let mut e = super::avro::validate(EventRef {
            reader_id: ReaderId(reader),
            conversation_id: ConversationId(conversation),
            message_seq,
            message_id,
            sender_id: c.id(Role::Sender, ids.user)?.map(SenderId),
            device_id: c.text(Role::Device)?,
            read_at_ms,
        })?;
        if c.mapping.position == PositionKind::MessageId {
            e.message_seq = UNRESOLVED_SEQ;
        }
        Ok(e)
    }

    /// The message event these fields make, validated.
    pub(super) fn message_event(self) -> Result<MessageEvent, DecodeError> {
        let mut c = self;
        let ids = c.mapping.ids;
        let conversation = typed_id(
            Role::Conversation,
            c.required(Role::Conversation)?,
            ids.conversation,
        )?;
        let message_seq = seq(Role::Position, c.required(Role::Position)?)?;
        let sender = typed_id(Role::Sender, c.required(Role::Sender)?, ids.user)?;
        let sent_at_ms = match c.take(Role::SentAt) {
            Some(v) => micros(Role::SentAt, v, c.mapping.time_unit)?.div_euclid(1000),
            None => 0,
        };
        let mentions = match c.take(Role::Mentions) {
            None => Vec::new(),
            Some(Scalar::List(items)) => items
                .into_iter()
                .map(|v| typed_id(Role::Mentions, v, ids.user).map(ReaderId))
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(invalid(
                    Role::Mentions,
                    format_args!("expected an array of ids, got {other:?}"),
                ))
            }
        };
        let mention_everyone = match c.take(Role::MentionEveryone) {
            None => false,
            Some(Scalar::Bool(b)) => b,
            Some(other) => {
                return Err(invalid(
                    Role::MentionEveryone,
                    format_args!("expected true or false, got {other:?}"),
                ))
            }
        };
        validate_message(MessageEvent {
            conversation_id: ConversationId(conversation),
            message_seq,
            message_id: c.message_id()?.map(Cow::into_owned),
            sender_id: SenderId(sender),
            sent_at_ms,
            mentions,
            mention_everyone,
        })
    }
}

/// The mapped fields of one record, with the mapping's defaults for the missing ones.
pub(super) struct Captured<'a, 'm> {
    found: [Option<Scalar<'a>>; ROLES],
    mapping: &'m FieldMapping,
}

impl<'a> Captured<'a, '_> {
    /// The role's value: the record's, else the mapping's default (a null is missing).
    fn take(&mut self, role: Role) -> Option<Scalar<'a>> {
        match self.found[role.index()].take() {
            None | Some(Scalar::Null) => {
                self.mapping.defaults[role.index()]
                    .as_ref()
                    .map(|d| match d {
                        FieldDefault::Int(i) => Scalar::Int(*i),
                        FieldDefault::Str(s) => Scalar::Str(Cow::Owned(s.clone())),
                    })
            }
            Some(v) => Some(v),
        }
    }

    fn required(&mut self, role: Role) -> Result<Scalar<'a>, DecodeError> {
        self.take(role).ok_or_else(|| self.missing(role))
    }

    /// The error of a record without `role`.
    fn missing(&self, role: Role) -> DecodeError {
        let path = self.mapping.paths[role.index()]
            .as_ref()
            .map(|p| p.join("."))
            .unwrap_or_default();
        DecodeError::Invalid(format!("no {} (field {path:?})", role.name()))
    }

    fn id(&mut self, role: Role, ty: IdType) -> Result<Option<Id>, DecodeError> {
        self.take(role).map(|v| typed_id(role, v, ty)).transpose()
    }

    /// The message id as text; a `uuid` message id is checked and written canonically.
    fn message_id(&mut self) -> Result<Option<Cow<'a, str>>, DecodeError> {
        let Some(t) = self.text(Role::MessageId)? else {
            return Ok(None);
        };
        if self.mapping.ids.message != IdType::Uuid {
            return Ok(Some(t));
        }
        let id = Id::parse(IdType::Uuid, &t).map_err(|e| invalid(Role::MessageId, e))?;
        Ok(Some(match Id::text(&t) {
            Ok(canonical) if canonical == id => t,
            _ => Cow::Owned(id.to_string()),
        }))
    }

    fn text(&mut self, role: Role) -> Result<Option<Cow<'a, str>>, DecodeError> {
        self.take(role).map(|v| text(role, v)).transpose()
    }
}

fn invalid(role: Role, what: impl fmt::Display) -> DecodeError {
    DecodeError::Invalid(format!("{}: {what}", role.name()))
}

/// A seq: a JSON integer, or a string of digits.
fn seq(role: Role, v: Scalar<'_>) -> Result<i64, DecodeError> {
    match v {
        Scalar::Int(i) => Ok(i),
        Scalar::Str(s) => s
            .parse::<i64>()
            .map_err(|_| invalid(role, format_args!("{s:?} is not a 64-bit integer"))),
        other => Err(invalid(
            role,
            format_args!("expected an integer, got {other:?}"),
        )),
    }
}

/// An id of the declared type: `i64` ids are JSON integers or strings of digits, `string`
/// ids are strings (an integer is taken as its decimal text), `uuid` ids UUID strings.
fn typed_id(role: Role, v: Scalar<'_>, ty: IdType) -> Result<Id, DecodeError> {
    let id = match (&v, ty) {
        (Scalar::Int(i), IdType::String) => Id::text(itoa::Buffer::new().format(*i)),
        (Scalar::Int(i), ty) => Id::number(ty, *i),
        (Scalar::Str(s), ty) => Id::parse(ty, s),
        (other, ty) => {
            return Err(invalid(
                role,
                format_args!("expected an id of type {ty}, got {other:?}"),
            ))
        }
    };
    id.map_err(|e| invalid(role, e))
}

/// Microseconds since the epoch of a time field written in `unit`.
fn micros(role: Role, v: Scalar<'_>, unit: TimeUnit) -> Result<i64, DecodeError> {
    let scale = |x: f64, by: f64| {
        let us = (x * by).round();
        (us.is_finite() && us.abs() < 9.2e18)
            .then_some(us as i64)
            .ok_or_else(|| invalid(role, format_args!("{x} is out of range")))
    };
    let by = match unit {
        TimeUnit::Seconds => 1_000_000i64,
        TimeUnit::Millis => 1_000,
        TimeUnit::Micros => 1,
        TimeUnit::Rfc3339 => {
            return match v {
                Scalar::Str(s) => parse_rfc3339(&s)
                    .ok_or_else(|| invalid(role, format_args!("{s:?} is not an RFC 3339 time"))),
                other => Err(invalid(
                    role,
                    format_args!("expected an RFC 3339 string, got {other:?}"),
                )),
            }
        }
    };
    match v {
        Scalar::Int(i) => i
            .checked_mul(by)
            .ok_or_else(|| invalid(role, format_args!("{i} is out of range"))),
        Scalar::Float(f) => scale(f, by as f64),
        Scalar::Str(s) => match s.parse::<i64>() {
            Ok(i) => i
                .checked_mul(by)
                .ok_or_else(|| invalid(role, format_args!("{i} is out of range"))),
            Err(_) => Err(invalid(role, format_args!("{s:?} is not a number"))),
        },
        other => Err(invalid(
            role,
            format_args!("expected a number, got {other:?}"),
        )),
    }
}

/// An id carried as text: a string, or an integer written in decimal.
fn text<'a>(role: Role, v: Scalar<'a>) -> Result<Cow<'a, str>, DecodeError> {
    match v {
        Scalar::Str(s) => Ok(s),
        Scalar::Int(i) => Ok(Cow::Owned(i.to_string())),
        other => Err(invalid(
            role,
            format_args!("expected a string, got {other:?}"),
        )),
    }
}

/// Microseconds since the epoch of an RFC 3339 date-time
/// (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `t`, `z` and a space are accepted too).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_us = 0i64;
    if sep(i, b".") {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 6)];
        frac_us = digits.parse::<i64>().ok()? * 10i64.pow(6 - digits.len() as u32);
    }
    let offset_s = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            let o = oh * 3600 + om * 60;
            if *c == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(secs * 1_000_000 + frac_us)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Walks one JSON object, capturing the fields on mapped paths.
struct ObjectSeed<'t, 'f, 'de> {
    trie: &'t Trie,
    found: &'f mut [Option<Scalar<'de>>; ROLES],
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match self.trie.child(&key.0) {
                Some(Trie {
                    role: Some(role), ..
                }) => self.found[role.index()] = Some(map.next_value::<Scalar<'de>>()?),
                Some(child) => map.next_value_seed(ObjectSeed {
                    trie: child,
                    found: &mut *self.found,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// An object key, borrowed from the record when it holds no escape.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> serde::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Nested)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        let mut items = Vec::new();
        let mut nested = false;
        while let Some(item) = seq.next_element::<Scalar<'de>>()? {
            nested |= matches!(item, Scalar::List(_) | Scalar::Nested);
            items.push(item);
        }
        Ok(if nested {
            Scalar::Nested
        } else {
            Scalar::List(items)
        })
    }
}

#[cfg(test)]
mod tests;
