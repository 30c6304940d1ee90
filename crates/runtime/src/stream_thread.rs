//! The poll loop (Kafka Streams' `StreamThread`): poll, route records to tasks, restore a
//! step, retry the registry, and decide when to commit. Nothing in one turn waits long:
//! restores advance by bounded steps, registry outages park partitions, so the consumer
//! keeps its group membership however long either takes.
//!
//! Rebalances arrive through the consumer context, inside `poll`: revoked partitions are
//! committed and closed before they are given up; a lost assignment closes every task
//! dirty; assigned tasks' stores are opened and checked against their changelogs inside
//! the callback, and only the partitions whose task must restore are paused until it has.

use crate::telemetry::series;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};

use super::offsets::TopicPartition;
use super::repeat_log::{RepeatLog, REPEAT_INTERVAL};
use super::task_manager::TaskManager;
use super::RuntimeError;

/// The longest a poll waits for its first record (shorter when a commit is due sooner).
const POLL_WAIT: Duration = Duration::from_millis(100);

/// Consumer context: hands rebalances to the task manager.
pub(super) struct RebalanceHandler {
    pub(super) tasks: Arc<Mutex<TaskManager>>,
    /// The instance's series owner (its consumer lag series).
    pub(super) owner: series::Owner,
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for RebalanceHandler {
    /// Consumer lag per assigned partition from librdkafka's statistics (no blocking
    /// request); a partition no longer assigned loses its series.
    fn stats(&self, stats: Statistics) {
        const LAG: &str = super::task_manager::CONSUMER_LAG;
        let mut active = std::collections::HashSet::new();
        for (topic, t) in &stats.topics {
            for (p, s) in &t.partitions {
                let behind = crate::kafka::records_behind(s);
                if let (true, Some(lag)) = (*p >= 0 && s.fetch_state == "active", behind) {
                    let part = p.to_string();
                    series::set(
                        self.owner,
                        LAG,
                        &[("topic", topic), ("partition", &part)],
                        lag as f64,
                    );
                    active.insert(format!("{topic}/{part}"));
                }
            }
        }
        series::retain_by(self.owner, LAG, |l| {
            let get = |k: &str| {
                l.iter()
                    .find(|(n, _)| *n == k)
                    .map_or("", |(_, v)| v.as_str())
            };
            active.contains(&format!("{}/{}", get("topic"), get("partition")))
        });
    }
}

impl ConsumerContext for RebalanceHandler {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = topic_partitions(tpl);
            let mut tasks = self.tasks.lock().expect("task manager lock");
            if consumer.assignment_lost() {
                let _ = tasks.assignment_lost(consumer, "librdkafka reports the assignment lost");
            } else {
                tasks.revoke(consumer, &parts);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = topic_partitions(tpl);
                tracing::info!(partitions = ?parts, startup_ms = crate::telemetry::since_start_ms(), "assigned");
                let member = crate::kafka::member_id(consumer);
                let mut tasks = self.tasks.lock().expect("task manager lock");
                tasks.assign(&parts, member);
                // Open the new tasks' stores here, before any of their records is polled:
                // a task with nothing to restore starts without its partition ever being
                // paused. (librdkafka notices a resumed partition only when its broker
                // thread next wakes, up to 1 s later: that was most of a restart.)
                if let Err(e) = tasks.open_assigned(consumer) {
                    tasks.deferred.get_or_insert(e);
                }
                let pause = tasks.still_parked(&parts);
                drop(tasks);
                // Forwarded partitions start fetching at once: clear a pause left over from
                // an earlier ownership (librdkafka keeps it per partition).
                let mut resume = TopicPartitionList::new();
                let mut paused = TopicPartitionList::new();
                for (t, p) in &parts {
                    match pause.contains(&(t.clone(), *p)) {
                        true => paused.add_partition(t, *p),
                        false => resume.add_partition(t, *p),
                    };
                }
                if let Err(e) = consumer.pause(&paused) {
                    tracing::error!(error = %e, "cannot pause restoring partitions");
                }
                if let Err(e) = consumer.resume(&resume) {
                    tracing::warn!(error = %e, "cannot resume assigned partitions");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

pub(super) struct StreamThread {
    pub(super) consumer: BaseConsumer<RebalanceHandler>,
    pub(super) tasks: Arc<Mutex<TaskManager>>,
    pub(super) commit_interval: Duration,
    pub(super) max_poll_records: usize,
    pub(super) commit_now: Arc<AtomicBool>,
}

impl StreamThread {
    /// Run until `shutdown` is set or an error stops the instance.
    pub(super) fn run(&self, shutdown: &AtomicBool) -> Result<(), RuntimeError> {
        // As Kafka Streams: the interval runs from a commit's start, so commits come every
        // interval, not every interval plus the commit's own duration.
        let mut next_commit = Instant::now() + self.commit_interval;
        let mut first_record = true;
        let mut errors = RepeatLog::new(REPEAT_INTERVAL);
        // Start-up work before the first poll (topic checks) is no gap between polls.
        self.tasks.lock().expect("task manager lock").started();
        while !shutdown.load(Ordering::Relaxed) {
            let batch = self.poll(next_commit);
            let mut tasks = self.tasks.lock().expect("task manager lock");
            tasks.polled();
            if let Some(e) = tasks.deferred.take() {
                return Err(e);
            }
            check_fatal(&tasks)?;
            tasks.open_assigned(&self.consumer)?;
            tasks.restore_step(&self.consumer)?;
            tasks.retry_registry(&self.consumer)?;
            let mut msgs = Vec::with_capacity(batch.len());
            for m in batch {
                match m {
                    Ok(m) => msgs.push(m),
                    // Transport failures and the like are transient: librdkafka reconnects.
                    Err(e) => warn_consumer_error(&mut errors, &e),
                }
            }
            tasks.process(&self.consumer, &msgs)?;
            if first_record && !msgs.is_empty() {
                first_record = false;
                report_startup();
            }
            drop(msgs);
            tasks.executor.dead_letters.tick();
            let requested = self.commit_now.swap(false, Ordering::Relaxed);
            if requested || Instant::now() >= next_commit || tasks.needs_flush() {
                let started = Instant::now();
                tasks.commit_all(&self.consumer)?;
                next_commit = started + self.commit_interval;
            }
            check_fatal(&tasks)?;
        }
        Ok(())
    }

    /// A batch of records: waits at most 100 ms for the first, and not past `commit_at`.
    fn poll(
        &self,
        commit_at: Instant,
    ) -> Vec<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>> {
        let mut batch = Vec::new();
        let wait = (commit_at.saturating_duration_since(Instant::now())).min(POLL_WAIT);
        if let Some(first) = self.consumer.poll(wait) {
            batch.push(first);
            while batch.len() < self.max_poll_records {
                match self.consumer.poll(Duration::ZERO) {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
        }
        batch
    }
}

/// Start-up, process start to the first record processed: a log line and a gauge.
fn report_startup() {
    let took = crate::telemetry::process_started().elapsed();
    metrics::gauge!("readstate_startup_seconds").set(took.as_secs_f64());
    tracing::info!(
        startup_ms = took.as_millis() as u64,
        "first record processed"
    );
}

fn check_fatal(tasks: &TaskManager) -> Result<(), RuntimeError> {
    match &tasks.fatal {
        Some(why) => Err(RuntimeError::Fatal(why.clone())),
        None => Ok(()),
    }
}

/// A consumer error, told once per kind per [`REPEAT_INTERVAL`] with how many repeats were
/// left out (a broker outage reports one on every poll).
fn warn_consumer_error(errors: &mut RepeatLog, e: &rdkafka::error::KafkaError) {
    let kind = e
        .rdkafka_error_code()
        .map_or_else(|| e.to_string(), |c| format!("{c:?}"));
    if let Some(left_out) = errors.admit(&kind, Instant::now()) {
        tracing::warn!(error = %e, repeats_left_out = left_out, "consumer error (the same kind is told at most every 30 s)");
    }
}
