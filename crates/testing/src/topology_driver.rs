//! A test driver for topologies, like Kafka Streams' `TopologyTestDriver`: pipe input
//! records (with partition and offset) into a compiled topology, advance wall-clock time,
//! read the emitted updates and dead letters, inspect the stores; no broker.
//!
//! The driver runs the same task, processor node (source serdes, sink serializers), store,
//! cache and Avro code as `readstate run`; the outputs it reads back were encoded by the
//! node's sinks and are decoded as a consumer of the output topics would. What it replaces
//! is Kafka: a flush's outputs are "acknowledged" at once, then the store batch is written
//! and the consumed offsets count as committed. Crashes can be simulated at
//! the two interesting points (before a flush; after the outputs but before the commit).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use readstate::ids::{ConversationId, Origin, ReaderId, TaskId};
use readstate::model::{
    HeadUpdate, MessageEvent, ReadBy, ReadEvent, ReceiptUpdate, SenderReceipt, StateKey,
    UnreadCounts,
};
use readstate::processor::resolve::ResolveStats;
use readstate::processor::SinkId;
use readstate::processor::{
    CacheBudget, InputId, MessageStats, ProcessStats, ProcessorContext, ProcessorSupplier,
    ReadStateProcessor, ReadStateSerdes, ReadStateSupplier, RecordKind, SourceSerdes,
};
use readstate::serde::avro::{AvroReadEvent, EventEncoder, UpdateDecoder};
use readstate::serde::message::{
    AvroMessageEvent, HeadDecoder, MessageEncoder, ReadByDecoder, SenderReceiptDecoder,
};
use readstate::serde::registry::{
    LocalRegistry, SchemaResolver, LOCAL_MESSAGE_EVENT_ID, LOCAL_READ_EVENT_ID,
};
use readstate::serde::{MESSAGE_EVENT_SCHEMA, READ_EVENT_SCHEMA};
use readstate::state::head::ConversationHead;
use readstate::state::memory::InMemoryStore;
use readstate::state::rocks::RocksDbStore;
use readstate::state::{KeyValueStore, ReadState};
use readstate::task::commit::{self, CrashPoint, MemoryLog, MemoryLogError};
use readstate::task::{DeadLetter, SourceRecord, StreamTask};
use readstate::topology::graph::{Graph, NodeKind, Output, Route};
use readstate::topology::{ProcessingGuarantee, Store, Topology};

/// Where the driver's stores live.
#[derive(Debug, Clone)]
pub enum DriverStores {
    Memory,
    RocksDb(PathBuf),
}

struct PartitionState {
    task: Option<StreamTask>,
    /// Next offset after the last record piped.
    consumed: i64,
    /// Next offset after the last record covered by a commit.
    committed: i64,
    /// The same two for the partition of the co-partitioned message topic.
    messages_consumed: i64,
    messages_committed: i64,
    /// And for the partition of the members topic.
    members_consumed: i64,
    members_committed: i64,
    /// Next offset of the records rerouted to this partition (one sequence over the
    /// rerouted topics).
    rerouted_next: i64,
}

impl PartitionState {
    fn new(task: Option<StreamTask>) -> Self {
        Self {
            task,
            consumed: 0,
            committed: 0,
            messages_consumed: 0,
            messages_committed: 0,
            members_consumed: 0,
            members_committed: 0,
            rerouted_next: 0,
        }
    }
}

pub struct TopologyTestDriver {
    topology: Topology,
    /// The compiled graph's routes: which processor input each source's records go to.
    routes: Vec<Route>,
    stores: DriverStores,
    /// The node's source serdes and its supplier, as `readstate run` builds them.
    serdes: Arc<ReadStateSerdes>,
    supplier: ReadStateSupplier,
    /// The output topics as their consumers read them.
    output: OutputReader,
    encoder: EventEncoder,
    message_encoder: MessageEncoder,
    rt: tokio::runtime::Runtime,
    partitions: BTreeMap<i32, PartitionState>,
    now_ms: i64,
    last_flush_ms: i64,
    /// Every dead letter of processing (those of commits so far sent to `log` too).
    dead_letters: Vec<DeadLetter>,
    /// What the commit protocol writes: outputs, dead letters, changelogs, offset commits.
    log: MemoryLog,
    /// The input topics' partition count, when set: the tasks check where records were
    /// put (misrouted ones rerouted, or `misrouted` dead letters), as under `readstate run`.
    partition_count: Option<i32>,
}

/// The output topics as their consumers read them: each sink node's records decoded with
/// the consumers' decoders, kept until the test takes them.
struct OutputReader {
    /// What each sink node (by `SinkId`) receives.
    sinks: Vec<Output>,
    update_decoder: UpdateDecoder,
    head_decoder: HeadDecoder,
    sender_decoder: SenderReceiptDecoder,
    read_by_decoder: ReadByDecoder,
    updates: Vec<ReceiptUpdate>,
    heads: Vec<HeadUpdate>,
    sender_receipts: Vec<SenderReceipt>,
    read_by: Vec<ReadBy>,
}

impl OutputReader {
    fn new(graph: &Graph, topology: &Topology, resolver: Arc<dyn SchemaResolver>) -> Self {
        let ids = &topology.ids;
        Self {
            sinks: graph
                .nodes
                .iter()
                .filter_map(|n| match &n.kind {
                    NodeKind::Sink { output, .. } => Some(*output),
                    _ => None,
                })
                .collect(),
            update_decoder: UpdateDecoder::new(
                resolver.clone(),
                &readstate::serde::receipt_update_schema(ids),
            )
            .expect("generated schema parses"),
            head_decoder: HeadDecoder::new(
                resolver.clone(),
                &readstate::serde::conversation_head_schema(ids),
            )
            .expect("generated schema parses"),
            sender_decoder: SenderReceiptDecoder::new(
                resolver.clone(),
                &readstate::serde::sender_receipt_schema(ids),
            )
            .expect("generated schema parses"),
            read_by_decoder: ReadByDecoder::new(resolver, &readstate::serde::read_by_schema(ids))
                .expect("generated schema parses"),
            updates: Vec::new(),
            heads: Vec::new(),
            sender_receipts: Vec::new(),
            read_by: Vec::new(),
        }
    }

    /// Read a flush's outputs back as the consumers of the output topics would.
    fn collect(
        &mut self,
        rt: &tokio::runtime::Runtime,
        outputs: Vec<(i32, SinkId, Vec<u8>, Vec<u8>)>,
    ) {
        for (_, sink, _key, value) in &outputs {
            let (_key, value) = (&_key[..], &value[..]);
            match self.sinks[sink.0] {
                Output::Receipts => {
                    let d = &mut self.update_decoder;
                    rt.block_on(d.prepare(std::iter::once(Some(value))))
                        .expect("the schema registry answers");
                    let u = d.decode(value).expect("the sink's own encoding decodes");
                    self.updates.push(u.into());
                }
                Output::ConversationHeads => {
                    let d = &mut self.head_decoder;
                    rt.block_on(d.prepare(std::iter::once(Some(value))))
                        .expect("the schema registry answers");
                    let h = d.decode(value).expect("the sink's own encoding decodes");
                    self.heads.push(h.into());
                }
                Output::SenderReceipts => {
                    let d = &mut self.sender_decoder;
                    rt.block_on(d.prepare(std::iter::once(Some(value))))
                        .expect("the schema registry answers");
                    let r = d.decode(value).expect("the sink's own encoding decodes");
                    let key = std::str::from_utf8(_key).expect("a sender key is text");
                    assert_eq!(key, r.sender_id.to_string(), "keyed by sender");
                    self.sender_receipts.push(r.into());
                }
                Output::ReadBy => {
                    let d = &mut self.read_by_decoder;
                    rt.block_on(d.prepare(std::iter::once(Some(value))))
                        .expect("the schema registry answers");
                    let r = d.decode(value).expect("the sink's own encoding decodes");
                    let key = std::str::from_utf8(_key).expect("a sender key is text");
                    assert_eq!(key, r.sender_id.to_string(), "keyed by sender");
                    self.read_by.push(r.into());
                }
            }
        }
    }
}

/// The driver's wall clock starts here (2023-11-14T22:13:20Z).
pub const START_MS: i64 = 1_700_000_000_000;

impl TopologyTestDriver {
    /// A driver with in-memory stores and the local schema registry.
    pub fn new(topology: Topology) -> Self {
        Self::with(
            topology,
            DriverStores::Memory,
            Arc::new(LocalRegistry::new()),
        )
    }

    pub fn with(
        topology: Topology,
        stores: DriverStores,
        resolver: Arc<dyn SchemaResolver>,
    ) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the driver's registry calls");
        let never = std::sync::atomic::AtomicBool::new(false);
        let serdes = rt
            .block_on(ReadStateSerdes::register(
                &topology,
                resolver.clone(),
                &never,
            ))
            .expect("the node's output schemas register");
        let serdes = Arc::new(serdes);
        let graph = Graph::compile(&topology);
        Self {
            routes: graph.routes(),
            output: OutputReader::new(&graph, &topology, resolver),
            supplier: ReadStateSupplier::new(&topology, serdes.clone()),
            serdes,
            rt,
            topology,
            stores,
            encoder: EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)
                .expect("embedded schema parses"),
            message_encoder: MessageEncoder::new(MESSAGE_EVENT_SCHEMA, LOCAL_MESSAGE_EVENT_ID)
                .expect("embedded schema parses"),
            partitions: BTreeMap::new(),
            now_ms: START_MS,
            last_flush_ms: START_MS,
            dead_letters: Vec::new(),
            log: MemoryLog::default(),
            partition_count: None,
        }
    }

    /// Tell the tasks the input topics' partition count (before piping): each record is
    /// then checked against its source's partitioner, as `readstate run` does. One found
    /// elsewhere is folded by the task of the partition it belongs on (its source's
    /// `on_misrouted = "repartition"`, the default), or is a `misrouted` dead letter.
    pub fn with_partition_count(mut self, partitions: i32) -> Self {
        assert!(self.partitions.is_empty(), "set before the first record");
        self.partition_count = Some(partitions);
        self
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    fn store_path(root: &Path, topology: &Topology, partition: i32, store: &Store) -> PathBuf {
        root.join(topology.application_id.as_str())
            .join(TaskId::new(0, partition).to_string())
            .join(store.name.as_str())
    }

    /// Open a partition's task over its stores (one per `Topology::stores()`).
    fn open_task(&self, partition: i32) -> StreamTask {
        let stores = self
            .topology
            .stores()
            .into_iter()
            .map(|spec| -> Box<dyn KeyValueStore> {
                match &self.stores {
                    DriverStores::Memory => Box::new(InMemoryStore::new(spec.name.clone())),
                    DriverStores::RocksDb(root) => Box::new(
                        RocksDbStore::open(
                            spec.name.clone(),
                            &Self::store_path(root, &self.topology, partition, spec),
                            &spec.rocksdb,
                        )
                        .expect("open rocksdb store"),
                    ),
                }
            })
            .collect();
        self.task_over(partition, stores)
    }

    /// Init the topology's processor over `stores` (as the runtime does after a restore).
    fn task_over(&self, partition: i32, stores: Vec<Box<dyn KeyValueStore>>) -> StreamTask {
        let id = TaskId::new(0, partition);
        let t = &self.topology;
        let ctx = ProcessorContext {
            task: id,
            stores,
            cache: CacheBudget {
                entries: t.store.cache_max_entries,
                positions: t.heads_store.as_ref().map_or(0, |h| h.cache_max_entries),
            },
            partitions: self.partition_count,
        };
        let processor = self.supplier.init(ctx).expect("init processor");
        StreamTask::new(id, processor)
    }

    /// The processor input of the topology's `kind` records (the compiled graph's route).
    fn input_of(&self, kind: RecordKind) -> InputId {
        self.routes
            .iter()
            .find(|r| r.records == kind)
            .map(|r| r.input)
            .expect("the topology has a source of these records")
    }

    fn partition(&mut self, partition: i32) -> &mut PartitionState {
        if !self.partitions.contains_key(&partition) {
            let task = self.open_task(partition);
            self.partitions
                .insert(partition, PartitionState::new(Some(task)));
        }
        self.partitions.get_mut(&partition).expect("inserted")
    }

    /// Make sure a partition's task is open.
    fn open_partition(&mut self, partition: i32) {
        if self
            .partitions
            .get(&partition)
            .is_none_or(|ps| ps.task.is_none())
        {
            let task = self.open_task(partition);
            self.partitions
                .entry(partition)
                .or_insert_with(|| PartitionState::new(None))
                .task = Some(task);
        }
    }

    /// Encode `event` in the Confluent wire format (local schema id) and pipe it.
    pub fn pipe_event(&mut self, partition: i32, offset: i64, event: &ReadEvent) {
        let bytes = self
            .encoder
            .encode(&AvroReadEvent::from(event))
            .expect("encode event");
        self.pipe_raw(partition, offset, Some(&bytes));
    }

    /// Pipe one raw record value, as read from the source topic.
    pub fn pipe_raw(&mut self, partition: i32, offset: i64, value: Option<&[u8]>) {
        self.pipe_batch(partition, &[(offset, value)]);
    }

    /// Pipe a batch of raw records of one partition (the shape a consumer poll returns).
    pub fn pipe_batch(&mut self, partition: i32, records: &[(i64, Option<&[u8]>)]) {
        let topic = self.topology.sources[0].topic.as_str().to_owned();
        let source = Origin::source_id(&topic, partition);
        // Produced now, by the driver's clock (message time, for reads waiting on
        // messages).
        let now_ms = self.now_ms;
        let recs: Vec<SourceRecord<'_>> = records
            .iter()
            .map(|(offset, value)| SourceRecord {
                topic: &topic,
                partition,
                offset: *offset,
                key: None,
                value: *value,
                origin: Origin {
                    source,
                    offset: *offset,
                },
                timestamp: Some(now_ms),
            })
            .collect();
        self.prepare(&recs);
        let max_next = records.iter().map(|(o, _)| o + 1).max().unwrap_or(0);
        let input = self.input_of(RecordKind::ReadEvents);
        self.open_partition(partition);
        let ps = self.partitions.get_mut(&partition).expect("open");
        ps.consumed = ps.consumed.max(max_next);
        let task = ps.task.as_mut().expect("open");
        task.process(input, &recs, &mut self.dead_letters)
            .expect("process");
        self.reroute(partition);
    }

    /// What the task of `partition` found misrouted (with the partition count set), piped
    /// at once into the tasks of the partitions it belongs on, as records of its source's
    /// rerouted topic. (`readstate run` produces them there with the next commit, and the
    /// owning task reads them back.)
    fn reroute(&mut self, partition: i32) {
        let mut rerouted = Vec::new();
        let ps = self.partitions.get_mut(&partition).expect("open");
        ps.task
            .as_mut()
            .expect("open")
            .drain_rerouted(&mut rerouted);
        for r in rerouted {
            let input = Graph::route(&self.routes, &r.topic)
                .expect("a rerouted topic routes to its source's input")
                .input;
            self.open_partition(r.partition);
            let ps = self.partitions.get_mut(&r.partition).expect("open");
            let rec = SourceRecord {
                topic: &r.topic,
                partition: r.partition,
                offset: ps.rerouted_next,
                key: r.key.as_deref(),
                value: r.value.as_deref(),
                origin: r.origin,
                timestamp: r.timestamp,
            };
            ps.rerouted_next += 1;
            let task = ps.task.as_mut().expect("open");
            task.process(input, &[rec], &mut self.dead_letters)
                .expect("process");
        }
    }

    /// Encode `message` (local schema id) and pipe it into the co-partitioned message
    /// topic's `partition`. The topology must have a message source.
    pub fn pipe_message(&mut self, partition: i32, offset: i64, message: &MessageEvent) {
        let bytes = self
            .message_encoder
            .encode(&AvroMessageEvent::from(message))
            .expect("encode message");
        self.pipe_message_raw(partition, offset, Some(&bytes));
    }

    /// Pipe one raw record value of the message topic.
    pub fn pipe_message_raw(&mut self, partition: i32, offset: i64, value: Option<&[u8]>) {
        let topic = (self.topology.messages.as_ref())
            .expect("the topology has a message source")
            .topic
            .as_str()
            .to_owned();
        self.pipe_side(
            RecordKind::MessageEvents,
            &topic,
            partition,
            offset,
            None,
            value,
        );
    }

    /// Pipe one record of the members topic into `partition`: the member list of
    /// `conversation` (JSON), or a tombstone (`None`). The topology must have a members
    /// source.
    pub fn pipe_members(
        &mut self,
        partition: i32,
        offset: i64,
        conversation: &ConversationId,
        members: Option<&[ReaderId]>,
    ) {
        let json = members.map(|ms| {
            let ids: Vec<String> = ms.iter().map(|m| m.to_string()).collect();
            serde_json::json!({ "members": ids }).to_string()
        });
        let key = conversation.to_string();
        let value = json.as_deref().map(str::as_bytes);
        self.pipe_members_raw(partition, offset, Some(key.as_bytes()), value);
    }

    /// Pipe one raw record of the members topic.
    pub fn pipe_members_raw(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) {
        let topic = (self.topology.members.as_ref())
            .expect("the topology has a members source")
            .topic
            .as_str()
            .to_owned();
        self.pipe_side(RecordKind::Members, &topic, partition, offset, key, value);
    }

    /// Pipe one record of a co-partitioned topic (messages or members) into its task.
    fn pipe_side(
        &mut self,
        kind: RecordKind,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) {
        let rec = SourceRecord {
            topic,
            partition,
            offset,
            key,
            value,
            origin: Origin {
                source: Origin::source_id(topic, partition),
                offset,
            },
            timestamp: Some(self.now_ms),
        };
        self.prepare(std::slice::from_ref(&rec));
        let input = self.input_of(kind);
        self.open_partition(partition);
        let ps = self.partitions.get_mut(&partition).expect("open");
        let consumed = match kind {
            RecordKind::Members => &mut ps.members_consumed,
            _ => &mut ps.messages_consumed,
        };
        *consumed = (*consumed).max(offset + 1);
        let task = ps.task.as_mut().expect("open");
        task.process(input, &[rec], &mut self.dead_letters)
            .expect("process");
        self.reroute(partition);
    }

    /// Next offset to consume in `partition` of the members topic after the last commit.
    pub fn committed_members_offset(&self, partition: i32) -> i64 {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.members_committed)
    }

    /// Take the read-by records emitted so far.
    pub fn read_read_by(&mut self) -> Vec<ReadBy> {
        std::mem::take(&mut self.output.read_by)
    }

    /// Fetch the writer schemas the records need (as the runtime does before processing).
    fn prepare(&self, recs: &[SourceRecord<'_>]) {
        let values: Vec<(&str, Option<&[u8]>)> = recs.iter().map(|r| (r.topic, r.value)).collect();
        self.rt
            .block_on(self.serdes.prepare(&values))
            .expect("the schema registry answers");
    }

    /// Take the receipts for senders emitted so far.
    pub fn read_sender_receipts(&mut self) -> Vec<SenderReceipt> {
        std::mem::take(&mut self.output.sender_receipts)
    }

    /// Advance the wall clock; flushes when a commit interval has passed (like the runtime).
    pub fn advance_wall_clock(&mut self, by: Duration) {
        self.now_ms += by.as_millis() as i64;
        if self.now_ms - self.last_flush_ms >= self.topology.commit_interval.as_millis() as i64 {
            self.flush();
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Flush and commit every task now, through the runtime's commit protocol
    /// (at-least-once) on the in-memory log.
    pub fn flush(&mut self) {
        if self.commit().is_ok() {
            for ps in self.partitions.values_mut() {
                ps.committed = ps.consumed;
                ps.messages_committed = ps.messages_consumed;
                ps.members_committed = ps.members_consumed;
            }
        }
        self.last_flush_ms = self.now_ms;
    }

    /// The commit protocol over every open task; the outputs it sent are read back (they
    /// reached their topics even when the commit then failed).
    fn commit(&mut self) -> Result<(), MemoryLogError> {
        let mut tasks: Vec<(i32, &mut StreamTask)> = (self.partitions.iter_mut())
            .filter_map(|(p, ps)| ps.task.as_mut().map(|t| (*p, t)))
            .collect();
        let unsent = &self.dead_letters[self.log.dead_letters().len()..];
        let guarantee = ProcessingGuarantee::AtLeastOnce;
        let r = commit::commit(&mut self.log, guarantee, &mut tasks, unsent, self.now_ms);
        self.output.collect(&self.rt, self.log.take_outputs());
        r.map(|_| ())
    }

    /// Simulate a crash before the next flush: everything not committed is lost; the
    /// consumer would resume every partition at [`committed_offset`](Self::committed_offset).
    pub fn crash(&mut self) {
        for ps in self.partitions.values_mut() {
            if let Some(task) = ps.task.as_mut() {
                task.reset_to_store().expect("reset");
            }
            ps.consumed = ps.committed;
            ps.messages_consumed = ps.messages_committed;
            ps.members_consumed = ps.members_committed;
        }
    }

    /// Simulate a crash in the middle of a flush: the updates reached the output topic, but
    /// the changelog, the store batch and the offset commit did not happen.
    pub fn crash_after_output(&mut self) {
        self.log.crash_at(CrashPoint::AfterOutputs);
        let crashed = self.commit();
        assert!(crashed.is_err(), "the commit crashed after its outputs");
        self.crash();
    }

    /// Simulate a crash between the store write and the offset commit (steps 4 and 5 of
    /// the commit protocol): outputs and state are durable, the offsets are not, so the
    /// records since the last commit are consumed again; replay marks must skip them.
    pub fn crash_after_store(&mut self) {
        self.log.crash_at(CrashPoint::AfterStores);
        let crashed = self.commit();
        assert!(crashed.is_err(), "the commit crashed after its stores");
        self.crash();
    }

    /// Close every task (dropping RocksDB handles) and reopen them from their stores, as a
    /// restarted process would. In-memory stores survive; the caches do not.
    pub fn restart(&mut self) {
        let parts: Vec<i32> = self.partitions.keys().copied().collect();
        for p in parts {
            let task = self.partitions.get_mut(&p).and_then(|ps| ps.task.take());
            let reopened = match (&self.stores, task) {
                (DriverStores::Memory, Some(t)) => self.task_over(p, t.close()),
                (_, t) => {
                    drop(t);
                    self.open_task(p)
                }
            };
            let ps = self.partition(p);
            ps.task = Some(reopened);
            ps.consumed = ps.committed;
            ps.messages_consumed = ps.messages_committed;
            ps.members_consumed = ps.members_committed;
        }
    }

    /// Next offset to consume in `partition` after the last commit.
    pub fn committed_offset(&self, partition: i32) -> i64 {
        self.partitions.get(&partition).map_or(0, |p| p.committed)
    }

    /// Next offset to consume in `partition` of the message topic after the last commit.
    pub fn committed_message_offset(&self, partition: i32) -> i64 {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.messages_committed)
    }

    /// Take the conversation-head updates emitted so far.
    pub fn read_heads(&mut self) -> Vec<HeadUpdate> {
        std::mem::take(&mut self.output.heads)
    }

    /// A reader's unread and mention counts now, from their task (message source only).
    pub fn unread_counts(&self, partition: i32, key: &StateKey) -> Option<UnreadCounts> {
        let task = self.partitions.get(&partition)?.task.as_ref()?;
        task.read_state()?.unread_counts(key).expect("store read")
    }

    /// A conversation's head as its task sees it.
    pub fn head(
        &self,
        partition: i32,
        conversation: &readstate::ids::ConversationId,
    ) -> Option<ConversationHead> {
        let task = self.partitions.get(&partition)?.task.as_ref()?;
        task.read_state()?.head(conversation).expect("store read")
    }

    /// What message folding did, summed over the tasks.
    pub fn message_stats(&self) -> MessageStats {
        let mut s = MessageStats::default();
        let tasks = self.partitions.values().filter_map(|p| p.task.as_ref());
        for t in tasks.filter_map(StreamTask::read_state) {
            if let Some(x) = t.message_stats() {
                s.counted += x.counted;
                s.duplicates += x.duplicates;
                s.late += x.late;
                s.replayed += x.replayed;
                s.read_before += x.read_before;
                s.heads_emitted += x.heads_emitted;
                s.head_writes += x.head_writes;
            }
        }
        s
    }

    /// What resolving reads positioned by message id did, and the reads waiting now,
    /// summed over the tasks.
    pub fn resolve_stats(&self) -> (ResolveStats, usize) {
        let (mut s, mut waiting) = (ResolveStats::default(), 0);
        let tasks = self.partitions.values().filter_map(|p| p.task.as_ref());
        for (x, n) in tasks.filter_map(|t| t.read_state()?.resolve_stats()) {
            s.immediate += x.immediate;
            s.waited += x.waited;
            s.after_wait += x.after_wait;
            s.fallback += x.fallback;
            s.unresolved += x.unresolved;
            waiting += n;
        }
        (s, waiting)
    }

    /// Take the updates emitted so far.
    pub fn read_output(&mut self) -> Vec<ReceiptUpdate> {
        std::mem::take(&mut self.output.updates)
    }

    pub fn dead_letters(&self) -> &[DeadLetter] {
        &self.dead_letters
    }

    /// The state of `key` as its task sees it (cached or stored), searching every task.
    pub fn state(&self, key: &StateKey) -> Option<ReadState> {
        self.partitions
            .values()
            .filter_map(|ps| ps.task.as_ref())
            .filter_map(StreamTask::read_state)
            .find_map(|p| p.state(key).expect("store read"))
    }

    /// The read-state store of a partition's task.
    pub fn store(&self, partition: i32) -> Option<&dyn KeyValueStore> {
        self.stores(partition).into_iter().next()
    }

    /// Every store of a partition's task, indexed as `Topology::stores()`.
    pub fn stores(&self, partition: i32) -> Vec<&dyn KeyValueStore> {
        match self
            .partitions
            .get(&partition)
            .and_then(|p| p.task.as_ref())
        {
            Some(t) => t.processor().stores(),
            None => Vec::new(),
        }
    }

    pub fn stats(&self) -> ProcessStats {
        let mut s = ProcessStats::default();
        let tasks = self.partitions.values().filter_map(|p| p.task.as_ref());
        for t in tasks.filter_map(StreamTask::read_state) {
            let x = t.stats();
            s.folded += x.folded;
            s.advanced += x.advanced;
            s.stale += x.stale;
            s.replayed += x.replayed;
            s.updates_emitted += x.updates_emitted;
            s.cache_misses += x.cache_misses;
            s.flushes += x.flushes;
        }
        s
    }

    pub fn pending_len(&self) -> usize {
        self.partitions
            .values()
            .filter_map(|p| p.task.as_ref())
            .filter_map(StreamTask::read_state)
            .map(ReadStateProcessor::pending_len)
            .sum()
    }
}
