//! `readstate run`: one instance of the application in its consumer group, in Kafka
//! Streams' runtime roles, one module each:
//!
//! - [`stream_thread`]: the poll loop (StreamThread) and the rebalance callbacks;
//! - [`task_manager`]: tasks by partition; assign, revoke (clean), lost (dirty), corrupted
//!   (wipe + restore), fatal; partitions parked while restoring or waiting on the registry;
//! - [`task_executor`]: processing, forwarding and the commit protocol (TaskExecutor);
//! - [`record_collector`]: every produce; acknowledged changelog offsets; send errors
//!   surfaced at flush (RecordCollector);
//! - [`state_manager`]: where stores live, checkpoints judged against the changelog, wipes
//!   (ProcessorStateManager);
//! - [`changelog_reader`]: incremental restores between polls (StoreChangelogReader);
//! - [`repartition_purger`]: deletes repartition records below the committed offsets.

mod changelog_reader;
pub(crate) mod dead_letter_log;
mod record_collector;
mod repartition_purger;
mod state_manager;
mod stream_thread;
mod task_executor;
mod task_manager;

pub use state_manager::check_state_dir;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdKafkaError;

use crate::kafka::admin::{ensure_topics, MetadataClient, TopicRequest};
use crate::kafka::{KafkaError, KafkaSettings};
use crate::serde::registry::SchemaResolver;
use crate::serde::{SerdeError, UpdateEncoder, RECEIPT_UPDATE_SCHEMA};
use crate::telemetry::{Health, Progress};
use crate::topology::Topology;

use dead_letter_log::{
    log_dead_letter, DeadLetterBreaker, LogLimiter, DEAD_LETTER_LOGS_PER_SECOND,
};
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
    pub records_consumed: u64,
    /// Records re-keyed into the repartition topic (sub-topology 0).
    pub records_forwarded: u64,
    pub events_folded: u64,
    pub replayed_skipped: u64,
    pub dead_letters: u64,
    pub updates_emitted: u64,
    pub changelog_records: u64,
    pub restored_records: u64,
    pub commits: u64,
    pub tasks_opened: u64,
    pub tasks_closed: u64,
    /// Assignments received from the group (the first one included).
    pub assignments: u64,
    /// Tasks closed dirty because the group moved on without this instance.
    pub tasks_lost: u64,
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
    /// Tasks are in an unknown state (outputs that could not be made durable): the
    /// instance stops with a non-zero exit.
    #[error("fatal: {0}")]
    Fatal(String),
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
        .map_err(|e| RuntimeError::Config(format!("tokio runtime: {e}")))?;
    let t = &config.topology;
    tracing::info!(application = %t.application_id, brokers = %config.kafka.brokers, "starting");
    // Before joining the group: an instance that cannot keep state must not cause a
    // rebalance per restart of a crash loop.
    state_manager::check_state_dir(&config.state_dir.join(t.application_id.as_str()))?;
    rt.block_on(prepare_topics(config))?;
    let encoder = rt.block_on(register_with_retry(
        &*config.resolver,
        &format!("{}-value", t.output.topic),
        shutdown,
    ))?;
    let tasks = Arc::new(Mutex::new(TaskManager::new(config, encoder, rt)?));
    let mut consumer_config = config.kafka.consumer(t.application_id.as_str());
    if consumer_config.get("statistics.interval.ms").is_none() {
        // Consumer lag per partition comes from these statistics (no blocking request).
        consumer_config.set("statistics.interval.ms", "5000");
    }
    let consumer: BaseConsumer<RebalanceHandler> = consumer_config
        .create_with_context(RebalanceHandler {
            tasks: tasks.clone(),
        })
        .map_err(KafkaError::from)?;
    // Sources, plus the repartition topics the stateful tasks read.
    let mut topics: Vec<String> = t.sources.iter().map(|s| s.topic.0.clone()).collect();
    topics.extend(
        t.sources
            .iter()
            .filter_map(|s| s.repartition_topic.as_ref().map(|r| r.0.clone())),
    );
    consumer
        .subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())
        .map_err(KafkaError::from)?;
    tracing::info!(application = %t.application_id, topics = ?topics, "joined consumer group");
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
        tm.close_all(clean);
        RunSummary {
            final_commit_at: Some(final_commit_at),
            ..tm.summary()
        }
    };
    thread.consumer.unsubscribe();
    drop(thread);
    tracing::debug!("consumer closed");
    result.map(|_| summary)
}

/// Source topics must exist; internal topics are created with the source's partition
/// count, and existing ones are checked (partition count, `cleanup.policy`).
async fn prepare_topics(config: &RunConfig) -> Result<(), RuntimeError> {
    let t = &config.topology;
    let md_timeout = Duration::from_secs(10);
    let mut partitions = None;
    let names: Vec<&str> = t.sources.iter().map(|s| s.topic.as_str()).collect();
    let metadata = MetadataClient::new(&config.kafka)?;
    let counts = metadata.partition_counts(&names, md_timeout).map_err(|e| {
        RuntimeError::Config(format!(
            "cannot reach Kafka at {} (no metadata within {md_timeout:?}): {e}",
            config.kafka.brokers
        ))
    })?;
    for (s, n) in t.sources.iter().zip(counts) {
        let n = n.ok_or_else(|| {
            RuntimeError::Config(format!("source topic {} does not exist", s.topic))
        })?;
        if let Some(m) = partitions {
            if m != n {
                return Err(RuntimeError::Config(format!(
                    "source topics must be co-partitioned: {} has {n} partitions, others {m}",
                    s.topic
                )));
            }
        }
        partitions = Some(n);
    }
    let partitions = partitions.ok_or_else(|| RuntimeError::Config("no sources".into()))?;
    let dlq = &t.dead_letter_topic.0;
    let mut wanted: Vec<TopicRequest> = t
        .internal_topics()
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
    wanted.push(TopicRequest {
        name: t.output.topic.0.clone(),
        partitions,
        compacted: false,
        check_partitions: false,
        replication: config.replication,
    });
    ensure_topics(&config.kafka, &metadata, &wanted, md_timeout).await?;
    tracing::debug!(topics = wanted.len(), "internal and output topics ready");
    Ok(())
}

async fn register_with_retry(
    resolver: &dyn SchemaResolver,
    subject: &str,
    shutdown: &AtomicBool,
) -> Result<UpdateEncoder, RuntimeError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match UpdateEncoder::register(resolver, subject, RECEIPT_UPDATE_SCHEMA).await {
            Ok(e) => return Ok(e),
            Err(SerdeError::RegistryUnavailable(msg)) if !shutdown.load(Ordering::Relaxed) => {
                tracing::warn!(error = %msg, retry_in = ?backoff, "schema registry unavailable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
