//! Task executor (Kafka Streams' `TaskExecutor`): processing polled records in their
//! tasks, and the commit protocol of `ARCHITECTURE.md` over a set of tasks:
//!
//! 1. prepare each task's flush (memory only);
//! 2. produce outputs and dead letters, and wait for their acknowledgements;
//! 3. produce changelog records, and wait for their acknowledgements;
//! 4. write each store batch with its checkpoint (atomic);
//! 5. commit the source offsets.
//!
//! A failure in 2 or 3 is fatal: the tasks drop their caches and the instance stops (the
//! offsets were not committed, so the work is replayed, harmlessly, by the next owner). A
//! commit refused in 5 because of membership means the tasks are lost.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::record_collector::TxnError;
use super::task_manager::{
    is_membership_error, rewind, Membership, ParkReason, RegistryWait, TaskManager, TopicPartition,
};
use super::{log_dead_letter, RuntimeError};
use crate::ids::Origin;
use crate::kafka::dead_letter_headers;
use crate::processor::{FlushOutput, InputId, RecordKind};
use crate::serde::SerdeError;
use crate::task::{DeadLetter, SourceRecord};
use crate::telemetry::{series, Progress};
use crate::topology::graph::Graph;
use crate::topology::OnBadRecord;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const MAX_REGISTRY_BACKOFF: Duration = Duration::from_secs(10);

impl TaskManager {
    fn origin_id(&mut self, topic: &str, partition: i32) -> u32 {
        if !self.origin_ids.contains_key(topic) {
            self.origin_ids.insert(topic.to_owned(), Default::default());
        }
        let ids = self.origin_ids.get_mut(topic).expect("inserted above");
        *ids.entry(partition)
            .or_insert_with(|| Origin::source_id(topic, partition))
    }

    /// Record that everything below `next` of (topic, partition) has been processed;
    /// `first` is the first offset processed in this batch.
    fn advance_position(&mut self, topic: &str, partition: i32, first: i64, next: i64) {
        if !self.positions.contains_key(topic) {
            self.positions.insert(topic.to_owned(), BTreeMap::new());
        }
        let pos = self.positions.get_mut(topic).expect("inserted above");
        match pos.get_mut(&partition) {
            Some(e) => *e = (*e).max(next),
            None => {
                pos.insert(partition, next);
                // Where this partition started: what the membership probe may commit.
                self.committed
                    .entry((topic.to_owned(), partition))
                    .or_insert(first);
            }
        }
    }

    /// Whether records of this partition are processed now; a parked one remembers the
    /// first record it dropped.
    fn accepts(&mut self, m: &BorrowedMessage<'_>) -> bool {
        // Parking is rare: no key (and no allocation) per record unless something is parked.
        if !self.parked.is_empty() {
            let key = (m.topic().to_owned(), m.partition());
            if let Some(parked) = self.parked.get_mut(&key) {
                parked.rewind = Some(parked.rewind.map_or(m.offset(), |r| r.min(m.offset())));
                return false;
            }
        }
        if self.is_task_topic(m.topic()) {
            // Not running: revoked in this poll (the next owner reads it from the committed
            // offset).
            return self.running.contains_key(&m.partition());
        }
        self.forwarding
            .as_ref()
            .is_some_and(|f| m.topic() == f.source_topic && f.partitions.contains(&m.partition()))
    }

    /// Decode and fold a polled batch (and forward what needs repartitioning).
    pub(super) fn process<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        msgs: &[BorrowedMessage<'_>],
    ) -> Result<(), RuntimeError> {
        if msgs.is_empty() {
            return Ok(());
        }
        self.prepare_schemas(consumer, msgs)?;
        let dead_before = self.dead_letters.len();
        // Group by task and input (the graph's route of the record's topic), keeping order
        // within each; forward what needs repartitioning.
        let mut batches: BTreeMap<(i32, InputId), (RecordKind, Vec<SourceRecord<'_>>)> =
            BTreeMap::new();
        let mut accepted = 0u64;
        for m in msgs {
            if !self.accepts(m) {
                continue;
            }
            accepted += 1;
            let Some(route) = Graph::route(&self.routes, m.topic()) else {
                self.forward(m);
                continue;
            };
            let key = (m.partition(), route.input);
            let kind = route.records;
            let origin = self.origin_of(m);
            let batch = batches.entry(key).or_insert_with(|| (kind, Vec::new()));
            batch.1.push(source_record(m, origin));
        }
        // Records dropped here (parked, revoked) are consumed again later, and counted then.
        self.summary.records_consumed += accepted;
        Progress::add(&self.progress.records_consumed, accepted);
        metrics::counter!("readstate_events_consumed_total").increment(accepted);
        for ((p, input), (kind, recs)) in batches {
            self.process_input(p, input, kind, &recs)?;
        }
        self.judge_bad_records(accepted, dead_before)
    }

    /// Records of task `p`'s input `input`, decoded as `kind`.
    fn process_input(
        &mut self,
        p: i32,
        input: InputId,
        kind: RecordKind,
        recs: &[SourceRecord<'_>],
    ) -> Result<(), RuntimeError> {
        let before = self.dead_letters.len();
        let task = &mut self.running.get_mut(&p).expect("accepted above").task;
        match kind {
            RecordKind::ReadEvents => {
                task.process_reads(input, &self.decoder, recs, &mut self.dead_letters)?
            }
            RecordKind::MessageEvents => {
                let decoder = self
                    .message_decoder
                    .as_ref()
                    .expect("a message topic has a decoder");
                task.process_messages(input, decoder, recs, &mut self.dead_letters)?
            }
        }
        for d in &self.dead_letters[before..] {
            log_dead_letter(d, &mut self.dead_letter_log);
        }
        let first = recs[0].offset;
        let next = recs.last().expect("non-empty").offset + 1;
        self.advance_position(recs[0].topic, p, first, next);
        Ok(())
    }

    /// `on_bad_record = "fail"` stops at the first dead letter; otherwise the circuit
    /// breaker stops the instance when dead letters are too large a share of the input.
    /// Either way nothing of this batch is committed (the instance closes dirty).
    fn judge_bad_records(&mut self, records: u64, dead_before: usize) -> Result<(), RuntimeError> {
        let new = &self.dead_letters[dead_before..];
        let policy = self.topology.bad_records;
        let why = match (policy.on_bad_record, new.first()) {
            (_, None) if records == 0 => return Ok(()),
            (OnBadRecord::Fail, Some(d)) => format!(
                "bad record at {} [{}] offset {} ({}: {}); on_bad_record = \"fail\" stops the instance, committing nothing past it",
                d.topic, d.partition, d.offset, d.reason, d.error
            ),
            _ => {
                let Some(t) = self.breaker.record(Instant::now(), records, new.len() as u64)
                else {
                    return Ok(());
                };
                let last = self.dead_letters.last().expect("dead letters in the window");
                format!(
                    "circuit breaker: {} of the last {} records (within {}) were dead letters, above dead_letter_max_ratio {}; the last one: {} [{}] offset {} ({}: {}). Stopping instead of draining the input into {}; nothing of this batch is committed",
                    t.dead, t.records, humantime::format_duration(policy.window), policy.max_ratio,
                    last.topic, last.partition, last.offset, last.reason, last.error,
                    self.topology.dead_letter_topic
                )
            }
        };
        metrics::counter!("readstate_bad_record_stops_total").increment(1);
        self.fatal = Some(why.clone());
        Err(RuntimeError::Fatal(why))
    }

    /// Through a repartition topic the origin rides in a header; a record without one (not
    /// written by readstate) counts as originating where it is.
    fn origin_of(&mut self, m: &BorrowedMessage<'_>) -> Origin {
        let carried = match self.forwarding.is_some() {
            true => m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == Origin::HEADER)
                    .and_then(|h| h.value)
                    .and_then(Origin::from_bytes)
            }),
            false => None,
        };
        carried.unwrap_or_else(|| Origin {
            source: self.origin_id(m.topic(), m.partition()),
            offset: m.offset(),
        })
    }

    /// Fetch unknown writer schemas. While the registry is unavailable the partitions
    /// whose records need them are parked (nothing is dead-lettered, polling goes on).
    fn prepare_schemas<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        msgs: &[BorrowedMessage<'_>],
    ) -> Result<(), RuntimeError> {
        let message_topic = self.message_topic.as_deref();
        let is_message = |m: &BorrowedMessage<'_>| Some(m.topic()) == message_topic;
        let reads = msgs.iter().filter(|m| !is_message(m)).map(|m| m.payload());
        let mut prepared = self.rt.block_on(self.decoder.prepare(reads));
        if let (Ok(()), Some(d)) = (&prepared, self.message_decoder.as_mut()) {
            let messages = msgs.iter().filter(|m| is_message(m)).map(|m| m.payload());
            prepared = self.rt.block_on(d.prepare(messages));
        }
        match prepared {
            Ok(()) => return Ok(()),
            Err(SerdeError::RegistryUnavailable(e)) => {
                tracing::warn!(error = %e, "schema registry unavailable: parking the partitions that need it")
            }
            Err(e) => return Err(e.into()),
        }
        let mut ids: Vec<u32> = Vec::new();
        let mut first: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for m in msgs {
            if let Some(id) = self.unknown_schema(m) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
                let tp = (m.topic().to_owned(), m.partition());
                first.entry(tp).or_insert(m.offset());
            }
        }
        // Everything polled for those partitions from the first record needing a schema on.
        let mut parked_now: HashSet<TopicPartition> = HashSet::new();
        for (tp, off) in first {
            let from = msgs
                .iter()
                .find(|m| m.topic() == tp.0 && m.partition() == tp.1)
                .map_or(off, |m| m.offset());
            if self.parked.contains_key(&tp) || !self.owns(&tp) {
                continue;
            }
            self.park(consumer, tp.clone(), ParkReason::Registry, Some(from))?;
            parked_now.insert(tp);
        }
        let now = Instant::now();
        let w = self.registry_wait.get_or_insert(RegistryWait {
            ids: Vec::new(),
            retry_at: now,
            backoff: Duration::from_millis(100),
            since: now,
        });
        for id in ids {
            if !w.ids.contains(&id) {
                w.ids.push(id);
            }
        }
        w.retry_at = now + w.backoff;
        w.backoff = (w.backoff * 2).min(MAX_REGISTRY_BACKOFF);
        Ok(())
    }

    /// The writer schema id of `m` when its source's decoder has not resolved it yet.
    fn unknown_schema(&self, m: &BorrowedMessage<'_>) -> Option<u32> {
        match (&self.message_decoder, self.message_topic.as_deref()) {
            (Some(d), Some(t)) if m.topic() == t => d.unknown_schema(m.payload()),
            _ => self.decoder.unknown_schema(m.payload()),
        }
    }

    fn owns(&self, tp: &TopicPartition) -> bool {
        if self.is_task_topic(&tp.0) {
            return self.running.contains_key(&tp.1);
        }
        self.forwarding
            .as_ref()
            .is_some_and(|f| tp.0 == f.source_topic && f.partitions.contains(&tp.1))
    }

    /// Ask the registry again when due; once it answers, resume the parked partitions.
    pub(super) fn retry_registry<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let Some(w) = &mut self.registry_wait else {
            return Ok(());
        };
        if Instant::now() < w.retry_at {
            return Ok(());
        }
        // Both decoders are asked: an id one of them cannot read is an incompatible writer
        // for it, which only records of the other source carry.
        let mut answer = self.rt.block_on(self.decoder.prepare_ids(&w.ids));
        if let (Ok(()), Some(d)) = (&answer, self.message_decoder.as_mut()) {
            answer = self.rt.block_on(d.prepare_ids(&w.ids));
        }
        match answer {
            Ok(()) => {
                tracing::info!(after = ?w.since.elapsed(), "schema registry available again: resuming parked partitions");
                self.registry_wait = None;
                let parked: Vec<TopicPartition> = self
                    .parked
                    .iter()
                    .filter(|(_, p)| p.reason == ParkReason::Registry)
                    .map(|(tp, _)| tp.clone())
                    .collect();
                for tp in parked {
                    self.unpark(consumer, &tp)?;
                }
                Ok(())
            }
            Err(SerdeError::RegistryUnavailable(e)) => {
                tracing::warn!(error = %e, retry_in = ?w.backoff, down_for = ?w.since.elapsed(), "schema registry still unavailable");
                w.retry_at = Instant::now() + w.backoff;
                w.backoff = (w.backoff * 2).min(MAX_REGISTRY_BACKOFF);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sub-topology 0: re-key one source record by conversation_id and produce it to the
    /// repartition topic with its origin; undecodable records become dead letters here.
    fn forward(&mut self, m: &BorrowedMessage<'_>) {
        let p = m.partition();
        let origin = Origin {
            source: self.origin_id(m.topic(), p),
            offset: m.offset(),
        };
        let f = self
            .forwarding
            .as_ref()
            .expect("accepted as a forwarded partition");
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
                self.collector.send(rec);
                self.summary.records_forwarded += 1;
                metrics::counter!("readstate_repartition_records_total").increment(1);
            }
            Err(e) => {
                let rec = source_record(m, origin);
                let max = self.decoder.max_record_bytes();
                let d = DeadLetter::from_record(&rec, e.reason(), e.to_string(), max);
                log_dead_letter(&d, &mut self.dead_letter_log);
                self.dead_letters.push(d);
            }
        }
        self.advance_position(m.topic(), p, m.offset(), m.offset() + 1);
    }

    /// True when some task's cache holds so many dirty keys that it should flush now.
    pub(super) fn needs_flush(&self) -> bool {
        self.running
            .values()
            .any(|t| t.task.processor().needs_flush())
    }

    /// Commit every task (verifying membership first after a long gap between polls).
    pub(super) fn commit_all<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        if self.fatal.is_some() || (self.suspect && !self.verify_membership(consumer)) {
            return Ok(());
        }
        // Cheap, every time: a changed member id means the tasks were lost meanwhile.
        if self.member_check(consumer) != Membership::Kept {
            return Ok(());
        }
        let parts = self.owned();
        self.commit_tasks(consumer, &parts)
    }

    /// The commit protocol for a set of tasks. A produce or store failure is fatal; a
    /// membership refusal loses every task.
    pub(super) fn commit_tasks<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[TopicPartition],
    ) -> Result<(), RuntimeError> {
        if self.fatal.is_some() {
            return Ok(());
        }
        if self.collector.is_transactional() {
            // One transaction holds every task's records: all of them commit together.
            return self.commit_transaction(consumer);
        }
        let started = Instant::now();
        let flushed = match self.flush_and_store(parts) {
            Ok(f) => f,
            Err(e) if e.is_expiry() && started.elapsed() > self.probe_after => {
                // A commit this slow may have spanned a pause past the session timeout: the
                // records that expired meanwhile were dropped by the producer. If the group
                // moved on, the tasks are lost, not broken. A record the broker refused is
                // never put down to a pause: the instance stops.
                self.suspect = true;
                if self.probe_membership(consumer) == Membership::Lost {
                    return Ok(());
                }
                return Err(self.fail(parts, e));
            }
            Err(e) => return Err(self.fail(parts, e)),
        };
        self.commit_offsets(consumer, parts);
        self.summary.commits += 1;
        self.refresh_summary();
        metrics::histogram!("readstate_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(tasks = flushed, elapsed = ?started.elapsed(), "committed");
        Ok(())
    }

    /// Outputs could not be made durable: the tasks forget what is not in their stores,
    /// and the instance stops (the offsets were not committed, so the work is replayed).
    fn fail(&mut self, parts: &[TopicPartition], e: RuntimeError) -> RuntimeError {
        for (_, p) in parts {
            if let Some(t) = self.running.get_mut(p) {
                let _ = t.task.reset_to_store();
            }
        }
        let msg = format!("commit of {} partition(s) failed: {e}", parts.len());
        tracing::error!(error = %e, "outputs could not be made durable: the instance stops");
        self.fatal = Some(msg.clone());
        RuntimeError::Fatal(msg)
    }

    /// Steps 1-4: flush, produce and await outputs, then changelog, then store batches.
    fn flush_and_store(&mut self, parts: &[TopicPartition]) -> Result<usize, RuntimeError> {
        let flushed = self.prepare_all(parts);
        for (_, out) in &flushed {
            self.send_updates(out);
        }
        self.send_dead_letters();
        // Also awaits the records forwarded to the repartition topic since the last commit.
        self.collector.flush()?;
        self.collector.clear_changelog_offsets();
        self.send_changelog(&flushed);
        self.collector.flush()?;
        self.store_all(flushed)
    }

    /// Step 1 for every running task of `parts` (memory only).
    fn prepare_all(&mut self, parts: &[TopicPartition]) -> Vec<(i32, FlushOutput)> {
        let now = now_ms();
        let mut flushed: Vec<(i32, FlushOutput)> = Vec::with_capacity(parts.len());
        for (topic, p) in parts {
            if *topic != self.task_topic {
                continue;
            }
            let Some(t) = self.running.get_mut(p) else {
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

    /// Each store's changelog records to its own changelog topic, partition p of task p.
    fn send_changelog(&mut self, flushed: &[(i32, FlushOutput)]) {
        for (p, out) in flushed {
            for (store, topic) in out.stores.iter().zip(&self.changelogs) {
                let Some(topic) = topic else {
                    continue;
                };
                for (k, v) in store.changelog() {
                    let rec = BaseRecord::to(topic.as_str())
                        .partition(*p)
                        .key(k)
                        .payload(v);
                    self.collector.send(rec);
                }
                let n = store.changelog_len() as u64;
                self.summary.changelog_records += n;
                metrics::counter!("readstate_changelog_records_written_total").increment(n);
            }
        }
    }

    /// Step 4: the store batches, each with its checkpoint (the offset after the records
    /// just acknowledged on its changelog).
    fn store_all(&mut self, flushed: Vec<(i32, FlushOutput)>) -> Result<usize, RuntimeError> {
        let highs = self.collector.take_changelog_offsets();
        let n = flushed.len();
        for (p, mut out) in flushed {
            let checkpoints: Vec<Option<i64>> = (0..out.stores.len())
                .map(|i| highs.get(&(i, p)).map(|o| o + 1))
                .collect();
            let t = self.running.get_mut(&p).expect("task flushed above");
            t.task.commit_flush(out.take_batches(), &checkpoints)?;
        }
        Ok(n)
    }

    /// exactly_once_v2: every task of the instance in one transaction (outputs, dead
    /// letters, changelog, the records forwarded since the last commit, and the source
    /// offsets with the group's metadata). The stores are written only after it committed,
    /// so a store is never ahead of what its changelog committed.
    fn commit_transaction<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let parts = self.owned();
        let flushed = self.prepare_all(&parts);
        for (_, out) in &flushed {
            self.send_updates(out);
        }
        self.send_dead_letters();
        self.collector.clear_changelog_offsets();
        self.send_changelog(&flushed);
        let (tpl, entries) = self.offsets_of(&parts);
        let Some(group) = consumer.group_metadata() else {
            return Err(self.fail(
                &parts,
                RuntimeError::Config("no consumer group metadata".into()),
            ));
        };
        match self.collector.commit_transaction(&tpl, &group) {
            Ok(()) => {
                self.store_all(flushed)?;
                self.committed_now(entries);
            }
            Err(TxnError::Aborted(e)) => {
                tracing::warn!(error = %e, "transaction aborted: tasks resume from their stores and the committed offsets");
                metrics::counter!("readstate_commits_failed_total").increment(1);
                self.rewind_to_committed(consumer, &parts)?;
                return Ok(());
            }
            Err(e @ TxnError::Migrated(_)) => {
                metrics::counter!("readstate_commits_failed_total").increment(1);
                self.lose_all_and_requeue(consumer, &e.to_string());
                return Ok(());
            }
            Err(e @ TxnError::Fenced(_)) => {
                metrics::counter!("readstate_commits_failed_total").increment(1);
                self.lose_all(&e.to_string());
                self.collector.recreate()?;
                return Ok(());
            }
        }
        self.summary.commits += 1;
        self.refresh_summary();
        metrics::histogram!("readstate_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Offsets are committed: remember them, and let the repartition topics go below them.
    fn committed_now(&mut self, entries: Vec<(TopicPartition, i64)>) {
        if let Some(purger) = &mut self.purger {
            let topic = &self.task_topic;
            purger.offer(
                entries
                    .iter()
                    .filter(|((t, _), _)| t == topic)
                    .map(|((t, p), o)| (t.clone(), *p, *o)),
            );
        }
        self.committed.extend(entries);
    }

    /// The next offset of every partition in `parts`, as a list to commit and as entries.
    fn offsets_of(
        &self,
        parts: &[TopicPartition],
    ) -> (TopicPartitionList, Vec<(TopicPartition, i64)>) {
        let mut tpl = TopicPartitionList::new();
        let mut entries = Vec::new();
        for (topic, p) in parts {
            if let Some(off) = self.positions.get(topic).and_then(|m| m.get(p)) {
                entries.push(((topic.clone(), *p), *off));
                if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(*off)) {
                    tracing::warn!(error = %e, topic, partition = p, "offset not committed");
                }
            }
        }
        (tpl, entries)
    }

    /// After an aborted transaction: every task drops its cache, and every partition goes
    /// back to its committed offset (what the aborted transaction held is read again).
    fn rewind_to_committed<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[TopicPartition],
    ) -> Result<(), RuntimeError> {
        for (_, p) in parts {
            if let Some(t) = self.running.get_mut(p) {
                t.task.reset_to_store()?;
            }
        }
        self.dead_letters.clear();
        for tp in parts {
            if let Some(pos) = self.positions.get_mut(&tp.0) {
                pos.remove(&tp.1);
            }
            let Some(&offset) = self.committed.get(tp) else {
                continue;
            };
            rewind(consumer, tp, offset)?;
        }
        Ok(())
    }

    fn send_updates(&mut self, out: &FlushOutput) {
        let output_topic = &self.receipts_topic;
        for u in &out.updates {
            self.buf.clear();
            self.encoder.encode_update_into(u, &mut self.buf);
            let mut key = itoa::Buffer::new();
            let rec = BaseRecord::to(output_topic)
                .key(key.format(u.conversation_id.0).as_bytes())
                .payload(&self.buf);
            self.collector.send(rec);
        }
        let n = out.updates.len() as u64;
        self.summary.updates_emitted += n;
        Progress::add(&self.progress.updates_emitted, n);
        metrics::counter!("readstate_updates_emitted_total").increment(n);
        self.send_heads(out);
    }

    /// Conversation-head updates, to their topic when the topology has one.
    fn send_heads(&mut self, out: &FlushOutput) {
        let (Some(encoder), Some(topic)) = (&self.heads_encoder, &self.heads_topic) else {
            return;
        };
        for u in &out.heads {
            self.buf.clear();
            encoder.encode_head_into(u, &mut self.buf);
            let mut key = itoa::Buffer::new();
            let rec = BaseRecord::to(topic.as_str())
                .key(key.format(u.conversation_id.0).as_bytes())
                .payload(&self.buf);
            self.collector.send(rec);
        }
        metrics::counter!("readstate_head_updates_emitted_total").increment(out.heads.len() as u64);
    }

    fn send_dead_letters(&mut self) {
        let dlq = &self.topology.dead_letter_topic.0;
        for d in std::mem::take(&mut self.dead_letters) {
            let headers = dead_letter_headers(&d);
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(dlq).headers(headers);
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

    /// Step 5. A refusal because of membership loses every task; other failures are left
    /// to the next commit (replay marks make a replay harmless).
    fn commit_offsets<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[TopicPartition],
    ) {
        let (tpl, entries) = self.offsets_of(parts);
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => self.committed_now(entries),
            Err(e) if is_membership_error(&e) => {
                metrics::counter!("readstate_commits_failed_total").increment(1);
                self.lose_all_and_requeue(consumer, &format!("offset commit refused: {e}"));
            }
            Err(e) => {
                metrics::counter!("readstate_commits_failed_total").increment(1);
                tracing::warn!(error = %e, "offset commit failed; the next commit covers it");
            }
        }
    }

    /// Summary and metrics after a commit: counters advance by what the running tasks did
    /// since the last commit; gauges are per task (bounded by the partition count).
    fn refresh_summary(&mut self) {
        metrics::gauge!("readstate_rocksdb_memory_bytes").set(self.rocks_memory_bytes() as f64);
        let mut total = crate::processor::ProcessStats::default();
        for t in self.running.values_mut() {
            let stats = t.task.stats();
            let (s, was) = (stats.events, t.reported.events);
            let d = |now: u64, before: u64| now.saturating_sub(before);
            metrics::counter!("readstate_events_folded_total").increment(d(s.folded, was.folded));
            metrics::counter!("readstate_events_stale_total").increment(d(s.stale, was.stale));
            metrics::counter!("readstate_events_replayed_skipped_total")
                .increment(d(s.replayed, was.replayed));
            if let Some(m) = stats.messages {
                let was = t.reported.messages.unwrap_or_default();
                for (result, now, before) in [
                    ("counted", m.counted, was.counted),
                    ("duplicate", m.duplicates, was.duplicates),
                    ("late", m.late, was.late),
                ] {
                    metrics::counter!("readstate_messages_folded_total", "result" => result)
                        .increment(d(now, before));
                }
                metrics::counter!("readstate_events_replayed_skipped_total")
                    .increment(d(m.replayed, was.replayed));
            }
            t.reported = stats;
            total.folded += s.folded;
            total.replayed += s.replayed;
            let id = t.task.id().to_string();
            for store in t.task.processor().stores() {
                let labels = [("task", id.as_str()), ("store", store.name().as_str())];
                let keys = store.approximate_num_keys() as f64;
                series::set("readstate_store_estimated_keys", &labels, keys);
                let bytes = store.approximate_size_bytes() as f64;
                series::set("readstate_store_size_bytes", &labels, bytes);
            }
        }
        self.summary.events_folded = self.summary.events_folded.max(total.folded);
        self.summary.replayed_skipped = self.summary.replayed_skipped.max(total.replayed);
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
