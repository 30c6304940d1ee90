use super::*;

/// The mapping of `topologies/json_read_receipts.toml`'s shape: numeric ids as strings,
/// `read_at` in seconds as the position.
fn receipts() -> FieldMapping {
    let mut m = FieldMapping::new(&[
        (Role::Reader, "reader_id"),
        (Role::Conversation, "conversation_id"),
        (Role::Position, "read_at"),
        (Role::MessageId, "msg_id"),
        (Role::Device, "device_id"),
        (Role::Sender, "sender_id"),
    ]);
    m.position = PositionKind::Timestamp;
    m.time_unit = TimeUnit::Seconds;
    m
}

fn decode<'a>(m: &FieldMapping, json: &'a str) -> Result<EventRef<'a>, DecodeError> {
    JsonDecoder::new(m.clone(), 65536).decode_ref(Some(json.as_bytes()))
}

#[test]
fn maps_fields_and_borrows_the_strings() {
    let json = r#"{"msg_id": "550e8400-e29b-41d4-a716-446655440000", "sender_id": "123",
        "reader_id": 456, "conversation_id": "789", "read_at": 1704067200,
        "device_id": "device-abc", "extra": {"nested": [1, 2, {"x": null}]}}"#;
    let e = decode(&receipts(), json).unwrap();
    assert_eq!(e.reader_id, ReaderId::from(456));
    assert_eq!(e.conversation_id, ConversationId::from(789));
    assert_eq!(e.sender_id, Some(SenderId::from(123)));
    assert_eq!(e.message_seq, 1_704_067_200_000_000, "microseconds");
    assert_eq!(
        e.read_at_ms, 1_704_067_200_000,
        "read_at defaults to the position"
    );
    assert!(matches!(
        e.message_id,
        Some(Cow::Borrowed("550e8400-e29b-41d4-a716-446655440000"))
    ));
    assert!(matches!(e.device_id, Some(Cow::Borrowed("device-abc"))));
}

/// The issue's exact event with `[ids]` string users and conversations, UUID messages.
#[test]
fn string_and_uuid_ids_as_declared() {
    let mut m = receipts();
    m.ids = IdTypes {
        conversation: IdType::String,
        user: IdType::String,
        message: IdType::Uuid,
    };
    let json = r#"{"msg_id": "550E8400-E29B-41D4-A716-446655440000", "sender_id": "user123",
        "reader_id": "user456", "conversation_id": "conv789", "read_at": 1704067200,
        "device_id": "device-abc"}"#;
    let e = decode(&m, json).unwrap();
    assert_eq!(e.reader_id.to_string(), "user456");
    assert_eq!(e.conversation_id.to_string(), "conv789");
    assert_eq!(e.sender_id.unwrap().to_string(), "user123");
    assert_eq!(
        e.message_id.as_deref(),
        Some("550e8400-e29b-41d4-a716-446655440000"),
        "a uuid message id is written canonically"
    );
    let numeric = r#"{"reader_id": 456, "conversation_id": "789", "read_at": 1}"#;
    let e = decode(&m, numeric).unwrap();
    assert_eq!(e.reader_id.to_string(), "456", "a number is its text");
    assert_eq!(e.reader_id.as_int(), None, "a string id, not an integer");
    let bad = [
        (
            r#"{"msg_id": "m-1", "reader_id": "a", "conversation_id": "c", "read_at": 1}"#,
            "message_id: \"m-1\" is not a UUID",
        ),
        (
            r#"{"reader_id": true, "conversation_id": "c", "read_at": 1}"#,
            "reader: expected an id of type string",
        ),
    ];
    for (json, says) in bad {
        let err = decode(&m, json).unwrap_err();
        assert!(err.to_string().contains(says), "{json}: {err}");
    }
    let long = format!(
        r#"{{"reader_id": "{}", "conversation_id": "c", "read_at": 1}}"#,
        "x".repeat(256)
    );
    let err = decode(&m, &long).unwrap_err();
    assert!(err.to_string().contains("longer than 255 bytes"), "{err}");
    m.ids.user = IdType::Uuid;
    let err = decode(&m, numeric).unwrap_err();
    assert!(
        err.to_string()
            .contains("reader: the number 456 is not a uuid id"),
        "{err}"
    );
}

#[test]
fn nested_paths_defaults_and_nulls() {
    let mut m = FieldMapping::new(&[
        (Role::Reader, "who.id"),
        (Role::Conversation, "where.channel.id"),
        (Role::Position, "seq"),
        (Role::Device, "who.device"),
        (Role::ReadAt, "at"),
    ]);
    m.defaults[Role::Device as usize] = Some(FieldDefault::Str("unknown".into()));
    m.time_unit = TimeUnit::Rfc3339;
    let json = r#"{"seq": 7, "who": {"id": 1, "device": null},
        "where": {"other": 1, "channel": {"id": 2}}, "at": "2024-01-01T00:00:00.5Z"}"#;
    let e = decode(&m, json).unwrap();
    assert_eq!(
        (
            e.reader_id.as_int().unwrap(),
            e.conversation_id.as_int().unwrap(),
            e.message_seq
        ),
        (1, 2, 7)
    );
    assert_eq!(
        e.device_id.as_deref(),
        Some("unknown"),
        "null takes the default"
    );
    assert_eq!(e.read_at_ms, 1_704_067_200_500);
    assert_eq!(e.message_id, None, "unmapped");
}

#[test]
fn bad_records_say_what_is_wrong() {
    let m = receipts();
    let cases = [
        (
            r#"{"reader_id": 1, "conversation_id": 2}"#,
            "invalid_event",
            "no position (field \"read_at\")",
        ),
        (
            r#"{"reader_id": "user456", "conversation_id": 2, "read_at": 1}"#,
            "invalid_event",
            "\"user456\" is not a 64-bit integer",
        ),
        (
            r#"{"reader_id": 1, "conversation_id": 2, "read_at": "soon"}"#,
            "invalid_event",
            "position: \"soon\" is not a number",
        ),
        (
            r#"{"reader_id": 1, "conversation_id": {}, "read_at": 1}"#,
            "invalid_event",
            "conversation: expected an id of type i64",
        ),
        (
            r#"{"reader_id": 1, "conversation_id": 2, "read_at": -5}"#,
            "invalid_event",
            "negative",
        ),
        (r#"{"reader_id": 1, "#, "malformed", "EOF"),
        (r#"[1, 2]"#, "malformed", "expected a JSON object"),
        (r#"{"reader_id": 1} trailing"#, "malformed", "trailing"),
    ];
    for (json, reason, says) in cases {
        let err = decode(&m, json).unwrap_err();
        assert_eq!(err.reason(), reason, "{json}: {err}");
        assert!(err.to_string().contains(says), "{json}: {err}");
    }
    let d = JsonDecoder::new(m, 10);
    assert_eq!(d.decode_ref(None).unwrap_err(), DecodeError::EmptyValue);
    assert_eq!(
        d.decode_ref(Some(&[b' '; 11])).unwrap_err().reason(),
        "too_large"
    );
}

#[test]
fn time_units_and_json_schema_framing() {
    let mut m = receipts();
    for (unit, value, us) in [
        (TimeUnit::Seconds, "1.25", 1_250_000),
        (TimeUnit::Millis, "1500", 1_500_000),
        (TimeUnit::Micros, "\"42\"", 42),
        (TimeUnit::Rfc3339, "\"1970-01-01T01:00:00+01:00\"", 0),
    ] {
        m.time_unit = unit;
        let json = format!(r#"{{"reader_id": 1, "conversation_id": 2, "read_at": {value}}}"#);
        assert_eq!(
            decode(&m, &json).unwrap().message_seq,
            us,
            "{unit:?} {value}"
        );
    }
    m.time_unit = TimeUnit::Seconds;
    m.wire_header = true;
    let mut framed = vec![0, 0, 0, 0, 9];
    framed.extend_from_slice(br#"{"reader_id": 1, "conversation_id": 2, "read_at": 3}"#);
    let d = JsonDecoder::new(m, 65536);
    assert_eq!(d.decode_ref(Some(&framed)).unwrap().message_seq, 3_000_000);
    assert_eq!(
        d.decode_ref(Some(b"{}")).unwrap_err().reason(),
        "not_wire_format"
    );
}

#[test]
fn rfc3339_agrees_with_humantime() {
    for s in [
        "1970-01-01T00:00:00Z",
        "2000-02-29T12:34:56Z",
        "2024-01-01T00:00:00.123456Z",
        "2038-01-19T03:14:08Z",
        "1999-12-31T23:59:59.9Z",
    ] {
        let want = humantime::parse_rfc3339(s).unwrap();
        let want = want
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        assert_eq!(parse_rfc3339(s), Some(want), "{s}");
    }
    assert_eq!(
        parse_rfc3339("2024-01-01T02:00:00+02:00"),
        parse_rfc3339("2024-01-01T00:00:00Z")
    );
    assert_eq!(
        parse_rfc3339("2024-01-01t00:00:00-01:30"),
        parse_rfc3339("2024-01-01T01:30:00Z")
    );
    for bad in [
        "2024-13-01T00:00:00Z",
        "2024-01-01",
        "2024-01-01T00:00:00",
        "2024-01-01T00:00:00.Z",
        "2024-01-01T00:00:00Zjunk",
    ] {
        assert_eq!(parse_rfc3339(bad), None, "{bad}");
    }
}

#[test]
fn message_events_with_mentions() {
    let mut m = FieldMapping::new(&[
        (Role::Conversation, "channel.id"),
        (Role::Position, "seq"),
        (Role::Sender, "author"),
        (Role::MessageId, "id"),
        (Role::Mentions, "mentions"),
        (Role::MentionEveryone, "everyone"),
        (Role::SentAt, "sent_at"),
    ]);
    m.time_unit = TimeUnit::Seconds;
    let d = JsonDecoder::new(m, 65536);
    let json = br#"{"channel": {"id": "7"}, "seq": 12, "author": 3, "id": "m-12",
        "mentions": [4, "5"], "everyone": true, "sent_at": 1.5, "body": "hi @4"}"#;
    let msg = d.decode_message(Some(json)).unwrap();
    assert_eq!(
        msg,
        MessageEvent {
            conversation_id: ConversationId::from(7),
            message_seq: 12,
            message_id: Some("m-12".into()),
            sender_id: SenderId::from(3),
            sent_at_ms: 1500,
            mentions: vec![ReaderId::from(4), ReaderId::from(5)],
            mention_everyone: true,
        }
    );
    let plain = d
        .decode_message(Some(br#"{"channel": {"id": 7}, "seq": 1, "author": 3}"#))
        .unwrap();
    assert!(plain.mentions.is_empty() && !plain.mention_everyone);
    for (json, says) in [
        (&br#"{"channel": {"id": 7}, "seq": 1}"#[..], "no sender"),
        (
            br#"{"channel": {"id": 7}, "seq": 1, "author": 3, "mentions": 4}"#,
            "expected an array",
        ),
        (
            br#"{"channel": {"id": 7}, "seq": 1, "author": 3, "mentions": [[4]]}"#,
            "expected an array",
        ),
        (
            br#"{"channel": {"id": 7}, "seq": 1, "author": 3, "mentions": ["x"]}"#,
            "mentions: \"x\"",
        ),
        (
            br#"{"channel": {"id": 7}, "seq": 1, "author": 3, "everyone": 1}"#,
            "expected true or false",
        ),
    ] {
        let err = d.decode_message(Some(json)).unwrap_err();
        assert_eq!(err.reason(), "invalid_event", "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
}

/// `position = "message_id"`: the read carries its message id and no seq of its own
/// (resolved later); a read without a message id is invalid, naming the field.
#[test]
fn a_read_by_message_id_is_unresolved_and_needs_the_id() {
    let mut m = receipts();
    m.position = PositionKind::MessageId;
    m.paths[Role::Position as usize] = None;
    m.paths[Role::ReadAt as usize] = Some(vec!["read_at".into()]);
    let json = r#"{"msg_id": "m-1", "reader_id": 4, "conversation_id": 7, "read_at": 1704067200}"#;
    let e = decode(&m, json).unwrap();
    assert_eq!(e.message_seq, UNRESOLVED_SEQ);
    assert_eq!(e.message_id.as_deref(), Some("m-1"));
    assert_eq!(e.read_at_ms, 1_704_067_200_000);
    let err = decode(&m, r#"{"reader_id": 4, "conversation_id": 7}"#).unwrap_err();
    assert_eq!(
        err.to_string(),
        DecodeError::Invalid("no message_id (field \"msg_id\")".into()).to_string()
    );
}
