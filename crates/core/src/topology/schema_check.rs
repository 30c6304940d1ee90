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
        SourceFormat::AvroConfluent | SourceFormat::AvroMapped(_) => true,
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
    let root: Value = match serde_json::from_str(schema) {
        Ok(v) => v,
        Err(e) => return not_parsed(s, "JSON", e),
    };
    check_paths(s, "property", |path| {
        let node = find(&root, &root, path)?;
        let items = node.get("items").map(types).unwrap_or_default();
        Ok((types(node), items))
    })
}

/// The problems of a mapped Avro source's fields against its latest writer `schema` (the
/// text of an Avro schema): every path through record fields (and map values, through
/// unions) must exist with a type its role can be read from.
pub fn check_avro_mapping(s: &Source, schema: &str) -> Vec<TopologyError> {
    let root: Value = match serde_json::from_str(schema) {
        Ok(v) => v,
        Err(e) => return not_parsed(s, "Avro", e),
    };
    let mut named = std::collections::HashMap::new();
    collect_named(&root, None, &mut named);
    check_paths(s, "field", |path| {
        let node = find_avro(&named, &root, path)?;
        let items = match resolve_avro(&named, node) {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("array") => o
                .get("items")
                .map(|i| avro_types(&named, i))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok((avro_types(&named, node), items))
    })
}

fn not_parsed(s: &Source, what: &str, e: serde_json::Error) -> Vec<TopologyError> {
    vec![TopologyError {
        at: at(s, "format"),
        message: format!("the schema of {} is not {what}: {e}", subject(s)),
    }]
}

/// Each mapped role's path located by `locate` (a path `segment` is a property or a
/// field; its types and, for arrays, its items'
/// types; or the first segment not found), and checked against the role.
fn check_paths<'n>(
    s: &Source,
    segment: &str,
    locate: impl Fn(&[String]) -> Result<(Vec<&'n str>, Vec<&'n str>), String>,
) -> Vec<TopologyError> {
    let Some(mapping) = s.format.mapping() else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    for role in Role::ALL {
        let Some(path) = &mapping.paths[role as usize] else {
            continue;
        };
        let dotted = path.join(".");
        let problem = match locate(path) {
            Err(missing) => Some(format!(
                "{dotted:?} is not in the schema of {}: no {segment} {missing:?}",
                subject(s)
            )),
            Ok((have, items)) => type_problem(role, mapping, &have, &items)
                .map(|p| format!("{dotted:?} in the schema of {}: {p}", subject(s))),
        };
        if let Some(message) = problem {
            errors.push(TopologyError {
                at: at(s, &format!("fields.{}", role.name())),
                message,
            });
        }
    }
    errors
}

/// Avro's named types (records, enums, fixed) by name and full name.
fn collect_named<'a>(
    node: &'a Value,
    namespace: Option<&str>,
    named: &mut std::collections::HashMap<String, &'a Value>,
) {
    match node {
        Value::Array(branches) => {
            for b in branches {
                collect_named(b, namespace, named);
            }
        }
        Value::Object(o) => {
            let ns = o.get("namespace").and_then(Value::as_str).or(namespace);
            if let Some(name) = o.get("name").and_then(Value::as_str) {
                if o.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| matches!(t, "record" | "enum" | "fixed"))
                {
                    named.insert(name.to_owned(), node);
                    if let Some(ns) = ns {
                        named.insert(format!("{ns}.{name}"), node);
                    }
                }
            }
            for key in ["fields", "items", "values"] {
                match o.get(key) {
                    Some(Value::Array(fields)) => {
                        for f in fields {
                            if let Some(t) = f.get("type") {
                                collect_named(t, ns, named);
                            }
                        }
                    }
                    Some(v) => collect_named(v, ns, named),
                    None => {}
                }
            }
            if let Some(t @ (Value::Object(_) | Value::Array(_))) = o.get("type") {
                collect_named(t, ns, named);
            }
        }
        _ => {}
    }
}

/// A named type's definition, or the node itself.
fn resolve_avro<'a>(
    named: &std::collections::HashMap<String, &'a Value>,
    node: &'a Value,
) -> &'a Value {
    match node {
        Value::String(n) => named.get(n).copied().unwrap_or(node),
        Value::Object(o) => match o.get("type") {
            Some(t @ (Value::Object(_) | Value::Array(_))) => resolve_avro(named, t),
            _ => node,
        },
        _ => node,
    }
}

/// The Avro schema node at `path` (record fields, map values, through unions), or the
/// first segment not found.
fn find_avro<'a>(
    named: &std::collections::HashMap<String, &'a Value>,
    node: &'a Value,
    path: &[String],
) -> Result<&'a Value, String> {
    let node = resolve_avro(named, node);
    let Some((first, rest)) = path.split_first() else {
        return Ok(node);
    };
    if let Value::Array(branches) = node {
        let mut inner = branches.iter().map(|b| find_avro(named, b, path));
        return inner
            .find(Result::is_ok)
            .unwrap_or_else(|| Err(first.clone()));
    }
    let child = match node.get("type").and_then(Value::as_str) {
        Some("record") => node
            .get("fields")
            .and_then(Value::as_array)
            .and_then(|fs| {
                fs.iter()
                    .find(|f| f.get("name").and_then(Value::as_str) == Some(first))
            })
            .and_then(|f| f.get("type")),
        Some("map") => node.get("values"),
        _ => None,
    }
    .ok_or_else(|| first.clone())?;
    find_avro(named, child, rest)
}

/// The JSON types an Avro node's values are read as (`null` left out).
fn avro_types(
    named: &std::collections::HashMap<String, &Value>,
    node: &Value,
) -> Vec<&'static str> {
    let node = resolve_avro(named, node);
    let of = |t: &str| match t {
        "int" | "long" => Some("integer"),
        "float" | "double" => Some("number"),
        "string" | "enum" => Some("string"),
        "boolean" => Some("boolean"),
        "array" => Some("array"),
        "record" | "map" => Some("object"),
        "bytes" | "fixed" => Some("bytes"),
        _ => None,
    };
    match node {
        Value::Array(branches) => {
            let mut all: Vec<&'static str> =
                branches.iter().flat_map(|b| avro_types(named, b)).collect();
            all.dedup();
            all
        }
        Value::String(t) => of(t).into_iter().collect(),
        Value::Object(o) => o
            .get("type")
            .and_then(Value::as_str)
            .and_then(of)
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
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

/// Why a field of types `have` (arrays: items of types `items`) cannot hold `role` under
/// `mapping`, if it cannot.
fn type_problem(
    role: Role,
    mapping: &FieldMapping,
    have: &[&str],
    items: &[&str],
) -> Option<String> {
    let allowed = allowed(role, mapping);
    if have.is_empty() || have.iter().any(|t| allowed.contains(t)) {
        if role == Role::Mentions {
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
