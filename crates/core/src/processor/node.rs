//! The `read-state` node as the runtime drives it: its source serdes (read events, and
//! message events with a message source), its sink serializers (receipt updates, and
//! conversation-head updates), and the adapter that runs [`ReadStateProcessor`] behind the
//! byte-level [`Processor`] trait. Everything that knows the read-state record types is
//! here or below; the runtime sees only the traits of [`super::api`].
//!
//! [`build`] makes the supplier and source serdes of a `read-state` node, registering its
//! sinks' schemas (the registry's built-in kind).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;

use super::api::{
    CacheBudget, Counter, FlushOutput, InputId, Outputs, Processor, ProcessorContext,
    ProcessorStats, ProcessorSupplier, RecordKind, SinkId, SourceSerdes,
};
use super::read_state::{EmitPolicy, ReadStateFlush, ReadStateProcessor};
use super::resolve::UNRESOLVED_MESSAGE;
use super::restorers::{HeadsRestorer, ReadStateRestorer};
use super::ProcessorError;
use crate::backoff::Backoff;
use crate::ids::{ConversationId, IdType, IdTypes};
use crate::kafka::partitioner::Partitioner;
use crate::serde::avro_mapped::AvroMappedDecoder;
use crate::serde::json::JsonDecoder;
use crate::serde::members::decode_members;
use crate::serde::message::{ReadByEncoder, SenderReceiptEncoder};
use crate::serde::registry::SchemaResolver;
use crate::serde::{
    conversation_head_schema, read_by_schema, receipt_update_schema, sender_receipt_schema,
    DecodeError, EventDecoder, HeadEncoder, MessageDecoder, MessageEventDecoder, ReadEventDecoder,
    SerdeError, UpdateEncoder,
};
use crate::state::restore::StoreRestorer;
use crate::state::{KeyValueStore, StoreBatch, StoreError};
use crate::task::{DeadLetter, Rerouted, SourceRecord};
use crate::topology::graph::{Graph, NodeKind, Output};
use crate::topology::{ResolveSpec, Source, SourceFormat, Topology};

/// A processor node, ready to run: what makes its tasks' processors, and its sources'
/// deserializers (shared by the tasks).
pub struct BuiltNode {
    pub supplier: Box<dyn ProcessorSupplier>,
    pub serdes: Arc<dyn SourceSerdes>,
}

/// Build the `read-state` node of a topology (see [`super::registry`]), registering its
/// sinks' output schemas (retried while the registry is unavailable, until `shutdown`).
pub async fn build(
    t: &Topology,
    resolver: Arc<dyn SchemaResolver>,
    shutdown: &AtomicBool,
) -> Result<BuiltNode, ProcessorError> {
    let serdes = Arc::new(ReadStateSerdes::register(t, resolver, shutdown).await?);
    Ok(BuiltNode {
        supplier: Box::new(ReadStateSupplier::new(t, serdes.clone())),
        serdes,
    })
}

/// The serdes of the read-state node: decoders shared by the tasks (each batch takes the
/// read lock once; fetching a writer schema takes the write lock only to install it).
pub struct ReadStateSerdes {
    resolver: Arc<dyn SchemaResolver>,
    reads: RwLock<ReadEventDecoder>,
    /// With a message source: it (its topics) and its decoder.
    messages: Option<(Source, RwLock<MessageEventDecoder>)>,
    updates: UpdateEncoder,
    heads: Option<HeadEncoder>,
    senders: Option<SenderReceiptEncoder>,
    read_by: Option<ReadByEncoder>,
    /// With a members source: it (JSON member lists, no decoder), and the id types.
    members: Option<Source>,
    ids: IdTypes,
}

impl ReadStateSerdes {
    /// Decoders for `t`'s sources, and encoders for its sinks (their schemas registered
    /// under `<topic>-value`).
    pub async fn register(
        t: &Topology,
        resolver: Arc<dyn SchemaResolver>,
        shutdown: &AtomicBool,
    ) -> Result<Self, ProcessorError> {
        let max = t.bad_records.max_record_bytes;
        let updates = register_with_retry(
            &*resolver,
            &format!("{}-value", t.output.topic),
            &receipt_update_schema(&t.ids),
            shutdown,
        )
        .await?;
        let heads = match &t.heads_output {
            Some(h) => {
                let subject = format!("{}-value", h.topic);
                let schema = conversation_head_schema(&t.ids);
                Some(register_with_retry(&*resolver, &subject, &schema, shutdown).await?)
            }
            None => None,
        };
        let senders = match &t.sender_receipts_output {
            Some(s) => {
                let subject = format!("{}-value", s.topic);
                let schema = sender_receipt_schema(&t.ids);
                Some(register_with_retry(&*resolver, &subject, &schema, shutdown).await?)
            }
            None => None,
        };
        let read_by = match &t.read_by_output {
            Some(s) => {
                let subject = format!("{}-value", s.topic);
                let schema = read_by_schema(&t.ids);
                Some(register_with_retry(&*resolver, &subject, &schema, shutdown).await?)
            }
            None => None,
        };
        let messages = match &t.messages {
            Some(m) => Some((m.clone(), RwLock::new(message_decoder(m, &resolver, max)?))),
            None => None,
        };
        let reads = match t.sources.first().map(|s| &s.format) {
            Some(SourceFormat::Json(mapping)) => {
                ReadEventDecoder::Json(Box::new(JsonDecoder::new((**mapping).clone(), max)))
            }
            Some(SourceFormat::AvroMapped(mapping)) => ReadEventDecoder::AvroMapped(Box::new(
                AvroMappedDecoder::new((**mapping).clone(), max),
            )),
            _ => {
                ReadEventDecoder::Avro(EventDecoder::with_max_record_bytes(resolver.clone(), max)?)
            }
        };
        Ok(Self {
            reads: RwLock::new(reads),
            resolver,
            messages,
            updates,
            heads,
            senders,
            read_by,
            members: t.members.clone(),
            ids: t.ids,
        })
    }

    fn is_message_topic(&self, topic: &str) -> bool {
        self.messages
            .as_ref()
            .is_some_and(|(s, _)| s.feeds_from(topic))
    }

    /// The ids either decoder has not resolved.
    fn missing(&self, ids: impl Iterator<Item = u32>) -> Vec<u32> {
        let reads = self.reads.read().expect("decoder lock");
        let messages = self
            .messages
            .as_ref()
            .map(|(_, d)| d.read().expect("decoder lock"));
        let mut missing: Vec<u32> = Vec::new();
        for id in ids {
            let needed =
                reads.needs_fetch(id) || messages.as_ref().is_some_and(|m| m.needs_fetch(id));
            if needed && !missing.contains(&id) {
                missing.push(id);
            }
        }
        missing
    }

    /// Fetch each id once (no lock held meanwhile) and install it where it is missing.
    async fn fetch(&self, ids: Vec<u32>) -> Result<(), SerdeError> {
        for id in ids {
            let text = self.resolver.schema_by_id(id).await?;
            let mut reads = self.reads.write().expect("decoder lock");
            if reads.needs_fetch(id) {
                reads.install(id, text.as_deref());
            }
            drop(reads);
            if let Some((_, m)) = &self.messages {
                let mut m = m.write().expect("decoder lock");
                if m.needs_fetch(id) {
                    m.install(id, text.as_deref());
                }
            }
        }
        Ok(())
    }
}

impl SourceSerdes for ReadStateSerdes {
    fn prepare<'a>(
        &'a self,
        records: &'a [(&'a str, Option<&'a [u8]>)],
    ) -> BoxFuture<'a, Result<(), SerdeError>> {
        Box::pin(async move {
            let ids = records
                .iter()
                .filter_map(|(_, v)| crate::serde::split_wire((*v)?).ok().map(|(id, _)| id));
            let missing = self.missing(ids);
            self.fetch(missing).await
        })
    }

    fn prepare_ids<'a>(&'a self, ids: &'a [u32]) -> BoxFuture<'a, Result<(), SerdeError>> {
        Box::pin(async move {
            let missing = self.missing(ids.iter().copied());
            self.fetch(missing).await
        })
    }

    fn unknown_schema(&self, topic: &str, value: Option<&[u8]>) -> Option<u32> {
        if self.members.as_ref().is_some_and(|s| s.feeds_from(topic)) {
            return None; // JSON
        }
        match &self.messages {
            Some((s, d)) if s.feeds_from(topic) => {
                d.read().expect("decoder lock").unknown_schema(value)
            }
            _ => self
                .reads
                .read()
                .expect("decoder lock")
                .unknown_schema(value),
        }
    }

    /// Read events are repartitioned by conversation (decimal, as every output key).
    fn repartition_key(
        &self,
        topic: &str,
        value: Option<&[u8]>,
        key: &mut Vec<u8>,
    ) -> Result<(), DecodeError> {
        debug_assert!(
            !self.is_message_topic(topic),
            "messages are not repartitioned"
        );
        let reads = self.reads.read().expect("decoder lock");
        let e = reads.decode_ref(value)?;
        e.conversation_id.0.write_key(key);
        Ok(())
    }

    fn max_record_bytes(&self) -> usize {
        self.reads.read().expect("decoder lock").max_record_bytes()
    }
}

/// The most members one member list may name (a larger one is a dead letter).
pub const MAX_MEMBERS: usize = 100_000;

/// The decoder of a message source, by its format.
fn message_decoder(
    m: &crate::topology::Source,
    resolver: &Arc<dyn SchemaResolver>,
    max: usize,
) -> Result<MessageEventDecoder, SerdeError> {
    Ok(match &m.format {
        SourceFormat::Json(mapping) => {
            MessageEventDecoder::Json(Box::new(JsonDecoder::new((**mapping).clone(), max)))
        }
        SourceFormat::AvroMapped(mapping) => MessageEventDecoder::AvroMapped(Box::new(
            AvroMappedDecoder::new((**mapping).clone(), max),
        )),
        SourceFormat::AvroConfluent => MessageEventDecoder::Avro(
            MessageDecoder::with_max_record_bytes(resolver.clone(), max)?,
        ),
    })
}

/// Register an output schema, retrying while the registry is unavailable.
async fn register_with_retry<T: serde::Serialize>(
    resolver: &dyn SchemaResolver,
    subject: &str,
    schema: &str,
    shutdown: &AtomicBool,
) -> Result<crate::serde::avro::WireEncoder<T>, SerdeError> {
    let mut backoff = Backoff::remote();
    loop {
        match crate::serde::avro::WireEncoder::<T>::register(resolver, subject, schema).await {
            Ok(e) => return Ok(e),
            Err(SerdeError::RegistryUnavailable(msg)) if !shutdown.load(Ordering::Relaxed) => {
                let wait = backoff.fail();
                tracing::warn!(error = %msg, retry_in = ?wait, subject, "schema registry unavailable");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes the read-state processor of each task.
pub struct ReadStateSupplier {
    policy: EmitPolicy,
    /// With a message input: positions kept per conversation head.
    unread_cap: Option<usize>,
    serdes: Arc<ReadStateSerdes>,
    wiring: Wiring,
    /// Per input: the partitioner that placed its records, and the topic its misrouted
    /// records are rerouted to (none: they are dead letters).
    partitioners: Vec<(Partitioner, Option<String>)>,
    /// With reads positioned by message id: how they wait, and the message id type.
    resolve: Option<(ResolveSpec, IdType)>,
    /// With a sender-receipts sink: the message id type.
    sender_receipts: Option<IdTypes>,
    /// With a members source: the size above which groups get read-by only.
    large_group_members: Option<usize>,
}

/// Where the node's inputs come from and its outputs go, from the compiled graph.
#[derive(Debug, Clone, Copy)]
struct Wiring {
    messages: Option<InputId>,
    members: Option<InputId>,
    receipts: SinkId,
    heads: Option<SinkId>,
    senders: Option<SinkId>,
    read_by: Option<SinkId>,
}

impl Wiring {
    fn of(t: &Topology) -> Self {
        let g = Graph::compile(t);
        let messages = g
            .routes()
            .iter()
            .find(|r| r.records == RecordKind::MessageEvents)
            .map(|r| r.input);
        let members = (g.routes().iter())
            .find(|r| r.records == RecordKind::Members)
            .map(|r| r.input);
        let sinks: Vec<Output> = g
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::Sink { output, .. } => Some(*output),
                _ => None,
            })
            .collect();
        let sink = |o: Output| sinks.iter().position(|s| *s == o).map(SinkId);
        Self {
            messages,
            members,
            receipts: sink(Output::Receipts).expect("a read-state node has a receipts sink"),
            heads: sink(Output::ConversationHeads),
            senders: sink(Output::SenderReceipts),
            read_by: sink(Output::ReadBy),
        }
    }
}

impl ReadStateSupplier {
    pub fn new(topology: &Topology, serdes: Arc<ReadStateSerdes>) -> Self {
        let node = &topology.processor;
        Self {
            policy: EmitPolicy {
                min_emit_interval_ms: node.min_emit_interval.as_millis() as i64,
            },
            unread_cap: node.unread_cap,
            serdes,
            wiring: Wiring::of(topology),
            partitioners: input_partitioners(topology),
            resolve: node.resolve.map(|r| (r, topology.ids.message)),
            sender_receipts: (topology.sender_receipts_output.as_ref()).map(|_| topology.ids),
            large_group_members: node.large_group_members,
        }
    }

    /// The concrete processor over a task's stores (benchmarks query its state).
    pub fn open(&self, ctx: ProcessorContext) -> Result<ReadStateProcessor, ProcessorError> {
        let mut stores = ctx.stores.into_iter();
        let state = stores
            .next()
            .ok_or(ProcessorError::MissingStore("read-state"))?;
        let mut p = ReadStateProcessor::open(state, self.policy, ctx.cache.entries)?;
        if let Some(cap) = self.unread_cap {
            let heads = stores.next().ok_or(ProcessorError::MissingStore("heads"))?;
            p.enable_unread(cap, ctx.cache.positions, heads)?;
        }
        if let Some((spec, message_ids)) = &self.resolve {
            p.enable_resolve(spec, *message_ids)?;
        }
        if let Some(large) = self.large_group_members {
            p.enable_groups(large, ctx.cache.positions.max(large * 4))?;
        }
        if let Some(ids) = self.sender_receipts {
            p.enable_sender_receipts(ids)?;
        }
        Ok(p)
    }
}

/// Per input of the node (the graph's routes): the partitioner that placed its records,
/// and its source's rerouted topic.
fn input_partitioners(t: &Topology) -> Vec<(Partitioner, Option<String>)> {
    let sources: Vec<&Source> = t.sources.iter().chain(t.side_sources()).collect();
    let mut by_input: Vec<(Partitioner, Option<String>)> = Vec::new();
    for r in Graph::compile(t).routes() {
        if r.input.0 < by_input.len() {
            continue;
        }
        let source = sources.iter().find(|s| s.feeds_from(r.topic.as_str()));
        by_input.push(source.map_or_else(Default::default, |s| {
            let rerouted = s.rerouted_topic.as_ref().map(|r| r.0.clone());
            (s.task_input_partitioner(), rerouted)
        }));
    }
    by_input
}

impl ProcessorSupplier for ReadStateSupplier {
    fn init(&self, ctx: ProcessorContext) -> Result<Box<dyn Processor>, ProcessorError> {
        let routing = ctx.partitions.map(|partitions| Routing {
            partitions,
            by_input: self.partitioners.clone(),
            rerouted: Vec::new(),
        });
        Ok(Box::new(ReadStateNode {
            inner: self.open(ctx)?,
            serdes: self.serdes.clone(),
            wiring: self.wiring,
            routing,
        }))
    }

    /// Read states (with their pending-emit index) and conversation heads.
    fn restorer(
        &self,
        index: usize,
        store: &dyn KeyValueStore,
    ) -> Result<Box<dyn StoreRestorer>, StoreError> {
        Ok(match index {
            super::HEADS_STORE => Box::new(HeadsRestorer),
            _ => Box::new(ReadStateRestorer::new(store)?),
        })
    }
}

/// A task's read-state processor behind the byte-level trait: decodes its inputs, encodes
/// its outputs.
pub struct ReadStateNode {
    inner: ReadStateProcessor,
    serdes: Arc<ReadStateSerdes>,
    wiring: Wiring,
    /// Where each input's records belong (unknown to a test driver that picks partitions
    /// itself: then nothing is checked).
    routing: Option<Routing>,
}

/// Where producers put a conversation's records: checked for every record, so that one
/// placed by another partitioner (or key) is never folded into a task that does not own
/// its conversation. It is rerouted to the partition it belongs on (its source's rerouted
/// topic), or a `misrouted` dead letter.
#[derive(Debug, Clone)]
struct Routing {
    partitions: i32,
    /// Per input: its partitioner and rerouted topic.
    by_input: Vec<(Partitioner, Option<String>)>,
    /// Set aside since the last drain.
    rerouted: Vec<Rerouted>,
}

impl Routing {
    /// Whether `r`, a record of `input` about conversation `c`, is where it belongs; one
    /// that is not is set aside (rerouted, or a dead letter in `dead_letters`).
    fn admit(
        &mut self,
        input: InputId,
        c: &ConversationId,
        r: &SourceRecord<'_>,
        key: &mut Vec<u8>,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> bool {
        let (partitioner, rerouted) = match self.by_input.get(input.0) {
            Some((p, t)) => (*p, t.as_deref()),
            None => (Partitioner::default(), None),
        };
        key.clear();
        c.0.write_key(key);
        let expected = partitioner.partition(key, self.partitions);
        if expected == r.partition {
            return true;
        }
        let why = format!(
            "conversation {c} belongs on partition {expected} of {} ({} over the conversation id, {} partitions), found on partition {}: its producer used another partitioner or key",
            r.topic, partitioner, self.partitions, r.partition
        );
        match rerouted {
            // Never around again: a record of the rerouted topic was placed by readstate.
            Some(topic) if topic != r.topic => {
                (self.rerouted).push(Rerouted::from_record(r, topic, expected, why))
            }
            _ => dead_letters.push(misrouted(r, why, MISROUTED_LETTER_BYTES)),
        }
        false
    }
}

/// The most of a misrouted record's value its dead letter carries (it was decoded: it is
/// within the record size limit).
const MISROUTED_LETTER_BYTES: usize = usize::MAX;

impl ReadStateNode {
    /// The processor (interactive queries: the test driver, benchmarks).
    pub fn processor(&self) -> &ReadStateProcessor {
        &self.inner
    }

    fn process_messages(
        &mut self,
        input: InputId,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        let (_, decoder) = self
            .serdes
            .messages
            .as_ref()
            .ok_or(ProcessorError::NoMessageSource)?;
        let decoder = decoder.read().expect("decoder lock");
        let mut messages = Vec::with_capacity(records.len());
        let max = decoder.max_record_bytes();
        let mut key = Vec::new();
        let time = records.iter().filter_map(|r| r.timestamp).max();
        for r in records {
            match decoder.decode(r.value) {
                Ok(m) => {
                    let c = &m.conversation_id;
                    if (self.routing.as_mut())
                        .is_none_or(|at| at.admit(input, c, r, &mut key, dead_letters))
                    {
                        messages.push((m, r.origin));
                    }
                }
                Err(e) => dead_letters.push(dead_letter(r, &e, max)),
            }
        }
        drop(decoder);
        self.inner.process_messages(&messages, time, dead_letters)
    }

    fn process_members(
        &mut self,
        input: InputId,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        let max = self.serdes.max_record_bytes();
        let ids = self.serdes.ids;
        let mut lists = Vec::with_capacity(records.len());
        let mut key = Vec::new();
        for r in records {
            match decode_members(r.key, r.value, &ids, MAX_MEMBERS) {
                Ok(l) => {
                    let c = &l.conversation;
                    if (self.routing.as_mut())
                        .is_none_or(|at| at.admit(input, c, r, &mut key, dead_letters))
                    {
                        lists.push(l);
                    }
                }
                Err(e) => dead_letters.push(dead_letter(r, &e, max)),
            }
        }
        self.inner.process_members(&lists)
    }

    fn process_reads(
        &mut self,
        input: InputId,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        let decoder = self.serdes.reads.read().expect("decoder lock");
        // One allocation per batch; the events borrow their ids from the records.
        let mut events = Vec::with_capacity(records.len());
        // With reads positioned by message id: each event's record, for those that wait.
        let mut at: Vec<usize> = Vec::new();
        let resolves = self.inner.resolve_stats().is_some();
        let max = decoder.max_record_bytes();
        let mut key = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match decoder.decode_ref(r.value) {
                Ok(e) => {
                    let c = &e.conversation_id;
                    if (self.routing.as_mut())
                        .is_none_or(|at| at.admit(input, c, r, &mut key, dead_letters))
                    {
                        events.push((e, r.origin));
                        if resolves {
                            at.push(i);
                        }
                    }
                }
                Err(e) => dead_letters.push(dead_letter(r, &e, max)),
            }
        }
        drop(decoder);
        if resolves {
            let record = |i: usize| {
                let r = &records[at[i]];
                let letter = DeadLetter::from_record(r, UNRESOLVED_MESSAGE, String::new(), max);
                (r.timestamp.unwrap_or_default(), letter)
            };
            self.inner
                .resolve_reads(&mut events, record, dead_letters)?;
        }
        self.inner.process(&events)
    }

    /// Encode a typed flush's updates for the node's sinks, keyed by conversation.
    fn encode(&self, typed: &ReadStateFlush, outputs: &mut Outputs) {
        debug_assert!(outputs.is_empty());
        fn key(c: &ConversationId) -> impl Fn(&mut Vec<u8>) + '_ {
            move |k| c.0.write_key(k)
        }
        for u in &typed.updates {
            outputs.push(self.wiring.receipts, key(&u.conversation_id), |v| {
                self.serdes.updates.encode_update_into(u, v)
            });
        }
        if let (Some(sink), Some(encoder)) = (self.wiring.heads, &self.serdes.heads) {
            for h in &typed.heads {
                outputs.push(sink, key(&h.conversation_id), |v| {
                    encoder.encode_head_into(h, v)
                });
            }
        }
        if let (Some(sink), Some(encoder)) = (self.wiring.read_by, &self.serdes.read_by) {
            for r in &typed.read_by {
                let by_sender = |k: &mut Vec<u8>| r.sender_id.0.write_key(k);
                outputs.push(sink, by_sender, |v| encoder.encode_read_by_into(r, v));
            }
        }
        if let (Some(sink), Some(encoder)) = (self.wiring.senders, &self.serdes.senders) {
            for r in &typed.sender_receipts {
                // Keyed by sender: a sender's receipts reach one gateway partition.
                let by_sender = |k: &mut Vec<u8>| r.sender_id.0.write_key(k);
                outputs.push(sink, by_sender, |v| encoder.encode_receipt_into(r, v));
            }
        }
    }
}

fn dead_letter(r: &SourceRecord<'_>, e: &DecodeError, max: usize) -> DeadLetter {
    DeadLetter::from_record(r, e.reason(), e.to_string(), max)
}

fn misrouted(r: &SourceRecord<'_>, why: String, max: usize) -> DeadLetter {
    DeadLetter::from_record(r, MISROUTED, why, max)
}

/// The dead-letter reason of a record on a partition its conversation does not belong on.
pub const MISROUTED: &str = "misrouted";

impl Processor for ReadStateNode {
    fn process(
        &mut self,
        input: InputId,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        if Some(input) == self.wiring.messages {
            self.process_messages(input, records, dead_letters)
        } else if Some(input) == self.wiring.members {
            self.process_members(input, records, dead_letters)
        } else {
            self.process_reads(input, records, dead_letters)
        }
    }

    fn drain_rerouted(&mut self, out: &mut Vec<Rerouted>) {
        if let Some(routing) = &mut self.routing {
            out.append(&mut routing.rerouted);
        }
    }

    fn flush(&mut self, now_ms: i64) -> FlushOutput {
        let mut typed = self.inner.prepare_flush(now_ms);
        let mut outputs = Outputs::default();
        self.encode(&typed, &mut outputs);
        typed.flush.outputs = outputs;
        typed.flush
    }

    fn commit(
        &mut self,
        batches: Vec<StoreBatch>,
        checkpoints: &[Option<i64>],
    ) -> Result<(), ProcessorError> {
        self.inner.commit_flush(batches, checkpoints)
    }

    fn reset(&mut self) -> Result<(), ProcessorError> {
        self.inner.reset_to_store()
    }

    fn close(self: Box<Self>) -> Vec<Box<dyn KeyValueStore>> {
        self.inner.into_stores()
    }

    fn stores(&self) -> Vec<&dyn KeyValueStore> {
        self.inner.stores()
    }

    fn stats(&self) -> ProcessorStats {
        let s = self.inner.stats();
        let counter = |name, value| Counter {
            name,
            label: None,
            value,
        };
        let mut counters = vec![
            counter("readstate_events_folded_total", s.folded),
            counter("readstate_events_stale_total", s.stale),
            counter("readstate_events_replayed_skipped_total", s.replayed),
            counter("readstate_updates_emitted_total", s.updates_emitted),
        ];
        if self.wiring.senders.is_some() {
            counters.push(counter(
                "readstate_sender_receipts_emitted_total",
                s.sender_receipts_emitted,
            ));
            let read_before = self.inner.message_stats().map_or(0, |m| m.read_before);
            counters.push(counter(
                "readstate_messages_read_before_arrival_total",
                read_before,
            ));
        }
        if let Some(g) = self.inner.group_stats() {
            counters.push(counter(
                "readstate_read_by_emitted_total",
                g.read_by_emitted,
            ));
            counters.push(counter("readstate_member_lists_total", g.member_lists));
        }
        if let Some(m) = self.inner.message_stats() {
            for (result, value) in [
                ("counted", m.counted),
                ("duplicate", m.duplicates),
                ("late", m.late),
            ] {
                counters.push(Counter {
                    name: "readstate_messages_folded_total",
                    label: Some(("result", result)),
                    value,
                });
            }
            counters.push(counter(
                "readstate_events_replayed_skipped_total",
                m.replayed,
            ));
            counters.push(counter(
                "readstate_head_updates_emitted_total",
                m.heads_emitted,
            ));
        }
        if let Some((r, _)) = self.inner.resolve_stats() {
            for (result, value) in [
                ("immediate", r.immediate),
                ("waited", r.waited),
                ("after_wait", r.after_wait),
                ("fallback", r.fallback),
                ("unresolved", r.unresolved),
            ] {
                counters.push(Counter {
                    name: "readstate_reads_by_message_id_total",
                    label: Some(("result", result)),
                    value,
                });
            }
        }
        ProcessorStats { counters }
    }

    fn set_cache_budget(&mut self, budget: CacheBudget) {
        self.inner
            .set_cache_capacity(budget.entries, budget.positions);
    }

    fn needs_flush(&self) -> bool {
        self.inner.dirty_len() >= self.inner.cache_capacity() / 2
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
