//! `readstate run`: one instance of the application in its consumer group.
//!
//! One thread polls a group consumer (cooperative-sticky) and drives every task assigned to
//! this instance: decode, fold, and every commit interval the flush protocol of
//! `ARCHITECTURE.md` (outputs and dead letters acknowledged → changelog acknowledged → store
//! batch with checkpoint → source offsets committed). Revoked tasks are flushed and committed
//! inside the rebalance callback, before the partitions are given up. Newly assigned tasks
//! open their RocksDB store and restore it from the changelog, from the store's checkpoint
//! to the end, before they process anything.

mod engine;
pub use engine::RESTORE_BATCH;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::ClientContext;

use crate::kafka::admin::{ensure_topics, MetadataClient, TopicRequest};
use crate::kafka::{KafkaError, KafkaSettings};
use crate::serde::registry::SchemaResolver;
use crate::serde::{SerdeError, UpdateEncoder, RECEIPT_UPDATE_SCHEMA};
use crate::telemetry::{Health, Progress};
use crate::topology::Topology;

use engine::Engine;
pub use engine::RunSummary;

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
    /// Replication factor of internal topics created by readstate.
    pub replication: i32,
    /// Liveness and readiness, for `/health` and `/ready`.
    pub health: Arc<Health>,
    /// Live counters (records consumed, updates emitted, dead letters).
    pub progress: Arc<Progress>,
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
            replication: 1,
            health: Health::new(),
            progress: Arc::new(Progress::default()),
        }
    }
}

/// Consumer context: hands rebalances to the engine.
struct RebalanceHandler {
    engine: Arc<Mutex<Engine>>,
}

impl ClientContext for RebalanceHandler {}

impl ConsumerContext for RebalanceHandler {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            let mut engine = self.engine.lock().expect("engine lock");
            if let Err(e) = engine.revoke(consumer, &parts) {
                tracing::error!(error = %e, "flush on revoke failed; uncommitted work will be replayed by the next owner");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(partitions = ?parts, "assigned");
                self.engine.lock().expect("engine lock").assign(&parts);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Run one instance until `shutdown` is set (then flush, commit, close) or a fatal error.
pub fn run(config: RunConfig, shutdown: Arc<AtomicBool>) -> Result<RunSummary, RuntimeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::Config(format!("tokio runtime: {e}")))?;
    let t = &config.topology;
    let md_timeout = Duration::from_secs(10);
    tracing::info!(application = %t.application_id, brokers = %config.kafka.brokers, "starting");

    // Source topics must exist; internal topics get the source's partition count.
    let mut partitions = None;
    let names: Vec<&str> = t.sources.iter().map(|s| s.topic.as_str()).collect();
    let metadata = MetadataClient::new(&config.kafka)?;
    let counts = metadata.partition_counts(&names, md_timeout)?;
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
    let mut wanted: Vec<TopicRequest> = t
        .internal_topics()
        .into_iter()
        .map(|(name, compacted)| TopicRequest {
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
        replication: config.replication,
    });
    rt.block_on(ensure_topics(&config.kafka, &metadata, &wanted, md_timeout))?;
    drop(metadata);
    tracing::debug!(topics = wanted.len(), "internal and output topics ready");

    let encoder = rt.block_on(register_with_retry(
        &*config.resolver,
        &format!("{}-value", t.output.topic),
        &shutdown,
    ))?;
    let engine = Arc::new(Mutex::new(Engine::new(&config, encoder, rt)?));
    let consumer: BaseConsumer<RebalanceHandler> = config
        .kafka
        .consumer(t.application_id.as_str())
        .create_with_context(RebalanceHandler {
            engine: engine.clone(),
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

    let commit_interval = t.commit_interval;
    let mut last_commit = Instant::now();
    let result = (|| -> Result<(), RuntimeError> {
        while !shutdown.load(Ordering::Relaxed) {
            let mut batch = Vec::new();
            if let Some(first) = consumer.poll(Duration::from_millis(100)) {
                batch.push(first);
                while batch.len() < config.max_poll_records {
                    match consumer.poll(Duration::ZERO) {
                        Some(m) => batch.push(m),
                        None => break,
                    }
                }
            }
            let mut engine = engine.lock().expect("engine lock");
            engine.open_assigned()?;
            let mut msgs = Vec::with_capacity(batch.len());
            for m in batch {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(e) => engine.consumer_error(e),
                }
            }
            let processing = Instant::now();
            engine.process(&msgs, &shutdown)?;
            tracing::trace!(records = msgs.len(), elapsed = ?processing.elapsed(), "processed a poll");
            drop(msgs);
            if last_commit.elapsed() >= commit_interval || engine.needs_flush() {
                engine.commit_all(&consumer)?;
                last_commit = Instant::now();
            }
        }
        Ok(())
    })();
    let summary = {
        let mut e = engine.lock().expect("engine lock");
        if result.is_ok() {
            e.commit_all(&consumer)?;
        } else {
            e.mark_failed();
        }
        let final_commit_at = Instant::now();
        tracing::debug!("final commit done");
        e.close_all();
        tracing::debug!("tasks closed");
        RunSummary {
            final_commit_at: Some(final_commit_at),
            ..e.summary()
        }
    };
    consumer.unsubscribe();
    drop(consumer);
    tracing::debug!("consumer closed");
    config.health.set_live(false);
    config.health.set_ready(false);
    result.map(|_| summary)
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
