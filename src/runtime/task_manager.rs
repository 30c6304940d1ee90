//! TaskManager (Kafka Streams' `TaskManager`): the tasks of one instance by partition and
//! their lifecycle.
//!
//! - **Assign**: the partition is paused in the group consumer, its store opened, its
//!   checkpoint judged against the changelog (a checkpoint outside `[low, high]` is
//!   *corrupted*: wipe, restore from the start) and the restore registered with the
//!   [`ChangelogReader`]; when the restore completes the task starts running and the
//!   partition is resumed.
//! - **Revoke** (we still own it): commit the task (clean close), then drop it.
//! - **Lost** (session timeout, a commit refused because of membership): someone else may
//!   own it already. Produce nothing, commit nothing, write no checkpoint: the queued
//!   records are purged, the cache dropped, and the store wiped, so the next owner (this
//!   instance included) restores it from the changelog.
//! - **Fatal** (outputs that could not be made durable): `fatal` is set and the poll loop
//!   stops the instance with an error after `/health` turns 503.
//!
//! Partitions are *parked* (paused in the consumer) while restoring or while the schema
//! registry cannot resolve their records; records of a parked partition that were already
//! fetched are dropped, and the partition is rewound to the first of them when it resumes.

use crate::telemetry::series;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::changelog_reader::{ChangelogReader, Restored};
use super::record_collector::RecordCollector;
use super::repartition_purger::RepartitionPurger;
use super::state_manager::{check_checkpoint, CheckpointCheck, StateManager};
use super::{
    DeadLetterBreaker, LogLimiter, RunConfig, RunSummary, RuntimeError, DEAD_LETTER_LOGS_PER_SECOND,
};
use crate::ids::TaskId;
use crate::kafka::KafkaError;
use crate::processor::{
    CacheBudget, ProcessorContext, ProcessorStats, ProcessorSupplier, ReadStateSupplier,
};
use crate::serde::{EventDecoder, HeadEncoder, MessageDecoder, UpdateEncoder};
use crate::state::{read_checkpoint, KeyValueStore};
use crate::task::{DeadLetter, StreamTask};
use crate::telemetry::{Health, Progress};
use crate::topology::graph::{Graph, Output, Route};
use crate::topology::{ProcessingGuarantee, Topology};

pub(super) struct RunningTask {
    pub(super) task: StreamTask,
    /// Stats already turned into metrics.
    pub(super) reported: ProcessorStats,
}

/// Sub-topology 0 of a repartitioned topology: source partitions whose records are
/// re-keyed by conversation_id and forwarded to the repartition topic.
pub(super) struct Forwarding {
    pub(super) source_topic: String,
    pub(super) repartition_topic: String,
    /// Assigned partitions of the source topic.
    pub(super) partitions: BTreeSet<i32>,
}

/// Why a partition is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ParkReason {
    Restoring,
    Registry,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Parked {
    pub(super) reason: ParkReason,
    /// First offset dropped while parked: where to seek when resuming.
    pub(super) rewind: Option<i64>,
}

/// Waiting for the schema registry to resolve writer schemas.
pub(super) struct RegistryWait {
    pub(super) ids: Vec<u32>,
    pub(super) retry_at: Instant,
    pub(super) backoff: Duration,
    pub(super) since: Instant,
}

pub(super) type TopicPartition = (String, i32);

pub(super) struct TaskManager {
    pub(super) topology: Topology,
    /// The topic the stateful tasks consume (the source, or its repartition topic).
    pub(super) task_topic: String,
    /// The message-event topic co-partitioned with `task_topic`: task p reads partition p
    /// of both.
    pub(super) message_topic: Option<String>,
    /// Where each task topic's records go: the compiled graph's source → processor input.
    pub(super) routes: Vec<Route>,
    /// The changelog topic of each store of a task (indexed as `Topology::stores()`).
    pub(super) changelogs: Vec<Option<String>>,
    /// The topics of the graph's sink nodes: receipt updates, and conversation heads.
    pub(super) receipts_topic: String,
    pub(super) heads_topic: Option<String>,
    /// Makes each task's processor (init with its restored stores).
    supplier: Box<dyn ProcessorSupplier>,
    /// Sub-topology number of the stateful tasks (1 when repartitioned, else 0).
    subtopology: u32,
    pub(super) forwarding: Option<Forwarding>,
    pub(super) running: BTreeMap<i32, RunningTask>,
    /// Partitions assigned but not yet opened.
    to_open: Vec<i32>,
    /// Stores restored of tasks whose other stores are still restoring, by partition
    /// (indexed as `Topology::stores()`).
    restored: BTreeMap<i32, Vec<Option<Restored>>>,
    pub(super) parked: HashMap<TopicPartition, Parked>,
    pub(super) registry_wait: Option<RegistryWait>,
    /// Next offset to commit per topic and partition (keyed by topic first, so the hot
    /// path looks up by `&str` without allocating).
    pub(super) positions: HashMap<String, BTreeMap<i32, i64>>,
    /// Offsets last committed (or first consumed) per partition: the membership probe
    /// commits these again.
    pub(super) committed: HashMap<TopicPartition, i64>,
    pub(super) origin_ids: HashMap<String, HashMap<i32, u32>>,
    pub(super) collector: RecordCollector,
    /// Deletes repartition records below the committed offsets (repartitioned sources).
    pub(super) purger: Option<RepartitionPurger>,
    state: StateManager,
    reader: Option<ChangelogReader>,
    pub(super) decoder: EventDecoder,
    pub(super) message_decoder: Option<MessageDecoder>,
    pub(super) encoder: UpdateEncoder,
    /// Encodes conversation-head updates (a message source with a heads sink).
    pub(super) heads_encoder: Option<HeadEncoder>,
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) dead_letters: Vec<DeadLetter>,
    pub(super) dead_letter_log: LogLimiter,
    pub(super) breaker: DeadLetterBreaker,
    pub(super) summary: RunSummary,
    pub(super) buf: Vec<u8>,
    health: Arc<Health>,
    pub(super) progress: Arc<Progress>,
    assigned_once: bool,
    /// When the poll loop last returned from `poll`.
    pub(super) last_poll: Instant,
    /// A gap between polls longer than this (the process was paused, or stalled) means
    /// the group may have moved on: membership is verified before the next commit.
    pub(super) probe_after: Duration,
    /// Set after such a gap until a membership probe succeeds.
    pub(super) suspect: bool,
    /// The group member id the running tasks were assigned under.
    pub(super) member: Option<String>,
    /// Set when tasks are in an unknown state: the poll loop stops the instance.
    pub(super) fatal: Option<String>,
    /// An error inside a rebalance callback (which cannot return one): the poll loop
    /// returns it.
    pub(super) deferred: Option<RuntimeError>,
}

impl TaskManager {
    pub(super) fn new(
        config: &RunConfig,
        encoder: UpdateEncoder,
        rt: tokio::runtime::Runtime,
    ) -> Result<Self, RuntimeError> {
        let t = &config.topology;
        let changelogs: Vec<Option<String>> = t
            .stores()
            .iter()
            .map(|s| s.changelog_topic.as_ref().map(|c| c.0.clone()))
            .collect();
        let [source] = t.sources.as_slice() else {
            return Err(RuntimeError::Config(format!(
                "{} sources feed one store; run supports one source per topology",
                t.sources.len()
            )));
        };
        let forwarding = source.repartition_topic.as_ref().map(|r| Forwarding {
            source_topic: source.topic.0.clone(),
            repartition_topic: r.0.clone(),
            partitions: BTreeSet::new(),
        });
        let reader = changelogs.iter().any(Option::is_some).then(|| {
            ChangelogReader::new(
                config.kafka.clone(),
                format!("{}-restore", t.application_id),
                changelogs.clone(),
                config.restore_batch,
            )
        });
        let state = StateManager::new(
            config.state_dir.join(t.application_id.as_str()),
            t.stores().into_iter().cloned().collect(),
        );
        let transactional_id = match t.guarantee {
            ProcessingGuarantee::AtLeastOnce => None,
            ProcessingGuarantee::ExactlyOnceV2 => {
                Some(format!("{}-{}", t.application_id, state.process_id()?))
            }
        };
        let collector = RecordCollector::with_transactions(
            &config.kafka,
            changelogs.clone(),
            transactional_id,
        )?;
        let graph = Graph::compile(t);
        Ok(Self {
            topology: t.clone(),
            task_topic: source.task_input_topic().0.clone(),
            message_topic: t.messages.as_ref().map(|m| m.topic.0.clone()),
            routes: graph.routes(),
            changelogs,
            receipts_topic: graph
                .sink_topic(Output::Receipts)
                .map(|t| t.0.clone())
                .ok_or_else(|| RuntimeError::Config("the topology has no receipts sink".into()))?,
            heads_topic: graph
                .sink_topic(Output::ConversationHeads)
                .map(|t| t.0.clone()),
            supplier: Box::new(ReadStateSupplier::new(t)),
            subtopology: u32::from(forwarding.is_some()),
            forwarding,
            running: BTreeMap::new(),
            to_open: Vec::new(),
            restored: BTreeMap::new(),
            parked: HashMap::new(),
            registry_wait: None,
            positions: HashMap::new(),
            committed: HashMap::new(),
            origin_ids: HashMap::new(),
            collector,
            purger: forwarding_purger(config, t),
            state,
            reader,
            decoder: EventDecoder::with_max_record_bytes(
                config.resolver.clone(),
                config.topology.bad_records.max_record_bytes,
            )?,
            message_decoder: match &t.messages {
                Some(_) => Some(MessageDecoder::with_max_record_bytes(
                    config.resolver.clone(),
                    config.topology.bad_records.max_record_bytes,
                )?),
                None => None,
            },
            encoder,
            heads_encoder: None,
            rt,
            dead_letters: Vec::new(),
            dead_letter_log: LogLimiter::new(DEAD_LETTER_LOGS_PER_SECOND),
            breaker: DeadLetterBreaker::new(config.topology.bad_records),
            summary: RunSummary::default(),
            buf: Vec::with_capacity(256),
            health: config.health.clone(),
            progress: config.progress.clone(),
            assigned_once: false,
            last_poll: Instant::now(),
            probe_after: config.kafka.session_timeout() / 3,
            suspect: false,
            member: None,
            fatal: None,
            deferred: None,
        })
    }

    pub(super) fn summary(&self) -> RunSummary {
        self.summary.clone()
    }

    pub(super) fn rocks_memory_bytes(&self) -> usize {
        self.state.memory_bytes()
    }

    fn task_id(&self, partition: i32) -> TaskId {
        TaskId::new(self.subtopology, partition)
    }

    /// The co-partitioned message topic's partition joining task partition `p`.
    fn message_partition(&self, p: i32) -> Option<TopicPartition> {
        self.message_topic.as_ref().map(|t| (t.clone(), p))
    }

    /// A record of a task's topic (the read events' or the co-partitioned messages').
    pub(super) fn is_task_topic(&self, topic: &str) -> bool {
        topic == self.task_topic || self.message_topic.as_deref() == Some(topic)
    }

    /// With a message source, both topics' partitions must come together (the range
    /// assignor guarantees it when every member subscribes to both with equal counts).
    fn check_co_partitioned(&self, parts: &[TopicPartition]) -> Result<(), RuntimeError> {
        let Some(mt) = &self.message_topic else {
            return Ok(());
        };
        let of = |topic: &str| -> BTreeSet<i32> {
            parts
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, p)| *p)
                .collect()
        };
        let (reads, messages) = (of(&self.task_topic), of(mt));
        if reads == messages {
            return Ok(());
        }
        Err(RuntimeError::Fatal(format!(
            "co-partitioning broken: this instance was assigned partitions {reads:?} of {} but {messages:?} of {mt}; every instance of the group must run the same topology (both topics subscribed, range assignment) and both topics must have the same partition count",
            self.task_topic
        )))
    }

    fn is_restoring(&self, p: i32) -> bool {
        self.restored.contains_key(&p)
            || self
                .reader
                .as_ref()
                .is_some_and(|r| r.tasks().iter().any(|t| t.partition == p))
    }

    /// The poll loop returned from `poll`: note a gap long enough to doubt membership.
    pub(super) fn polled(&mut self, now: Instant) {
        if now.duration_since(self.last_poll) > self.probe_after {
            if !self.suspect {
                tracing::warn!(gap = ?now.duration_since(self.last_poll), "long gap between polls (process paused or stalled): membership is verified before the next commit");
            }
            self.suspect = true;
        }
        self.last_poll = now;
    }

    /// New partitions from the group: returns those to pause until their task restored.
    pub(super) fn assign(
        &mut self,
        parts: &[TopicPartition],
        member: Option<String>,
    ) -> Vec<TopicPartition> {
        self.assigned_once = true;
        self.member = member;
        if let Err(e) = self.check_co_partitioned(parts) {
            self.fatal = Some(e.to_string());
            self.deferred.get_or_insert(e);
        }
        self.summary.assignments += 1;
        metrics::counter!("readstate_rebalances_total").increment(1);
        self.queue(parts)
    }

    /// Of `parts`, those still parked (their task restoring, or not opened).
    pub(super) fn still_parked(&self, parts: &[TopicPartition]) -> Vec<TopicPartition> {
        parts
            .iter()
            .filter(|tp| self.parked.contains_key(*tp))
            .cloned()
            .collect()
    }

    /// Queue task partitions for opening (parked) and take forwarded partitions on.
    fn queue(&mut self, parts: &[TopicPartition]) -> Vec<TopicPartition> {
        let mut pause = Vec::new();
        for (topic, p) in parts {
            if *topic == self.task_topic {
                if !self.running.contains_key(p)
                    && !self.to_open.contains(p)
                    && !self.is_restoring(*p)
                {
                    self.to_open.push(*p);
                    let parked = Parked {
                        reason: ParkReason::Restoring,
                        rewind: None,
                    };
                    self.parked.insert((topic.clone(), *p), parked);
                    pause.push((topic.clone(), *p));
                    if let Some(mp) = self.message_partition(*p) {
                        self.parked.insert(mp.clone(), parked);
                        pause.push(mp);
                    }
                    self.health.set_ready(false);
                }
            } else if let Some(f) = &mut self.forwarding {
                if *topic == f.source_topic {
                    f.partitions.insert(*p);
                }
            }
        }
        pause
    }

    /// Open the stores of newly assigned tasks and register their restores.
    pub(super) fn open_assigned<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let parts: Vec<i32> = std::mem::take(&mut self.to_open);
        if parts.is_empty() {
            return Ok(());
        }
        let ids: Vec<TaskId> = parts.iter().map(|p| self.task_id(*p)).collect();
        let started = Instant::now();
        let stores = self.state.open_many(&ids);
        tracing::debug!(tasks = ids.len(), opened = ?started.elapsed(), startup_ms = crate::telemetry::since_start_ms(), "stores opened");
        for (id, stores) in ids.into_iter().zip(stores) {
            for (index, store) in stores?.into_iter().enumerate() {
                if let Some(done) = self.register_restore(id, index, store)? {
                    self.store_restored(consumer, done)?;
                }
            }
        }
        tracing::debug!(
            startup_ms = crate::telemetry::since_start_ms(),
            "checkpoints checked against the changelogs"
        );
        self.update_readiness();
        Ok(())
    }

    /// Judge a store's checkpoint and start its restore; a store with nothing to restore
    /// is returned at once.
    fn register_restore(
        &mut self,
        id: TaskId,
        index: usize,
        store: Box<dyn KeyValueStore>,
    ) -> Result<Option<Restored>, RuntimeError> {
        let Some(reader) = self.reader.as_mut().filter(|r| r.has_changelog(index)) else {
            return Ok(Some(Restored {
                task: id,
                index,
                store,
                records: 0,
                elapsed: Duration::ZERO,
            }));
        };
        let (low, high) = reader.watermarks(index, id.partition)?;
        let store = match check_checkpoint(read_checkpoint(&*store)?, low, high) {
            CheckpointCheck::RestoreFrom(from) => {
                return reader.register(id, index, store, from, high)
            }
            CheckpointCheck::Corrupted(why) => {
                tracing::warn!(task = %id, store = %store.name(), reason = %why, "store does not match its changelog: wiping it and restoring from the start");
                metrics::counter!("readstate_tasks_corrupted_total").increment(1);
                self.summary.tasks_corrupted += 1;
                drop(store);
                self.state.wipe_store(id, index)?;
                self.state.open(id, index)?
            }
        };
        reader.register(id, index, store, low, high)
    }

    /// Apply one step of every running restore; start the tasks that completed.
    pub(super) fn restore_step<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(());
        };
        if !reader.is_restoring() {
            return Ok(());
        }
        for done in reader.step()? {
            self.store_restored(consumer, done)?;
        }
        self.update_readiness();
        Ok(())
    }

    /// One store of a task is restored: start the task once all of its stores are.
    fn store_restored<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        done: Restored,
    ) -> Result<(), RuntimeError> {
        let n = self.state.stores().len();
        let p = done.task.partition;
        let slots = self
            .restored
            .entry(p)
            .or_insert_with(|| (0..n).map(|_| None).collect());
        let index = done.index;
        slots[index] = Some(done);
        if slots.iter().any(Option::is_none) {
            return Ok(());
        }
        let slots = self.restored.remove(&p).expect("present above");
        let done: Vec<Restored> = slots.into_iter().flatten().collect();
        self.start_task(consumer, done)
    }

    fn start_task<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        done: Vec<Restored>,
    ) -> Result<(), RuntimeError> {
        let id = done[0].task;
        let records: u64 = done.iter().map(|r| r.records).sum();
        let elapsed = done.iter().map(|r| r.elapsed).max().unwrap_or_default();
        self.summary.restored_records += records;
        if self.reader.is_some() {
            tracing::info!(task = %id, records, ?elapsed, "task restored");
        }
        let ctx = ProcessorContext {
            task: id,
            stores: done.into_iter().map(|r| r.store).collect(),
            cache: self.cache_share(self.running.len() + 1),
        };
        let processor = self.supplier.init(ctx)?;
        self.running.insert(
            id.partition,
            RunningTask {
                task: StreamTask::new(id, processor),
                reported: Default::default(),
            },
        );
        self.summary.tasks_opened += 1;
        self.share_cache_budget();
        let tp = (self.task_topic.clone(), id.partition);
        self.unpark(consumer, &tp)?;
        match self.message_partition(id.partition) {
            Some(mp) => self.unpark(consumer, &mp),
            None => Ok(()),
        }
    }

    fn update_readiness(&mut self) {
        metrics::gauge!("readstate_tasks_assigned").set(self.running.len() as f64);
        self.prune_series();
        let restoring = self.reader.as_ref().is_some_and(|r| r.is_restoring());
        // Ready once the group has given us an assignment (even an empty one) and every
        // assigned task has restored.
        self.health
            .set_ready(self.assigned_once && !restoring && self.to_open.is_empty());
    }

    /// Remove the per-task and per-partition series of tasks this instance no longer has
    /// (closed, lost, moved): another instance exports them now.
    fn prune_series(&self) {
        let mut live: std::collections::HashSet<String> = self
            .running
            .keys()
            .chain(&self.to_open)
            .map(|p| self.task_id(*p).to_string())
            .collect();
        if let Some(r) = &self.reader {
            live.extend(r.tasks().iter().map(ToString::to_string));
        }
        for name in [
            "readstate_store_estimated_keys",
            "readstate_store_size_bytes",
            "readstate_restore_remaining_records",
        ] {
            series::retain(name, "task", |t| live.contains(t));
        }
    }

    /// Pause a partition; records of it already fetched are dropped (and rewound to).
    pub(super) fn park<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tp: TopicPartition,
        reason: ParkReason,
        rewind: Option<i64>,
    ) -> Result<(), RuntimeError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        consumer.pause(&tpl).map_err(KafkaError::from)?;
        let e = self.parked.entry(tp).or_insert(Parked { reason, rewind });
        e.rewind = match (e.rewind, rewind) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    }

    /// Resume a parked partition, first rewinding to the first record dropped meanwhile.
    pub(super) fn unpark<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tp: &TopicPartition,
    ) -> Result<(), RuntimeError> {
        let Some(parked) = self.parked.remove(tp) else {
            return Ok(());
        };
        if let Some(offset) = parked.rewind {
            rewind(consumer, tp, offset)?;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        consumer.resume(&tpl).map_err(KafkaError::from)?;
        Ok(())
    }

    /// Every topic-partition this instance processes: running tasks and forwarders.
    pub(super) fn owned(&self) -> Vec<TopicPartition> {
        let mut v: Vec<TopicPartition> = self
            .running
            .keys()
            .map(|p| (self.task_topic.clone(), *p))
            .collect();
        let messages: Vec<TopicPartition> = self
            .running
            .keys()
            .filter_map(|p| self.message_partition(*p))
            .collect();
        v.extend(messages);
        if let Some(f) = &self.forwarding {
            v.extend(f.partitions.iter().map(|p| (f.source_topic.clone(), *p)));
        }
        v
    }

    /// `cache_max_entries` is the instance's record-cache budget (as Kafka Streams'
    /// `statestore.cache.max.bytes`): each running task gets an equal share.
    fn share_cache_budget(&mut self) {
        let share = self.cache_share(self.running.len());
        for t in self.running.values_mut() {
            t.task.processor_mut().set_cache_budget(share);
        }
    }

    /// One task's share of the instance's cache budget when it runs `tasks` tasks.
    fn cache_share(&self, tasks: usize) -> CacheBudget {
        let tasks = tasks.max(1);
        let t = &self.topology;
        CacheBudget {
            entries: (t.store.cache_max_entries / tasks).max(1),
            positions: t
                .heads_store
                .as_ref()
                .map_or(0, |h| h.cache_max_entries / tasks),
        }
    }

    /// Forget a partition's bookkeeping (positions, parking).
    fn forget(&mut self, tp: &TopicPartition) {
        if let Some(pos) = self.positions.get_mut(&tp.0) {
            pos.remove(&tp.1);
        }
        self.committed.remove(tp);
        self.parked.remove(tp);
    }

    /// Partitions revoked while we still own them: commit them (clean close), then drop.
    pub(super) fn revoke<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[TopicPartition],
    ) {
        for (t, p) in parts {
            if *t == self.task_topic {
                self.to_open.retain(|q| q != p);
                self.restored.remove(p);
                if let Some(r) = self.reader.as_mut() {
                    r.remove(*p);
                }
            }
        }
        let owned = self.owned();
        let revoked: Vec<TopicPartition> = parts
            .iter()
            .filter(|tp| owned.contains(tp))
            .cloned()
            .collect();
        if !revoked.is_empty() && self.fatal.is_none() {
            let doubtful = self.suspect && !self.verify_membership(consumer);
            if doubtful || self.member_check(consumer) != Membership::Kept {
                // Lost, or in doubt: close without committing (as after a crash); the next
                // owner replays from the committed offsets.
                tracing::warn!(partitions = ?revoked, "membership in doubt: revoked partitions closed without a commit");
            } else if let Err(e) = self.commit_tasks(consumer, &revoked) {
                tracing::error!(error = %e, "commit on revoke failed");
            }
        }
        for tp in &revoked {
            if tp.0 == self.task_topic {
                if self.running.remove(&tp.1).is_some() {
                    self.summary.tasks_closed += 1;
                }
            } else if let Some(f) = &mut self.forwarding {
                f.partitions.remove(&tp.1);
            }
        }
        self.forget_all(parts);
        for (t, p) in parts {
            let p = p.to_string();
            series::remove(CONSUMER_LAG, &[("topic", t), ("partition", &p)]);
        }
        self.share_cache_budget();
        self.update_readiness();
        tracing::info!(partitions = ?revoked, "revoked partitions closed");
    }

    fn forget_all(&mut self, parts: &[TopicPartition]) {
        for tp in parts {
            self.forget(tp);
        }
    }

    /// Every task is lost after a commit the coordinator refused, while the consumer may
    /// still hold its assignment (RebalanceInProgress does not end the membership, and a
    /// cooperative rebalance says nothing of the partitions it leaves in place): the
    /// partitions still assigned are queued again like new ones (parked, restored from
    /// the changelog, rewound to the last committed offset), and the next commit verifies
    /// membership first.
    pub(super) fn lose_all_and_requeue<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        why: &str,
    ) {
        let rewinds = std::mem::take(&mut self.committed);
        self.lose_all(why);
        if consumer.assignment_lost() {
            return;
        }
        let parts: Vec<TopicPartition> = match consumer.assignment() {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Err(e) => {
                self.fatal = Some(format!(
                    "tasks were lost and the assignment is unknown: {e}"
                ));
                return;
            }
        };
        let pause = self.queue(&parts);
        for tp in &parts {
            let Some(&offset) = rewinds.get(tp) else {
                continue;
            };
            if let Some(parked) = self.parked.get_mut(tp) {
                parked.rewind = Some(offset);
            } else if let Err(e) = rewind(consumer, tp, offset) {
                self.fatal = Some(e.to_string());
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &pause {
            tpl.add_partition(t, *p);
        }
        if let Err(e) = consumer.pause(&tpl) {
            self.fatal = Some(format!("cannot pause requeued partitions: {e}"));
        }
        self.suspect = true;
    }

    /// Every task is lost: someone else may own its partition already. Nothing more is
    /// produced or committed for it; its store is wiped so that whoever owns it next
    /// restores it from the changelog.
    pub(super) fn lose_all(&mut self, why: &str) {
        // Only what is owned now is a lost task (a repeated loss finds nothing).
        self.collector.abandon();
        let running: Vec<i32> = self.running.keys().copied().collect();
        let restoring: Vec<i32> = self
            .reader
            .as_ref()
            .map(|r| r.tasks().iter().map(|t| t.partition).collect())
            .unwrap_or_default();
        let mut lost = Vec::new();
        for p in running {
            drop(self.running.remove(&p));
            lost.push(self.task_id(p));
        }
        for p in restoring {
            if let Some(t) = self.reader.as_mut().and_then(|r| r.remove(p)) {
                lost.push(t);
            }
        }
        // Stores restored while another store of their task still restored.
        for p in std::mem::take(&mut self.restored).into_keys() {
            let id = self.task_id(p);
            if !lost.contains(&id) {
                lost.push(id);
            }
        }
        for id in &lost {
            if let Err(e) = self.state.wipe(*id) {
                self.fatal = Some(format!(
                    "task {id} was lost and its store cannot be wiped: {e}"
                ));
            }
        }
        self.to_open.clear();
        if let Some(f) = &mut self.forwarding {
            f.partitions.clear();
        }
        self.positions.clear();
        self.committed.clear();
        self.parked.clear();
        self.registry_wait = None;
        self.dead_letters.clear();
        self.suspect = false;
        self.summary.tasks_lost += lost.len() as u64;
        metrics::counter!("readstate_tasks_lost_total").increment(lost.len() as u64);
        tracing::warn!(tasks = ?lost.iter().map(ToString::to_string).collect::<Vec<_>>(), reason = why, "tasks lost: closed dirty (nothing produced or committed), stores wiped for a restore from the changelog");
        self.update_readiness();
    }

    /// Whether a commit may go on after a long gap between polls.
    pub(super) fn verify_membership<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> bool {
        self.probe_membership(consumer) == Membership::Kept
    }

    /// The member id now against the one the tasks were assigned under: changed means
    /// the client lost its membership and rejoined (librdkafka resets the member id after
    /// a session timeout), so every task is lost; none yet means it is rejoining.
    pub(super) fn member_check<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Membership {
        if self.running.is_empty()
            && self
                .forwarding
                .as_ref()
                .is_none_or(|f| f.partitions.is_empty())
        {
            return Membership::Kept;
        }
        match (&self.member, crate::kafka::member_id(consumer)) {
            (Some(was), Some(now)) if *was != now => {
                let why = format!("group member id changed from {was} to {now}");
                // librdkafka revokes the lost assignment and assigns again: no requeue.
                self.lose_all(&why);
                self.member = None;
                Membership::Lost
            }
            (Some(_), None) => Membership::Unknown,
            _ => Membership::Kept,
        }
    }

    /// Commit, once more, the offsets already committed: the group coordinator refuses it
    /// if this member was removed. On refusal every task is lost; on any other failure the
    /// answer is unknown (a commit is postponed, and the probe repeated next time).
    pub(super) fn probe_membership<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Membership {
        if consumer.assignment_lost() {
            self.lose_all("the consumer reports its assignment lost");
            return Membership::Lost;
        }
        match self.member_check(consumer) {
            Membership::Kept => {}
            other => return other,
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &self.committed {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if tpl.count() == 0 {
            self.suspect = false;
            return Membership::Kept;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            // The client may have rejoined (a new member id) while the commit waited.
            Ok(()) if self.member_check(consumer) != Membership::Kept => Membership::Lost,
            Ok(()) => {
                tracing::info!("membership verified after a long gap between polls");
                self.suspect = false;
                Membership::Kept
            }
            Err(e) if is_membership_error(&e) => {
                self.lose_all_and_requeue(consumer, &format!("membership probe refused: {e}"));
                Membership::Lost
            }
            Err(e) => {
                tracing::warn!(error = %e, "membership probe failed; commit postponed");
                Membership::Unknown
            }
        }
    }

    /// Close every task after the final commit (clean) or without it (after a failure).
    pub(super) fn close_all(&mut self, clean: bool) {
        self.summary.tasks_closed += self.running.len() as u64;
        self.running.clear();
        self.to_open.clear();
        self.prune_series();
        if clean {
            self.collector.close();
        } else {
            self.collector.abandon();
        }
    }
}

fn forwarding_purger(config: &RunConfig, t: &Topology) -> Option<RepartitionPurger> {
    t.sources
        .iter()
        .any(|s| s.repartition_topic.is_some())
        .then(|| RepartitionPurger::new(&config.kafka, config.repartition_purge_interval))
}

/// The consumer lag series, per (topic, partition).
pub(super) const CONSUMER_LAG: &str = "readstate_consumer_lag_records";

/// What a membership probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Membership {
    Kept,
    Lost,
    Unknown,
}

/// Seek a partition back to `offset` (records after it are read again); failing leaves
/// the position unknown, which is fatal.
pub(super) fn rewind<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tp: &TopicPartition,
    offset: i64,
) -> Result<(), RuntimeError> {
    consumer
        .seek(&tp.0, tp.1, Offset::Offset(offset), Duration::from_secs(10))
        .map_err(|e| {
            RuntimeError::Fatal(format!(
                "cannot rewind {} [{}] to offset {offset}: {e}",
                tp.0, tp.1
            ))
        })
}

/// Commit errors meaning this member no longer owns its partitions.
pub(super) fn is_membership_error(e: &RdKafkaError) -> bool {
    e.rdkafka_error_code().is_some_and(is_membership_code)
}

pub(super) fn is_membership_code(c: RDKafkaErrorCode) -> bool {
    matches!(
        c,
        RDKafkaErrorCode::UnknownMemberId
            | RDKafkaErrorCode::IllegalGeneration
            | RDKafkaErrorCode::RebalanceInProgress
            | RDKafkaErrorCode::FencedInstanceId
            | RDKafkaErrorCode::AssignmentLost
            | RDKafkaErrorCode::StaleMemberEpoch
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::KafkaSettings;
    use crate::serde::{LocalRegistry, RECEIPT_UPDATE_SCHEMA};
    use crate::state::{put_checkpoint, StoreBatch};
    use rdkafka::mocking::MockCluster;

    fn manager(brokers: &str, dir: &std::path::Path) -> TaskManager {
        let text = format!(
            r#"
[application]
id = "app"
state_dir = "{}"
[[source]]
name = "events"
topic = "src"
[[store]]
name = "read-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["events"]
store = "read-state"
[[sink]]
name = "updates"
kind = "kafka"
input = "read-state"
topic = "out"
"#,
            dir.display()
        );
        let topology = crate::topology::compile(&text).unwrap();
        let cfg = RunConfig::new(
            topology,
            KafkaSettings::new(brokers),
            Arc::new(LocalRegistry::new()),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let encoder = rt
            .block_on(UpdateEncoder::register(
                &*cfg.resolver,
                "out-value",
                RECEIPT_UPDATE_SCHEMA,
            ))
            .unwrap();
        TaskManager::new(&cfg, encoder, rt).unwrap()
    }

    /// Assign parks the partitions; open judges checkpoints (one beyond the empty
    /// changelog is wiped), restores and starts the tasks, resuming the partitions; a
    /// loss closes them dirty and wipes their stores.
    #[test]
    fn assign_open_corrupted_and_lost() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("src", 2, 1).unwrap();
        mock.create_topic("app-read-state-changelog", 2, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut tm = manager(&mock.bootstrap_servers(), dir.path());
        {
            let mut s = tm.state.open(TaskId::new(0, 0), 0).unwrap();
            let mut b = StoreBatch::default();
            put_checkpoint(&mut b, 100);
            s.write(b).unwrap();
        }
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "g")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("src", 0);
        tpl.add_partition("src", 1);
        consumer.assign(&tpl).unwrap();
        let parts = vec![("src".to_owned(), 0), ("src".to_owned(), 1)];
        let pause = tm.assign(&parts, Some("m1".into()));
        assert_eq!(pause, parts, "restoring partitions are paused");
        assert_eq!(tm.parked.len(), 2);
        tm.open_assigned(&consumer).unwrap();
        while tm.running.len() < 2 {
            tm.restore_step(&consumer).unwrap();
        }
        assert!(tm.parked.is_empty(), "resumed once restored");
        assert_eq!(
            tm.summary.tasks_corrupted, 1,
            "the checkpoint beyond the end"
        );
        let dirs: Vec<_> = [0, 1]
            .map(|p| tm.state.store_dir(TaskId::new(0, p), 0))
            .into();
        assert!(dirs.iter().all(|d| d.exists()));
        tm.lose_all("test");
        assert!(tm.running.is_empty());
        assert_eq!(tm.summary.tasks_lost, 2);
        assert!(dirs.iter().all(|d| !d.exists()), "lost stores are wiped");
    }

    #[test]
    fn membership_errors_are_told_from_transient_ones() {
        let commit = |c| RdKafkaError::ConsumerCommit(c);
        assert!(is_membership_error(&commit(
            RDKafkaErrorCode::UnknownMemberId
        )));
        assert!(is_membership_error(&commit(
            RDKafkaErrorCode::IllegalGeneration
        )));
        assert!(is_membership_error(&commit(
            RDKafkaErrorCode::RebalanceInProgress
        )));
        assert!(!is_membership_error(&commit(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!is_membership_error(&commit(
            RDKafkaErrorCode::RequestTimedOut
        )));
    }
}
