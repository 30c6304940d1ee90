//! Changelog reader (Kafka Streams' `StoreChangelogReader`): restores the stores of newly
//! assigned tasks from their changelog partitions, incrementally, between polls of the
//! main consumer. Each `step` applies at most `batch` records (or stops at its time budget)
//! so the poll loop keeps serving the group however long a restore takes; the source
//! partitions of restoring tasks stay paused meanwhile. One restore consumer (no group
//! membership, manual assignment) serves every restoring store: a task with several
//! stores restores each from its own changelog topic, and is complete when all are.

use crate::telemetry::series;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::RuntimeError;
use crate::backoff::Backoff;
use crate::ids::TaskId;
use crate::kafka::{KafkaError, KafkaSettings};
use crate::state::restore::StoreRestorer;
use crate::state::KeyValueStore;

/// A restore that makes no progress this long fails the instance.
const STALLED_AFTER: Duration = Duration::from_secs(120);

struct Restoring {
    task: TaskId,
    /// Which of the task's stores (its index in `Topology::stores()`).
    index: usize,
    store: Box<dyn KeyValueStore>,
    restorer: Box<dyn StoreRestorer>,
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
    /// Which of the task's stores.
    pub index: usize,
    pub store: Box<dyn KeyValueStore>,
    pub records: u64,
    pub elapsed: Duration,
}

pub struct ChangelogReader {
    settings: KafkaSettings,
    group: String,
    /// The changelog topic of each store index (`None`: a store without a changelog).
    topics: Vec<Option<String>>,
    consumer: Option<BaseConsumer>,
    /// By (store index, changelog partition).
    restoring: BTreeMap<(usize, i32), Restoring>,
    /// Most records applied per step.
    batch: usize,
    /// Most time spent per step (then the poll loop gets its turn).
    budget: Duration,
    /// Until when a leaderless changelog partition is asked again (set by the first ask,
    /// cleared by an answer).
    leader_wait: Option<Instant>,
    /// Whose `readstate_restore_remaining_records` series these are.
    owner: series::Owner,
}

impl ChangelogReader {
    /// The reader of an instance of `config`'s topology (none when no store has a
    /// changelog).
    pub(super) fn for_topology(config: &super::RunConfig, owner: series::Owner) -> Option<Self> {
        let t = &config.topology;
        let changelogs = t.changelog_topics();
        changelogs.iter().any(Option::is_some).then(|| {
            let group = format!("{}-restore", t.application_id);
            Self::new(
                config.kafka.clone(),
                group,
                changelogs,
                config.restore_batch,
                owner,
            )
        })
    }

    pub fn new(
        settings: KafkaSettings,
        group: String,
        topics: Vec<Option<String>>,
        batch: usize,
        owner: series::Owner,
    ) -> Self {
        Self {
            settings,
            group,
            topics,
            consumer: None,
            restoring: BTreeMap::new(),
            batch: batch.max(1),
            budget: Duration::from_millis(200),
            leader_wait: None,
            owner,
        }
    }

    fn consumer(&mut self) -> Result<&BaseConsumer, KafkaError> {
        if self.consumer.is_none() {
            self.consumer = Some(self.settings.restore_consumer(&self.group).create()?);
        }
        Ok(self.consumer.as_ref().expect("created above"))
    }

    /// The changelog partition's (low, high) watermarks. A changelog created a moment ago
    /// may have no leader yet, and a process resumed after a pause may have to reconnect:
    /// those answers are asked again, backing off, until a deadline
    /// 10 s after the first ask since the last answer. The deadline is shared by the
    /// partitions asked one after another (this runs inside the assignment callback), so a
    /// changelog that never gets a leader costs 10 s in all, not 10 s per partition.
    pub fn watermarks(&mut self, store: usize, partition: i32) -> Result<(i64, i64), KafkaError> {
        let topic = self.topics[store]
            .clone()
            .expect("a store with a changelog");
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

    /// Whether store `index` has a changelog to restore from.
    pub fn has_changelog(&self, index: usize) -> bool {
        self.topics.get(index).is_some_and(Option::is_some)
    }

    /// Start restoring `store` from `from` up to `end`; a store already complete is handed
    /// back at once.
    pub fn register(
        &mut self,
        task: TaskId,
        index: usize,
        store: Box<dyn KeyValueStore>,
        restorer: Box<dyn StoreRestorer>,
        from: i64,
        end: i64,
    ) -> Result<Option<Restored>, RuntimeError> {
        if from >= end {
            self.report_remaining(task);
            return Ok(Some(Restored {
                task,
                index,
                store,
                records: 0,
                elapsed: Duration::ZERO,
            }));
        }
        let now = Instant::now();
        self.restoring.insert(
            (index, task.partition),
            Restoring {
                task,
                index,
                store,
                restorer,
                next: from,
                end,
                restored: 0,
                started: now,
                last_progress: now,
            },
        );
        self.report_remaining(task);
        self.reassign()?;
        Ok(None)
    }

    /// `readstate_restore_remaining_records{task}`: summed over the task's stores.
    /// `readstate_restore_remaining_records{task}` (removed when the task closes).
    fn remaining(&self, task: TaskId, v: f64) {
        let task = task.to_string();
        let name = "readstate_restore_remaining_records";
        series::set(self.owner, name, &[("task", &task)], v);
    }

    fn report_remaining(&self, task: TaskId) {
        let left: i64 = self
            .restoring
            .values()
            .filter(|r| r.task == task)
            .map(|r| (r.end - r.next).max(0))
            .sum();
        self.remaining(task, left as f64);
    }

    /// Stop restoring a task's stores (revoked or lost meanwhile); they are closed.
    pub fn remove(&mut self, partition: i32) -> Option<TaskId> {
        let keys: Vec<(usize, i32)> = self
            .restoring
            .keys()
            .filter(|(_, p)| *p == partition)
            .copied()
            .collect();
        let task = keys
            .iter()
            .filter_map(|k| self.restoring.remove(k))
            .map(|r| r.task)
            .last()?;
        self.remaining(task, 0.0);
        if let Err(e) = self.reassign() {
            tracing::warn!(error = %e, "restore consumer reassignment failed");
        }
        Some(task)
    }

    /// Every task with a store being restored.
    pub fn tasks(&self) -> Vec<TaskId> {
        let mut t: Vec<TaskId> = self.restoring.values().map(|r| r.task).collect();
        t.sort_unstable();
        t.dedup();
        t
    }

    fn reassign(&mut self) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for ((i, p), r) in &self.restoring {
            let topic = self.topics[*i]
                .as_deref()
                .expect("restoring from a changelog");
            tpl.add_partition_offset(topic, *p, Offset::Offset(r.next))?;
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
            topics,
            batch,
            budget,
            ..
        } = self;
        let consumer = consumer.as_ref().expect("created above");
        let polled = poll_batch(consumer, topics, *batch, *budget);
        let mut by_store: BTreeMap<(usize, i32), Vec<&BorrowedMessage<'_>>> = BTreeMap::new();
        for m in &polled {
            let Some(i) = store_of(topics, m.topic()) else {
                continue;
            };
            let k = (i, m.partition());
            if restoring.get(&k).is_some_and(|r| m.offset() >= r.next) {
                by_store.entry(k).or_default().push(m);
            }
        }
        let mut progressed = Vec::new();
        for (k, msgs) in by_store {
            let r = restoring.get_mut(&k).expect("filtered above");
            let next = msgs.last().expect("non-empty").offset() + 1;
            let mut records = msgs
                .iter()
                .filter_map(|m| m.key().map(|k| (k, m.payload())));
            let n = r.restorer.restore(&mut *r.store, &mut records, next)?;
            r.next = next;
            r.restored += n as u64;
            r.last_progress = Instant::now();
            progressed.push(r.task);
            metrics::counter!("readstate_changelog_records_restored_total").increment(n as u64);
        }
        drop(polled);
        for task in progressed {
            self.report_remaining(task);
        }
        let finished: Vec<Restored> = self
            .complete()?
            .into_iter()
            .filter_map(|k| self.restoring.remove(&k))
            .map(|r| Restored {
                task: r.task,
                index: r.index,
                store: r.store,
                records: r.restored,
                elapsed: r.started.elapsed(),
            })
            .collect();
        if !finished.is_empty() {
            for r in &finished {
                self.report_remaining(r.task);
            }
            self.reassign()?;
        }
        Ok(finished)
    }

    /// The restores that reached their end; an error for one that stalled.
    fn complete(&self) -> Result<Vec<(usize, i32)>, RuntimeError> {
        let consumer = self.consumer.as_ref().expect("created by step");
        let position = consumer.position().ok();
        let mut done = Vec::new();
        for ((i, p), r) in &self.restoring {
            let topic = self.topics[*i]
                .as_deref()
                .expect("restoring from a changelog");
            // Compaction leaves offset gaps at the end: the position tells where we are.
            let pos = position
                .as_ref()
                .and_then(|t| t.find_partition(topic, *p))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            if r.next >= r.end || pos.is_some_and(|o| o >= r.end) {
                done.push((*i, *p));
            } else if r.last_progress.elapsed() > STALLED_AFTER {
                return Err(RuntimeError::RestoreStalled {
                    topic: topic.to_owned(),
                    partition: *p,
                    stalled_for: STALLED_AFTER,
                    at: r.next,
                    end: r.end,
                });
            }
        }
        Ok(done)
    }
}

/// The store index whose changelog `topic` is.
fn store_of(topics: &[Option<String>], topic: &str) -> Option<usize> {
    topics.iter().position(|t| t.as_deref() == Some(topic))
}

/// Up to `batch` changelog records, or what arrives within `budget`.
fn poll_batch<'c>(
    consumer: &'c BaseConsumer,
    topics: &[Option<String>],
    batch: usize,
    budget: Duration,
) -> Vec<BorrowedMessage<'c>> {
    let started = Instant::now();
    let mut polled: Vec<BorrowedMessage<'c>> = Vec::new();
    while polled.len() < batch && started.elapsed() < budget {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) if store_of(topics, m.topic()).is_some() => polled.push(m),
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "restore consumer error"),
            None if !polled.is_empty() => break,
            None => {}
        }
    }
    polled
}

/// How long a changelog partition may go without a leader (see
/// [`ChangelogReader::watermarks`]).
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// One partition's watermarks, asked again while the partition has no leader, until
/// `deadline`. A request that timed out (in librdkafka's queue, or past the call's own
/// timeout) once the deadline has passed gets one fresh window: the process was paused
/// while it waited (SIGSTOP), and the pause is no answer from the cluster.
fn watermarks_with_retry(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    mut deadline: Instant,
) -> Result<(i64, i64), KafkaError> {
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
    let mut resumed = false;
    let started = Instant::now();
    loop {
        let e = match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(e) if retriable(&e) => e,
            Err(e) => return Err(e.into()),
        };
        if !resumed && timed_out(&e) && Instant::now() >= deadline {
            resumed = true;
            deadline = Instant::now() + LEADER_WAIT;
        }
        if Instant::now() + backoff.peek() >= deadline {
            return Err(e.into());
        }
        // Said at INFO past a second: the caller (task open, also inside a rebalance
        // callback) waits, and a wait this long is what a stalled instance shows.
        let waited = started.elapsed();
        match waited >= Duration::from_secs(1) {
            true => {
                tracing::info!(topic, partition, error = %e, ?waited, "changelog watermarks not answered yet")
            }
            false => {
                tracing::debug!(topic, partition, error = %e, "changelog watermarks not answered yet")
            }
        }
        std::thread::sleep(backoff.fail());
    }
}

/// The request itself timed out (rather than being answered with an error).
fn timed_out(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::TimedOutQueue | C::OperationTimedOut | C::RequestTimedOut)
    )
}

/// Worth asking again: a partition without a (known) leader yet (a topic just created),
/// or a transient transport failure (librdkafka reconnects; e.g. after the process was
/// paused and its connections timed out).
fn retriable(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::NotLeaderForPartition
                | C::LeaderNotAvailable
                | C::UnknownTopicOrPartition
                // Not in the client's metadata yet (a node of the cluster restarted).
                | C::UnknownPartition
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::RequestTimedOut
                // Requests that expired in librdkafka's queue or waited past the call's
                // timeout: what a process paused past them (SIGSTOP) finds on waking.
                | C::TimedOutQueue
                | C::OperationTimedOut
        )
    )
}

#[cfg(test)]
mod tests;
