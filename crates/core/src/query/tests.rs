use std::time::Duration;

use super::*;
use crate::ids::Origin;
use crate::model::{MessageEvent, StateKey};
use crate::state::memory::InMemoryStore;
use crate::state::{KeyValueStore, StoreBatch};
use crate::topology::compile;

const PARTITIONS: i32 = 4;

fn topology() -> Topology {
    compile(include_str!(
        "../../../../topologies/read_state_with_unread.toml"
    ))
    .unwrap()
}

/// Queries over one task's in-memory stores; the store handles are returned to write.
fn setup(
    c: &ConversationId,
) -> (
    ReadStateQueries,
    Arc<QueryableStores>,
    Vec<InMemoryStore>,
    i32,
) {
    let t = topology();
    let stores = Arc::new(QueryableStores::default());
    stores.set_partitions(PARTITIONS);
    let q = ReadStateQueries::new(&t, stores.clone());
    let p = q.partition_of(c).unwrap();
    let kv: Vec<InMemoryStore> = (t.stores().iter())
        .map(|s| InMemoryStore::new(s.name.clone()))
        .collect();
    (q, stores, kv, p)
}

fn put_state(store: &mut InMemoryStore, c: &ConversationId, r: i64, seq: i64) {
    let st = ReadState {
        last_read_seq: seq,
        version: seq + 1,
        events_total: seq + 2,
        device_id: Some("phone".into()),
        ..ReadState::default()
    };
    let key = StoreKey::state(&StateKey {
        conversation: c.clone(),
        reader: ReaderId::from(r),
    });
    let mut b = StoreBatch::default();
    b.put_with(key.as_bytes(), |out| st.encode(out));
    store.write(b).unwrap();
}

fn put_head(store: &mut InMemoryStore, c: &ConversationId, senders: &[i64]) {
    let mut head = ConversationHead::default();
    for (i, s) in senders.iter().enumerate() {
        let m = MessageEvent {
            conversation_id: c.clone(),
            message_seq: i as i64,
            message_id: None,
            sender_id: SenderId::from(*s),
            sent_at_ms: 0,
            mentions: vec![ReaderId::from(2)],
            mention_everyone: false,
        };
        head.fold(
            &m,
            Origin {
                source: 1,
                offset: i as i64,
            },
            100,
        );
    }
    let mut b = StoreBatch::default();
    b.put(StoreKey::head(c).as_bytes(), head.to_bytes());
    store.write(b).unwrap();
}

fn now() -> Freshness {
    Freshness::default()
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_running_task_answers_with_its_position_and_counts() {
    let c = ConversationId::from(7);
    let (q, stores, mut kv, p) = setup(&c);
    put_state(&mut kv[0], &c, 1, 3);
    put_state(&mut kv[0], &c, 2, 1);
    // Messages 0..=4: sent by 1, 1, 2, 3, 3; each mentions reader 2.
    put_head(&mut kv[1], &c, &[1, 1, 2, 3, 3]);
    let input = q.task_topic.clone();
    let position = Position::from([((input.clone(), p), 41)]);
    stores.running(p, kv.iter().map(|s| s.reader()).collect(), position);
    let a = block(q.reader_state(&c, &ReaderId::from(1), &now())).unwrap();
    assert_eq!((a.value.last_read_seq, a.value.version), (3, 4));
    assert_eq!(a.value.unread, Some(1), "message 4, not the reader's own");
    assert_eq!(a.position[&input][&p], 41);
    let b = block(q.reader_state(&c, &ReaderId::from(2), &now())).unwrap();
    assert_eq!(
        (b.value.unread, b.value.mentions),
        (Some(2), Some(2)),
        "3 and 4; 2 is its own"
    );
    let all = block(q.readers(&c, 10, &now())).unwrap();
    let ids: Vec<i64> = all
        .value
        .readers
        .iter()
        .map(|r| r.reader.as_int().unwrap())
        .collect();
    assert_eq!((ids, all.value.truncated), (vec![1, 2], false));
    let one = block(q.readers(&c, 1, &now())).unwrap();
    assert!(one.value.truncated);
    let by = block(q.read_by(&c, 2, &now())).unwrap();
    assert_eq!((by.value.read_by, by.value.of), (1, 2));
    let missing = block(q.reader_state(&c, &ReaderId::from(9), &now()));
    assert!(matches!(missing, Err(QueryError::NotFound { .. })));
}

#[test]
fn ownership_restores_and_positions_decide_whether_to_answer() {
    let c = ConversationId::from(7);
    let (q, stores, kv, p) = setup(&c);
    let r = ReaderId::from(1);
    let owned = block(q.reader_state(&c, &r, &now()));
    assert!(matches!(owned, Err(QueryError::NotOwned { partition, .. }) if partition == p));
    stores.restoring(p, Vec::new());
    let restoring = block(q.reader_state(&c, &r, &now()));
    assert!(matches!(restoring, Err(QueryError::Restoring { .. })));
    stores.running(p, kv.iter().map(|s| s.reader()).collect(), Position::new());
    let input = q.task_topic.clone();
    let text = format!("{input}:{p}:10");
    let fresh = Freshness {
        min_position: q.min_position(&c, &text).unwrap(),
        timeout: Duration::from_millis(50),
        allow_stale: false,
    };
    let behind = block(q.reader_state(&c, &r, &fresh));
    assert!(
        matches!(behind, Err(QueryError::Behind { .. })),
        "{behind:?}"
    );
    // A commit past the asked offset while the query waits: it answers.
    let waiting = std::thread::spawn({
        let stores = stores.clone();
        let input = input.clone();
        move || stores.committed(&[((input, p), 11)])
    });
    let fresh = Freshness {
        timeout: Duration::from_secs(30),
        ..fresh
    };
    let answered = block(q.reader_state(&c, &r, &fresh));
    waiting.join().unwrap();
    assert!(
        matches!(answered, Err(QueryError::NotFound { ref position, .. }) if position[&(input.clone(), p)] == 10),
        "{answered:?}"
    );
}

#[test]
fn a_restoring_task_answers_stale_only_when_allowed() {
    let c = ConversationId::from(7);
    let (q, stores, mut kv, p) = setup(&c);
    put_state(&mut kv[0], &c, 1, 3);
    stores.restoring(p, kv.iter().map(|s| s.reader()).collect());
    let r = ReaderId::from(1);
    let strict = block(q.reader_state(&c, &r, &now()));
    assert!(
        matches!(strict, Err(QueryError::Restoring { .. })),
        "{strict:?}"
    );
    let stale = Freshness {
        allow_stale: true,
        ..now()
    };
    let a = block(q.reader_state(&c, &r, &stale)).unwrap();
    assert!(a.stale && a.position.is_empty());
    assert_eq!(a.value.last_read_seq, 3);
    // A position asked for cannot be promised by a task that restores.
    let text = format!("{}:{p}:0", q.task_topic);
    let asked = Freshness {
        min_position: q.min_position(&c, &text).unwrap(),
        ..stale
    };
    let behind = block(q.reader_state(&c, &r, &asked));
    assert!(
        matches!(behind, Err(QueryError::Restoring { .. })),
        "{behind:?}"
    );
}

#[test]
fn bad_requests_name_what_is_wrong() {
    let c = ConversationId::from(7);
    let (q, _, _, p) = setup(&c);
    let other = (p + 1) % PARTITIONS;
    let input = q.task_topic.clone();
    for (text, says) in [
        ("nope", "not topic:partition:offset"),
        ("", "not topic:partition:offset"),
        (
            &format!("{input}:{p}:1,") as &str,
            "not topic:partition:offset",
        ),
        (
            &format!("{input}:{p}:-1") as &str,
            "not topic:partition:offset",
        ),
        ("elsewhere:0:1", "which no task reads"),
        (&format!("{input}:{other}:1"), "is on partition"),
    ] {
        let e = q.min_position(&c, text).unwrap_err().to_string();
        assert!(e.contains(says), "{text}: {e}");
    }
    assert!(q
        .conversation("x")
        .unwrap_err()
        .to_string()
        .contains("conversation id"));
}
