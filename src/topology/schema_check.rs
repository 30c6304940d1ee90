//! `readstate validate --schema-registry`: a JSON source's field mapping checked against the
//! JSON Schema its producers registered (the latest version of `<topic>-value`). Every
//! mapped path must exist in the schema (through `properties`, local `$ref`s and `allOf`),
//! with a type the role can be read from; every problem is reported, named by its source
//! and field (`source "events".fields.reader`).

use apache_avro::schema_compatibility::SchemaCompatibility;
use serde_json::Value;

use super::{Source, SourceFormat, TopologyError};
use crate::ids::IdType;
use crate::serde::json::{FieldMapping, PositionKind, Role, TimeUnit};

/// The subject a source's value schema is registered under.
pub fn subject(s: &Source) -> String {
    format!("{}-value", s.topic)
}

/// Whether `s` has a registered schema to check against: an Avro or `json-schema` source
/// (plain JSON has none).
pub fn has_schema(s: &Source) -> bool {
    match &s.format {
        SourceFormat::AvroConfluent => true,
        SourceFormat::Json(m) => m.wire_header,
    }
}

/// An Avro source: the latest writer `schema` must be readable with the source's reader
/// schema (`reader`: `read_event.avsc` or `message_event.avsc`).
pub fn check_avro(s: &Source, schema: &str, reader: &str) -> Vec<TopologyError> {
    let problem = |message: String| {
        vec![TopologyError {
            at: at(s, "format"),
            message,
        }]
    };
    let reader = apache_avro::Schema::parse_str(reader).expect("bundled schema");
    match apache_avro::Schema::parse_str(schema) {
        Err(e) => problem(format!("the schema of {} is not Avro: {e}", subject(s))),
        Ok(writer) => match SchemaCompatibility::can_read(&writer, &reader) {
            Ok(_) => Vec::new(),
            Err(e) => problem(format!(
                "the latest schema of {} cannot be read as readstate's: {e}",
                subject(s)
            )),
        },
    }
}

/// Where a source's problems are reported.
fn at(s: &Source, what: &str) -> String {
    format!("source {:?}.{what}", s.name)
}

/// The problems of `s`'s mapping against `schema` (the text of a JSON Schema); empty when
/// it fits.
pub fn check(s: &Source, schema: &str) -> Vec<TopologyError> {
    let at = |what: &str| at(s, what);
    let SourceFormat::Json(mapping) = &s.format else {
        return Vec::new();
    };
    let root: Value = match serde_json::from_str(schema) {
        Ok(v) => v,
        Err(e) => {
            return vec![TopologyError {
                at: at("format"),
                message: format!("the schema of {} is not JSON: {e}", subject(s)),
            }]
        }
    };
    let mut errors = Vec::new();
    for role in Role::ALL {
        let Some(path) = &mapping.paths[role as usize] else {
            continue;
        };
        let dotted = path.join(".");
        let problem = match find(&root, &root, path) {
            Err(missing) => Some(format!(
                "{dotted:?} is not in the schema of {}: no property {missing:?}",
                subject(s)
            )),
            Ok(node) => type_problem(role, mapping, node)
                .map(|p| format!("{dotted:?} in the schema of {}: {p}", subject(s))),
        };
        if let Some(message) = problem {
            errors.push(TopologyError {
                at: at(&format!("fields.{}", role.name())),
                message,
            });
        }
    }
    errors
}

/// The schema node at `path` below `node`, or the first segment not found.
fn find<'a>(root: &'a Value, node: &'a Value, path: &[String]) -> Result<&'a Value, String> {
    let node = resolve(root, node);
    let Some((first, rest)) = path.split_first() else {
        return Ok(node);
    };
    let child = node
        .get("properties")
        .and_then(|p| p.get(first))
        .or_else(|| {
            let all = node.get("allOf")?.as_array()?;
            all.iter()
                .find_map(|s| resolve(root, s).get("properties")?.get(first))
        })
        .ok_or_else(|| first.clone())?;
    find(root, child, rest)
}

/// Follow a local `$ref` (`#/definitions/X`, `#/$defs/X`).
fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) if r.starts_with("#/") => root.pointer(&r[1..]).unwrap_or(node),
        _ => node,
    }
}

/// The JSON types a node allows (`null` left out); empty when it says nothing.
fn types(node: &Value) -> Vec<&str> {
    match node.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
    .into_iter()
    .filter(|t| *t != "null")
    .collect()
}

/// Why `node` cannot hold `role` under `mapping`, if it cannot.
fn type_problem(role: Role, mapping: &FieldMapping, node: &Value) -> Option<String> {
    let allowed = allowed(role, mapping);
    let have = types(node);
    if have.is_empty() || have.iter().any(|t| allowed.contains(t)) {
        if role == Role::Mentions {
            let items = node.get("items").map(types).unwrap_or_default();
            let ids = id_types(mapping.ids.user);
            if !items.is_empty() && !items.iter().any(|t| ids.contains(t)) {
                return Some(format!(
                    "its items are {}, mentions need {} items",
                    items.join(" or "),
                    ids.join(" or ")
                ));
            }
        }
        return None;
    }
    Some(format!(
        "it is {}, {} needs {}",
        have.join(" or "),
        role.name(),
        allowed.join(" or ")
    ))
}

/// The JSON types a role can be read from.
fn allowed(role: Role, mapping: &FieldMapping) -> Vec<&'static str> {
    let ids = mapping.ids;
    let time = |unit: TimeUnit| match unit {
        TimeUnit::Rfc3339 => vec!["string"],
        _ => vec!["integer", "number", "string"],
    };
    match role {
        Role::Reader | Role::Sender => id_types(ids.user),
        Role::Conversation => id_types(ids.conversation),
        Role::Position => match mapping.position {
            PositionKind::Seq | PositionKind::MessageId => vec!["integer", "string"],
            PositionKind::Timestamp => time(mapping.time_unit),
        },
        Role::ReadAt | Role::SentAt => time(mapping.time_unit),
        Role::MessageId if ids.message == IdType::Uuid => vec!["string"],
        Role::MessageId | Role::Device => vec!["string", "integer"],
        Role::Mentions => vec!["array"],
        Role::MentionEveryone => vec!["boolean"],
    }
}

fn id_types(ty: IdType) -> Vec<&'static str> {
    match ty {
        IdType::Uuid => vec!["string"],
        IdType::I64 | IdType::String => vec!["integer", "string"],
    }
}

#[cfg(test)]
mod tests;
