use super::*;
use crate::processor::restorers::HeadsRestorer;
use crate::state::memory::InMemoryStore;
use crate::state::restore::StoreRestorer;
use proptest::prelude::*;

fn spec(wait_ms: u64, max_waiting: usize) -> ResolveSpec {
    ResolveSpec {
        wait: Duration::from_millis(wait_ms),
        max_waiting,
        fallback_to_read_at: true,
    }
}

fn waiting(offset: i64, conversation: i64, message: &str, record_ms: i64) -> WaitingRead {
    WaitingRead {
        event: ReadEvent {
            reader_id: ReaderId::from(offset),
            conversation_id: ConversationId::from(conversation),
            message_seq: crate::serde::json::UNRESOLVED_SEQ,
            message_id: Some(message.to_owned()),
            sender_id: None,
            device_id: Some("phone".into()),
            read_at_ms: record_ms,
        },
        message: Id::text(message).unwrap(),
        origin: Origin { source: 9, offset },
        record_ms,
        record: DeadLetter {
            topic: "reads".into(),
            partition: 2,
            offset,
            key: None,
            value: Some(b"{}".to_vec()),
            reason: UNRESOLVED_MESSAGE,
            error: String::new(),
            key_truncated_from: None,
            value_truncated_from: Some(9000),
        },
    }
}

fn arb_waiting() -> impl Strategy<Value = WaitingRead> {
    (
        any::<i64>(),
        any::<i64>(),
        "[a-z0-9-]{1,40}",
        any::<i64>(),
        proptest::option::of(any::<i64>()),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        proptest::option::of("[a-z]{0,12}"),
    )
        .prop_map(|(offset, conv, msg, ms, sender, key, device)| {
            let mut w = waiting(offset, conv, &msg, ms);
            w.event.sender_id = sender.map(SenderId::from);
            w.event.device_id = device;
            w.record.key = key;
            w
        })
}

proptest! {
    #[test]
    fn a_waiting_read_roundtrips(w in arb_waiting()) {
        let mut b = Vec::new();
        w.encode(&mut b);
        let key = WaitingRead::decode_key(&WaitingRead::encode_key(w.key())).unwrap();
        prop_assert_eq!(WaitingRead::decode(key, &b).unwrap(), w);
    }

    #[test]
    fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let _ = WaitingRead::decode((1, 2), &bytes);
        let _ = WaitingRead::decode_key(&bytes);
    }
}

#[test]
fn a_message_ends_the_waits_of_the_reads_that_name_it() {
    let mut w = Waiting::new(&spec(1_000, 10));
    w.park(waiting(1, 7, "m-1", 0));
    w.park(waiting(2, 7, "m-1", 0));
    w.park(waiting(3, 8, "m-1", 0));
    w.park(waiting(1, 7, "m-1", 0));
    assert_eq!(w.len(), 3, "a replayed record waits once");
    let ended = w.take_for(&ConversationId::from(7), &Id::text("m-1").unwrap());
    let mut offsets: Vec<i64> = ended.iter().map(|r| r.origin.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, [1, 2]);
    assert_eq!(
        w.len(),
        1,
        "another conversation's message of that id still waits"
    );
}

#[test]
fn message_time_ends_waits_and_the_oldest_go_first_beyond_the_cap() {
    let mut w = Waiting::new(&spec(1_000, 2));
    w.park(waiting(1, 7, "a", 100));
    w.park(waiting(2, 7, "b", 500));
    w.advance(1_099);
    assert!(w.expired().is_empty(), "within the wait");
    w.advance(1_100);
    let ended: Vec<i64> = w.expired().iter().map(|r| r.origin.offset).collect();
    assert_eq!(ended, [1]);
    w.park(waiting(3, 7, "c", 50));
    w.park(waiting(4, 7, "d", 900));
    let ended: Vec<i64> = w.expired().iter().map(|r| r.origin.offset).collect();
    assert_eq!(ended, [3], "beyond two waiting: the oldest by record time");
    assert_eq!(w.len(), 2);
}

/// Waits reach the store through the flush (logged, so restored like every entry), and
/// ended stored ones are deleted; a restore through the heads restorer gives them back.
#[test]
fn waits_are_stored_logged_deleted_and_restored() {
    let mut w = Waiting::new(&spec(1_000, 10));
    w.park(waiting(1, 7, "a", 0));
    w.park(waiting(2, 7, "b", 0));
    let mut flush = StoreFlush::default();
    w.flush(&mut flush);
    let logged: Vec<(Vec<u8>, Option<Vec<u8>>)> = flush
        .changelog()
        .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(logged.len(), 2);
    let mut restored = InMemoryStore::new("heads".into());
    let mut records = logged.iter().map(|(k, v)| (k.as_slice(), v.as_deref()));
    HeadsRestorer
        .restore(&mut restored, &mut records, 2)
        .unwrap();
    let mut again = Waiting::new(&spec(1_000, 10));
    again.load(&restored).unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(
        again
            .take_for(&ConversationId::from(7), &Id::text("a").unwrap())
            .len(),
        1
    );
    let mut flush = StoreFlush::default();
    again.flush(&mut flush);
    let deleted: Vec<Option<&[u8]>> = flush.changelog().map(|(_, v)| v).collect();
    assert_eq!(deleted, [None], "a tombstone for the ended wait");
}
