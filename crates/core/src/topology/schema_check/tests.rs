use super::*;
use crate::topology::compile;

/// A JSON Schema source in the issue's shape, with a nested device path.
fn source() -> Source {
    let text = r#"
[application]
id = "app"
[ids]
conversation = "string"
user = "string"
message = "uuid"
[[source]]
name = "events"
topic = "read_receipt_events"
format = "json-schema"
keyed_by = "sender_id"
partitioner = "fnv1a"
position = "timestamp"
time_unit = "s"
fields = { reader = "reader_id", conversation = "conversation_id", position = "read_at", message_id = "msg_id", sender = "sender_id", device = "client.device_id" }
[[store]]
name = "read-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["events"]
store = "read-state"
[[sink]]
name = "out"
kind = "kafka"
input = "read-state"
topic = "out"
"#;
    compile(text).unwrap().sources.remove(0)
}

const FITS: &str = r##"{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "type": "object",
  "properties": {
    "msg_id": {"type": "string", "format": "uuid"},
    "sender_id": {"type": "string"},
    "reader_id": {"type": "string"},
    "conversation_id": {"type": "string"},
    "read_at": {"type": "integer"},
    "client": {"$ref": "#/definitions/Client"}
  },
  "required": ["reader_id", "conversation_id", "read_at"],
  "definitions": {
    "Client": {"type": "object", "properties": {"device_id": {"type": ["string", "null"]}}}
  }
}"##;

#[test]
fn a_schema_the_mapping_fits_passes() {
    let s = source();
    assert!(has_schema(&s));
    assert_eq!(subject(&s), "read_receipt_events-value");
    assert_eq!(check(&s, FITS), Vec::new());
}

#[test]
fn every_missing_path_and_wrong_type_is_reported() {
    let mut v: Value = serde_json::from_str(FITS).unwrap();
    let props = v["properties"].as_object_mut().unwrap();
    props.remove("reader_id");
    props.insert(
        "conversation_id".into(),
        serde_json::json!({"type": "boolean"}),
    );
    props.insert("msg_id".into(), serde_json::json!({"type": "integer"}));
    props.insert("read_at".into(), serde_json::json!({"type": "object"}));
    v["definitions"]["Client"]["properties"] = serde_json::json!({});
    let errors = check(&source(), &v.to_string());
    let got: Vec<(String, String)> = errors.into_iter().map(|e| (e.at, e.message)).collect();
    let want = [
        ("reader", "\"reader_id\" is not in the schema of read_receipt_events-value: no property \"reader_id\""),
        ("conversation", "it is boolean, conversation needs integer or string"),
        ("position", "it is object, position needs integer or number or string"),
        ("message_id", "it is integer, message_id needs string"),
        ("device", "no property \"device_id\""),
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for ((at, message), (field, says)) in got.iter().zip(want) {
        assert_eq!(at, &format!("source \"events\".fields.{field}"));
        assert!(message.contains(says), "{message}");
    }
    assert_eq!(
        check(&source(), "not json")[0].at,
        "source \"events\".format"
    );
}

#[test]
fn an_avro_writer_schema_must_be_readable_as_readstates() {
    let mut s = source();
    s.format = SourceFormat::AvroConfluent;
    let reader = crate::serde::READ_EVENT_SCHEMA;
    assert_eq!(check_avro(&s, reader, reader), Vec::new());
    let strings = reader.replace(
        r#"{"name": "reader_id", "type": "long","#,
        r#"{"name": "reader_id", "type": "string","#,
    );
    assert_ne!(strings, reader, "the test edits the schema");
    let errors = check_avro(&s, &strings, reader);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message.contains("cannot be read as readstate's"),
        "{}",
        errors[0].message
    );
}

/// An Avro source mapped by fields: each path through records (named types referenced by
/// name, optional unions) must exist in the writer schema with a usable type.
#[test]
fn a_mapped_avro_source_is_checked_against_its_writer_schema() {
    let mut s = source();
    let SourceFormat::Json(m) = &s.format else {
        panic!("json-schema source")
    };
    s.format = SourceFormat::AvroMapped(m.clone());
    let schema = |reader: &str, read_at: &str| {
        format!(
            r#"{{"type": "record", "name": "Receipt", "namespace": "svc", "fields": [
              {{"name": "reader_id", "type": "{reader}"}},
              {{"name": "conversation_id", "type": "string"}},
              {{"name": "read_at", "type": {read_at}}},
              {{"name": "msg_id", "type": ["null", {{"type": "string", "logicalType": "uuid"}}]}},
              {{"name": "sender_id", "type": "string"}},
              {{"name": "client", "type": {{"type": "record", "name": "Client", "fields": [
                {{"name": "device_id", "type": ["null", "string"]}}]}}}},
              {{"name": "other_client", "type": ["null", "svc.Client"]}}
            ]}}"#
        )
    };
    let fits = schema(
        "string",
        r#"{"type": "long", "logicalType": "timestamp-millis"}"#,
    );
    assert_eq!(check_avro_mapping(&s, &fits), Vec::new());
    let bad = schema("boolean", r#""bytes""#).replace("\"client\"", "\"device\"");
    let errors = check_avro_mapping(&s, &bad);
    let mut got: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| (e.at.as_str(), e.message.as_str()))
        .collect();
    got.sort();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].0, "source \"events\".fields.device");
    assert!(got[0].1.contains("no field \"client\""), "{got:?}");
    assert_eq!(got[1].0, "source \"events\".fields.position");
    assert!(got[1].1.contains("it is bytes"), "{got:?}");
    assert_eq!(got[2].0, "source \"events\".fields.reader");
    assert!(got[2].1.contains("it is boolean"), "{got:?}");
    // A named type referenced by name: the path goes through it.
    let by_name = fits
        .replace("\"client\", \"type\": {", "\"unused\", \"type\": {")
        .replace("\"other_client\"", "\"client\"");
    assert_eq!(check_avro_mapping(&s, &by_name), Vec::new());
}
