//! A source's value format and, for JSON, its field mapping: every mistake reported at
//! once, named by its place in the file (`source[0].fields.reader`).

use super::compile::Errors;
use super::SourceFormat;
use crate::config::{SourceSpec, TopologySpec};
use crate::ids::{IdType, IdTypes};
use crate::serde::json::{FieldDefault, FieldMapping, PositionKind, Role, TimeUnit};

/// The format of source `at` (`is_messages`: a message-events source, Avro only).
pub(super) fn source_format(
    at: &str,
    s: &SourceSpec,
    is_messages: bool,
    ids: &IdTypes,
    errs: &mut Errors,
) -> SourceFormat {
    let wire_header = match s.format.as_deref() {
        None | Some("avro-confluent") if s.fields.is_some() => false,
        None | Some("avro-confluent") => {
            refuse_json_fields(
                at,
                s,
                "for mapped sources only (JSON, or Avro with fields)",
                errs,
            );
            if ids.conversation != IdType::I64 || ids.user != IdType::I64 {
                errs.push(
                    format!("{at}.format"),
                    "readstate's Avro schemas carry long conversation and user ids (schemas/read_event.avsc, message_event.avsc): [ids] other than i64 need [source.fields] mapping your own schema's fields, or a JSON format",
                );
            }
            return SourceFormat::AvroConfluent;
        }
        Some("json") => false,
        Some("json-schema") => true,
        Some(f) => {
            errs.push(
                format!("{at}.format"),
                format!("unsupported format {f:?} (supported: avro-confluent, json, json-schema)"),
            );
            return SourceFormat::AvroConfluent;
        }
    };
    let avro = matches!(s.format.as_deref(), None | Some("avro-confluent"));
    let kind = match is_messages {
        true => Kind::Messages,
        false => Kind::Reads,
    };
    let mut mapping = FieldMapping::new(&[]);
    mapping.wire_header = wire_header;
    mapping.ids = *ids;
    mapping.position = position_kind(at, s, errs);
    if is_messages && mapping.position != PositionKind::Seq {
        errs.push(
            format!("{at}.position"),
            "message events are ordered by seq (the order read pointers point into)",
        );
    }
    mapping.time_unit = time_unit(at, s, errs);
    paths(at, s, kind, &mut mapping, errs);
    defaults(at, s, kind, &mut mapping, errs);
    match avro {
        true => SourceFormat::AvroMapped(Box::new(mapping)),
        false => SourceFormat::Json(Box::new(mapping)),
    }
}

/// `[ids]`: the type of each kind of id (i64 conversations and users, string message ids
/// by default).
pub(super) fn id_types(spec: &TopologySpec, errs: &mut Errors) -> IdTypes {
    let mut ids = IdTypes::default();
    let Some(s) = &spec.ids else {
        return ids;
    };
    let names: Vec<&str> = IdType::ALL.iter().map(|t| t.name()).collect();
    let mut parse = |field: &str, value: &Option<String>, slot: &mut IdType| {
        let Some(v) = value else { return };
        match IdType::parse(v) {
            Some(t) => *slot = t,
            None => errs.push(
                format!("ids.{field}"),
                format!("unknown id type {v:?} (one of {})", names.join(", ")),
            ),
        }
    };
    parse("conversation", &s.conversation, &mut ids.conversation);
    parse("user", &s.user, &mut ids.user);
    parse("message", &s.message, &mut ids.message);
    if ids.message == IdType::I64 {
        errs.push(
            "ids.message",
            "message ids are \"string\" or \"uuid\" (a numeric message id is kept as its text: declare \"string\")",
        );
        ids.message = IdType::String;
    }
    ids
}

/// What a source's records are: which roles a mapping may and must name.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Reads,
    Messages,
}

impl Kind {
    fn roles(self) -> &'static [Role] {
        match self {
            Kind::Reads => Role::READ,
            Kind::Messages => Role::MESSAGE,
        }
    }

    fn required(self) -> &'static [Role] {
        match self {
            Kind::Reads => &Role::READ_REQUIRED,
            Kind::Messages => &Role::MESSAGE_REQUIRED,
        }
    }

    /// The role called `name`, when records of this kind have it.
    fn role(self, name: &str) -> Result<Role, String> {
        Role::parse(name)
            .filter(|r| self.roles().contains(r))
            .ok_or_else(|| {
                let names: Vec<&str> = self.roles().iter().map(|r| r.name()).collect();
                let what = match self {
                    Kind::Reads => "read events",
                    Kind::Messages => "message events",
                };
                format!("unknown role of {what} (one of {})", names.join(", "))
            })
    }
}

fn refuse_json_fields(at: &str, s: &SourceSpec, why: &str, errs: &mut Errors) {
    let fields = [
        ("fields", s.fields.is_some()),
        ("defaults", s.defaults.is_some()),
        ("position", s.position.is_some()),
        ("time_unit", s.time_unit.is_some()),
    ];
    errs.refuse_set(at, fields, why);
}

fn position_kind(at: &str, s: &SourceSpec, errs: &mut Errors) -> PositionKind {
    match s.position.as_deref() {
        None | Some("seq") => PositionKind::Seq,
        Some("timestamp") => PositionKind::Timestamp,
        Some("message_id") => PositionKind::MessageId,
        Some(p) => {
            errs.push(
                format!("{at}.position"),
                format!("unknown position {p:?} (seq, timestamp or message_id)"),
            );
            PositionKind::Seq
        }
    }
}

fn time_unit(at: &str, s: &SourceSpec, errs: &mut Errors) -> TimeUnit {
    match s.time_unit.as_deref() {
        None => TimeUnit::default(),
        Some(u) => TimeUnit::parse(u).unwrap_or_else(|| {
            errs.push(
                format!("{at}.time_unit"),
                format!("unknown time unit {u:?} (one of {})", TimeUnit::NAMES),
            );
            TimeUnit::default()
        }),
    }
}

/// `[source.fields]`: a path per role, the required roles present.
fn paths(at: &str, s: &SourceSpec, kind: Kind, mapping: &mut FieldMapping, errs: &mut Errors) {
    let fields = s.fields.clone().unwrap_or_default();
    for (name, path) in &fields {
        let role = match kind.role(name) {
            Ok(role) => role,
            Err(e) => {
                errs.push(format!("{at}.fields.{name}"), e);
                continue;
            }
        };
        let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
        if parts.iter().any(String::is_empty) {
            errs.push(
                format!("{at}.fields.{name}"),
                format!("{path:?} is not a field path (names joined by dots)"),
            );
            continue;
        }
        mapping.paths[role as usize] = Some(parts);
    }
    let by_message_id = mapping.position == PositionKind::MessageId;
    for role in kind.required() {
        let role = match (role, by_message_id) {
            (Role::Position, true) => &Role::MessageId,
            _ => role,
        };
        if !fields.contains_key(role.name()) {
            errs.push(
                format!("{at}.fields.{}", role.name()),
                "is required for a JSON source",
            );
        }
    }
    if by_message_id && fields.contains_key(Role::Position.name()) {
        errs.push(
            format!("{at}.fields.position"),
            "with position = \"message_id\" a read's position is its message's seq, resolved through the message source: map message_id (and read_at, the fallback), not position",
        );
    }
}

/// `[source.defaults]`: a value per role, of the role's type.
fn defaults(at: &str, s: &SourceSpec, kind: Kind, mapping: &mut FieldMapping, errs: &mut Errors) {
    for (name, value) in s.defaults.iter().flatten() {
        let role = match kind.role(name) {
            Ok(Role::Mentions | Role::MentionEveryone) => {
                errs.push(format!("{at}.defaults.{name}"), "has no default");
                continue;
            }
            Ok(role) => role,
            Err(e) => {
                errs.push(format!("{at}.defaults.{name}"), e);
                continue;
            }
        };
        let d = match (role, value) {
            (Role::MessageId | Role::Device, toml::Value::String(s)) => {
                FieldDefault::Str(s.clone())
            }
            (Role::MessageId | Role::Device, _) => {
                errs.push(format!("{at}.defaults.{name}"), "expected a string");
                continue;
            }
            (_, toml::Value::Integer(i)) => FieldDefault::Int(*i),
            _ => {
                errs.push(format!("{at}.defaults.{name}"), "expected an integer");
                continue;
            }
        };
        mapping.defaults[role as usize] = Some(d);
    }
}

#[cfg(test)]
mod tests {
    use crate::topology::{compile, SourceFormat};

    const JSON_SOURCE: &str = r#"
[application]
id = "rr"
[[source]]
name = "events"
topic = "read_receipt_events"
format = "json"
keyed_by = "sender_id"
partitioner = "fnv1a"
position = "timestamp"
time_unit = "s"
[source.fields]
reader = "reader_id"
conversation = "conversation_id"
position = "read_at"
message_id = "msg_id"
[source.defaults]
device = "unknown"
[[store]]
name = "read-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["events"]
store = "read-state"
[[sink]]
name = "updates"
kind = "kafka"
input = "read-state"
topic = "updates"
"#;

    #[test]
    fn a_json_source_compiles_into_its_mapping() {
        let t = compile(JSON_SOURCE).unwrap();
        let SourceFormat::Json(m) = &t.sources[0].format else {
            panic!("json: {:?}", t.sources[0].format)
        };
        assert_eq!(m.paths[2].as_deref(), Some(&["read_at".to_owned()][..]));
        assert!(!m.wire_header);
        assert_eq!(t.sources[0].format.name(), "json");
    }

    #[test]
    fn every_mapping_mistake_is_reported_at_once() {
        let bad = JSON_SOURCE
            .replace("reader = \"reader_id\"\n", "raeder = \"reader_id\"\n")
            .replace("position = \"timestamp\"", "position = \"when\"")
            .replace("time_unit = \"s\"", "time_unit = \"fortnights\"")
            .replace("message_id = \"msg_id\"", "message_id = \"a..b\"")
            .replace("device = \"unknown\"", "device = 7");
        let errs = compile(&bad).unwrap_err();
        let mut ats: Vec<&str> = errs.iter().map(|e| e.at.as_str()).collect();
        ats.sort();
        assert_eq!(
            ats,
            [
                "source[0].defaults.device",
                "source[0].fields.message_id",
                "source[0].fields.raeder",
                "source[0].fields.reader",
                "source[0].position",
                "source[0].time_unit",
            ],
            "{errs:?}"
        );
        let avro = JSON_SOURCE.replace("format = \"json\"", "format = \"avro-confluent\"");
        let t = compile(&avro).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(matches!(t.sources[0].format, SourceFormat::AvroMapped(_)));
        let unmapped = avro.replace(
            "[source.fields]\nreader = \"reader_id\"\nconversation = \"conversation_id\"\nposition = \"read_at\"\nmessage_id = \"msg_id\"\n",
            "",
        );
        let errs = compile(&unmapped).unwrap_err();
        assert_eq!(
            errs.len(),
            3,
            "defaults, position, time_unit without fields: {errs:?}"
        );
    }

    /// `base` (JSON_SOURCE's shape) keyed by conversation with a JSON message source mapped
    /// by `fields` and its heads store; `processor` is added to the processor.
    fn with_message_source(base: &str, fields: &str, processor: &str) -> String {
        let messages = format!(
            "[[source]]\nname = \"messages\"\ntopic = \"messages\"\nrecords = \"message-events\"\nformat = \"json\"\nfields = {fields}\n"
        );
        base.replace("keyed_by = \"sender_id\"\npartitioner = \"fnv1a\"\n", "")
            .replace("[[store]]", &format!("{messages}[[store]]"))
            .replace(
                "inputs = [\"events\"]",
                &format!("inputs = [\"events\", \"messages\"]\nheads_store = \"heads\"{processor}"),
            )
            .replace(
                "[[processor]]",
                "[[store]]\nname = \"heads\"\n[[processor]]",
            )
    }

    /// A JSON message source names the roles of message events; read roles, a missing
    /// sender or a timestamp position are refused.
    #[test]
    fn a_json_message_source_has_the_roles_of_messages() {
        let fields = r#"{ conversation = "conv", position = "seq", sender = "from.id", mentions = "mentions", mention_everyone = "everyone" }"#;
        let with_messages = with_message_source(
            &JSON_SOURCE.replace("position = \"timestamp\"\n", ""),
            fields,
            "",
        );
        let t = compile(&with_messages).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(t.messages.as_ref().unwrap().format.name(), "json");
        let bad = with_messages
            .replace("sender = \"from.id\", ", "device = \"d\", ")
            .replace(
                "format = \"json\"\nfields = { conv",
                "format = \"json\"\nposition = \"timestamp\"\nfields = { conv",
            );
        let errs = compile(&bad).unwrap_err();
        let mut got: Vec<(&str, &str)> = errs
            .iter()
            .map(|e| (e.at.as_str(), e.message.as_str()))
            .collect();
        got.sort();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].0, "source[1].fields.device");
        assert!(
            got[0].1.contains("unknown role of message events"),
            "{got:?}"
        );
        assert_eq!(
            got[1],
            ("source[1].fields.sender", "is required for a JSON source")
        );
        assert_eq!(got[2].0, "source[1].position");
    }

    /// `position = "message_id"`: the read maps message_id (not position), a message source
    /// that maps message ids is required, and the wait settings belong to such a topology.
    #[test]
    fn message_id_positions_need_a_message_source_that_names_messages() {
        let by_id = JSON_SOURCE
            .replace("position = \"timestamp\"", "position = \"message_id\"")
            .replace("position = \"read_at\"\n", "read_at = \"read_at\"\n");
        let errs = compile(&by_id).unwrap_err();
        let ats: Vec<&str> = errs.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(ats, ["source[0].position"], "{errs:?}");
        assert!(errs[0].message.contains("message-events"), "{errs:?}");

        let fields = r#"{ conversation = "conv", position = "seq", sender = "from", message_id = "id", sent_at = "at" }"#;
        let with_messages = with_message_source(&by_id, fields, "\nmessage_wait = \"2m\"");
        let t = compile(&with_messages).unwrap_or_else(|e| panic!("{e:?}"));
        let r = t.processor.resolve.expect("reads resolve through messages");
        assert_eq!(r.wait, std::time::Duration::from_secs(120));
        assert!(r.fallback_to_read_at);

        let bad = with_messages
            .replace(", message_id = \"id\"", "")
            .replace("read_at = \"read_at\"\n", "position = \"read_at\"\n");
        let errs = compile(&bad).unwrap_err();
        let mut ats: Vec<&str> = errs.iter().map(|e| e.at.as_str()).collect();
        ats.sort();
        assert_eq!(
            ats,
            ["source[0].fields.position", "source[1].fields.message_id"],
            "{errs:?}"
        );
        let seq_reads = JSON_SOURCE.replace(
            "store = \"read-state\"\n[[sink]]",
            "store = \"read-state\"\nmessage_wait = \"1s\"\n[[sink]]",
        );
        let errs = compile(&seq_reads).unwrap_err();
        assert_eq!(errs[0].at, "processor[0].message_wait", "{errs:?}");
    }
}
