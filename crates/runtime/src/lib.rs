//! readstate-runtime: `readstate run`, one instance of the application in its consumer
//! group. It builds on `readstate-core` (the processor API, stores, tasks, the topology's
//! graph) and knows no domain type.
//!
//! # Layout
//!
//! Kafka Streams' runtime roles, one module (and one type) each; the crate root holds
//! `run` and its `RunConfig`:
//!
//! - [`stream_thread`]: the poll loop (StreamThread) and the rebalance callbacks;
//! - [`task_manager`]: the task lifecycle: assign, revoke (clean), lost (dirty), corrupted
//!   (wipe + restore), fatal;
//! - [`task_executor`]: processing, forwarding and committing (TaskExecutor): the core's
//!   one commit protocol (`task::commit`) on a [`kafka_log`];
//! - [`kafka_log`]: the commit protocol's log on Kafka (the collector, the consumer's
//!   offset commit or the transaction);
//! - [`active_task_creator`]: running tasks made over restored stores; the cache budget
//!   shared among them (ActiveTaskCreator);
//! - [`tasks`]: the running tasks by partition, and the forwarded source partitions;
//! - [`membership`]: the member id and pause suspicion, on an injectable clock;
//! - [`parking`]: partitions paused while restoring or waiting on the schema registry;
//! - [`offsets`]: processed and committed source offsets, origin ids;
//! - [`record_collector`]: every produce; transactions; send errors surfaced at flush
//!   (RecordCollector);
//! - [`delivery_tracker`]: the collector's producer context: records in flight and
//!   failed, acknowledged changelog offsets;
//! - [`state_manager`]: where stores live, checkpoints judged against the changelog, wipes
//!   (ProcessorStateManager);
//! - [`state_updater`]: tasks assigned but not ready: stores opened, checkpoints judged,
//!   restores advanced between polls (DefaultStateUpdater);
//! - [`changelog_reader`]: incremental restores between polls (StoreChangelogReader);
//! - [`repartition_purger`]: deletes repartition records below the committed offsets;
//! - [`rerouter`]: produces misrouted records to the partitions they belong on.

// The core's modules, at this crate's root as in the core's.
use readstate_core::{
    backoff, dead_letter_log, ids, kafka, processor, serde, state, task, telemetry, topology,
};
// Only the tests name a domain type (to check what the built-in node stored).
#[cfg(test)]
use readstate_core::model;

mod active_task_creator;
mod changelog_reader;
mod delivery_tracker;
mod kafka_log;
mod membership;
mod offsets;
mod parking;
mod readiness;
mod record_collector;
mod repartition_purger;
mod repeat_log;
mod rerouter;
mod schema_gate;
mod state_manager;
mod state_updater;
mod stream_thread;
mod task_executor;
mod task_manager;
mod tasks;

pub use state_manager::check_state_dir;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdKafkaError;

use crate::backoff::Clock;
use crate::kafka::admin::{describe_policies, ensure_topics, MetadataClient, TopicRequest};
use crate::kafka::{KafkaError, KafkaSettings};
use crate::processor::ProcessorRegistry;
use crate::serde::registry::SchemaResolver;
use crate::serde::SerdeError;
use crate::state::queryable::QueryableStores;
use crate::telemetry::{Health, Progress};
use crate::topology::Topology;

use stream_thread::{RebalanceHandler, StreamThread};
use task_manager::TaskManager;

/// Changelog records applied per restore step by default (one atomic store write each,
/// with the checkpoint); the poll loop runs between steps.
pub const RESTORE_BATCH: usize = 100_000;

/// What an instance did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// When the final commit at shutdown completed (before stores and clients close).
    pub final_commit_at: Option<Instant>,
    /// Source records consumed (a repartitioned event once, not again from the internal
    /// topic it is read back from).
    pub records_consumed: u64,
    /// Records re-keyed into the repartition topic (sub-topology 0).
    pub records_forwarded: u64,
    /// Misrouted records produced to the partitions they belong on (rerouted topics).
    pub records_rerouted: u64,
    pub events_folded: u64,
    pub replayed_skipped: u64,
    pub dead_letters: u64,
    pub updates_emitted: u64,
    pub changelog_records: u64,
    pub commits: u64,
    /// What happened to its tasks.
    pub lifecycle: LifecycleCounts,
}

/// What happened to an instance's tasks over its life (the task manager's half of a
/// [`RunSummary`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LifecycleCounts {
    /// Changelog records restored into stores.
    pub restored_records: u64,
    pub tasks_opened: u64,
    pub tasks_closed: u64,
    /// Assignments received from the group (the first one included).
    pub assignments: u64,
    /// Tasks closed dirty because the group moved on without this instance.
    pub tasks_lost: u64,
    /// Commits the group refused while it rebalanced, postponed (no task lost).
    pub commits_postponed: u64,
    /// Stores wiped because their checkpoint lay outside the changelog.
    pub tasks_corrupted: u64,
}

/// Errors that stop an instance.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Processor(#[from] crate::processor::ProcessorError),
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
    #[error(transparent)]
    Serde(#[from] SerdeError),
    #[error("{0}")]
    Config(String),
    /// A topology the runtime cannot run (yet).
    #[error("unsupported topology: {0}")]
    Unsupported(String),
    #[error("{0} does not exist")]
    MissingTopic(String),
    #[error("{0}")]
    Partitioning(String),
    #[error("cannot reach Kafka at {brokers} (no metadata within {timeout:?}): {source}")]
    KafkaUnreachable {
        brokers: String,
        timeout: Duration,
        source: Box<KafkaError>,
    },
    #[error("the topology has no receipts sink")]
    NoReceiptsSink,
    #[error("the consumer has no group metadata (exactly_once_v2 needs it for a transaction)")]
    NoGroupMetadata,
    #[error("tokio runtime: {0}")]
    Tokio(std::io::Error),
    #[error("restore of {topic} [{partition}] made no progress for {stalled_for:?} at offset {at} of {end}")]
    RestoreStalled {
        topic: String,
        partition: i32,
        stalled_for: Duration,
        at: i64,
        end: i64,
    },
    #[error("cannot rewind {topic} [{partition}] to offset {offset}: {source}")]
    Rewind {
        topic: String,
        partition: i32,
        offset: i64,
        source: Box<RdKafkaError>,
    },
    /// Tasks are in an unknown state (outputs that could not be made durable): the
    /// instance stops with a non-zero exit.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl RuntimeError {
    /// Records that timed out rather than being refused: after a pause past the
    /// timeouts, the group may have moved on (tasks lost, not broken).
    pub(crate) fn is_expiry(&self) -> bool {
        matches!(
            self,
            RuntimeError::Kafka(KafkaError::Delivery { expired: true, .. })
        )
    }
}

impl From<RdKafkaError> for RuntimeError {
    fn from(e: RdKafkaError) -> Self {
        RuntimeError::Kafka(KafkaError::Client(e))
    }
}

/// Everything an instance needs.
pub struct RunConfig {
    pub topology: Topology,
    pub kafka: KafkaSettings,
    pub resolver: Arc<dyn SchemaResolver>,
    /// Root of local state; the topology's `state_dir` unless overridden.
    pub state_dir: PathBuf,
    /// Records taken from the consumer per processing batch.
    pub max_poll_records: usize,
    /// Changelog records applied per restore step (the poll loop runs between steps).
    pub restore_batch: usize,
    /// How often records of repartition topics below the committed offsets are deleted
    /// (Kafka Streams' `repartition.purge.interval.ms`, 30 s).
    pub repartition_purge_interval: Duration,
    /// Replication factor of internal topics created by readstate.
    pub replication: i32,
    /// Liveness and readiness, for `/health` and `/ready`.
    pub health: Arc<Health>,
    /// Live counters (records consumed, updates emitted, dead letters).
    pub progress: Arc<Progress>,
    /// Set to request a commit at the next turn of the poll loop, whatever the commit
    /// interval (Kafka Streams' `ProcessorContext.commit()`); cleared when done.
    pub commit_now: Arc<AtomicBool>,
    /// The clock of the membership heuristics (a gap between polls, a slow commit).
    pub clock: Arc<dyn Clock>,
    /// The processor kinds this instance can run (`read-state`, and a program's own).
    pub registry: Arc<ProcessorRegistry>,
    /// Set once the topics are prepared (the output and internal topics exist): the
    /// embedded sinks subscribe only then.
    pub topics_ready: Arc<AtomicBool>,
    /// The tasks' stores and positions, published for interactive queries.
    pub queryable: Arc<QueryableStores>,
    /// The read API is served: the instance directory's topic is prepared with the others.
    pub instance_directory: bool,
}

impl RunConfig {
    pub fn new(
        topology: Topology,
        kafka: KafkaSettings,
        resolver: Arc<dyn SchemaResolver>,
    ) -> Self {
        Self {
            state_dir: topology.state_dir.clone(),
            topology,
            kafka,
            resolver,
            max_poll_records: 10_000,
            restore_batch: RESTORE_BATCH,
            repartition_purge_interval: Duration::from_secs(30),
            replication: 1,
            health: Health::new(),
            progress: Arc::new(Progress::default()),
            commit_now: Arc::new(AtomicBool::new(false)),
            clock: crate::backoff::system_clock(),
            registry: Arc::new(ProcessorRegistry::default()),
            topics_ready: Arc::new(AtomicBool::new(false)),
            queryable: Arc::default(),
            instance_directory: false,
        }
    }
}

/// Run one instance until `shutdown` is set (then flush, commit, close) or an error stops
/// it (then `/health` turns 503 first, and nothing more is committed).
pub fn run(config: RunConfig, shutdown: Arc<AtomicBool>) -> Result<RunSummary, RuntimeError> {
    let result = run_instance(&config, &shutdown);
    config.health.set_live(false);
    config.health.set_ready(false);
    if let Err(e) = &result {
        tracing::error!(error = %e, "instance stops");
    }
    result
}

fn run_instance(config: &RunConfig, shutdown: &AtomicBool) -> Result<RunSummary, RuntimeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RuntimeError::Tokio)?;
    let t = &config.topology;
    tracing::info!(application = %t.application_id, brokers = %config.kafka.brokers, startup_ms = crate::telemetry::since_start_ms(), "starting");
    // Before joining the group: an instance that cannot keep state must not cause a
    // rebalance per restart of a crash loop.
    state_manager::check_state_dir(&config.state_dir.join(t.application_id.as_str()))?;
    // The topic checks (a few round trips) go on while the output schema is registered
    // and the producer made; nothing joins the group before both are done.
    let (checked, tasks) = std::thread::scope(|s| {
        let checks = s.spawn(|| prepare_topics(config));
        let tasks = rt
            .block_on(config.registry.build(t, config.resolver.clone(), shutdown))
            .map_err(RuntimeError::from)
            .and_then(|node| TaskManager::new(config, node, rt));
        (checks.join().expect("topic check thread panicked"), tasks)
    });
    let partitions = checked?;
    config.topics_ready.store(true, Ordering::Relaxed);
    let mut tasks = tasks?;
    tasks.set_partitions(partitions);
    config.queryable.set_partitions(partitions);
    let owner = tasks.owner;
    let tasks = Arc::new(Mutex::new(tasks));
    tracing::debug!(
        startup_ms = crate::telemetry::since_start_ms(),
        "output schema and producer ready"
    );
    let mut consumer_config = config.kafka.consumer(t.application_id.as_str());
    let consumer_protocol = config.kafka.consumer_protocol();
    // Co-partitioned topics beside the task topic: message and members sources, and the
    // rerouted topics.
    let sides = t.side_sources();
    let co_partitioned = !sides.is_empty() || !t.rerouted_topics().is_empty();
    if co_partitioned && !consumer_protocol {
        // Co-partitioning: the range assignor gives each member the same partition numbers
        // of every topic with the same partition count (all members subscribe to both).
        // Rebalances are eager: every task is revoked (committed, closed) and reassigned.
        consumer_config.set("partition.assignment.strategy", "range");
    }
    if co_partitioned && consumer_protocol && consumer_config.get("group.remote.assignor").is_none()
    {
        // The coordinator's range assignor keeps the same partition numbers of co-
        // partitioned topics together; its incremental assignment may still give one half
        // of a pair before the other, and a task starts once it holds both.
        consumer_config.set("group.remote.assignor", "range");
    }
    if consumer_config.get("statistics.interval.ms").is_none() {
        // Consumer lag per partition comes from these statistics (no blocking request).
        consumer_config.set("statistics.interval.ms", "5000");
    }
    let consumer: BaseConsumer<RebalanceHandler> = consumer_config
        .create_with_context(RebalanceHandler {
            tasks: tasks.clone(),
            owner,
        })
        .map_err(KafkaError::from)?;
    // Sources, plus the repartition topics the stateful tasks read.
    let mut topics: Vec<String> = t.sources.iter().map(|s| s.topic.0.clone()).collect();
    topics.extend(
        t.sources
            .iter()
            .filter_map(|s| s.repartition_topic.as_ref().map(|r| r.0.clone())),
    );
    topics.extend(sides.iter().map(|m| m.topic.0.clone()));
    topics.extend(t.rerouted_topics().into_iter().map(|r| r.0));
    consumer
        .subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())
        .map_err(KafkaError::from)?;
    tracing::info!(application = %t.application_id, topics = ?topics, startup_ms = crate::telemetry::since_start_ms(), "subscribed; joining the consumer group");
    let thread = StreamThread {
        consumer,
        tasks,
        commit_interval: t.commit_interval,
        max_poll_records: config.max_poll_records,
        commit_now: config.commit_now.clone(),
    };
    let result = thread.run(shutdown);
    let summary = {
        let mut tm = thread.tasks.lock().expect("task manager lock");
        let clean = result.is_ok() && tm.fatal.is_none();
        if clean {
            tm.commit_all(&thread.consumer)?;
        } else {
            // Unknown state: stop answering healthy before anything else.
            config.health.set_live(false);
        }
        let final_commit_at = Instant::now();
        let clean = clean && tm.fatal.is_none();
        tracing::info!(clean, "final commit done; closing the tasks");
        tm.close_all(clean);
        RunSummary {
            final_commit_at: Some(final_commit_at),
            ..tm.summary()
        }
    };
    tracing::info!("tasks closed; leaving the group");
    thread.consumer.unsubscribe();
    let what = format!("stream thread of {}", t.application_id);
    if crate::kafka::close_within(&what, thread, crate::kafka::CONSUMER_CLOSE_TIMEOUT) {
        tracing::info!("consumer closed");
    }
    result.map(|_| summary)
}

/// Source topics must exist; internal topics are created with the source's partition
/// count, and existing ones are checked (partition count, `cleanup.policy`); returns the
/// sources' partition count. Runs on a
/// thread of its own (with its own small runtime for the admin requests); the metadata
/// requests and the DescribeConfigs go out at once.
fn prepare_topics(config: &RunConfig) -> Result<i32, RuntimeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RuntimeError::Tokio)?;
    let t = &config.topology;
    let sides = t.side_sources();
    let md_timeout = Duration::from_secs(10);
    let mut internal = t.internal_topics();
    if config.instance_directory {
        internal.push((t.instances_topic(), true));
    }
    let mut names: Vec<&str> = t.sources.iter().map(|s| s.topic.as_str()).collect();
    names.extend(internal.iter().map(|(n, _)| n.as_str()));
    names.push(t.output.topic.as_str());
    let outputs = t.heads_output.iter().chain(&t.sender_receipts_output);
    for h in outputs.chain(&t.read_by_output) {
        names.push(h.topic.as_str());
    }
    // Last: not created, only checked against the read events' partitioning.
    names.extend(sides.iter().map(|m| m.topic.as_str()));
    let compacted: Vec<String> = internal
        .iter()
        .filter(|(_, c)| *c)
        .map(|(n, _)| n.0.clone())
        .collect();
    let policies = describe_in_background(&config.kafka, compacted.clone(), md_timeout);
    let metadata = MetadataClient::new(&config.kafka)?;
    let counts = metadata.partition_counts(&names, md_timeout);
    let counts = counts.map_err(|e| RuntimeError::KafkaUnreachable {
        brokers: config.kafka.brokers.clone(),
        timeout: md_timeout,
        source: Box::new(e),
    })?;
    // Only an existing changelog needs its policy (a missing one is created compacted):
    // a broker that never answers DescribeConfigs then costs nothing on a first start.
    // Nor on a restart when the cluster has no controller to answer it (the mock).
    let existing_changelog = names
        .iter()
        .zip(&counts)
        .find(|(n, c)| c.is_some() && compacted.iter().any(|k| k == *n));
    let policies = match existing_changelog {
        Some((topic, _)) if metadata.has_controller(topic, md_timeout) => {
            policies.recv().map_err(|_| {
                RuntimeError::Fatal("the DescribeConfigs thread ended without an answer".into())
            })??
        }
        Some(_) => {
            tracing::debug!("no controller among the brokers: DescribeConfigs is not waited for");
            Default::default()
        }
        None => Default::default(),
    };
    let partitions = source_partitions(t, &counts)?;
    let side_counts = &counts[counts.len() - sides.len()..];
    for (m, count) in sides.iter().zip(side_counts) {
        check_message_partitions(m, *count, partitions, t)?;
    }
    let dlq = &t.dead_letter_topic.0;
    let mut wanted: Vec<TopicRequest> = internal
        .into_iter()
        .map(|(name, compacted)| TopicRequest {
            // The dead-letter topic's partitioning does not matter to any task.
            check_partitions: name.0 != *dlq,
            name: name.0,
            partitions,
            compacted,
            replication: config.replication,
        })
        .collect();
    let outputs = std::iter::once(&t.output).chain(&t.heads_output);
    let outputs = outputs.chain(&t.sender_receipts_output);
    for topic in outputs.chain(&t.read_by_output) {
        wanted.push(TopicRequest {
            name: topic.topic.0.clone(),
            partitions,
            compacted: false,
            check_partitions: false,
            replication: config.replication,
        });
    }
    let existing = &counts[t.sources.len()..t.sources.len() + wanted.len()];
    let created = rt.block_on(ensure_topics(
        &config.kafka,
        &wanted,
        existing,
        &policies,
        md_timeout,
    ))?;
    if !metadata.await_leaders(&created, md_timeout) {
        tracing::warn!(topics = ?created, "created topics have no leader yet after {md_timeout:?}");
    }
    metadata.close_in_background();
    tracing::debug!(
        topics = wanted.len(),
        startup_ms = crate::telemetry::since_start_ms(),
        "internal and output topics ready"
    );
    Ok(partitions)
}

/// DescribeConfigs of `topics` on a thread of its own (an admin client is a connection
/// of its own too): the answer arrives on the returned channel.
fn describe_in_background(
    settings: &KafkaSettings,
    topics: Vec<String>,
    timeout: Duration,
) -> std::sync::mpsc::Receiver<Result<crate::kafka::admin::Policies, KafkaError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let settings = settings.clone();
    std::thread::spawn(move || {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let answer = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(describe_policies(&settings, &names, timeout)),
            Err(e) => {
                tracing::warn!(error = %e, "no runtime for DescribeConfigs");
                Ok(Default::default())
            }
        };
        let _ = tx.send(answer);
    });
    rx
}

/// The sources' common partition count (from `counts`, sources first): each must exist,
/// and all must be co-partitioned.
fn source_partitions(t: &Topology, counts: &[Option<i32>]) -> Result<i32, RuntimeError> {
    let mut partitions = None;
    for (s, n) in t.sources.iter().zip(counts) {
        let n = n.ok_or_else(|| RuntimeError::MissingTopic(format!("source topic {}", s.topic)))?;
        if let Some(m) = partitions {
            if m != n {
                return Err(RuntimeError::Partitioning(format!(
                    "source topics must be co-partitioned: {} has {n} partitions, others {m}",
                    s.topic
                )));
            }
        }
        partitions = Some(n);
    }
    partitions.ok_or_else(|| RuntimeError::Unsupported("a topology without sources".into()))
}

/// A co-partitioned source's topic (messages, members) must exist with the read events'
/// partition count: task p reads partition p of each, so a conversation's records meet
/// in one task.
fn check_message_partitions(
    m: &crate::topology::Source,
    count: Option<i32>,
    partitions: i32,
    t: &Topology,
) -> Result<(), RuntimeError> {
    let reads = &t.sources[0].topic;
    match count {
        None => Err(RuntimeError::MissingTopic(format!(
            "source topic {} of source {:?} (create it with {partitions} partitions, like {reads})",
            m.topic, m.name
        ))),
        Some(n) if n != partitions => Err(RuntimeError::Partitioning(format!(
            "source topic {} of source {:?} has {n} partitions but {reads} has {partitions}: co-partitioned sources need the same partition count (and the same key, conversation_id, and partitioner)",
            m.topic, m.name
        ))),
        Some(_) => Ok(()),
    }
}
