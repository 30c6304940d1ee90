//! The tasks of one instance and the flush/commit protocol over Kafka.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, DeliveryResult, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::{RunConfig, RuntimeError};
use crate::ids::{Origin, TaskId};
use crate::kafka::{dead_letter_headers, KafkaError, KafkaSettings};
use crate::processor::{EmitPolicy, ReadStateProcessor};
use crate::serde::{EventDecoder, SerdeError, UpdateEncoder};
use crate::state::memory::InMemoryStore;
use crate::state::restore::ChangelogRestorer;
use crate::state::rocks::{RocksDbMemory, RocksDbStore};
use crate::state::{read_checkpoint, KeyValueStore};
use crate::task::{DeadLetter, SourceRecord, StreamTask};
use crate::telemetry::{Health, Progress};
use crate::topology::{StoreKind, Topology};

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
}

#[derive(Default)]
struct Deliveries {
    /// Records handed to the producer whose delivery has not been reported yet.
    outstanding: u64,
    failed: u64,
    last_error: Option<String>,
    /// Highest offset acknowledged per changelog partition in the current flush.
    changelog_high: HashMap<i32, i64>,
}

/// Producer context: counts outstanding and failed deliveries and remembers changelog
/// offsets. Awaiting deliveries waits on `drained` (signalled by the last delivery report)
/// rather than `flush`, which polls in 100 ms steps when another thread serves the reports.
pub(super) struct DeliveryTracker {
    changelog_topic: Option<String>,
    state: Mutex<Deliveries>,
    drained: Condvar,
}

impl DeliveryTracker {
    fn sending(&self) {
        self.state.lock().expect("delivery lock").outstanding += 1;
    }

    fn settled(&self, s: &mut Deliveries) {
        s.outstanding = s.outstanding.saturating_sub(1);
        if s.outstanding == 0 {
            self.drained.notify_all();
        }
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut s = self.state.lock().expect("delivery lock");
        self.settled(&mut s);
        match result {
            Ok(m) => {
                if self.changelog_topic.as_deref() == Some(m.topic()) {
                    let e = s.changelog_high.entry(m.partition()).or_insert(m.offset());
                    *e = (*e).max(m.offset());
                }
            }
            Err((e, m)) => {
                s.failed += 1;
                s.last_error = Some(format!("{} [{}]: {e}", m.topic(), m.partition()));
            }
        }
    }
}

struct OpenTask {
    task: StreamTask,
    /// Stats already turned into metrics.
    reported: crate::processor::ProcessStats,
}

/// Sub-topology 0 of a repartitioned topology: source partitions whose records are
/// re-keyed by conversation_id and forwarded to the repartition topic.
struct Forwarding {
    source_topic: String,
    repartition_topic: String,
    /// Assigned partitions of the source topic.
    partitions: BTreeSet<i32>,
}

pub(super) struct Engine {
    topology: Topology,
    kafka: KafkaSettings,
    state_dir: PathBuf,
    /// The topic the stateful tasks consume (the source, or its repartition topic).
    task_topic: String,
    /// Sub-topology number of the stateful tasks (1 when repartitioned, else 0).
    task_subtopology: u32,
    forwarding: Option<Forwarding>,
    /// Stateful tasks by partition of `task_topic`.
    tasks: BTreeMap<i32, OpenTask>,
    /// Partitions assigned but not yet opened.
    to_open: Vec<i32>,
    /// Next offset to commit per topic and partition (keyed by topic first, so the hot
    /// path looks up by `&str` without allocating).
    positions: HashMap<String, BTreeMap<i32, i64>>,
    origin_ids: HashMap<String, HashMap<i32, u32>>,
    producer: ThreadedProducer<DeliveryTracker>,
    /// Block cache and memtable budget shared by every store of this instance.
    rocks_memory: RocksDbMemory,
    decoder: EventDecoder,
    encoder: UpdateEncoder,
    rt: tokio::runtime::Runtime,
    dead_letters: Vec<DeadLetter>,
    dead_letter_log: LogLimiter,
    summary: RunSummary,
    failed: bool,
    buf: Vec<u8>,
    health: Arc<Health>,
    progress: Arc<Progress>,
    assigned_once: bool,
    lag_measured: Instant,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// Changelog records applied per store batch during restore (one atomic write each, with
/// the checkpoint); larger batches sort into longer sequential memtable runs.
pub const RESTORE_BATCH: usize = 100_000;

impl Engine {
    pub(super) fn new(
        config: &RunConfig,
        encoder: UpdateEncoder,
        rt: tokio::runtime::Runtime,
    ) -> Result<Self, RuntimeError> {
        let t = &config.topology;
        let producer: ThreadedProducer<DeliveryTracker> = config
            .kafka
            .producer()
            .create_with_context(DeliveryTracker {
                changelog_topic: t.store.changelog_topic.as_ref().map(|c| c.0.clone()),
                state: Mutex::new(Deliveries::default()),
                drained: Condvar::new(),
            })
            .map_err(KafkaError::from)?;
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
        Ok(Self {
            topology: t.clone(),
            kafka: config.kafka.clone(),
            state_dir: config.state_dir.clone(),
            task_topic: source.task_input_topic().0.clone(),
            task_subtopology: u32::from(forwarding.is_some()),
            forwarding,
            tasks: BTreeMap::new(),
            to_open: Vec::new(),
            positions: HashMap::new(),
            origin_ids: HashMap::new(),
            producer,
            rocks_memory: RocksDbMemory::new(&t.store.rocksdb),
            decoder: EventDecoder::new(config.resolver.clone())?,
            encoder,
            rt,
            dead_letters: Vec::new(),
            dead_letter_log: LogLimiter::new(DEAD_LETTER_LOGS_PER_SECOND),
            summary: RunSummary::default(),
            failed: false,
            buf: Vec::with_capacity(256),
            health: config.health.clone(),
            progress: config.progress.clone(),
            assigned_once: false,
            lag_measured: Instant::now(),
        })
    }

    pub(super) fn summary(&self) -> RunSummary {
        self.summary.clone()
    }

    pub(super) fn mark_failed(&mut self) {
        self.failed = true;
    }

    pub(super) fn consumer_error(&mut self, e: rdkafka::error::KafkaError) {
        // Transport failures and the like are transient: librdkafka reconnects by itself.
        tracing::warn!(error = %e, "consumer error");
    }

    pub(super) fn assign(&mut self, parts: &[(String, i32)]) {
        self.assigned_once = true;
        for (topic, p) in parts {
            if *topic == self.task_topic {
                if !self.tasks.contains_key(p) && !self.to_open.contains(p) {
                    self.to_open.push(*p);
                    self.health.set_ready(false);
                }
            } else if let Some(f) = &mut self.forwarding {
                if *topic == f.source_topic {
                    f.partitions.insert(*p);
                }
            }
        }
    }

    /// Every topic-partition this instance works on: stateful tasks and forwarders.
    fn owned(&self) -> Vec<(String, i32)> {
        let mut v: Vec<(String, i32)> = self
            .tasks
            .keys()
            .map(|p| (self.task_topic.clone(), *p))
            .collect();
        if let Some(f) = &self.forwarding {
            v.extend(f.partitions.iter().map(|p| (f.source_topic.clone(), *p)));
        }
        v
    }

    /// Open (and restore) every newly assigned task.
    pub(super) fn open_assigned(&mut self) -> Result<(), RuntimeError> {
        // One restore consumer for every task opened now (creating and closing one per task
        // cost ~100 ms each).
        let mut restorer: Option<BaseConsumer> = None;
        // Opening a RocksDB store is mostly waiting on the file system (~10 ms for a new
        // one): open them on a few threads, then restore one after the other.
        let parts: Vec<i32> = std::mem::take(&mut self.to_open);
        let opened = !parts.is_empty();
        let stores = self.open_stores(&parts);
        for (p, store) in parts.into_iter().zip(stores) {
            let task = self.open_task(p, store?, &mut restorer)?;
            self.tasks.insert(
                p,
                OpenTask {
                    task,
                    reported: Default::default(),
                },
            );
            self.summary.tasks_opened += 1;
        }
        metrics::gauge!("readstate_tasks_assigned").set(self.tasks.len() as f64);
        if opened {
            self.share_cache_budget();
        }
        // Ready once the group has given us an assignment (even an empty one) and every
        // assigned task has restored.
        self.health.set_ready(self.assigned_once);
        Ok(())
    }

    /// Open the stores of `parts` (in that order), several at a time.
    fn open_stores(&self, parts: &[i32]) -> Vec<Result<Box<dyn KeyValueStore>, RuntimeError>> {
        const OPENERS: usize = 8;
        let (t, state_dir, subtopology) = (&self.topology, &self.state_dir, self.task_subtopology);
        let memory = &self.rocks_memory;
        let open = |p: i32| -> Result<Box<dyn KeyValueStore>, RuntimeError> {
            let id = TaskId::new(subtopology, p);
            Ok(match t.store.kind {
                StoreKind::RocksDb => {
                    let path = state_dir
                        .join(t.application_id.as_str())
                        .join(id.to_string())
                        .join(t.store.name.as_str());
                    Box::new(RocksDbStore::open_with(
                        t.store.name.clone(),
                        &path,
                        &t.store.rocksdb,
                        memory,
                    )?)
                }
                StoreKind::Memory => Box::new(InMemoryStore::new(t.store.name.clone())),
            })
        };
        if parts.len() <= 1 {
            return parts.iter().map(|p| open(*p)).collect();
        }
        let chunk = parts.len().div_ceil(OPENERS);
        std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .chunks(chunk)
                .map(|c| s.spawn(|| c.iter().map(|p| open(*p)).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("store opener panicked"))
                .collect()
        })
    }

    fn open_task(
        &mut self,
        partition: i32,
        mut store: Box<dyn KeyValueStore>,
        restorer: &mut Option<BaseConsumer>,
    ) -> Result<StreamTask, RuntimeError> {
        let t = &self.topology;
        let id = TaskId::new(self.task_subtopology, partition);
        if let Some(changelog) = t.store.changelog_topic.clone() {
            let started = Instant::now();
            if restorer.is_none() {
                *restorer = Some(
                    self.kafka
                        .restore_consumer(&format!("{}-restore", self.topology.application_id))
                        .create()
                        .map_err(KafkaError::from)?,
                );
            }
            let consumer = restorer.as_ref().expect("created above");
            let n = self.restore(consumer, &mut *store, changelog.as_str(), id)?;
            self.summary.restored_records += n;
            tracing::info!(task = %id, records = n, elapsed = ?started.elapsed(), "task restored");
        }
        let policy = EmitPolicy {
            min_emit_interval_ms: t.processor.min_emit_interval.as_millis() as i64,
        };
        let processor = ReadStateProcessor::open(store, policy, t.store.cache_max_entries)?;
        Ok(StreamTask::new(id, processor))
    }

    /// Replay the changelog partition from the store's checkpoint to its end.
    fn restore(
        &self,
        consumer: &BaseConsumer,
        store: &mut dyn KeyValueStore,
        topic: &str,
        task: TaskId,
    ) -> Result<u64, RuntimeError> {
        let partition = task.partition;
        let remaining =
            metrics::gauge!("readstate_restore_remaining_records", "task" => task.to_string());
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(KafkaError::from)?;
        let from = read_checkpoint(store)?.unwrap_or(0).max(low);
        if from >= high {
            remaining.set(0.0);
            return Ok(0);
        }
        let mut restorer = ChangelogRestorer::new(store)?;
        remaining.set((high - from) as f64);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(KafkaError::from)?;
        consumer.assign(&tpl).map_err(KafkaError::from)?;
        let mut restored = 0u64;
        let mut next = from;
        let mut last_progress = Instant::now();
        let mut last_log = Instant::now();
        while next < high {
            let mut batch = Vec::new();
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                batch.push(m);
                while batch.len() < RESTORE_BATCH {
                    match consumer.poll(Duration::ZERO) {
                        Some(m) => batch.push(m),
                        None => break,
                    }
                }
            }
            let mut msgs = Vec::with_capacity(batch.len());
            for m in batch {
                match m {
                    // The consumer is shared by the tasks opened together: ignore anything
                    // left over from the partition restored before this one.
                    Ok(m) if m.partition() == partition && m.topic() == topic => msgs.push(m),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, topic, partition, "restore consumer error")
                    }
                }
            }
            if let Some(last) = msgs.last() {
                next = last.offset() + 1;
                let n = restorer.apply(
                    store,
                    msgs.iter()
                        .filter_map(|m| m.key().map(|k| (k, m.payload()))),
                    next,
                )?;
                restored += n as u64;
                remaining.set((high - next).max(0) as f64);
                if last_log.elapsed() > Duration::from_secs(5) {
                    tracing::info!(%task, restored, remaining = high - next, "restoring");
                    last_log = Instant::now();
                }
                last_progress = Instant::now();
                metrics::counter!("readstate_changelog_records_restored_total").increment(n as u64);
            } else if let Ok(pos) = consumer.position() {
                // Compaction leaves offset gaps at the end: the position tells where we are.
                if let Some(Offset::Offset(o)) =
                    pos.find_partition(topic, partition).map(|e| e.offset())
                {
                    if o >= high {
                        break;
                    }
                }
            }
            if last_progress.elapsed() > Duration::from_secs(120) {
                remaining.set(0.0);
                return Err(RuntimeError::Config(format!("restore of {topic} [{partition}] made no progress for 120 s at offset {next} of {high}")));
            }
        }
        remaining.set(0.0);
        Ok(restored)
    }

    fn origin_id(&mut self, topic: &str, partition: i32) -> u32 {
        if !self.origin_ids.contains_key(topic) {
            self.origin_ids.insert(topic.to_owned(), HashMap::new());
        }
        let ids = self.origin_ids.get_mut(topic).expect("inserted above");
        *ids.entry(partition)
            .or_insert_with(|| Origin::source_id(topic, partition))
    }

    /// Record that everything below `next` of (topic, partition) has been processed.
    fn advance_position(&mut self, topic: &str, partition: i32, next: i64) {
        if !self.positions.contains_key(topic) {
            self.positions.insert(topic.to_owned(), BTreeMap::new());
        }
        let pos = self.positions.get_mut(topic).expect("inserted above");
        let e = pos.entry(partition).or_insert(next);
        *e = (*e).max(next);
    }

    /// Decode and fold a polled batch.
    pub(super) fn process(
        &mut self,
        msgs: &[BorrowedMessage<'_>],
        shutdown: &AtomicBool,
    ) -> Result<(), RuntimeError> {
        if msgs.is_empty() {
            return Ok(());
        }
        self.summary.records_consumed += msgs.len() as u64;
        Progress::add(&self.progress.records_consumed, msgs.len() as u64);
        metrics::counter!("readstate_events_consumed_total").increment(msgs.len() as u64);
        // Fetch unknown writer schemas first; a registry outage is retried, never a dead letter.
        let mut backoff = Duration::from_millis(100);
        loop {
            match self
                .rt
                .block_on(self.decoder.prepare(msgs.iter().map(|m| m.payload())))
            {
                Ok(()) => break,
                Err(SerdeError::RegistryUnavailable(e)) if !shutdown.load(Ordering::Relaxed) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "schema registry unavailable");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Group by partition, keeping order within each; forward what needs repartitioning.
        let mut by_part: BTreeMap<i32, Vec<SourceRecord<'_>>> = BTreeMap::new();
        for m in msgs {
            let p = m.partition();
            if m.topic() != self.task_topic {
                self.forward(m)?;
                continue;
            }
            if !self.tasks.contains_key(&p) {
                // Revoked during this poll: the next owner consumes it from the committed offset.
                continue;
            }
            let origin = match self.forwarding.is_some() {
                // Through a repartition topic the origin rides in a header; a record without
                // one (not written by readstate) counts as originating where it is.
                true => m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == Origin::HEADER)
                        .and_then(|h| h.value)
                        .and_then(Origin::from_bytes)
                }),
                false => None,
            };
            let origin = match origin {
                Some(o) => o,
                None => Origin {
                    source: self.origin_id(m.topic(), p),
                    offset: m.offset(),
                },
            };
            by_part.entry(p).or_default().push(source_record(m, origin));
        }
        for (p, recs) in by_part {
            let before = self.dead_letters.len();
            let task = &mut self.tasks.get_mut(&p).expect("checked above").task;
            task.process(&self.decoder, &recs, &mut self.dead_letters)?;
            for d in &self.dead_letters[before..] {
                log_dead_letter(d, &mut self.dead_letter_log);
            }
            if let Some(next) = recs.iter().map(|r| r.offset + 1).max() {
                let topic = recs[0].topic;
                self.advance_position(topic, p, next);
            }
        }
        Ok(())
    }

    /// Sub-topology 0: re-key one source record by conversation_id and produce it to the
    /// repartition topic with its origin; undecodable records become dead letters here.
    fn forward(&mut self, m: &BorrowedMessage<'_>) -> Result<(), RuntimeError> {
        let p = m.partition();
        let Some(f) = &self.forwarding else {
            return Ok(());
        };
        if m.topic() != f.source_topic || !f.partitions.contains(&p) {
            return Ok(());
        }
        let origin = Origin {
            source: self.origin_id(m.topic(), p),
            offset: m.offset(),
        };
        let f = self.forwarding.as_ref().expect("checked above");
        match self.decoder.decode_ref(m.payload()) {
            Ok(e) => {
                let mut key = itoa::Buffer::new();
                let key = key.format(e.conversation_id.0);
                let headers = OwnedHeaders::new().insert(Header {
                    key: Origin::HEADER,
                    value: Some(&origin.to_bytes()),
                });
                let mut rec = BaseRecord::to(&f.repartition_topic)
                    .key(key.as_bytes())
                    .headers(headers);
                if let Some(v) = m.payload() {
                    rec = rec.payload(v);
                }
                send(&self.producer, rec)?;
                self.summary.records_forwarded += 1;
                metrics::counter!("readstate_repartition_records_total").increment(1);
            }
            Err(e) => {
                let rec = source_record(m, origin);
                let d = DeadLetter::from_record(&rec, e.reason(), e.to_string());
                log_dead_letter(&d, &mut self.dead_letter_log);
                self.dead_letters.push(d);
            }
        }
        self.advance_position(m.topic(), p, m.offset() + 1);
        Ok(())
    }

    fn position_entries(&self) -> impl Iterator<Item = (&str, i32, i64)> + '_ {
        self.positions
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |(p, o)| (t.as_str(), *p, *o)))
    }

    /// `cache_max_entries` is the instance's record-cache budget (as Kafka Streams'
    /// `statestore.cache.max.bytes`): each open task gets an equal share.
    fn share_cache_budget(&mut self) {
        let share = (self.topology.store.cache_max_entries / self.tasks.len().max(1)).max(1);
        for t in self.tasks.values_mut() {
            t.task.processor_mut().set_cache_capacity(share);
        }
    }

    /// True when some task's cache holds so many dirty keys that it should flush now.
    pub(super) fn needs_flush(&self) -> bool {
        self.tasks.values().any(|t| {
            let p = t.task.processor();
            p.dirty_len() >= p.cache_capacity() / 2
        })
    }

    pub(super) fn commit_all<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let parts = self.owned();
        self.commit_tasks(consumer, &parts)
    }

    /// Flush revoked tasks and commit their offsets, then close them.
    pub(super) fn revoke<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[(String, i32)],
    ) -> Result<(), RuntimeError> {
        let task_topic = self.task_topic.clone();
        self.to_open
            .retain(|p| !parts.iter().any(|(t, q)| *t == task_topic && q == p));
        let owned = self.owned();
        let revoked: Vec<(String, i32)> = parts
            .iter()
            .filter(|tp| owned.contains(tp))
            .cloned()
            .collect();
        if revoked.is_empty() {
            return Ok(());
        }
        let r = if self.failed {
            Ok(())
        } else {
            self.commit_tasks(consumer, &revoked)
        };
        for (t, p) in &revoked {
            if *t == task_topic {
                self.tasks.remove(p);
                self.summary.tasks_closed += 1;
            } else if let Some(f) = &mut self.forwarding {
                f.partitions.remove(p);
            }
            if let Some(pos) = self.positions.get_mut(t) {
                pos.remove(p);
            }
        }
        self.share_cache_budget();
        tracing::info!(partitions = ?revoked, "revoked partitions closed");
        r
    }

    pub(super) fn close_all(&mut self) {
        self.summary.tasks_closed += self.tasks.len() as u64;
        self.tasks.clear();
        let _ = self.producer.flush(Duration::from_secs(10));
    }

    /// The commit protocol for a set of tasks (see ARCHITECTURE.md).
    fn commit_tasks<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[(String, i32)],
    ) -> Result<(), RuntimeError> {
        if self.failed {
            return Ok(());
        }
        let r = self.try_commit_tasks(consumer, parts);
        if r.is_err() {
            // Outputs could not be made durable: forget what is not in the stores and stop;
            // the offsets were not committed, so the work is replayed.
            self.failed = true;
            for (_, p) in parts {
                if let Some(t) = self.tasks.get_mut(p) {
                    let _ = t.task.reset_to_store();
                }
            }
        }
        r
    }

    fn try_commit_tasks<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[(String, i32)],
    ) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let now = now_ms();
        let output_topic = self.topology.output.topic.0.clone();
        // 1. prepare; 2. outputs + dead letters, acknowledged.
        let mut flushed = Vec::with_capacity(parts.len());
        for (topic, p) in parts {
            if *topic != self.task_topic {
                continue;
            }
            let Some(t) = self.tasks.get_mut(p) else {
                continue;
            };
            let flush_started = Instant::now();
            let out = t.task.prepare_flush(now);
            metrics::histogram!("readstate_flush_duration_seconds")
                .record(flush_started.elapsed().as_secs_f64());
            for u in &out.updates {
                self.buf.clear();
                self.encoder.encode_update_into(u, &mut self.buf);
                let mut key = itoa::Buffer::new();
                send(
                    &self.producer,
                    BaseRecord::to(&output_topic)
                        .key(key.format(u.conversation_id.0).as_bytes())
                        .payload(&self.buf),
                )?;
            }
            self.summary.updates_emitted += out.updates.len() as u64;
            Progress::add(&self.progress.updates_emitted, out.updates.len() as u64);
            metrics::counter!("readstate_updates_emitted_total")
                .increment(out.updates.len() as u64);
            flushed.push((*p, out));
        }
        let dlq = self.topology.dead_letter_topic.0.clone();
        for d in std::mem::take(&mut self.dead_letters) {
            let headers = dead_letter_headers(&d);
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&dlq).headers(headers);
            if let Some(k) = d.key.as_deref() {
                rec = rec.key(k);
            }
            if let Some(v) = d.value.as_deref() {
                rec = rec.payload(v);
            }
            send(&self.producer, rec)?;
            self.summary.dead_letters += 1;
            Progress::add(&self.progress.dead_letters, 1);
        }
        let prepared = started.elapsed();
        // Also awaits the records forwarded to the repartition topic since the last commit.
        self.await_deliveries()?;
        let outputs_acked = started.elapsed();
        // 3. changelog, acknowledged.
        if let Some(changelog) = self.topology.store.changelog_topic.clone() {
            self.producer
                .context()
                .state
                .lock()
                .expect("delivery lock")
                .changelog_high
                .clear();
            for (p, out) in &flushed {
                for (k, v) in out.changelog() {
                    send(
                        &self.producer,
                        BaseRecord::to(changelog.as_str())
                            .partition(*p)
                            .key(k)
                            .payload(v),
                    )?;
                }
                self.summary.changelog_records += out.changelog_len() as u64;
                metrics::counter!("readstate_changelog_records_written_total")
                    .increment(out.changelog_len() as u64);
            }
            self.await_deliveries()?;
        }
        let changelog_acked = started.elapsed();
        // 4. store batches with their checkpoints.
        let highs = std::mem::take(
            &mut self
                .producer
                .context()
                .state
                .lock()
                .expect("delivery lock")
                .changelog_high,
        );
        for (p, out) in flushed {
            let next = highs.get(&p).map(|o| o + 1);
            let t = self.tasks.get_mut(&p).expect("task flushed above");
            t.task.commit_flush(out.batch, next)?;
        }
        let stored = started.elapsed();
        // 5. source offsets.
        let mut tpl = TopicPartitionList::new();
        for (topic, p, off) in self.position_entries() {
            if parts.iter().any(|(t, q)| t == topic && *q == p) {
                tpl.add_partition_offset(topic, p, Offset::Offset(off))
                    .map_err(KafkaError::from)?;
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                // Not fatal: the next commit covers it, and replay marks make a replay harmless.
                tracing::warn!(error = %e, "offset commit failed");
            }
        }
        self.summary.commits += 1;
        self.refresh_summary();
        if self.lag_measured.elapsed() >= Duration::from_secs(5) {
            self.lag_measured = Instant::now();
            for (topic, p, next) in self.position_entries() {
                if let Ok((_, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(1)) {
                    metrics::gauge!("readstate_consumer_lag_records", "topic" => topic.to_owned(), "partition" => p.to_string())
                        .set((high - next).max(0) as f64);
                }
            }
        }
        metrics::histogram!("readstate_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(tasks = parts.len(), ?prepared, ?outputs_acked, ?changelog_acked, ?stored, elapsed = ?started.elapsed(), "committed");
        Ok(())
    }

    /// Summary and metrics after a commit: counters advance by what the open tasks did
    /// since the last commit; gauges are per task (bounded by the partition count).
    fn refresh_summary(&mut self) {
        metrics::gauge!("readstate_rocksdb_memory_bytes")
            .set(self.rocks_memory.usage_bytes() as f64);
        let mut total = crate::processor::ProcessStats::default();
        for t in self.tasks.values_mut() {
            let s = t.task.stats();
            let d = |now: u64, before: u64| now.saturating_sub(before);
            metrics::counter!("readstate_events_folded_total")
                .increment(d(s.folded, t.reported.folded));
            metrics::counter!("readstate_events_stale_total")
                .increment(d(s.stale, t.reported.stale));
            metrics::counter!("readstate_events_replayed_skipped_total")
                .increment(d(s.replayed, t.reported.replayed));
            t.reported = s;
            total.folded += s.folded;
            total.replayed += s.replayed;
            let id = t.task.id().to_string();
            let store = t.task.processor().store();
            metrics::gauge!("readstate_store_estimated_keys", "task" => id.clone())
                .set(store.approximate_num_keys() as f64);
            metrics::gauge!("readstate_store_size_bytes", "task" => id)
                .set(store.approximate_size_bytes() as f64);
        }
        self.summary.events_folded = self.summary.events_folded.max(total.folded);
        self.summary.replayed_skipped = self.summary.replayed_skipped.max(total.replayed);
        if self.summary.updates_emitted > 0 {
            metrics::gauge!("readstate_coalescing_ratio")
                .set(self.summary.events_folded as f64 / self.summary.updates_emitted as f64);
        }
    }

    fn await_deliveries(&self) -> Result<(), RuntimeError> {
        let ctx = self.producer.context();
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        let mut s = ctx.state.lock().expect("delivery lock");
        while s.outstanding > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KafkaError::Delivery {
                    failed: s.outstanding,
                    last: format!("not acknowledged within {DELIVERY_TIMEOUT:?}"),
                }
                .into());
            }
            s = ctx.drained.wait_timeout(s, left).expect("delivery lock").0;
        }
        if s.failed > 0 {
            let err = KafkaError::Delivery {
                failed: s.failed,
                last: s.last_error.take().unwrap_or_default(),
            };
            s.failed = 0;
            return Err(err.into());
        }
        Ok(())
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
    }
}

/// Dead letters logged one by one per second; beyond that they are counted and summed up
/// (the metric and the DLQ itself have every one).
const DEAD_LETTER_LOGS_PER_SECOND: u32 = 10;

fn log_dead_letter(d: &DeadLetter, limit: &mut LogLimiter) {
    let (log, suppressed) = limit.admit(Instant::now());
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "more dead letters than logged in the last second; readstate_dead_letters_total and the dead-letter topic have them all"
        );
    }
    if log {
        tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset, reason = d.reason, error = %d.error, "dead letter");
    }
    metrics::counter!("readstate_dead_letters_total", "reason" => d.reason).increment(1);
}

/// At most `per_second` log lines per one-second window; the rest are counted and
/// reported when the next window opens.
#[derive(Debug)]
struct LogLimiter {
    per_second: u32,
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether to log this line, and how many were suppressed in the window that just
    /// closed (to report now).
    fn admit(&mut self, now: Instant) -> (bool, u64) {
        let mut closed = 0;
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            closed = std::mem::take(&mut self.suppressed);
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged < self.per_second {
            self.logged += 1;
            (true, closed)
        } else {
            self.suppressed += 1;
            (false, closed)
        }
    }
}

/// Enqueue a record, waiting while the producer queue is full.
fn send<K, P>(
    producer: &ThreadedProducer<DeliveryTracker>,
    rec: BaseRecord<'_, K, P>,
) -> Result<(), RuntimeError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    producer.context().sending();
    crate::kafka::send_waiting(producer, rec).map_err(|e| {
        let ctx = producer.context();
        ctx.settled(&mut ctx.state.lock().expect("delivery lock"));
        KafkaError::from(e).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_logs_are_limited_per_second_and_the_rest_counted() {
        let mut l = LogLimiter::new(3);
        let t0 = Instant::now();
        let first: Vec<(bool, u64)> = (0..5).map(|_| l.admit(t0)).collect();
        assert_eq!(
            first,
            vec![(true, 0), (true, 0), (true, 0), (false, 0), (false, 0)]
        );
        assert_eq!(
            l.admit(t0 + Duration::from_millis(999)),
            (false, 0),
            "same window"
        );
        assert_eq!(
            l.admit(t0 + Duration::from_secs(1)),
            (true, 3),
            "a new window reports the three suppressed"
        );
        assert_eq!(l.admit(t0 + Duration::from_secs(1)), (true, 0));
    }
}
