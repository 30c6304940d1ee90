//! TaskExecutor (Kafka Streams' `TaskExecutor`): processing polled records in their
//! tasks, and the one commit protocol of `ARCHITECTURE.md` over a set of tasks:
//!
//! 1. prepare each task's flush (memory only);
//! 2. produce outputs and dead letters (at-least-once: and wait for their acknowledgements);
//! 3. produce changelog records;
//! 4. complete the commit: at-least-once waits for every acknowledgement, writes each store
//!    batch with its checkpoint, then commits the source offsets; exactly_once_v2 commits one
//!    transaction holding the records and the offsets, then writes the store batches.
//!
//! Step 4 is the only place where the two guarantees differ. The executor reports what
//! happened as a [`CommitOutcome`]; losing tasks and stopping the instance are the task
//! manager's decisions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use rdkafka::Message;

use super::dead_letter_log::DeadLetterQueue;
use super::membership::{refusal, Refusal};
use super::offsets::{SourceOffsets, TopicPartition};
use super::parking::{rewind, Parking};
use super::record_collector::{RecordCollector, TxnError};
use super::repartition_purger::RepartitionPurger;
use super::schema_gate::SchemaGate;
use super::tasks::Tasks;
use super::{RunSummary, RuntimeError};
use crate::ids::Origin;
use crate::kafka::dead_letter_headers;
use crate::processor::{FlushOutput, InputId, SourceSerdes};
use crate::task::{DeadLetter, SourceRecord};
use crate::telemetry::{series, Progress};
use crate::topology::graph::{Graph, Route};
use crate::topology::ProcessingGuarantee;

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
    /// The repartition topic read back (see [`ExecutorParts::repartitioned`]).
    repartitioned: Option<String>,
    /// The changelog topic of each store of a task (indexed as `Topology::stores()`).
    changelogs: Vec<Option<String>>,
    /// The sources' deserializers (writer schemas, repartition keys), and the park and
    /// resume protocol of the schema registry.
    schemas: SchemaGate,
    /// The topic of each sink node, by `SinkId`.
    sinks: Vec<String>,
    collector: RecordCollector,
    /// Deletes records of the repartition topic (the first) below the committed offsets.
    purger: Option<(String, RepartitionPurger)>,
    pub(super) offsets: SourceOffsets,
    pub(super) dead_letters: DeadLetterQueue,
    pub(super) summary: RunSummary,
    progress: Arc<Progress>,
    /// Whose per-task series these are.
    owner: series::Owner,
}

/// What the executor is made of (`TaskManager::new` builds it from the run's config).
pub(super) struct ExecutorParts {
    pub(super) guarantee: ProcessingGuarantee,
    pub(super) routes: Vec<Route>,
    /// The internal topic repartitioned records are read back from, if any: its records
    /// entered readstate once already (counted when consumed from their source).
    pub(super) repartitioned: Option<String>,
    pub(super) changelogs: Vec<Option<String>>,
    pub(super) serdes: Arc<dyn SourceSerdes>,
    pub(super) sinks: Vec<String>,
    pub(super) collector: RecordCollector,
    pub(super) purger: Option<(String, RepartitionPurger)>,
    pub(super) dead_letters: DeadLetterQueue,
    pub(super) progress: Arc<Progress>,
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) owner: series::Owner,
}

impl TaskExecutor {
    pub(super) fn new(p: ExecutorParts) -> Self {
        Self {
            guarantee: p.guarantee,
            routes: p.routes,
            repartitioned: p.repartitioned,
            changelogs: p.changelogs,
            schemas: SchemaGate::new(p.serdes, p.rt),
            sinks: p.sinks,
            collector: p.collector,
            purger: p.purger,
            offsets: SourceOffsets::default(),
            dead_letters: p.dead_letters,
            summary: RunSummary::default(),
            progress: p.progress,
            owner: p.owner,
        }
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
            if self.repartitioned.as_deref() != Some(m.topic()) {
                entered += 1;
            }
            let Some(input) = Graph::route(&self.routes, m.topic()).map(|r| r.input) else {
                self.forward(tasks, m);
                continue;
            };
            let origin = self.origin_of(tasks, m);
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
        let first = recs[0].offset;
        let next = recs.last().expect("non-empty").offset + 1;
        self.offsets.advance(recs[0].topic, p, first, next);
        Ok(())
    }

    /// Through a repartition topic the origin rides in a header; a record without one (not
    /// written by readstate) counts as originating where it is.
    fn origin_of(&mut self, tasks: &Tasks, m: &BorrowedMessage<'_>) -> Origin {
        let carried = match tasks.forwarding.is_some() {
            true => m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == Origin::HEADER)
                    .and_then(|h| h.value)
                    .and_then(Origin::from_bytes)
            }),
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
                let headers = OwnedHeaders::new().insert(Header {
                    key: Origin::HEADER,
                    value: Some(&origin.to_bytes()),
                });
                let mut rec = BaseRecord::to(&f.repartition_topic)
                    .key(&key[..])
                    .headers(headers);
                if let Some(v) = m.payload() {
                    rec = rec.payload(v);
                }
                self.collector.send(rec);
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

    /// The commit protocol for the tasks of `parts` (under exactly_once_v2, for every
    /// owned task: one transaction holds every task's records). A produce or store
    /// failure is returned (the caller resets the tasks and stops the instance).
    pub(super) fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tasks: &mut Tasks,
        parts: &[TopicPartition],
    ) -> Result<CommitOutcome, RuntimeError> {
        let started = Instant::now();
        let eos = self.guarantee == ProcessingGuarantee::ExactlyOnceV2;
        let parts = if eos { tasks.owned() } else { parts.to_vec() };
        let flushed = self.prepare_all(tasks, &parts);
        for (_, out) in &flushed {
            self.send_outputs(out);
        }
        self.send_dead_letters();
        if !eos {
            // Outputs (and the records forwarded since the last commit) before changelog.
            self.collector.flush()?;
        }
        self.collector.clear_changelog_offsets();
        self.send_changelog(&flushed);
        let outcome = match self.guarantee {
            ProcessingGuarantee::AtLeastOnce => {
                self.collector.flush()?;
                self.store_all(tasks, flushed)?;
                self.commit_offsets(consumer, &parts)
            }
            ProcessingGuarantee::ExactlyOnceV2 => {
                self.commit_transaction(consumer, tasks, &parts, flushed)?
            }
        };
        if outcome == CommitOutcome::Committed {
            self.summary.commits += 1;
            self.refresh_summary(tasks);
            metrics::histogram!("readstate_commit_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(tasks = parts.len(), elapsed = ?started.elapsed(), "committed");
        }
        Ok(outcome)
    }

    /// Step 4 under exactly_once_v2: the transaction with the source offsets and the
    /// group's metadata; the stores are written only after it committed, so a store is
    /// never ahead of what its changelog committed.
    fn commit_transaction<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tasks: &mut Tasks,
        parts: &[TopicPartition],
        flushed: Vec<(i32, FlushOutput)>,
    ) -> Result<CommitOutcome, RuntimeError> {
        let (tpl, entries) = self.offsets.to_commit(parts);
        let group = consumer
            .group_metadata()
            .ok_or(RuntimeError::NoGroupMetadata)?;
        let failed = || metrics::counter!("readstate_commits_failed_total").increment(1);
        match self.collector.commit_transaction(&tpl, &group) {
            Ok(()) => {
                self.store_all(tasks, flushed)?;
                self.committed_now(entries);
                Ok(CommitOutcome::Committed)
            }
            Err(TxnError::Aborted(e)) => {
                tracing::warn!(error = %e, "transaction aborted: tasks resume from their stores and the committed offsets");
                failed();
                self.rewind_to_committed(consumer, tasks, parts)?;
                Ok(CommitOutcome::Aborted)
            }
            Err(TxnError::Rebalancing(e)) => {
                postponed(&e);
                self.rewind_to_committed(consumer, tasks, parts)?;
                Ok(CommitOutcome::Postponed { why: e })
            }
            Err(e @ TxnError::Migrated(_)) => {
                failed();
                let why = e.to_string();
                Ok(CommitOutcome::Lost { why, requeue: true })
            }
            Err(e @ TxnError::Fenced(_)) => {
                failed();
                Ok(CommitOutcome::Fenced { why: e.to_string() })
            }
        }
    }

    /// Step 4 under at-least-once, last: the source offsets. A refusal while the group
    /// rebalances postpones them; one because this member left the group loses every
    /// task; other failures are left to the next commit (replay marks make a replay
    /// harmless).
    fn commit_offsets<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[TopicPartition],
    ) -> CommitOutcome {
        let (tpl, entries) = self.offsets.to_commit(parts);
        if tpl.count() == 0 {
            return CommitOutcome::Committed;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => self.committed_now(entries),
            Err(e) => match refusal(&e) {
                Some(Refusal::Rebalancing) => {
                    let why = e.to_string();
                    postponed(&why);
                    return CommitOutcome::Postponed { why };
                }
                Some(Refusal::Gone) => {
                    metrics::counter!("readstate_commits_failed_total").increment(1);
                    let why = format!("offset commit refused: {e}");
                    return CommitOutcome::Lost { why, requeue: true };
                }
                None => {
                    metrics::counter!("readstate_commits_failed_total").increment(1);
                    tracing::warn!(error = %e, "offset commit failed; the next commit covers it");
                }
            },
        }
        CommitOutcome::Committed
    }

    /// Step 1 for every running task of `parts` (memory only).
    fn prepare_all(
        &mut self,
        tasks: &mut Tasks,
        parts: &[TopicPartition],
    ) -> Vec<(i32, FlushOutput)> {
        let now = now_ms();
        let mut flushed: Vec<(i32, FlushOutput)> = Vec::with_capacity(parts.len());
        for (topic, p) in parts {
            if topic != tasks.task_topic() {
                continue;
            }
            let Some(t) = tasks.running.get_mut(p) else {
                continue;
            };
            let flush_started = Instant::now();
            let out = t.task.prepare_flush(now);
            metrics::histogram!("readstate_flush_duration_seconds")
                .record(flush_started.elapsed().as_secs_f64());
            flushed.push((*p, out));
        }
        flushed
    }

    /// A flush's outputs to their sink nodes' topics.
    fn send_outputs(&mut self, out: &FlushOutput) {
        for (sink, key, value) in out.outputs.iter() {
            let rec = BaseRecord::to(self.sinks[sink.0].as_str())
                .key(key)
                .payload(value);
            self.collector.send(rec);
        }
    }

    fn send_dead_letters(&mut self) {
        for d in self.dead_letters.take() {
            let headers = dead_letter_headers(&d);
            let mut rec: BaseRecord<'_, [u8], [u8]> =
                BaseRecord::to(self.dead_letters.topic()).headers(headers);
            if let Some(k) = d.key.as_deref() {
                rec = rec.key(k);
            }
            if let Some(v) = d.value.as_deref() {
                rec = rec.payload(v);
            }
            self.collector.send(rec);
            self.summary.dead_letters += 1;
            Progress::add(&self.progress.dead_letters, 1);
        }
    }

    /// Each store's changelog records to its own changelog topic, partition p of task p.
    fn send_changelog(&mut self, flushed: &[(i32, FlushOutput)]) {
        for (p, out) in flushed {
            for (store, topic) in out.stores.iter().zip(&self.changelogs) {
                let Some(topic) = topic else {
                    continue;
                };
                for (k, v) in store.changelog() {
                    let mut rec: BaseRecord<'_, [u8], [u8]> =
                        BaseRecord::to(topic.as_str()).partition(*p).key(k);
                    if let Some(v) = v {
                        rec = rec.payload(v);
                    }
                    self.collector.send(rec);
                }
                let n = store.changelog_len() as u64;
                self.summary.changelog_records += n;
                metrics::counter!("readstate_changelog_records_written_total").increment(n);
            }
        }
    }

    /// The store batches, each with its checkpoint (the offset after the records just
    /// acknowledged on its changelog).
    fn store_all(
        &mut self,
        tasks: &mut Tasks,
        flushed: Vec<(i32, FlushOutput)>,
    ) -> Result<(), RuntimeError> {
        let highs = self.collector.take_changelog_offsets();
        for (p, mut out) in flushed {
            let checkpoints: Vec<Option<i64>> = (0..out.stores.len())
                .map(|i| highs.get(&(i, p)).map(|o| o + 1))
                .collect();
            let t = tasks.running.get_mut(&p).expect("task flushed above");
            t.task.commit_flush(out.take_batches(), &checkpoints)?;
        }
        Ok(())
    }

    /// Offsets are committed: remember them, and let the repartition topics go below them.
    fn committed_now(&mut self, entries: Vec<(TopicPartition, i64)>) {
        if let Some((topic, purger)) = &mut self.purger {
            purger.offer(
                entries
                    .iter()
                    .filter(|((t, _), _)| t == topic)
                    .map(|((t, p), o)| (t.clone(), *p, *o)),
            );
        }
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

    /// Summary and metrics after a commit: counters advance by what the running tasks did
    /// since the last commit; gauges are per task (bounded by the partition count).
    fn refresh_summary(&mut self, tasks: &mut Tasks) {
        for t in tasks.running.values_mut() {
            let stats = t.task.stats();
            t.reported.resize(stats.counters.len(), 0);
            for (c, was) in stats.counters.iter().zip(t.reported.iter_mut()) {
                let d = c.value.saturating_sub(*was);
                *was = c.value;
                match c.label {
                    Some((k, v)) => metrics::counter!(c.name, k => v).increment(d),
                    None => metrics::counter!(c.name).increment(d),
                }
                match c.name {
                    "readstate_events_folded_total" => self.summary.events_folded += d,
                    "readstate_events_replayed_skipped_total" => self.summary.replayed_skipped += d,
                    "readstate_updates_emitted_total" => {
                        self.summary.updates_emitted += d;
                        Progress::add(&self.progress.updates_emitted, d);
                    }
                    _ => {}
                }
            }
            let id = t.task.id().to_string();
            for store in t.task.processor().stores() {
                let labels = [("task", id.as_str()), ("store", store.name().as_str())];
                let keys = store.approximate_num_keys() as f64;
                series::set(self.owner, "readstate_store_estimated_keys", &labels, keys);
                let bytes = store.approximate_size_bytes() as f64;
                series::set(self.owner, "readstate_store_size_bytes", &labels, bytes);
            }
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
