//! The sink's consumer loop (`readstate sink`, or embedded in `readstate run`).
//!
//! Consumes the output topic in its own group, so a slow or dead database never stalls
//! stream processing: the topic is the shock absorber and the sink's lag is its backlog.
//!
//! - **Assign**: the partitions are claimed in the database (offset row created if new),
//!   and the consumer seeks to the stored `next_offset` (the beginning if none). Records
//!   below the stored offset are skipped even if they arrive before the seek takes effect.
//! - **Batch**: decoded updates are folded to one row per key (highest version) until
//!   `batch_size` distinct rows or `linger` since the batch's first record.
//! - **Write**: one transaction: the rows and the offsets they cover (see
//!   [`super::table`]). Then, for lag tooling only, the same offsets are committed to Kafka.
//! - **Faults**: a retriable error pauses every assigned partition and retries with
//!   exponential backoff and jitter (the consumer keeps serving the group meanwhile); rows
//!   the database rejects for good go to the dead-letter topic and the batch is retried
//!   without them; a fenced write (another instance owns the partition now) drops that
//!   partition's part of the batch and claims it again.
//! - **Revoke**: the unwritten part of the batch for the revoked partitions is dropped; the
//!   next owner reads it again from the offsets in the database.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::batch::{Batcher, WriteBatch};
use super::lag::{Consumed, ConsumedAt, LagProbe, Positions, Written};
use super::row::{RowDecoder, SinkRow};
use super::table::ReceiptTable;
use super::SinkError;
use crate::backoff::Backoff;
use crate::dead_letter_log::{
    flush_dead_letter_log, log_dead_letter, LogLimiter, DEAD_LETTER_LOGS_PER_SECOND,
};
use crate::ids::Origin;
use crate::kafka::{dead_letter_headers, KafkaError, KafkaSettings};
use crate::model::ReceiptUpdate;
use crate::serde::registry::SchemaResolver;
use crate::serde::SerdeError;
use crate::task::{DeadLetter, SourceRecord};
use crate::telemetry::{Health, Progress};

/// Everything a sink instance needs.
pub struct SinkConfig<R: SinkRow = ReceiptUpdate> {
    /// Consumer group, `<application.id>-pg-sink`.
    pub group: String,
    /// The output topic it consumes.
    pub topic: String,
    pub dead_letter_topic: String,
    pub batch_size: usize,
    pub linger: Duration,
    pub kafka: KafkaSettings,
    pub resolver: Arc<dyn SchemaResolver>,
    /// The table; the topic's reader schema follows its id types.
    pub table: Arc<dyn ReceiptTable<R>>,
    /// Live counters (sink records, rows written, statements).
    pub progress: Arc<Progress>,
    /// `/ready` says here why the sink is waiting (the database unreachable).
    pub health: Arc<Health>,
    /// When given, the sink subscribes once it is set: the sink embedded in `readstate
    /// run` waits for the stream thread to create the output topic (subscribing to a
    /// missing topic logs an error and delays the first assignment).
    pub topics_ready: Option<Arc<AtomicBool>>,
}

/// What a sink instance did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkSummary {
    pub records: u64,
    pub batches: u64,
    /// Upsert statements executed.
    pub statements: u64,
    /// Rows inserted or moved forward.
    pub rows_changed: u64,
    pub dead_letters: u64,
    pub retries: u64,
    pub fenced: u64,
}

enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Consumer context: queues rebalances for the loop, which owns the database work.
struct SinkContext {
    topic: String,
    events: Mutex<Vec<RebalanceEvent>>,
    /// Where the consumer stands per partition (its statistics), for the lag probe.
    consumed: Consumed,
}

impl ClientContext for SinkContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        let Some(t) = stats.topics.get(&self.topic) else {
            return;
        };
        let mut consumed = self.consumed.lock().expect("consumed lock");
        for (p, s) in t.partitions.iter().filter(|(p, _)| **p >= 0) {
            consumed.insert(
                *p,
                ConsumedAt {
                    next_fetch: s.next_offset,
                    queued: s.fetchq_cnt,
                },
            );
        }
    }
}

impl SinkContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect()
    }
}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = self.partitions(tpl);
            self.events
                .lock()
                .expect("events lock")
                .push(RebalanceEvent::Revoked(parts));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = self.partitions(tpl);
            self.events
                .lock()
                .expect("events lock")
                .push(RebalanceEvent::Assigned(parts));
        }
    }
}

/// Run one sink instance until `shutdown` is set or a fatal error.
pub fn run_sink<R: SinkRow>(
    config: SinkConfig<R>,
    shutdown: Arc<AtomicBool>,
) -> Result<SinkSummary, SinkError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SinkError::Fatal(format!("tokio runtime: {e}")))?;
    rt.block_on(async move {
        let mut sink = Sink::<R>::new(config)?;
        let r = sink.run(&shutdown).await;
        sink.consumer.unsubscribe();
        let summary = r.map(|_| std::mem::take(&mut sink.summary));
        let what = format!("sink {}", sink.cfg.group);
        crate::kafka::close_within(&what, sink.consumer, crate::kafka::CONSUMER_CLOSE_TIMEOUT);
        summary
    })
}

struct Sink<R: SinkRow> {
    cfg: SinkConfig<R>,
    consumer: BaseConsumer<SinkContext>,
    producer: FutureProducer,
    decoder: Box<dyn RowDecoder<R>>,
    /// Stored `next_offset` per owned partition (-1: none).
    owned: BTreeMap<i32, i64>,
    /// Assigned partitions not claimed yet (the database was unreachable): paused.
    unclaimed: BTreeSet<i32>,
    /// The offset after the last record accepted per owned partition: a record below it
    /// and below the stored offset means the topic started again (recreated).
    read: BTreeMap<i32, i64>,
    /// Partitions stopped because their topic was recreated while running: paused, and
    /// `/ready` says why, until an operator resets the sink offsets.
    stopped: BTreeSet<i32>,
    claim_retry: Retry,
    /// The database is unavailable: every owned partition is paused, and partitions
    /// assigned meanwhile are paused too.
    outage: bool,
    summary: SinkSummary,
    /// `owned`, as the lag probe sees it.
    positions: Positions,
    /// The owned partitions published as all written (see `unwritten`).
    all_written: BTreeSet<i32>,
    _lag: LagProbe,
    dead_letter_log: LogLimiter,
}

/// How often the sink's lag per partition is measured (a watermark request each).
const LAG_INTERVAL: Duration = Duration::from_secs(5);

const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl<R: SinkRow> Sink<R> {
    fn new(cfg: SinkConfig<R>) -> Result<Self, SinkError> {
        let consumed = Consumed::default();
        let consumer: BaseConsumer<SinkContext> = cfg
            .kafka
            .consumer(&cfg.group)
            // Where the consumer stands, for the lag probe (no request: local figures).
            .set("statistics.interval.ms", "5000")
            .create_with_context(SinkContext {
                topic: cfg.topic.clone(),
                events: Mutex::new(Vec::new()),
                consumed: consumed.clone(),
            })
            .map_err(KafkaError::from)?;
        let producer: FutureProducer = cfg.kafka.producer().create().map_err(KafkaError::from)?;
        let decoder = R::decoder(cfg.resolver.clone(), &cfg.table.ids())?;
        let positions = Positions::default();
        let lag = LagProbe::start(
            &cfg.kafka,
            cfg.topic.clone(),
            positions.clone(),
            consumed,
            LAG_INTERVAL,
        )?;
        Ok(Self {
            cfg,
            consumer,
            producer,
            decoder,
            owned: BTreeMap::new(),
            unclaimed: BTreeSet::new(),
            read: BTreeMap::new(),
            stopped: BTreeSet::new(),
            claim_retry: Retry::new(),
            outage: false,
            summary: SinkSummary::default(),
            positions,
            all_written: BTreeSet::new(),
            _lag: lag,
            dead_letter_log: LogLimiter::new(DEAD_LETTER_LOGS_PER_SECOND),
        })
    }

    /// Wait until the table can be written (an unmigrated database is refused at once).
    async fn wait_for_database(&mut self, shutdown: &AtomicBool) -> Result<bool, SinkError> {
        let mut retry = Retry::new();
        loop {
            match self.cfg.table.check_ready().await {
                Ok(()) => {
                    self.cfg.health.set_waiting(None);
                    return Ok(true);
                }
                Err(SinkError::Retriable(e)) => {
                    let why = format!("postgres sink waiting for the database: {e}");
                    let wait = retry.failed();
                    tracing::warn!(error = %e, retry_in = ?wait, "database unavailable: the sink waits (stream processing goes on)");
                    self.cfg.health.set_waiting(Some(why));
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        if shutdown.load(Ordering::Relaxed) {
                            return Ok(false);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    retry.failed();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Wait until the output topic exists (see [`SinkConfig::topics_ready`]); false when
    /// shut down first.
    async fn wait_for_topics(&self, shutdown: &AtomicBool) -> bool {
        let Some(ready) = &self.cfg.topics_ready else {
            return true;
        };
        while !ready.load(Ordering::Relaxed) {
            if shutdown.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    async fn run(&mut self, shutdown: &AtomicBool) -> Result<(), SinkError> {
        if !self.wait_for_database(shutdown).await? || !self.wait_for_topics(shutdown).await {
            return Ok(());
        }
        self.consumer
            .subscribe(&[self.cfg.topic.as_str()])
            .map_err(KafkaError::from)?;
        tracing::info!(group = %self.cfg.group, topic = %self.cfg.topic, "sink joined its consumer group");
        let mut batch = Batcher::new();
        while !shutdown.load(Ordering::Relaxed) {
            self.rebalances(&mut batch, &mut []).await?;
            self.retry_claims().await?;
            // BaseConsumer::poll blocks; keep it short and yield to the runtime between.
            let polled = self.consumer.poll(Duration::from_millis(50));
            match polled {
                Some(Ok(m)) => {
                    let (p, off) = (m.partition(), m.offset());
                    let payload = m.payload().map(<[u8]>::to_vec);
                    let key = m.key().map(<[u8]>::to_vec);
                    drop(m);
                    self.accept(p, off, key, payload, &mut batch, shutdown)
                        .await?;
                }
                Some(Err(e)) => tracing::warn!(error = %e, "sink consumer error"),
                None => tokio::task::yield_now().await,
            }
            flush_dead_letter_log(&mut self.dead_letter_log);
            let due = batch.age().is_some_and(|a| a >= self.cfg.linger);
            if batch.rows() >= self.cfg.batch_size || due {
                self.flush(&mut batch, shutdown).await?;
            }
        }
        self.flush(&mut batch, shutdown).await
    }

    /// Apply queued rebalances: drop revoked partitions' unwritten work; pause newly
    /// assigned ones until they are claimed (and, during an outage, until it ends).
    async fn rebalances(
        &mut self,
        batch: &mut Batcher<R>,
        writing: &mut [WriteBatch<R>],
    ) -> Result<(), SinkError> {
        let events = std::mem::take(&mut *self.consumer.context().events.lock().expect("lock"));
        for ev in events {
            match ev {
                RebalanceEvent::Revoked(parts) => {
                    for p in &parts {
                        self.owned.remove(p);
                        self.unclaimed.remove(p);
                        self.read.remove(p);
                        self.stopped.remove(p);
                        batch.drop_partition(*p);
                        for w in writing.iter_mut() {
                            w.remove_partition(*p);
                        }
                    }
                    self.publish_positions();
                    tracing::info!(partitions = ?parts, "sink partitions revoked");
                }
                RebalanceEvent::Assigned(parts) if !parts.is_empty() => {
                    // librdkafka keeps a partition's pause flag across ownerships: every
                    // assigned partition is paused here and resumed once claimed.
                    self.consumer
                        .pause(&self.partition_list(parts.iter()))
                        .map_err(KafkaError::from)?;
                    self.unclaimed.extend(parts);
                    self.claim_retry = Retry::new();
                }
                RebalanceEvent::Assigned(_) => {}
            }
        }
        Ok(())
    }

    fn partition_list<'a>(&self, parts: impl Iterator<Item = &'a i32>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            tpl.add_partition(&self.cfg.topic, *p);
        }
        tpl
    }

    /// Claim the unclaimed partitions when due; while the database is unavailable they stay
    /// paused and the claim is retried with backoff (the loop keeps polling meanwhile).
    async fn retry_claims(&mut self) -> Result<(), SinkError> {
        if self.unclaimed.is_empty() || Instant::now() < self.claim_retry.at {
            return Ok(());
        }
        let parts: Vec<i32> = self.unclaimed.iter().copied().collect();
        match self.claim(&parts).await {
            Ok(()) => {
                self.unclaimed.clear();
                if !self.outage {
                    let claimed = parts.iter().filter(|p| !self.stopped.contains(p));
                    self.consumer
                        .resume(&self.partition_list(claimed))
                        .map_err(KafkaError::from)?;
                }
                Ok(())
            }
            Err(SinkError::Retriable(e)) => {
                let wait = self.claim_retry.failed();
                tracing::warn!(error = %e, partitions = ?parts, retry_in = ?wait, "claiming sink partitions");
                self.summary.retries += 1;
                metrics::counter!("readstate_sink_retries_total").increment(1);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Load the stored offsets of `parts` and seek to them.
    async fn claim(&mut self, parts: &[i32]) -> Result<(), SinkError> {
        let stored = self
            .cfg
            .table
            .claim(&self.cfg.group, &self.cfg.topic, parts)
            .await?;
        for p in parts {
            let next = stored.get(p).copied().unwrap_or(-1);
            if let Some(end) = self.stored_offset_beyond_end(*p, next)? {
                self.owned.insert(*p, next);
                self.stop_partition(*p, next, end);
                continue;
            }
            self.owned.insert(*p, next);
            self.read.remove(p);
            let to = if next >= 0 {
                Offset::Offset(next)
            } else {
                Offset::Beginning
            };
            // Best effort: records below the stored offset are skipped in `accept` anyway.
            if let Err(e) = self.consumer.seek(&self.cfg.topic, *p, to, Duration::ZERO) {
                tracing::debug!(partition = p, error = %e, "seek after assignment deferred");
            }
        }
        self.publish_positions();
        tracing::info!(partitions = ?parts, offsets = ?self.owned, "sink partitions claimed");
        Ok(())
    }

    /// A stored offset must lie within the partition's log: beyond its end means the topic
    /// was recreated (`Some(end)`: the partition is stopped); below its start means records
    /// were deleted unwritten (said).
    fn stored_offset_beyond_end(
        &self,
        partition: i32,
        next: i64,
    ) -> Result<Option<i64>, SinkError> {
        if next < 0 {
            return Ok(None);
        }
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.cfg.topic, partition, Duration::from_secs(5))
            .map_err(|e| {
                SinkError::Retriable(format!("offsets of {} [{partition}]: {e}", self.cfg.topic))
            })?;
        if next > high {
            return Ok(Some(high));
        }
        if next < low {
            tracing::warn!(topic = %self.cfg.topic, partition, stored = next, log_start = low, "records below the log start were deleted (retention) before the sink wrote them; it goes on from the log start");
        }
        Ok(None)
    }

    /// A partition's offsets went back below the stored offset: if its log now ends
    /// below it, the topic was recreated while running.
    fn offsets_went_back(&mut self, partition: i32, stored: i64) {
        match self
            .consumer
            .fetch_watermarks(&self.cfg.topic, partition, Duration::from_secs(5))
        {
            Ok((_, high)) if high < stored => self.stop_partition(partition, stored, high),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(topic = %self.cfg.topic, partition, error = %e, "offsets went back below the stored offset; the log end is unknown, checked again at the next record");
            }
        }
    }

    /// The partition's topic was recreated (or truncated) since its offsets were stored:
    /// reading on would skip every record below the stored offset, so the partition stops
    /// (paused, nothing skipped silently). The error names it and the fix, and `/ready`
    /// says why until an operator resets the sink offsets and restarts; the other
    /// partitions go on.
    fn stop_partition(&mut self, partition: i32, stored: i64, end: i64) {
        let topic = &self.cfg.topic;
        let e = SinkError::OffsetBeyondEnd {
            group: self.cfg.group.clone(),
            topic: topic.clone(),
            partition,
            stored,
            end,
        };
        tracing::error!(error = %e, "sink partition stopped");
        self.cfg
            .health
            .set_stopped(format!("postgres sink stopped {topic} [{partition}]: {e}"));
        metrics::counter!("readstate_sink_partitions_stopped_total").increment(1);
        self.stopped.insert(partition);
        if let Err(e) = self
            .consumer
            .pause(&self.partition_list([partition].iter()))
        {
            tracing::warn!(topic = %topic, partition, error = %e, "cannot pause the stopped partition");
        }
    }

    async fn accept(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        batch: &mut Batcher<R>,
        shutdown: &AtomicBool,
    ) -> Result<(), SinkError> {
        let Some(stored) = self.owned.get(&partition).copied() else {
            // Revoked meanwhile (the next owner reads it), or not claimed yet (the claim
            // seeks back to the stored offset).
            return Ok(());
        };
        if self.stopped.contains(&partition) {
            return Ok(());
        }
        if offset < stored {
            // Written already (fetched before the seek took effect), unless the offsets
            // went back: then the topic may have been recreated.
            if self.read.get(&partition).is_some_and(|&next| offset < next) {
                self.offsets_went_back(partition, stored);
            }
            return Ok(());
        }
        self.read.insert(partition, offset + 1);
        self.unwritten(partition);
        self.summary.records += 1;
        metrics::counter!("readstate_sink_records_total").increment(1);
        let update = match self
            .decode(key.as_deref(), payload.as_deref(), offset, shutdown)
            .await?
        {
            Ok(u) => Some(u),
            Err((reason, error)) => {
                let rec = SourceRecord {
                    topic: &self.cfg.topic,
                    partition,
                    offset,
                    key: key.as_deref(),
                    value: payload.as_deref(),
                    origin: Origin { source: 0, offset },
                    timestamp: None,
                };
                let max = crate::serde::avro::MAX_RECORD_BYTES;
                self.dead_letter(DeadLetter::from_record(&rec, reason, error, max))
                    .await?;
                None
            }
        };
        batch.add(partition, offset, update);
        Ok(())
    }

    /// Decode one output record; a registry outage is retried, never a dead letter.
    async fn decode(
        &mut self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        offset: i64,
        shutdown: &AtomicBool,
    ) -> Result<Result<R, (&'static str, String)>, SinkError> {
        let mut backoff = sink_backoff();
        while let Some(bytes) = payload {
            match self.decoder.prepare(bytes).await {
                Ok(()) => break,
                Err(SerdeError::RegistryUnavailable(e)) if !shutdown.load(Ordering::Relaxed) => {
                    let wait = backoff.fail();
                    tracing::warn!(error = %e, retry_in = ?wait, "schema registry unavailable");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(match self.decoder.decode(key, payload, offset) {
            Ok(u) => Ok(u),
            Err(e) => Err((e.reason(), e.to_string())),
        })
    }

    /// Produce a dead letter and wait for its acknowledgement.
    async fn dead_letter(&mut self, d: DeadLetter) -> Result<(), SinkError> {
        log_dead_letter(&d, &mut self.dead_letter_log);
        let mut rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.cfg.dead_letter_topic).headers(dead_letter_headers(&d));
        if let Some(k) = d.key.as_deref() {
            rec = rec.key(k);
        }
        if let Some(v) = d.value.as_deref() {
            rec = rec.payload(v);
        }
        self.producer
            .send(rec, Duration::from_secs(60))
            .await
            .map_err(|(e, _)| KafkaError::from(e))?;
        self.summary.dead_letters += 1;
        Ok(())
    }

    fn assignment(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for p in self.owned.keys().filter(|p| !self.stopped.contains(p)) {
            tpl.add_partition(&self.cfg.topic, *p);
        }
        tpl
    }

    /// Write the batch as up to `parallel_writes` transactions over disjoint partitions,
    /// at once; each is retried as its errors say until all are written. A transaction that
    /// committed is never written again (its partitions' offsets moved with it).
    async fn flush(
        &mut self,
        batch: &mut Batcher<R>,
        shutdown: &AtomicBool,
    ) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let owned = self.owned.clone();
        let mut pending = batch
            .take(|p| owned.get(&p).copied().unwrap_or(-1))
            .split(self.cfg.table.parallel_writes());
        let mut backoff = sink_backoff();
        let mut outage_started: Option<Instant> = None;
        let result = loop {
            pending.retain(|w| !w.is_empty());
            if pending.is_empty() {
                if let Some(t) = outage_started {
                    tracing::info!(after = ?t.elapsed(), "database available again; sink resumed");
                }
                break Ok(());
            }
            let started = Instant::now();
            let (group, topic) = (&self.cfg.group, &self.cfg.topic);
            let results = futures::future::join_all(
                pending
                    .iter()
                    .map(|w| self.cfg.table.write(group, topic, w)),
            )
            .await;
            let mut unavailable: Option<String> = None;
            let mut fatal: Option<SinkError> = None;
            let mut next = Vec::with_capacity(pending.len());
            for (mut w, r) in std::mem::take(&mut pending).into_iter().zip(results) {
                match self.settle(&mut w, r, started, batch).await {
                    Ok(Settled::Done) => {}
                    Ok(Settled::Again) => next.push(w),
                    Ok(Settled::Unavailable(e)) => {
                        unavailable = Some(e);
                        next.push(w);
                    }
                    Err(e) => fatal = Some(e),
                }
            }
            if let Some(e) = fatal {
                break Err(e);
            }
            pending = next;
            if let Some(e) = unavailable {
                if shutdown.load(Ordering::Relaxed) {
                    // Not written, offsets not moved: the next owner writes it.
                    tracing::warn!(error = %e, "database unavailable at shutdown; batch left to be replayed");
                    break Ok(());
                }
                if !self.outage {
                    self.consumer
                        .pause(&self.assignment())
                        .map_err(KafkaError::from)?;
                    self.outage = true;
                    outage_started = Some(Instant::now());
                }
                self.cfg
                    .health
                    .set_waiting(Some(format!("postgres sink waiting for the database: {e}")));
                let wait = backoff.fail();
                tracing::warn!(error = %e, retry_in = ?wait, "database write failed; consumption paused");
                self.summary.retries += 1;
                metrics::counter!("readstate_sink_retries_total").increment(1);
                self.wait_serving_group(wait, batch, &mut pending, shutdown)
                    .await?;
            }
        };
        if self.outage && result.is_ok() && pending_is_written(&pending) {
            // Every owned partition, including those assigned during the outage.
            self.outage = false;
            self.cfg.health.set_waiting(None);
            let tpl = self.assignment();
            if tpl.count() > 0 {
                self.consumer.resume(&tpl).map_err(KafkaError::from)?;
            }
        }
        result
    }

    /// What one transaction's outcome means for its batch `w`.
    async fn settle(
        &mut self,
        w: &mut WriteBatch<R>,
        result: Result<super::table::WriteReport, SinkError>,
        started: Instant,
        batch: &mut Batcher<R>,
    ) -> Result<Settled, SinkError> {
        Ok(match result {
            Ok(report) => {
                self.committed(w, report, started.elapsed());
                Settled::Done
            }
            Err(SinkError::Retriable(e)) => Settled::Unavailable(e),
            Err(SinkError::Rejected(rows)) => {
                let idx: Vec<usize> = rows.iter().map(|(i, _)| *i).collect();
                for (i, error) in rows {
                    let u = &w.rows[i];
                    let d = DeadLetter {
                        topic: self.cfg.topic.clone(),
                        partition: w.row_partitions[i],
                        offset: w.row_offsets[i],
                        key: Some(u.record_key().into_bytes()),
                        value: Some(u.to_json().into_bytes()),
                        reason: "rejected_by_database",
                        error,
                        key_truncated_from: None,
                        value_truncated_from: None,
                    };
                    self.dead_letter(d).await?;
                }
                w.remove_rows(&idx);
                Settled::Again
            }
            Err(SinkError::Fenced(parts)) => {
                tracing::warn!(partitions = ?parts, "sink fenced: another instance moved these offsets; claiming again");
                self.summary.fenced += 1;
                for p in &parts {
                    w.remove_partition(*p);
                    batch.drop_partition(*p);
                }
                let still: Vec<i32> = parts
                    .into_iter()
                    .filter(|p| self.owned.contains_key(p))
                    .collect();
                if !still.is_empty() {
                    for p in &still {
                        self.owned.remove(p);
                    }
                    self.publish_positions();
                    self.consumer
                        .pause(&self.partition_list(still.iter()))
                        .map_err(KafkaError::from)?;
                    self.unclaimed.extend(still);
                    self.claim_retry = Retry::new();
                    self.retry_claims().await?;
                }
                Settled::Again
            }
            Err(e) => return Err(e),
        })
    }

    /// Sleep `d` while still polling the consumer, so the group sees us alive and
    /// rebalances are served; records that were already fetched go to the next batch.
    async fn wait_serving_group(
        &mut self,
        d: Duration,
        batch: &mut Batcher<R>,
        w: &mut [WriteBatch<R>],
        shutdown: &AtomicBool,
    ) -> Result<(), SinkError> {
        let until = Instant::now() + d;
        while Instant::now() < until && !shutdown.load(Ordering::Relaxed) {
            let polled = self.consumer.poll(Duration::from_millis(50));
            if let Some(Ok(m)) = polled {
                let (p, off) = (m.partition(), m.offset());
                let payload = m.payload().map(<[u8]>::to_vec);
                let key = m.key().map(<[u8]>::to_vec);
                drop(m);
                self.accept(p, off, key, payload, batch, shutdown).await?;
            }
            self.rebalances(batch, w).await?;
            self.retry_claims().await?;
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// After a committed transaction: remember the offsets, tell Kafka (for lag tooling),
    /// record metrics.
    fn committed(&mut self, w: &WriteBatch<R>, report: super::table::WriteReport, took: Duration) {
        let mut tpl = TopicPartitionList::new();
        for r in &w.ranges {
            if let Some(stored) = self.owned.get_mut(&r.partition) {
                *stored = r.next;
                let _ =
                    tpl.add_partition_offset(&self.cfg.topic, r.partition, Offset::Offset(r.next));
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "kafka offset commit (informational) failed");
            }
        }
        let pr = &self.cfg.progress;
        let covered: i64 = w.ranges.iter().map(|r| r.records).sum();
        Progress::add(&pr.sink_records, covered.max(0) as u64);
        Progress::add(&pr.sink_rows_written, report.rows_changed);
        Progress::add(&pr.sink_statements, report.statements);
        self.summary.batches += 1;
        self.summary.statements += report.statements;
        self.summary.rows_changed += report.rows_changed;
        metrics::counter!("readstate_sink_batches_total").increment(1);
        metrics::counter!("readstate_sink_statements_total").increment(report.statements);
        metrics::counter!("readstate_sink_rows_written_total").increment(report.rows_changed);
        metrics::counter!("readstate_sink_rows_total").increment(w.rows.len() as u64);
        metrics::histogram!("readstate_sink_batch_duration_seconds").record(took.as_secs_f64());
        self.publish_positions();
    }

    /// Let the lag probe see the owned partitions, their stored offsets, and whether every
    /// record accepted is written.
    fn publish_positions(&mut self) {
        let mut positions = self.positions.lock().expect("positions lock");
        positions.clear();
        self.all_written.clear();
        for (p, next) in &self.owned {
            let all = self.read.get(p).is_none_or(|r| r <= next);
            positions.insert(*p, Written { next: *next, all });
            if all {
                self.all_written.insert(*p);
            }
        }
    }

    /// A record accepted after the last publication: the probe must not count the
    /// partition as written (one lock when the partition changes state, not per record).
    fn unwritten(&mut self, partition: i32) {
        if self.all_written.remove(&partition) {
            let mut positions = self.positions.lock().expect("positions lock");
            if let Some(w) = positions.get_mut(&partition) {
                w.all = false;
            }
        }
    }
}

/// The outcome of one transaction of a flush.
enum Settled {
    /// Committed.
    Done,
    /// Changed (rows rejected, partitions fenced): write what is left again, now.
    Again,
    /// The database is unavailable: write it again after a backoff.
    Unavailable(String),
}

fn pending_is_written<R: Clone>(pending: &[WriteBatch<R>]) -> bool {
    pending.iter().all(WriteBatch::is_empty)
}

/// The sink's pacing of a retried step: 100 ms doubling to 30 s, jittered.
fn sink_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), MAX_BACKOFF).with_jitter()
}

/// A step retried from the poll loop: when it is due next.
struct Retry {
    at: Instant,
    backoff: Backoff,
}

impl Retry {
    fn new() -> Self {
        Self {
            at: Instant::now(),
            backoff: sink_backoff(),
        }
    }

    /// Another failure: the delay until the next attempt.
    fn failed(&mut self) -> Duration {
        let wait = self.backoff.fail();
        self.at = Instant::now() + wait;
        wait
    }
}
