//! Member lists of a members source (`records = "members"`): a compacted table topic
//! keyed by conversation id (its text, as every co-partitioned source), each value the
//! conversation's members now, in JSON: a list of ids, or an object whose `members` is
//! one. Ids are JSON strings or integers, parsed as the topology's user id type. A
//! tombstone (no value) means the conversation has no members any more.

use super::DecodeError;
use crate::ids::{ConversationId, Id, IdTypes, ReaderId};

/// One record of a members source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberList {
    pub conversation: ConversationId,
    /// Sorted and deduplicated; empty for a tombstone.
    pub members: Vec<ReaderId>,
}

/// Decode a members record (key: the conversation id as text).
pub fn decode_members(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    ids: &IdTypes,
    max_members: usize,
) -> Result<MemberList, DecodeError> {
    let invalid = |why: String| DecodeError::Invalid(format!("member list: {why}"));
    let key = key.ok_or_else(|| invalid("no key (the conversation id)".into()))?;
    let key = std::str::from_utf8(key).map_err(|_| invalid("key is not UTF-8".into()))?;
    let conversation = Id::parse(ids.conversation, key)
        .map(ConversationId::from)
        .map_err(|e| invalid(format!("key {key:?}: {e}")))?;
    let Some(value) = value else {
        return Ok(MemberList {
            conversation,
            members: Vec::new(),
        });
    };
    let json: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| DecodeError::MalformedJson(e.to_string()))?;
    let list = match &json {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => match o.get("members") {
            Some(serde_json::Value::Array(a)) => a,
            _ => return Err(invalid("an object without a \"members\" list".into())),
        },
        _ => return Err(invalid("neither a list nor an object".into())),
    };
    if list.len() > max_members {
        return Err(invalid(format!(
            "{} members, more than the limit of {max_members}",
            list.len()
        )));
    }
    let mut members = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(invalid(format!("members[{i}] is {other}, not an id"))),
        };
        let id = Id::parse(ids.user, &text).map_err(|e| invalid(format!("members[{i}]: {e}")))?;
        members.push(ReaderId::from(id));
    }
    members.sort_unstable();
    members.dedup();
    Ok(MemberList {
        conversation,
        members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::IdType;

    #[test]
    fn lists_objects_tombstones_and_errors() {
        let ids = IdTypes::default();
        let m = decode_members(Some(b"7"), Some(b"[3, 1, \"2\", 1]"), &ids, 10).unwrap();
        assert_eq!(m.conversation, ConversationId::from(7));
        let want: Vec<ReaderId> = [1, 2, 3].into_iter().map(ReaderId::from).collect();
        assert_eq!(m.members, want);
        let o = decode_members(Some(b"7"), Some(br#"{"members": [1, 2, 3]}"#), &ids, 10);
        assert_eq!(o.unwrap().members, want);
        assert!(decode_members(Some(b"7"), None, &ids, 10)
            .unwrap()
            .members
            .is_empty());
        for (key, value) in [
            (Some(&b"x"[..]), Some(&b"[1]"[..])),
            (None, Some(&b"[1]"[..])),
            (Some(b"7"), Some(b"{\"m\": []}")),
            (Some(b"7"), Some(b"[1, \"a\"]")),
            (Some(b"7"), Some(b"[1, 2, 3, 4]")),
            (Some(b"7"), Some(b"not json")),
        ] {
            assert!(decode_members(key, value, &ids, 3).is_err(), "{value:?}");
        }
        let text = IdTypes {
            user: IdType::String,
            conversation: IdType::String,
            ..IdTypes::default()
        };
        let m = decode_members(Some(b"conv-1"), Some(b"[\"u1\", 5]"), &text, 10).unwrap();
        assert_eq!(m.members.len(), 2);
    }
}
