//! The changelog reader against librdkafka's mock cluster.

use super::*;

fn raw() -> Box<dyn StoreRestorer> {
    Box::new(crate::state::restore::RawRestorer)
}

/// A process resumed after SIGSTOP finds its watermark request expired in librdkafka's
/// queue (TimedOutQueue): asked again, not fatal. A CI run saw the paused instance of
/// unread_e2e exit 1 with "Meta data fetch error: TimedOutQueue" after SIGCONT: its
/// assignment callback was fetching watermarks when it was stopped.
#[test]
fn watermark_errors_of_a_paused_process_are_asked_again() {
    use rdkafka::error::KafkaError as E;
    use rdkafka::types::RDKafkaErrorCode as C;
    for c in [
        C::TimedOutQueue,
        C::OperationTimedOut,
        C::RequestTimedOut,
        C::BrokerTransportFailure,
        C::LeaderNotAvailable,
    ] {
        assert!(retriable(&E::MetadataFetch(c)), "{c:?}");
    }
    for c in [C::TopicAuthorizationFailed, C::InvalidPartitions] {
        assert!(!retriable(&E::MetadataFetch(c)), "{c:?}");
    }
}
use crate::ids::{ConversationId, ReaderId};
use crate::model::StateKey;
use crate::state::memory::InMemoryStore;
use crate::state::{read_checkpoint, ReadState, StoreKey};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

/// Two partitions restored in small steps: every step returns to the caller, and each
/// store ends with the last value per key and the changelog's end as checkpoint.
#[test]
fn restores_several_partitions_incrementally() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("cl", 2, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .create()
        .unwrap();
    let key = |c: i64| {
        StoreKey::state(&StateKey {
            conversation: ConversationId::from(c),
            reader: ReaderId::from(1),
        })
    };
    for i in 0..250i64 {
        for p in 0..2 {
            let v = ReadState {
                last_read_seq: i,
                version: i,
                emitted_version: i,
                ..Default::default()
            }
            .to_bytes();
            let k = key(i % 10);
            producer
                .send(
                    BaseRecord::to("cl")
                        .partition(p)
                        .key(k.as_bytes())
                        .payload(&v),
                )
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let settings = KafkaSettings::new(mock.bootstrap_servers());
    let mut reader = ChangelogReader::new(
        settings,
        "r".into(),
        vec![Some("cl".into())],
        40,
        series::Owner::new(),
    );
    for p in 0..2 {
        let (low, high) = reader.watermarks(0, p).unwrap();
        assert_eq!((low, high), (0, 250));
        let store = Box::new(InMemoryStore::new("s".into()));
        assert!(reader
            .register(TaskId::new(0, p), 0, store, raw(), 0, high)
            .unwrap()
            .is_none());
    }
    let mut done = Vec::new();
    let mut steps = 0;
    while done.len() < 2 {
        done.extend(reader.step().unwrap());
        steps += 1;
        assert!(steps < 1_000, "restore finishes");
    }
    assert!(
        steps >= 500 / 40,
        "at most one batch per step: {steps} steps"
    );
    assert!(!reader.is_restoring());
    for r in done {
        assert_eq!(r.records, 250);
        assert_eq!(read_checkpoint(&*r.store).unwrap(), Some(250));
        let v = r.store.get(key(9).as_bytes()).unwrap().unwrap();
        assert_eq!(ReadState::decode(&v).unwrap().last_read_seq, 249);
    }
}

/// Two stores of one task, each from its own changelog topic: each ends with its own
/// records and its own changelog's end as checkpoint, and a store without a changelog
/// is not restored at all.
#[test]
fn restores_each_store_of_a_task_from_its_own_changelog() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("state-cl", 1, 1).unwrap();
    mock.create_topic("heads-cl", 1, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .create()
        .unwrap();
    let state_key = StoreKey::state(&StateKey {
        conversation: ConversationId::from(3),
        reader: ReaderId::from(4),
    });
    let head_key = StoreKey::head(&ConversationId::from(3));
    let head = crate::state::ConversationHead {
        message_count: 7,
        ..Default::default()
    };
    let mut head_bytes = Vec::new();
    head.encode(&mut head_bytes);
    for i in 0..30i64 {
        let v = ReadState {
            last_read_seq: i,
            ..Default::default()
        }
        .to_bytes();
        let rec = BaseRecord::to("state-cl")
            .partition(0)
            .key(state_key.as_bytes());
        producer.send(rec.payload(&v)).unwrap();
    }
    for _ in 0..5 {
        let rec = BaseRecord::to("heads-cl")
            .partition(0)
            .key(head_key.as_bytes());
        producer.send(rec.payload(&head_bytes)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let settings = KafkaSettings::new(mock.bootstrap_servers());
    let topics = vec![Some("state-cl".into()), Some("heads-cl".into()), None];
    let mut reader = ChangelogReader::new(settings, "r".into(), topics, 8, series::Owner::new());
    assert!(!reader.has_changelog(2));
    let task = TaskId::new(0, 0);
    for index in 0..2 {
        let (low, high) = reader.watermarks(index, 0).unwrap();
        let store = Box::new(InMemoryStore::new(format!("s{index}").into()));
        assert!(reader
            .register(task, index, store, raw(), low, high)
            .unwrap()
            .is_none());
    }
    assert_eq!(reader.tasks(), [task], "one task, two stores restoring");
    let mut done = Vec::new();
    for _ in 0..1_000 {
        done.extend(reader.step().unwrap());
        if done.len() == 2 {
            break;
        }
    }
    done.sort_by_key(|r| r.index);
    let [state, heads] = done.as_slice() else {
        panic!("both stores restore: {}", done.len());
    };
    assert_eq!((state.records, heads.records), (30, 5));
    assert_eq!(read_checkpoint(&*state.store).unwrap(), Some(30));
    assert_eq!(read_checkpoint(&*heads.store).unwrap(), Some(5));
    assert!(state.store.get(head_key.as_bytes()).unwrap().is_none());
    let h = heads.store.get(head_key.as_bytes()).unwrap().unwrap();
    assert_eq!(
        crate::state::ConversationHead::decode(&h)
            .unwrap()
            .message_count,
        7
    );
    assert!(!reader.is_restoring());
}
