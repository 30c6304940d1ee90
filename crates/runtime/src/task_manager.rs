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

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::TopicPartitionList;

use super::active_task_creator::ActiveTaskCreator;
use super::changelog_reader::ChangelogReader;
use super::membership::{Loss, Membership, MembershipMonitor, Verdict};
use super::offsets::TopicPartition;
use super::parking::{ParkReason, Parking};
use super::readiness::{Readiness, TaskStates};
use super::state_manager::StateManager;
use super::state_updater::{ReadyTask, StateUpdater};
use super::task_executor::{CommitOutcome, TaskExecutor};
use super::tasks::Tasks;
use super::{LifecycleCounts, RunConfig, RunSummary, RuntimeError};
use crate::processor::{BuiltNode, CacheBudget};
use crate::state::queryable::{Position, QueryableStores};
use crate::telemetry::series;

pub(super) struct TaskManager {
    creator: ActiveTaskCreator,
    pub(super) tasks: Tasks,
    /// Tasks assigned but not ready: opening, restoring.
    updater: StateUpdater,
    pub(super) parking: Parking,
    pub(super) executor: TaskExecutor,
    membership: MembershipMonitor,
    counts: LifecycleCounts,
    /// Whose per-task and per-partition series this instance's are.
    pub(super) owner: series::Owner,
    readiness: Readiness,
    /// What queries see of the tasks: published at each change and commit.
    queryable: std::sync::Arc<QueryableStores>,
    /// Input partitions whose committed offset was asked of the broker since the last
    /// assignment (asked once, even when the group has none).
    committed_asked: std::collections::BTreeSet<TopicPartition>,
    /// Set when tasks are in an unknown state: the poll loop stops the instance.
    pub(super) fatal: Option<String>,
    /// An error inside a rebalance callback (which cannot return one): the poll loop
    /// returns it.
    pub(super) deferred: Option<RuntimeError>,
}

impl TaskManager {
    /// The input topics' partition count (checked before the group is joined).
    pub(super) fn set_partitions(&mut self, partitions: i32) {
        self.creator.set_partitions(partitions);
    }

    pub(super) fn new(
        config: &RunConfig,
        node: BuiltNode,
        rt: tokio::runtime::Runtime,
    ) -> Result<Self, RuntimeError> {
        let t = &config.topology;
        let [source] = t.sources.as_slice() else {
            return Err(RuntimeError::Unsupported(format!(
                "{} sources feed one store; run supports one source per topology",
                t.sources.len()
            )));
        };
        let owner = series::Owner::new();
        let state = StateManager::new(
            config.state_dir.join(t.application_id.as_str()),
            t.stores().into_iter().cloned().collect(),
        );
        let tasks = Tasks::for_source(source, t);
        let reader = ChangelogReader::for_topology(config, owner);
        let forwarded = u32::from(tasks.forwarding.is_some());
        let cache = CacheBudget {
            entries: t.store.cache_max_entries,
            positions: t.heads_store.as_ref().map_or(0, |h| h.cache_max_entries),
        };
        Ok(Self {
            creator: ActiveTaskCreator::new(node.supplier, cache),
            executor: TaskExecutor::for_topology(config, source, &state, node.serdes, rt, owner)?,
            updater: StateUpdater::new(state, reader, forwarded),
            tasks,
            parking: Parking::default(),
            membership: MembershipMonitor::new(
                config.clock.clone(),
                config.kafka.session_timeout(),
            )
            .with_consumer_protocol(config.kafka.consumer_protocol()),
            counts: LifecycleCounts::default(),
            owner,
            readiness: Readiness::new(config.health.clone()),
            queryable: config.queryable.clone(),
            committed_asked: Default::default(),
            fatal: None,
            deferred: None,
        })
    }

    pub(super) fn summary(&self) -> RunSummary {
        let lifecycle = LifecycleCounts {
            tasks_corrupted: self.updater.corrupted,
            ..self.counts
        };
        RunSummary {
            lifecycle,
            ..self.executor.summary.clone()
        }
    }

    /// The poll loop returned from `poll`: note a gap long enough to doubt membership.
    pub(super) fn polled(&mut self) {
        self.membership.polled();
    }

    /// Start-up work before the first poll (topic checks) is no gap between polls.
    pub(super) fn started(&mut self) {
        self.membership.started();
    }

    /// Decode and fold a polled batch; an error stops the instance.
    pub(super) fn process<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        msgs: &[rdkafka::message::BorrowedMessage<'_>],
    ) -> Result<(), RuntimeError> {
        let r = self
            .executor
            .process(consumer, &mut self.tasks, &mut self.parking, msgs);
        self.update_ready();
        self.note_fatal(r)
    }

    /// Ask the registry again when due; resume what waited for it.
    pub(super) fn retry_registry<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let r = self.executor.retry_registry(consumer, &mut self.parking);
        self.update_ready();
        r
    }

    pub(super) fn needs_flush(&self) -> bool {
        self.tasks.needs_flush()
    }

    /// A fatal error is remembered, so that nothing more is committed.
    fn note_fatal<T>(&mut self, r: Result<T, RuntimeError>) -> Result<T, RuntimeError> {
        if let Err(RuntimeError::Fatal(why)) = &r {
            self.fatal.get_or_insert_with(|| why.clone());
        }
        r
    }

    /// New partitions from the group: returns those to pause until their task restored.
    pub(super) fn assign(
        &mut self,
        parts: &[TopicPartition],
        member: Option<String>,
    ) -> Vec<TopicPartition> {
        self.readiness.assigned();
        self.membership.assigned_under(member);
        if !self.membership.is_consumer_protocol() {
            // The classic protocol's range assignment gives both halves of a pair at once.
            if let Err(e) = self.tasks.check_co_partitioned(parts) {
                self.fatal = Some(e.to_string());
                self.deferred.get_or_insert(e);
            }
        }
        self.counts.assignments += 1;
        self.committed_asked.clear();
        metrics::counter!("readstate_rebalances_total").increment(1);
        self.take_on(parts)
    }

    /// Take newly held partitions on: tasks whose co-partitioned pair is complete are
    /// queued; a half held alone is parked until its other half comes. Returns the
    /// partitions to pause.
    fn take_on(&mut self, parts: &[TopicPartition]) -> Vec<TopicPartition> {
        let (take, lone) = self.tasks.pair(parts);
        let mut pause = self.queue(&take);
        for tp in lone {
            tracing::info!(topic = %tp.0, partition = tp.1, "co-partitioned half held without its pair: parked until the group assigns the other half");
            self.parking.mark(tp.clone(), ParkReason::CoPartition, None);
            pause.push(tp);
        }
        pause
    }

    /// Of `parts`, those still parked (their task restoring, or not opened).
    pub(super) fn still_parked(&self, parts: &[TopicPartition]) -> Vec<TopicPartition> {
        parts
            .iter()
            .filter(|tp| self.parking.contains(tp))
            .cloned()
            .collect()
    }

    /// Queue task partitions for opening (parked) and take forwarded partitions on.
    fn queue(&mut self, parts: &[TopicPartition]) -> Vec<TopicPartition> {
        let mut pause = Vec::new();
        for (topic, p) in parts {
            if topic != self.tasks.task_topic() {
                self.tasks.forward(topic, *p);
                continue;
            }
            if self.tasks.running.contains_key(p) || self.updater.has(*p) {
                continue;
            }
            self.updater.queue(*p);
            self.queryable.restoring(*p, Vec::new());
            let tps = std::iter::once((topic.clone(), *p)).chain(self.tasks.side_partitions(*p));
            for tp in tps {
                self.parking.mark(tp.clone(), ParkReason::Restoring, None);
                pause.push(tp);
            }
            self.readiness.restoring();
        }
        pause
    }

    /// Open the stores of newly assigned tasks and register their restores; start those
    /// with nothing to restore.
    pub(super) fn open_assigned<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        for ready in self.updater.open_queued(self.creator.supplier())? {
            self.start_task(consumer, ready)?;
        }
        // Tasks restoring from now on can be read, stale, from their stores.
        for p in self.queryable.restoring_partitions() {
            if let Some(readers) = self.updater.restoring_readers(p) {
                self.queryable.restoring(p, readers);
            }
        }
        self.update_readiness();
        Ok(())
    }

    /// Apply one step of every running restore; start the tasks that completed.
    pub(super) fn restore_step<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let ready = self.updater.step()?;
        if ready.is_empty() {
            return Ok(());
        }
        for t in ready {
            self.start_task(consumer, t)?;
        }
        self.update_readiness();
        Ok(())
    }

    /// A task whose stores are restored starts: its processor is made over them and its
    /// partitions resume.
    fn start_task<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        ready: ReadyTask,
    ) -> Result<(), RuntimeError> {
        let id = ready.id;
        self.counts.restored_records += ready.records;
        let task = self.creator.create(ready, self.tasks.running.len())?;
        let stores = task.task.processor().stores();
        let readers = stores.iter().map(|s| s.reader()).collect();
        self.queryable
            .running(id.partition, readers, self.committed_position(id.partition));
        self.tasks.running.insert(id.partition, task);
        self.counts.tasks_opened += 1;
        self.creator.share_cache(&mut self.tasks);
        let tp = (self.tasks.task_topic().to_owned(), id.partition);
        self.parking.unpark(consumer, &tp)?;
        for sp in self.tasks.side_partitions(id.partition) {
            self.parking.unpark(consumer, &sp)?;
        }
        Ok(())
    }

    /// Where the stores of task `p` are at least: its committed offsets.
    fn committed_position(&self, p: i32) -> Position {
        let offsets = &self.executor.offsets;
        (self.tasks.inputs_of(p))
            .filter_map(|tp| Some((offsets.committed(&tp)? - 1, tp)))
            .map(|(at, tp)| (tp, at))
            .collect()
    }

    /// Queries see the tasks a commit made durable at their new positions: the offsets
    /// they committed. A task that has committed nothing since it started (idle since a
    /// restart) is at the group's committed offsets, asked of the broker once.
    fn publish_committed<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let inputs: Vec<TopicPartition> = (self.tasks.running.keys())
            .flat_map(|p| self.tasks.inputs_of(*p))
            .collect();
        let offsets = &mut self.executor.offsets;
        let asked = &mut self.committed_asked;
        let unknown: Vec<&TopicPartition> = (inputs.iter())
            .filter(|tp| offsets.committed(tp).is_none() && asked.insert((*tp).clone()))
            .collect();
        if !unknown.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in &unknown {
                tpl.add_partition(t, *p);
            }
            match consumer.committed_offsets(tpl, std::time::Duration::from_secs(2)) {
                Ok(got) => {
                    for e in got.elements() {
                        if let rdkafka::Offset::Offset(o) = e.offset() {
                            offsets.learn_committed((e.topic().to_owned(), e.partition()), o);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "committed offsets unknown: positions wait for a commit")
                }
            }
        }
        let committed: Vec<_> = (inputs.into_iter())
            .filter_map(|tp| Some((offsets.committed(&tp)?, tp)))
            .map(|(next, tp)| (tp, next))
            .collect();
        self.queryable.committed(&committed);
    }

    fn update_readiness(&mut self) {
        let (running, updater) = (&self.tasks.running, &self.updater);
        (self.queryable).retain(|p| running.contains_key(&p) || updater.has(p));
        metrics::gauge!("readstate_tasks_assigned").set(self.tasks.running.len() as f64);
        self.executor.report_running(self.tasks.running.len());
        self.prune_series();
        self.update_ready();
    }

    fn update_ready(&self) {
        let running = self.tasks.running.keys();
        self.readiness.update(TaskStates {
            restoring: self.updater.is_busy(),
            all_wait_for_registry: (self.parking)
                .all_wait_for_registry(self.tasks.task_topic(), running),
        });
    }

    /// Remove the per-task and per-partition series of tasks this instance no longer has
    /// (closed, lost, moved): another instance exports them now.
    fn prune_series(&self) {
        let running = self.tasks.running.keys().map(|p| self.updater.task_id(*p));
        let live: std::collections::HashSet<String> = running
            .chain(self.updater.task_ids())
            .map(|id| id.to_string())
            .collect();
        for name in [
            "readstate_store_estimated_keys",
            "readstate_store_size_bytes",
            "readstate_restore_remaining_records",
        ] {
            series::retain(self.owner, name, "task", |t| live.contains(t));
        }
    }

    /// Partitions revoked while we still own them: commit them (clean close), then drop.
    pub(super) fn revoke<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[TopicPartition],
    ) {
        // A task with either half of its pair revoked closes; the other half is parked.
        let (touched, alone) = self.tasks.unpair(parts);
        for (t, p) in parts {
            if t == self.tasks.task_topic() {
                self.updater.revoke(*p);
            }
        }
        touched.iter().for_each(|p| self.updater.revoke(*p));
        let owned = self.tasks.owned();
        let revoked: Vec<TopicPartition> = parts
            .iter()
            .chain(&alone)
            .filter(|tp| owned.contains(tp))
            .cloned()
            .collect();
        if !revoked.is_empty() && self.fatal.is_none() {
            let doubtful = self.membership.is_suspect() && !self.verify_membership(consumer);
            if doubtful || self.member_check(consumer) != Membership::Kept {
                // Lost, or in doubt: close without committing (as after a crash); the next
                // owner replays from the committed offsets.
                tracing::warn!(partitions = ?revoked, "membership in doubt: revoked partitions closed without a commit");
            } else if let Err(e) = self.commit_tasks(consumer, &revoked) {
                tracing::error!(error = %e, "commit on revoke failed");
            }
        }
        for tp in &revoked {
            if self.tasks.close(tp) {
                self.counts.tasks_closed += 1;
            }
        }
        for tp in parts {
            self.executor.forget(tp);
            self.parking.forget(tp);
            let p = tp.1.to_string();
            let labels = [("topic", tp.0.as_str()), ("partition", &p)];
            series::remove(self.owner, CONSUMER_LAG, &labels);
        }
        for tp in alone {
            self.executor.forget(&tp);
            if let Err(e) = self
                .parking
                .park(consumer, tp, ParkReason::CoPartition, None)
            {
                self.fatal = Some(format!("cannot pause a co-partitioned half: {e}"));
            }
        }
        self.creator.share_cache(&mut self.tasks);
        self.update_readiness();
        tracing::info!(partitions = ?revoked, "revoked partitions closed");
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
        let rewinds = self.lose_all(why, Loss::Left);
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
        let pause = self.take_on(&parts);
        self.readiness.assigned();
        self.update_readiness();
        if let Err(e) = self.parking.requeue(consumer, &parts, &rewinds, &pause) {
            self.fatal = Some(e.to_string());
        }
        self.membership.suspect();
    }

    /// librdkafka reports the assignment lost: every task is lost, as [`Loss`] judges from
    /// the member id now.
    pub(super) fn assignment_lost<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        why: &str,
    ) -> std::collections::HashMap<TopicPartition, i64> {
        let member = crate::kafka::member_id(consumer);
        let loss = self.membership.judge_loss(member.as_deref());
        self.lose_all(why, loss)
    }

    /// Every task is lost: someone else may own its partition already. Nothing more is
    /// produced or committed for it. Under at-least-once, after this member may have left
    /// the group, its store is wiped so that whoever owns it next restores it from the
    /// changelog; otherwise the store is kept (it holds only committed data). Returns the
    /// offsets last committed.
    pub(super) fn lose_all(
        &mut self,
        why: &str,
        loss: Loss,
    ) -> std::collections::HashMap<TopicPartition, i64> {
        // Only what is owned now is a lost task (a repeated loss finds nothing).
        let committed = self.executor.abandon();
        self.committed_asked.clear();
        let wipe = loss == Loss::Left && !self.executor.is_exactly_once();
        let (lost, failed) = self.updater.lose_all(self.tasks.clear(), wipe);
        if let Some(why) = failed {
            self.fatal = Some(why);
        }
        self.parking.clear();
        self.membership.verified();
        // Nothing runs until the group assigns partitions again (or they are requeued).
        self.readiness.unassigned();
        self.counts.tasks_lost += lost.len() as u64;
        metrics::counter!("readstate_tasks_lost_total").increment(lost.len() as u64);
        let tasks: Vec<String> = lost.iter().map(ToString::to_string).collect();
        match wipe {
            true => tracing::warn!(?tasks, reason = why, "tasks lost: closed dirty (nothing produced or committed), stores wiped for a restore from the changelog"),
            false => tracing::warn!(?tasks, reason = why, ?loss, "tasks lost: closed dirty (nothing produced or committed), stores kept at their last commit"),
        }
        self.update_readiness();
        committed
    }

    /// Commit every task (verifying membership first after a long gap between polls).
    pub(super) fn commit_all<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        if self.fatal.is_some()
            || (self.membership.is_suspect() && !self.verify_membership(consumer))
        {
            return Ok(());
        }
        // Cheap, every time: a changed member id means the tasks were lost meanwhile.
        if self.member_check(consumer) != Membership::Kept {
            return Ok(());
        }
        let parts = self.tasks.owned();
        self.commit_tasks(consumer, &parts)
    }

    /// The commit protocol for a set of tasks (the executor's), and what its outcome
    /// means for them: a produce or store failure is fatal; a membership refusal or a
    /// fenced producer loses every task.
    pub(super) fn commit_tasks<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[TopicPartition],
    ) -> Result<(), RuntimeError> {
        if self.fatal.is_some() {
            return Ok(());
        }
        let started = self.membership.now();
        let outcome = self.executor.commit(consumer, &mut self.tasks, parts);
        let rocks = self.updater.state().memory_bytes() as f64;
        metrics::gauge!("readstate_rocksdb_memory_bytes").set(rocks);
        match outcome {
            Ok(CommitOutcome::Committed) => {
                self.publish_committed(consumer);
                Ok(())
            }
            Ok(CommitOutcome::Aborted) => Ok(()),
            Ok(CommitOutcome::Postponed { why }) => {
                self.counts.commits_postponed += 1;
                tracing::debug!(reason = why, "commit postponed");
                Ok(())
            }
            Ok(CommitOutcome::Lost { why, requeue: true }) => {
                self.lose_all_and_requeue(consumer, &why);
                Ok(())
            }
            Ok(CommitOutcome::Lost {
                why,
                requeue: false,
            }) => {
                self.lose_all(&why, Loss::Left);
                Ok(())
            }
            Ok(CommitOutcome::Fenced { why }) => {
                self.lose_all(&why, Loss::Left);
                self.executor.recreate_producer()
            }
            Err(e) if e.is_expiry() && self.membership.took_long(started) => {
                // A commit this slow may have spanned a pause past the session timeout, or
                // an outage of the brokers: the records that expired meanwhile were dropped
                // by the producer. If the group moved on, the tasks are lost, not broken;
                // if the coordinator cannot be reached either (the cluster is gone), they
                // are lost too and queued again, to resume from the committed offsets once
                // it is back. A record the broker refused is never put down to a pause or
                // an outage: the instance stops.
                self.membership.suspect();
                match self.probe_membership(consumer) {
                    Membership::Lost => Ok(()),
                    Membership::Unknown => {
                        let why = format!(
                            "records expired while the group coordinator could not be reached: {e}"
                        );
                        self.lose_all_and_requeue(consumer, &why);
                        Ok(())
                    }
                    // Still a member, by the coordinator's word: stop rather than
                    // process on (a dropped commit replayed over a store another owner
                    // may have moved past regressed the output in a chaos run).
                    Membership::Kept => Err(self.fail(parts, e)),
                }
            }
            Err(e) => Err(self.fail(parts, e)),
        }
    }

    /// Outputs could not be made durable: the tasks forget what is not in their stores,
    /// and the instance stops (the offsets were not committed, so the work is replayed).
    fn fail(&mut self, parts: &[TopicPartition], e: RuntimeError) -> RuntimeError {
        let _ = self.executor.reset_tasks(&mut self.tasks, parts);
        let msg = format!("commit of {} partition(s) failed: {e}", parts.len());
        tracing::error!(error = %e, "outputs could not be made durable: the instance stops");
        self.fatal = Some(msg.clone());
        RuntimeError::Fatal(msg)
    }

    /// Whether a commit may go on after a long gap between polls.
    pub(super) fn verify_membership<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> bool {
        self.probe_membership(consumer) == Membership::Kept
    }

    /// The member id now against the one the tasks were assigned under, acted on.
    pub(super) fn member_check<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Membership {
        let member = crate::kafka::member_id(consumer);
        let verdict = self.membership.member_verdict(self.tasks.is_idle(), member);
        self.act_on(consumer, verdict)
    }

    /// Probe the coordinator (see [`MembershipMonitor::probe`]), and act on its verdict.
    pub(super) fn probe_membership<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Membership {
        let committed = self.executor.offsets.committed_list();
        let idle = self.tasks.is_idle();
        let verdict = self.membership.probe(consumer, &committed, idle);
        self.act_on(consumer, verdict)
    }

    /// Lose the tasks a membership verdict says are lost.
    fn act_on<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, v: Verdict) -> Membership {
        match &v {
            Verdict::Kept | Verdict::Unknown | Verdict::Rejoining => {}
            Verdict::Rejoined(why) => {
                self.lose_all(why, Loss::Left);
                self.membership.assigned_under(None);
            }
            Verdict::AssignmentLost => {
                self.assignment_lost(consumer, "the consumer reports its assignment lost");
            }
            Verdict::Removed(why) => self.lose_all_and_requeue(consumer, why),
        }
        v.membership()
    }

    /// Close every task after the final commit (clean) or without it (after a failure).
    pub(super) fn close_all(&mut self, clean: bool) {
        self.counts.tasks_closed += self.tasks.running.len() as u64;
        self.tasks.running.clear();
        self.updater.clear();
        self.queryable.retain(|_| false);
        self.prune_series();
        self.executor.close(clean);
    }
}

/// The consumer lag series, per (topic, partition).
pub(super) const CONSUMER_LAG: &str = "readstate_consumer_lag_records";

#[cfg(test)]
mod tests;
