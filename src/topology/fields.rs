//! A source's value format and, for JSON, its field mapping: every mistake reported at
//! once, named by its place in the file (`source[0].fields.reader`).

use super::compile::Errors;
use super::SourceFormat;
use crate::config::SourceSpec;
use crate::serde::json::{FieldDefault, FieldMapping, PositionKind, Role, TimeUnit};

/// The format of source `at` (`is_messages`: a message-events source, Avro only).
pub(super) fn source_format(
    at: &str,
    s: &SourceSpec,
    is_messages: bool,
    errs: &mut Errors,
) -> SourceFormat {
    let wire_header = match s.format.as_deref() {
        None | Some("avro-confluent") => {
            refuse_json_fields(at, s, "for JSON formats only", errs);
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
    if is_messages {
        errs.push(
            format!("{at}.format"),
            "message events are read as Avro (message_event.avsc) in this version",
        );
        return SourceFormat::AvroConfluent;
    }
    let mut mapping = FieldMapping::new(&[]);
    mapping.wire_header = wire_header;
    mapping.position = position_kind(at, s, errs);
    mapping.time_unit = time_unit(at, s, errs);
    paths(at, s, &mut mapping, errs);
    defaults(at, s, &mut mapping, errs);
    SourceFormat::Json(Box::new(mapping))
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
        Some(p) => {
            errs.push(
                format!("{at}.position"),
                format!("unknown position {p:?} (seq or timestamp)"),
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

fn role_names() -> String {
    Role::ALL.map(Role::name).join(", ")
}

/// `[source.fields]`: a path per role, the required roles present.
fn paths(at: &str, s: &SourceSpec, mapping: &mut FieldMapping, errs: &mut Errors) {
    let fields = s.fields.clone().unwrap_or_default();
    for (name, path) in &fields {
        let Some(role) = Role::parse(name) else {
            errs.push(
                format!("{at}.fields.{name}"),
                format!("unknown role (one of {})", role_names()),
            );
            continue;
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
    for role in Role::REQUIRED {
        if !fields.contains_key(role.name()) {
            errs.push(
                format!("{at}.fields.{}", role.name()),
                "is required for a JSON source",
            );
        }
    }
}

/// `[source.defaults]`: a value per role, of the role's type.
fn defaults(at: &str, s: &SourceSpec, mapping: &mut FieldMapping, errs: &mut Errors) {
    for (name, value) in s.defaults.iter().flatten() {
        let Some(role) = Role::parse(name) else {
            errs.push(
                format!("{at}.defaults.{name}"),
                format!("unknown role (one of {})", role_names()),
            );
            continue;
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
        let errs = compile(&avro).unwrap_err();
        assert_eq!(
            errs.len(),
            4,
            "fields, defaults, position, time_unit: {errs:?}"
        );
    }
}
