//! TaskExecutor (Kafka Streams' `TaskExecutor`): processing polled records in their
//! tasks, and committing a set of tasks: the one commit protocol of `ARCHITECTURE.md`
//! ([`commit::commit`], the same the test drivers run on memory) on a [`KafkaLog`].
//!
//! The executor reports what a commit did as a [`CommitOutcome`]; losing tasks and
//! stopping the instance are the task manager's decisions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;

use super::dead_letter_log::DeadLetterQueue;
use super::kafka_log::{KafkaLog, Refused};
use super::offsets::{SourceOffsets, TopicPartition};
use super::parking::{rewind, Parking};
use super::record_collector::{RecordCollector, TxnError};
use super::repartition_purger::Purging;
use super::rerouter::Rerouter;
use super::schema_gate::SchemaGate;
use super::state_manager::StateManager;
use super::tasks::{Forwarding, Tasks};
use super::{RunConfig, RunSummary, RuntimeError};
use crate::ids::Origin;
use crate::processor::{InputId, SourceSerdes};
use crate::task::commit;
use crate::task::{DeadLetter, SourceRecord};
use crate::telemetry::{series, Progress};
use crate::topology::graph::{Graph, Route};
use crate::topology::{ProcessingGuarantee, Source};

/// A commit the group refused while it rebalances: counted and told once, at INFO (it is
/// expected, and costs nothing but the wait).
fn postponed(why: &str) {
    metrics::counter!("readstate_commits_postponed_total").increment(1);
    tracing::info!(
        reason = why,
        "commit postponed until the rebalance completes; no task is lost"
    );
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What a commit did, when nothing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CommitOutcome {
    /// Outputs, changelog, stores and offsets are durable (or there was nothing to do).
    Committed,
    /// The transaction was aborted: the tasks went back to their stores and the
    /// partitions to their committed offsets.
    Aborted,
    /// The coordinator refused the offsets because the group is rebalancing: they are
    /// committed after the rebalance, for the partitions still owned (under
    /// exactly_once_v2 the transaction was aborted, and the tasks went back to their stores
    /// and the partitions to their committed offsets). No task is lost.
    Postponed { why: String },
    /// The coordinator refused the offsets (or the transaction) because this member left
    /// the group: every task is lost. `requeue`: the consumer may still hold the assignment.
    Lost { why: String, requeue: bool },
    /// The producer was fenced: every task is lost, and a new producer is needed.
    Fenced { why: String },
}

pub(super) struct TaskExecutor {
    guarantee: ProcessingGuarantee,
    /// Where each task topic's records go: the compiled graph's source → processor input.
    routes: Vec<Route>,
    /// The internal topic repartitioned records are read back from, if any: its records
    /// entered readstate once already (counted when consumed from their source).
    repartitioned: Option<String>,
    /// The changelog topic of each store of a task (indexed as `Topology::stores()`).
    changelogs: Vec<Option<String>>,
    /// The sources' deserializers (writer schemas, repartition keys), and the park and
    /// resume protocol of the schema registry.
    schemas: SchemaGate,
    /// The topic of each sink node, by `SinkId`.
    sinks: Vec<String>,
    collector: RecordCollector,
    /// Produces the records the tasks found misrouted to where they belong.
    rerouter: Rerouter,
    /// Deletes records of the internal topics the tasks read (repartition, rerouted)
    /// below the committed offsets; made once there is something to delete.
    purger: Purging,
    pub(super) offsets: SourceOffsets,
    pub(super) dead_letters: DeadLetterQueue,
    pub(super) summary: RunSummary,
    progress: Arc<Progress>,
    /// Whose per-task series these are.
    owner: series::Owner,
}

impl TaskExecutor {
    /// The executor of an instance of `config`'s topology, whose one source is `source`.
    pub(super) fn for_topology(
        config: &RunConfig,
        source: &Source,
        state: &StateManager,
        serdes: Arc<dyn SourceSerdes>,
        rt: tokio::runtime::Runtime,
        owner: series::Owner,
    ) -> Result<Self, RuntimeError> {
        let t = &config.topology;
        let graph = Graph::compile(t);
        let changelogs = t.changelog_topics();
        Ok(Self {
            guarantee: t.guarantee,
            routes: graph.routes(),
            repartitioned: source.repartition_topic.as_ref().map(|t| t.0.clone()),
            sinks: graph.sink_topics().iter().map(|t| t.0.clone()).collect(),
            collector: RecordCollector::for_topology(config, state, changelogs.clone())?,
            changelogs,
            schemas: SchemaGate::new(serdes, rt),
            purger: Purging::new(config, source),
            rerouter: Rerouter::for_topology(t),
            offsets: SourceOffsets::default(),
            dead_letters: DeadLetterQueue::new(t.bad_records, t.dead_letter_topic.0.clone()),
            summary: RunSummary::default(),
            progress: config.progress.clone(),
            owner,
        })
    }

    /// Whether records of this partition are processed now; a parked one remembers the
    /// first record it dropped.
    fn accepts(tasks: &Tasks, parking: &mut Parking, m: &BorrowedMessage<'_>) -> bool {
        if parking.drop_record(m.topic(), m.partition(), m.offset()) {
            return false;
        }
        // Not owned: revoked in this poll (the next owner reads it from the committed
        // offset).
        tasks.owns(m.topic(), m.partition())
    }

    /// Decode and fold a polled batch (and forward what needs repartitioning). An error
    /// stops the instance (bad records under `fail` or the circuit breaker included).
    pub(super) fn process<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tasks: &mut Tasks,
        parking: &mut Parking,
        msgs: &[BorrowedMessage<'_>],
    ) -> Result<(), RuntimeError> {
        if msgs.is_empty() {
            return Ok(());
        }
        self.schemas.prepare(consumer, tasks, parking, msgs)?;
        let dead_before = self.dead_letters.len();
        // Group by task and input (the graph's route of the record's topic), keeping order
        // within each; forward what needs repartitioning.
        let mut batches: BTreeMap<(i32, InputId), Vec<SourceRecord<'_>>> = BTreeMap::new();
        let (mut accepted, mut entered) = (0u64, 0u64);
        for m in msgs {
            if !Self::accepts(tasks, parking, m) {
                continue;
            }
            accepted += 1;
            if !self.carries_origin(m.topic()) {
                entered += 1;
            }
            let Some(input) = Graph::route(&self.routes, m.topic()).map(|r| r.input) else {
                self.forward(tasks, m);
                continue;
            };
            let origin = self.origin_of(m);
            let batch = batches.entry((m.partition(), input)).or_default();
            batch.push(source_record(m, origin));
        }
        // Records dropped here (parked, revoked) are consumed again later, and counted then.
        // The summary counts a repartitioned event once (when consumed from its source);
        // the live progress counts every record consumed (the demo and bench pace on it).
        self.summary.records_consumed += entered;
        Progress::add(&self.progress.records_consumed, accepted);
        metrics::counter!("readstate_events_consumed_total").increment(accepted);
        for ((p, input), recs) in batches {
            self.process_input(tasks, p, input, &recs)?;
        }
        match self
            .dead_letters
            .judge(Instant::now(), accepted, dead_before)
        {
            None => Ok(()),
            Some(why) => {
                metrics::counter!("readstate_bad_record_stops_total").increment(1);
                Err(RuntimeError::Fatal(why))
            }
        }
    }

    /// Records of task `p`'s input `input`.
    fn process_input(
        &mut self,
        tasks: &mut Tasks,
        p: i32,
        input: InputId,
        recs: &[SourceRecord<'_>],
    ) -> Result<(), RuntimeError> {
        let before = self.dead_letters.len();
        let task = &mut tasks.running.get_mut(&p).expect("accepted above").task;
        task.process(input, recs, self.dead_letters.pending_mut())?;
        self.dead_letters.log_since(before);
        self.summary.records_rerouted += self.rerouter.send(task, &self.collector);
        let first = recs[0].offset;
        let next = recs.last().expect("non-empty").offset + 1;
        self.offsets.advance(recs[0].topic, p, first, next);
        Ok(())
    }

    /// Whether records of `topic` entered readstate before (repartitioned or rerouted):
    /// their origin rides in a header, and they were counted when first consumed.
    fn carries_origin(&self, topic: &str) -> bool {
        self.repartitioned.as_deref() == Some(topic) || self.rerouter.is_rerouted_topic(topic)
    }

    /// Through a repartition or rerouted topic the origin rides in a header; a record
    /// without one (not written by readstate) counts as originating where it is.
    fn origin_of(&mut self, m: &BorrowedMessage<'_>) -> Origin {
        let carried = match self.carries_origin(m.topic()) {
            true => Forwarding::carried_origin(m),
            false => None,
        };
        carried.unwrap_or_else(|| Origin {
            source: self.offsets.origin_id(m.topic(), m.partition()),
            offset: m.offset(),
        })
    }

    /// Ask the registry again when due; once it answers, resume the parked partitions.
    pub(super) fn retry_registry<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parking: &mut Parking,
    ) -> Result<(), RuntimeError> {
        self.schemas.retry(consumer, parking)
    }

    /// Sub-topology 0: re-key one source record by conversation_id and produce it to the
    /// repartition topic with its origin; undecodable records become dead letters here.
    fn forward(&mut self, tasks: &Tasks, m: &BorrowedMessage<'_>) {
        let p = m.partition();
        let origin = Origin {
            source: self.offsets.origin_id(m.topic(), p),
            offset: m.offset(),
        };
        let f = tasks
            .forwarding
            .as_ref()
            .expect("accepted as a forwarded partition");
        let mut key = Vec::with_capacity(24);
        match (self.schemas.serdes()).repartition_key(m.topic(), m.payload(), &mut key) {
            Ok(()) => {
                self.collector.send(f.record(&key, m.payload(), origin));
                self.summary.records_forwarded += 1;
                metrics::counter!("readstate_repartition_records_total").increment(1);
            }
            Err(e) => {
                let rec = source_record(m, origin);
                let max = self.schemas.serdes().max_record_bytes();
                let d = DeadLetter::from_record(&rec, e.reason(), e.to_string(), max);
                self.dead_letters.push(d);
            }
        }
        self.offsets
            .advance(m.topic(), p, m.offset(), m.offset() + 1);
    }

    /// The commit protocol ([`commit::commit`] on a [`KafkaLog`]) for the tasks of
    /// `parts` (under exactly_once_v2, for every owned task: one transaction holds every
    /// task's records). A produce or store failure is returned (the caller resets the
    /// tasks and stops the instance).
    pub(super) fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tasks: &mut Tasks,
        parts: &[TopicPartition],
    ) -> Result<CommitOutcome, RuntimeError> {
        let started = Instant::now();
        let parts = match self.is_exactly_once() {
            true => tasks.owned(),
            false => parts.to_vec(),
        };
        let (offsets, entries) = self.offsets.to_commit(&parts);
        let dead = self.dead_letters.take();
        self.summary.dead_letters += dead.len() as u64;
        Progress::add(&self.progress.dead_letters, dead.len() as u64);
        let mut log = KafkaLog {
            collector: &self.collector,
            consumer,
            sinks: &self.sinks,
            changelogs: &self.changelogs,
            dead_letter_topic: self.dead_letters.topic(),
            offsets,
            committed: false,
        };
        let mut running = tasks.of(&parts);
        let done = commit::commit(&mut log, self.guarantee, &mut running, &dead, now_ms());
        let committed = log.committed;
        drop(running);
        let report = done?;
        self.summary.changelog_records += report.changelog_records;
        let outcome = match report.refused {
            None => {
                if committed {
                    self.committed_now(entries);
                }
                CommitOutcome::Committed
            }
            Some(refused) => self.refused(consumer, tasks, &parts, refused)?,
        };
        if outcome == CommitOutcome::Committed {
            self.summary.commits += 1;
            for t in tasks.running.values_mut() {
                t.report(&mut self.summary, &self.progress, self.owner);
            }
            metrics::histogram!("readstate_commit_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(tasks = report.tasks, elapsed = ?started.elapsed(), "committed");
        }
        Ok(outcome)
    }

    /// What a refused completion means: offsets postponed while the group rebalances, the
    /// tasks lost with the membership, or (exactly_once_v2) an aborted transaction, after
    /// which the tasks go back to their stores and the partitions to their committed
    /// offsets.
    fn refused<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tasks: &mut Tasks,
        parts: &[TopicPartition],
        refused: Refused,
    ) -> Result<CommitOutcome, RuntimeError> {
        let failed = || metrics::counter!("readstate_commits_failed_total").increment(1);
        Ok(match refused {
            Refused::Rebalancing(why) => {
                postponed(&why);
                CommitOutcome::Postponed { why }
            }
            Refused::Gone(why) => {
                failed();
                CommitOutcome::Lost { why, requeue: true }
            }
            Refused::Transaction(TxnError::Aborted(e)) => {
                tracing::warn!(error = %e, "transaction aborted: tasks resume from their stores and the committed offsets");
                failed();
                self.rewind_to_committed(consumer, tasks, parts)?;
                CommitOutcome::Aborted
            }
            Refused::Transaction(TxnError::Rebalancing(e)) => {
                postponed(&e);
                self.rewind_to_committed(consumer, tasks, parts)?;
                CommitOutcome::Postponed { why: e }
            }
            Refused::Transaction(e @ TxnError::Migrated(_)) => {
                failed();
                let why = e.to_string();
                CommitOutcome::Lost { why, requeue: true }
            }
            Refused::Transaction(e @ TxnError::Fenced(_)) => {
                failed();
                CommitOutcome::Fenced { why: e.to_string() }
            }
        })
    }

    /// Offsets are committed: remember them, and let the internal topics go below them.
    fn committed_now(&mut self, entries: Vec<(TopicPartition, i64)>) {
        self.purger.offer(&entries, self.rerouter.topics());
        self.offsets.committed_now(entries);
    }

    /// After an aborted transaction: every task drops its cache, and every partition goes
    /// back to its committed offset (what the aborted transaction held is read again).
    fn rewind_to_committed<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tasks: &mut Tasks,
        parts: &[TopicPartition],
    ) -> Result<(), RuntimeError> {
        self.reset_tasks(tasks, parts)?;
        self.dead_letters.clear();
        for tp in parts {
            self.offsets.drop_position(tp);
            if let Some(offset) = self.offsets.committed(tp) {
                rewind(consumer, tp, offset)?;
            }
        }
        Ok(())
    }

    /// The tasks of `parts` forget what is not in their stores.
    pub(super) fn reset_tasks(
        &mut self,
        tasks: &mut Tasks,
        parts: &[TopicPartition],
    ) -> Result<(), RuntimeError> {
        for (_, p) in parts {
            if let Some(t) = tasks.running.get_mut(p) {
                t.task.reset_to_store()?;
            }
        }
        Ok(())
    }

    /// Tasks lost: nothing more is produced for them; what they processed is forgotten.
    /// Returns the committed offsets (where partitions still assigned resume).
    pub(super) fn abandon(&mut self) -> std::collections::HashMap<TopicPartition, i64> {
        self.collector.abandon();
        self.dead_letters.clear();
        self.offsets.clear()
    }

    /// How many tasks run now, for whoever watches the instance's progress.
    pub(super) fn report_running(&self, tasks: usize) {
        Progress::set(&self.progress.tasks_running, tasks as u64);
    }

    pub(super) fn is_exactly_once(&self) -> bool {
        self.guarantee == ProcessingGuarantee::ExactlyOnceV2
    }

    /// A new producer after this one was fenced.
    pub(super) fn recreate_producer(&mut self) -> Result<(), RuntimeError> {
        Ok(self.collector.recreate()?)
    }

    /// Forget a revoked partition's position.
    pub(super) fn forget(&mut self, tp: &TopicPartition) {
        self.offsets.forget(tp);
    }

    /// Close the producer: flushing what is queued (clean) or dropping it.
    pub(super) fn close(&mut self, clean: bool) {
        if clean {
            self.collector.close();
        } else {
            self.collector.abandon();
        }
    }
}

fn source_record<'a>(m: &'a BorrowedMessage<'_>, origin: Origin) -> SourceRecord<'a> {
    SourceRecord {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        value: m.payload(),
        origin,
        timestamp: m.timestamp().to_millis(),
    }
}
