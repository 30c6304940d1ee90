use proptest::prelude::*;

use super::*;

fn key(id: &Id) -> Vec<u8> {
    let mut out = Vec::new();
    id.encode_key(&mut out);
    out
}

fn text_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_\\-]{0,30}",
        "\\PC{0,40}",
        proptest::collection::vec(any::<u8>().prop_map(|b| (b % 3) as char), 0..8)
            .prop_map(|v| v.into_iter().collect()),
    ]
}

#[test]
fn canonical_uuid_text_is_a_uuid_other_spellings_stay_text() {
    let lower = "550e8400-e29b-41d4-a716-446655440000";
    let id = Id::text(lower).unwrap();
    assert_eq!(id, Id::parse(IdType::Uuid, lower).unwrap());
    assert_eq!(id.to_string(), lower);
    let upper = lower.to_uppercase();
    assert_eq!(Id::text(&upper).unwrap().to_string(), upper);
    assert_eq!(Id::parse(IdType::Uuid, &upper).unwrap(), id);
    assert!(Id::text(&upper).unwrap().fits(IdType::String));
    assert!(!Id::text(&upper).unwrap().fits(IdType::Uuid));
    assert!(Id::parse(IdType::Uuid, "user123").is_err());
    assert_eq!(Id::text("user123").unwrap().to_string(), "user123");
}

#[test]
fn limits_and_types_are_enforced() {
    assert_eq!(
        Id::text(&"x".repeat(256)),
        Err(IdError::TooLong(256)),
        "past the limit"
    );
    assert!(Id::text(&"x".repeat(255)).is_ok());
    assert_eq!(Id::parse(IdType::I64, "-42").unwrap(), Id::int(-42));
    assert!(Id::parse(IdType::I64, "4x").is_err());
    assert!(Id::number(IdType::String, 5).is_err());
    assert_eq!(Id::number(IdType::I64, 5).unwrap().as_int(), Some(5));
}

#[test]
fn serde_keeps_numbers_and_text_apart() {
    let ids = [
        Id::int(-7),
        Id::text("conv789").unwrap(),
        Id::text("550e8400-e29b-41d4-a716-446655440000").unwrap(),
    ];
    let json = serde_json::to_string(&ids).unwrap();
    assert_eq!(
        json,
        r#"[-7,"conv789","550e8400-e29b-41d4-a716-446655440000"]"#
    );
    let back: Vec<Id> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, ids);
}

proptest! {
    #[test]
    fn int_keys_order_as_integers(a in any::<i64>(), b in any::<i64>()) {
        prop_assert_eq!(key(&Id::int(a)).cmp(&key(&Id::int(b))), a.cmp(&b));
    }

    #[test]
    fn text_keys_order_as_text_and_never_prefix(a in text_id(), b in text_id()) {
        let (ia, ib) = (Id::text(&a).unwrap(), Id::text(&b).unwrap());
        let (ka, kb) = (key(&ia), key(&ib));
        if matches!(ia.0, Repr::Text(_)) && matches!(ib.0, Repr::Text(_)) {
            prop_assert_eq!(ka.cmp(&kb), a.as_bytes().cmp(b.as_bytes()));
        }
        if a != b {
            prop_assert!(!ka.starts_with(&kb) && !kb.starts_with(&ka));
        }
    }

    #[test]
    fn key_and_value_forms_round_trip(t in text_id(), n in any::<i64>(), u in any::<[u8; 16]>(), tail in any::<u8>()) {
        for id in [Id::text(&t).unwrap(), Id::int(n), Id::uuid(u)] {
            let mut k = key(&id);
            let len = k.len();
            k.push(tail);
            prop_assert_eq!(Id::decode_key(&k), Some((id.clone(), len)));
            let mut v = Vec::new();
            id.encode_value(&mut v);
            let len = v.len();
            v.push(tail);
            prop_assert_eq!(Id::decode_value(&v), Ok((id.clone(), len)));
            let ty = if id.as_int().is_some() { IdType::I64 } else { IdType::String };
            prop_assert_eq!(Id::parse(ty, &id.to_string()).unwrap(), id);
        }
    }

    #[test]
    fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        let _ = Id::decode_key(&bytes);
        let _ = Id::decode_value(&bytes);
    }
}
