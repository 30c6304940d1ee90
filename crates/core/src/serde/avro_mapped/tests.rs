use super::*;
use crate::ids::{IdType, IdTypes};
use crate::serde::json::{PositionKind, Role, TimeUnit};
use apache_avro::Schema;

/// "Another team's" Avro read receipt: string ids, a UUID message id, a millisecond
/// timestamp, the device in a nested optional record.
const SCHEMA: &str = r#"{"type": "record", "name": "ReadReceiptEvent", "namespace": "team.b",
  "fields": [
    {"name": "userId", "type": "string"},
    {"name": "channelId", "type": "string"},
    {"name": "msgId", "type": ["null", {"type": "string", "logicalType": "uuid"}], "default": null},
    {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "client", "type": ["null", {"type": "record", "name": "Client",
      "fields": [{"name": "device", "type": "string"}]}], "default": null}
  ]}"#;

fn mapping() -> FieldMapping {
    let mut m = FieldMapping::new(&[
        (Role::Reader, "userId"),
        (Role::Conversation, "channelId"),
        (Role::Position, "timestamp"),
        (Role::MessageId, "msgId"),
        (Role::Device, "client.device"),
    ]);
    m.position = PositionKind::Timestamp;
    m.time_unit = TimeUnit::Millis;
    m.ids = IdTypes {
        conversation: IdType::String,
        user: IdType::String,
        message: IdType::Uuid,
    };
    m
}

fn record(user: &str, msg: Option<&str>, ts: i64, device: Option<&str>) -> Vec<u8> {
    let schema = Schema::parse_str(SCHEMA).unwrap();
    let union = |v: Option<Value>| match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    };
    let value = Value::Record(vec![
        ("userId".into(), Value::String(user.into())),
        ("channelId".into(), Value::String("general".into())),
        (
            "msgId".into(),
            union(msg.map(|m| Value::Uuid(m.parse().unwrap()))),
        ),
        ("timestamp".into(), Value::TimestampMillis(ts)),
        (
            "client".into(),
            union(device.map(|d| Value::Record(vec![("device".into(), Value::String(d.into()))]))),
        ),
    ]);
    let mut out = vec![0, 0, 0, 0, 42];
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap();
    out.extend(writer.write_value_to_vec(value).unwrap());
    out
}

fn decoder() -> AvroMappedDecoder {
    let mut d = AvroMappedDecoder::new(mapping(), 65536);
    assert!(d.needs_fetch(42));
    d.install(42, Some(SCHEMA));
    d
}

#[test]
fn fields_of_the_users_schema_are_read_by_role() {
    let d = decoder();
    let uuid = "550e8400-e29b-41d4-a716-446655440000";
    let e = d
        .decode_ref(Some(&record(
            "user456",
            Some(uuid),
            1_704_067_200_250,
            Some("phone"),
        )))
        .unwrap();
    assert_eq!(e.reader_id.to_string(), "user456");
    assert_eq!(e.conversation_id.to_string(), "general");
    assert_eq!(e.message_seq, 1_704_067_200_250_000, "microseconds");
    assert_eq!(e.message_id.as_deref(), Some(uuid));
    assert_eq!(e.device_id.as_deref(), Some("phone"));
    let bare = d.decode_ref(Some(&record("u", None, 5, None))).unwrap();
    assert_eq!((bare.message_id, bare.device_id), (None, None));
}

#[test]
fn bad_records_are_named_errors() {
    let d = decoder();
    let long = "u".repeat(256);
    let err = d
        .decode_ref(Some(&record(&long, None, 5, None)))
        .unwrap_err();
    assert!(matches!(err, DecodeError::Invalid(_)), "{err}");
    let mut truncated = record("u", None, 5, None);
    // Cut inside the channel id (apache-avro reads a union index at the very end of the
    // input as its first branch).
    truncated.truncate(5 + 2 + 3);
    assert!(matches!(
        d.decode_ref(Some(&truncated)),
        Err(DecodeError::Malformed { id: 42, .. })
    ));
    let mut other = record("u", None, 5, None);
    other[4] = 43;
    assert!(matches!(
        d.decode_ref(Some(&other)),
        Err(DecodeError::UnknownSchema(43))
    ));
    let mut missing = mapping();
    missing.paths[Role::Reader as usize] = Some(vec!["readerId".into()]);
    let mut d = AvroMappedDecoder::new(missing, 65536);
    d.install(42, Some(SCHEMA));
    let err = d.decode_ref(Some(&record("u", None, 5, None))).unwrap_err();
    assert_eq!(
        err.to_string(),
        DecodeError::Invalid("no reader (field \"readerId\")".into()).to_string()
    );
}
