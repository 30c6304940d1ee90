//! Changelog reader (Kafka Streams' `StoreChangelogReader`): restores the stores of newly
//! assigned tasks from their changelog partitions, incrementally, between polls of the
//! main consumer. Each `step` applies at most `batch` records (or stops at its time budget)
//! so the poll loop keeps serving the group however long a restore takes; the source
//! partitions of restoring tasks stay paused meanwhile. One restore consumer (no group
//! membership, manual assignment) serves every restoring task.

use crate::telemetry::series;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::RuntimeError;
use crate::ids::TaskId;
use crate::kafka::{KafkaError, KafkaSettings};
use crate::state::restore::ChangelogRestorer;
use crate::state::KeyValueStore;

/// A restore that makes no progress this long fails the instance.
const STALLED_AFTER: Duration = Duration::from_secs(120);

struct Restoring {
    task: TaskId,
    store: Box<dyn KeyValueStore>,
    restorer: ChangelogRestorer,
    /// Next changelog offset to apply.
    next: i64,
    /// The changelog's end when the restore began.
    end: i64,
    restored: u64,
    started: Instant,
    last_progress: Instant,
}

/// A store whose restore is complete.
pub struct Restored {
    pub task: TaskId,
    pub store: Box<dyn KeyValueStore>,
    pub records: u64,
    pub elapsed: Duration,
}

pub struct ChangelogReader {
    settings: KafkaSettings,
    group: String,
    topic: String,
    consumer: Option<BaseConsumer>,
    /// By changelog partition.
    restoring: BTreeMap<i32, Restoring>,
    /// Most records applied per step.
    batch: usize,
    /// Most time spent per step (then the poll loop gets its turn).
    budget: Duration,
    /// Until when a leaderless changelog partition is asked again (set by the first ask,
    /// cleared by an answer).
    leader_wait: Option<Instant>,
}

impl ChangelogReader {
    pub fn new(settings: KafkaSettings, group: String, topic: String, batch: usize) -> Self {
        Self {
            settings,
            group,
            topic,
            consumer: None,
            restoring: BTreeMap::new(),
            batch: batch.max(1),
            budget: Duration::from_millis(200),
            leader_wait: None,
        }
    }

    fn consumer(&mut self) -> Result<&BaseConsumer, KafkaError> {
        if self.consumer.is_none() {
            self.consumer = Some(self.settings.restore_consumer(&self.group).create()?);
        }
        Ok(self.consumer.as_ref().expect("created above"))
    }

    /// The changelog partition's (low, high) watermarks. A changelog created a moment ago
    /// may have no leader yet: that answer is asked again, backing off, until a deadline
    /// 10 s after the first ask since the last answer. The deadline is shared by the
    /// partitions asked one after another (this runs inside the assignment callback), so a
    /// changelog that never gets a leader costs 10 s in all, not 10 s per partition.
    pub fn watermarks(&mut self, partition: i32) -> Result<(i64, i64), KafkaError> {
        let topic = self.topic.clone();
        let deadline = *self
            .leader_wait
            .get_or_insert_with(|| Instant::now() + LEADER_WAIT);
        let answer = watermarks_with_retry(self.consumer()?, &topic, partition, deadline);
        if answer.is_ok() {
            self.leader_wait = None;
        }
        answer
    }

    pub fn is_restoring(&self) -> bool {
        !self.restoring.is_empty()
    }

    /// Start restoring `store` from `from` up to `end`; a store already complete is handed
    /// back at once.
    pub fn register(
        &mut self,
        task: TaskId,
        store: Box<dyn KeyValueStore>,
        from: i64,
        end: i64,
    ) -> Result<Option<Restored>, RuntimeError> {
        if from >= end {
            gauge(task).set(0.0);
            return Ok(Some(Restored {
                task,
                store,
                records: 0,
                elapsed: Duration::ZERO,
            }));
        }
        let restorer = ChangelogRestorer::new(&*store)?;
        gauge(task).set((end - from) as f64);
        let now = Instant::now();
        self.restoring.insert(
            task.partition,
            Restoring {
                task,
                store,
                restorer,
                next: from,
                end,
                restored: 0,
                started: now,
                last_progress: now,
            },
        );
        self.reassign()?;
        Ok(None)
    }

    /// Stop restoring a task (revoked or lost meanwhile); its store is closed.
    pub fn remove(&mut self, partition: i32) -> Option<TaskId> {
        let r = self.restoring.remove(&partition)?;
        gauge(r.task).set(0.0);
        if let Err(e) = self.reassign() {
            tracing::warn!(error = %e, "restore consumer reassignment failed");
        }
        Some(r.task)
    }

    /// Every task being restored.
    pub fn tasks(&self) -> Vec<TaskId> {
        self.restoring.values().map(|r| r.task).collect()
    }

    fn reassign(&mut self) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (p, r) in &self.restoring {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(r.next))?;
        }
        self.consumer()?.assign(&tpl)?;
        Ok(())
    }

    /// Apply up to one batch of changelog records; return the stores now complete.
    pub fn step(&mut self) -> Result<Vec<Restored>, RuntimeError> {
        if self.restoring.is_empty() {
            return Ok(Vec::new());
        }
        self.consumer()?;
        let Self {
            consumer,
            restoring,
            topic,
            batch,
            budget,
            ..
        } = self;
        let consumer = consumer.as_ref().expect("created above");
        let started = Instant::now();
        let mut polled: Vec<BorrowedMessage<'_>> = Vec::new();
        while polled.len() < *batch && started.elapsed() < *budget {
            match consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) if m.topic() == topic.as_str() => polled.push(m),
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, %topic, "restore consumer error"),
                None if !polled.is_empty() => break,
                None => {}
            }
        }
        let mut by_part: BTreeMap<i32, Vec<&BorrowedMessage<'_>>> = BTreeMap::new();
        for m in &polled {
            if restoring
                .get(&m.partition())
                .is_some_and(|r| m.offset() >= r.next)
            {
                by_part.entry(m.partition()).or_default().push(m);
            }
        }
        for (p, msgs) in by_part {
            let r = restoring.get_mut(&p).expect("filtered above");
            let next = msgs.last().expect("non-empty").offset() + 1;
            let records = msgs
                .iter()
                .filter_map(|m| m.key().map(|k| (k, m.payload())));
            let n = r.restorer.apply(&mut *r.store, records, next)?;
            r.next = next;
            r.restored += n as u64;
            r.last_progress = Instant::now();
            gauge(r.task).set((r.end - r.next).max(0) as f64);
            metrics::counter!("readstate_changelog_records_restored_total").increment(n as u64);
        }
        drop(polled);
        let position = consumer.position().ok();
        let mut done = Vec::new();
        for (p, r) in restoring.iter_mut() {
            // Compaction leaves offset gaps at the end: the position tells where we are.
            let pos = position
                .as_ref()
                .and_then(|t| t.find_partition(topic, *p))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            if r.next >= r.end || pos.is_some_and(|o| o >= r.end) {
                done.push(*p);
            } else if r.last_progress.elapsed() > STALLED_AFTER {
                return Err(RuntimeError::Config(format!(
                    "restore of {topic} [{p}] made no progress for {STALLED_AFTER:?} at offset {} of {}",
                    r.next, r.end
                )));
            }
        }
        let finished: Vec<Restored> = done
            .into_iter()
            .filter_map(|p| restoring.remove(&p))
            .map(|r| {
                gauge(r.task).set(0.0);
                Restored {
                    task: r.task,
                    store: r.store,
                    records: r.restored,
                    elapsed: r.started.elapsed(),
                }
            })
            .collect();
        if !finished.is_empty() {
            self.reassign()?;
        }
        Ok(finished)
    }
}

/// `readstate_restore_remaining_records{task}` (removed when the task closes).
struct Remaining(TaskId);

impl Remaining {
    fn set(&self, v: f64) {
        let task = self.0.to_string();
        series::set("readstate_restore_remaining_records", &[("task", &task)], v);
    }
}

fn gauge(task: TaskId) -> Remaining {
    Remaining(task)
}

/// How long a changelog partition may go without a leader (see
/// [`ChangelogReader::watermarks`]).
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// One partition's watermarks, asked again while the partition has no leader, until
/// `deadline`.
fn watermarks_with_retry(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    deadline: Instant,
) -> Result<(i64, i64), KafkaError> {
    let mut backoff = Duration::from_millis(10);
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(e) if leaderless(&e) && Instant::now() + backoff < deadline => {
                tracing::debug!(topic, partition, error = %e, "changelog partition has no leader yet");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A partition without a (known) leader yet: a topic just created.
fn leaderless(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::NotLeaderForPartition | C::LeaderNotAvailable | C::UnknownTopicOrPartition)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
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
            StoreKey::state(StateKey {
                conversation: ConversationId(c),
                reader: ReaderId(1),
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
        let mut reader = ChangelogReader::new(settings, "r".into(), "cl".into(), 40);
        for p in 0..2 {
            let (low, high) = reader.watermarks(p).unwrap();
            assert_eq!((low, high), (0, 250));
            let store = Box::new(InMemoryStore::new("s".into()));
            assert!(reader
                .register(TaskId::new(0, p), store, 0, high)
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
}
