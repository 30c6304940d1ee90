//! The processor API as the runtime sees it: bytes in, bytes out, stores by index. Nothing
//! here names a domain type; the runtime, the task and the test driver drive every processor
//! through these traits.
//!
//! - [`SourceSerdes`]: the deserializers of a topology's source nodes, shared by the tasks of
//!   an instance: which writer schemas a polled batch needs (fetched from the schema
//!   registry before processing; while it is down the partitions are parked), and the
//!   repartition key of a record.
//! - [`ProcessorSupplier::init`] makes a task's processor over its restored stores (in the
//!   order its node names them) and its cache budget.
//! - [`Processor::process`]: raw records of one input (a source node of the graph), decoded
//!   by the processor's source serdes; undecodable ones become dead letters.
//! - [`Processor::flush`]: memory only: the outputs, encoded by its sink nodes' serializers
//!   and addressed by [`SinkId`] ([`Outputs`]), and each store's batch with its changelog
//!   records ([`StoreFlush`]). The task makes them durable in the commit protocol's order,
//!   then [`Processor::commit`]s the batches back with each store's checkpoint; `reset`
//!   drops what was not committed.
//! - [`Processor::close`] hands the stores back (closed, or wiped when lost).
//!
//! `tests::CountingProcessor` is the test implementation beside the trait; the read-state
//! node ([`super::node`]) is the production one.

use std::ops::Range;

use futures::future::BoxFuture;

use super::ProcessorError;
use crate::ids::TaskId;
use crate::serde::{DecodeError, SerdeError};
use crate::state::restore::{RawRestorer, StoreRestorer};
use crate::state::{BatchOp, KeyValueStore, StoreBatch, StoreError};
use crate::task::{DeadLetter, Rerouted, SourceRecord};

/// Which input of a processor a batch comes from: its source's position in the node's
/// `inputs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputId(pub usize);

/// Which sink node an output record goes to: its position among the graph's sink nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SinkId(pub usize);

/// The kinds of record a source decodes to (its `records` in the topology).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    ReadEvents,
    MessageEvents,
    /// A conversation's member list (a table: the latest per conversation holds).
    Members,
}

/// The record-cache budget of one task (its share of the instance's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheBudget {
    /// Entries of the first store's cache (read states).
    pub entries: usize,
    /// Window positions of the heads store's cache (0 without one).
    pub positions: usize,
}

impl CacheBudget {
    /// One task's share of this (the instance's) budget when it runs `tasks` tasks: each
    /// running task gets an equal share, as Kafka Streams divides
    /// `statestore.cache.max.bytes`.
    pub fn share(&self, tasks: usize) -> CacheBudget {
        let tasks = tasks.max(1);
        CacheBudget {
            entries: (self.entries / tasks).max(1),
            positions: self.positions / tasks,
        }
    }
}

/// What a processor is initialised with: its task, its stores (in the order its node
/// names them), and its cache budget.
pub struct ProcessorContext {
    pub task: TaskId,
    pub stores: Vec<Box<dyn KeyValueStore>>,
    pub cache: CacheBudget,
    /// The partition count of the task's input topics (co-partitioned: one count), when
    /// known. A processor checks with it where producers put its records; a test driver
    /// that pipes records into partitions of its own choosing leaves it `None`.
    pub partitions: Option<i32>,
}

/// One monotone counter of a processor: a metric name (and a bounded label) with its
/// total over the processor's life. The runtime adds what grew since the last commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub name: &'static str,
    pub label: Option<(&'static str, &'static str)>,
    pub value: u64,
}

/// What a processor did, as counters (see [`Counter`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessorStats {
    pub counters: Vec<Counter>,
}

impl ProcessorStats {
    /// The total of the counters named `name` (over labels).
    pub fn total(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .filter(|c| c.name == name)
            .map(|c| c.value)
            .sum()
    }
}

/// Output records of one flush, encoded: every key and value in one buffer (no allocation
/// per record), each record addressed to a sink node.
#[derive(Debug, Default)]
pub struct Outputs {
    buf: Vec<u8>,
    records: Vec<(SinkId, Range<usize>, Range<usize>)>,
}

impl Outputs {
    /// Append a record for `sink`, its key and value written by the two encoders.
    pub fn push(
        &mut self,
        sink: SinkId,
        key: impl FnOnce(&mut Vec<u8>),
        value: impl FnOnce(&mut Vec<u8>),
    ) {
        let k0 = self.buf.len();
        key(&mut self.buf);
        let v0 = self.buf.len();
        value(&mut self.buf);
        self.records.push((sink, k0..v0, v0..self.buf.len()));
    }

    /// (sink, key, value) of every record, in the order pushed.
    pub fn iter(&self) -> impl Iterator<Item = (SinkId, &[u8], &[u8])> + '_ {
        self.records
            .iter()
            .map(|(s, k, v)| (*s, &self.buf[k.clone()], &self.buf[v.clone()]))
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records for `sink`.
    pub fn count(&self, sink: SinkId) -> usize {
        self.records.iter().filter(|(s, _, _)| *s == sink).count()
    }
}

/// One store's part of a flush: its writes, and which of them go to its changelog.
#[derive(Debug, Default)]
pub struct StoreFlush {
    /// The store writes, to apply once the outputs and changelog are acknowledged.
    pub batch: StoreBatch,
    /// Which of `batch`'s puts go to the changelog topic (the values; not the pending
    /// index).
    changelog: Vec<usize>,
}

impl StoreFlush {
    /// (store key, encoded value) records for the changelog topic, borrowed from the batch;
    /// a logged delete is a tombstone (`None`).
    pub fn changelog(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> + '_ {
        self.changelog.iter().map(|&i| match self.batch.op(i) {
            BatchOp::Put { key, value } => (key, Some(value)),
            BatchOp::Delete { key } => (key, None),
        })
    }

    pub fn changelog_len(&self) -> usize {
        self.changelog.len()
    }

    /// Put a value that goes to the changelog too.
    pub fn put_logged(&mut self, key: &[u8], encode: impl FnOnce(&mut Vec<u8>)) {
        let i = self.batch.put_with(key, encode);
        self.changelog.push(i);
    }

    /// Delete a key, with a tombstone on the changelog.
    pub fn delete_logged(&mut self, key: &[u8]) {
        self.batch.delete(key);
        self.changelog.push(self.batch.len() - 1);
    }
}

/// What a flush produced: the outputs, and one part per store of the task (indexed as its
/// stores). The task makes the outputs and each store's changelog durable, then hands the
/// batches back to [`Processor::commit`].
#[derive(Debug, Default)]
pub struct FlushOutput {
    pub outputs: Outputs,
    pub stores: Vec<StoreFlush>,
}

impl FlushOutput {
    /// An empty flush of `n` stores.
    pub fn for_stores(n: usize) -> Self {
        let mut out = Self::default();
        out.stores.resize_with(n, StoreFlush::default);
        out
    }

    /// Nothing to write to any store.
    pub fn is_empty(&self) -> bool {
        self.stores.iter().all(|s| s.batch.is_empty())
    }

    /// Store puts of this flush.
    pub fn store_writes(&self) -> usize {
        self.stores.iter().map(|s| s.batch.len()).sum()
    }

    /// Changelog records of this flush, over every store.
    pub fn changelog_len(&self) -> usize {
        self.stores.iter().map(StoreFlush::changelog_len).sum()
    }

    /// Take the store batches, to hand back to [`Processor::commit`].
    pub fn take_batches(&mut self) -> Vec<StoreBatch> {
        std::mem::take(&mut self.stores)
            .into_iter()
            .map(|s| s.batch)
            .collect()
    }
}

/// The processor node of a sub-topology, as a task drives it.
pub trait Processor: Send {
    /// Decode and fold raw records of input `input`; records that cannot be decoded are
    /// added to `dead_letters` (and otherwise skipped).
    fn process(
        &mut self,
        input: InputId,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError>;

    /// Records of the `process` calls since the last drain that were found on a
    /// partition their key does not belong on, appended to `out`: nothing of them was
    /// folded here, and the runtime produces them to where they belong with this task's
    /// next commit. A processor that does not check where records are has none.
    fn drain_rerouted(&mut self, _out: &mut Vec<Rerouted>) {}

    /// The outputs and store writes of everything processed since the last flush, and of
    /// the work due at `now_ms` (punctuation; memory only: see [`Processor::commit`]).
    fn flush(&mut self, now_ms: i64) -> FlushOutput;

    /// Write a flush's store batches (indexed as the stores), each with its changelog's
    /// next offset when records were written to it.
    fn commit(
        &mut self,
        batches: Vec<StoreBatch>,
        checkpoints: &[Option<i64>],
    ) -> Result<(), ProcessorError>;

    /// Forget everything not committed to the stores (a flush whose outputs could not be
    /// made durable): continue from the stores as after a crash.
    fn reset(&mut self) -> Result<(), ProcessorError>;

    /// Hand the stores back (closing the task).
    fn close(self: Box<Self>) -> Vec<Box<dyn KeyValueStore>>;

    fn stores(&self) -> Vec<&dyn KeyValueStore>;

    fn stats(&self) -> ProcessorStats;

    /// Follow the task's share of the instance's cache budget.
    fn set_cache_budget(&mut self, budget: CacheBudget);

    /// Whether the cache holds so much unflushed work that the task should flush now.
    fn needs_flush(&self) -> bool;

    /// For interactive queries of a concrete processor (downcast).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Makes the processor of a topology node for each task (`init`), and the restorer of
/// each of its stores.
pub trait ProcessorSupplier: Send + Sync {
    fn init(&self, ctx: ProcessorContext) -> Result<Box<dyn Processor>, ProcessorError>;

    /// How store `index` of a task is restored from its changelog (`store` as it is before
    /// the restore). By default, records are written as they are.
    fn restorer(
        &self,
        index: usize,
        store: &dyn KeyValueStore,
    ) -> Result<Box<dyn StoreRestorer>, StoreError> {
        let _ = (index, store);
        Ok(Box::new(RawRestorer))
    }
}

/// The deserializers of a topology's source nodes, shared by an instance's tasks.
pub trait SourceSerdes: Send + Sync {
    /// Fetch the writer schemas the records (topic, value) need that are not known yet. An
    /// error means the registry is unavailable: nothing is dead-lettered, the caller
    /// parks what needs it and asks again later.
    fn prepare<'a>(
        &'a self,
        records: &'a [(&'a str, Option<&'a [u8]>)],
    ) -> BoxFuture<'a, Result<(), SerdeError>>;

    /// Fetch the writer schemas `ids` (after an outage).
    fn prepare_ids<'a>(&'a self, ids: &'a [u32]) -> BoxFuture<'a, Result<(), SerdeError>>;

    /// The writer schema id of a record of `topic` when it has not been resolved yet.
    fn unknown_schema(&self, topic: &str, value: Option<&[u8]>) -> Option<u32>;

    /// Write the key a record of source `topic` is repartitioned by into `key`.
    fn repartition_key(
        &self,
        topic: &str,
        value: Option<&[u8]>,
        key: &mut Vec<u8>,
    ) -> Result<(), DecodeError>;

    /// The largest record value a dead letter carries whole.
    fn max_record_bytes(&self) -> usize;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::memory::InMemoryStore;

    /// The test implementation beside the trait: counts the records of each input into
    /// its own store (one key per input), forwards one output per flushed input to sink 0,
    /// and flushes every `every` records. It shows the seams: inputs routed by id, outputs
    /// by sink, several stores each with its own changelog records, and commit with
    /// per-store checkpoints.
    pub(crate) struct CountingProcessor {
        stores: Vec<Box<dyn KeyValueStore>>,
        counts: Vec<u64>,
        dirty: Vec<bool>,
        every: u64,
        pending: u64,
        /// When flushes ran.
        pub(crate) flushed_at: Vec<i64>,
    }

    impl CountingProcessor {
        pub(crate) fn new(stores: Vec<Box<dyn KeyValueStore>>, every: u64) -> Self {
            let n = stores.len();
            Self {
                stores,
                counts: vec![0; n],
                dirty: vec![false; n],
                every,
                pending: 0,
                flushed_at: Vec::new(),
            }
        }
    }

    impl Processor for CountingProcessor {
        fn process(
            &mut self,
            input: InputId,
            records: &[SourceRecord<'_>],
            dead_letters: &mut Vec<DeadLetter>,
        ) -> Result<(), ProcessorError> {
            for r in records {
                if r.value.is_none() {
                    dead_letters.push(DeadLetter::from_record(
                        r,
                        "empty_value",
                        "no value".into(),
                        0,
                    ));
                    continue;
                }
                self.counts[input.0] += 1;
                self.dirty[input.0] = true;
                self.pending += 1;
            }
            Ok(())
        }

        fn flush(&mut self, now_ms: i64) -> FlushOutput {
            let mut out = FlushOutput::for_stores(self.stores.len());
            for (i, dirty) in self.dirty.iter_mut().enumerate() {
                if std::mem::take(dirty) {
                    let v = self.counts[i].to_be_bytes();
                    out.stores[i].put_logged(b"count", |b| b.extend_from_slice(&v));
                    out.outputs
                        .push(SinkId(0), |k| k.push(i as u8), |b| b.extend_from_slice(&v));
                }
            }
            self.pending = 0;
            self.flushed_at.push(now_ms);
            out
        }

        fn commit(
            &mut self,
            batches: Vec<StoreBatch>,
            checkpoints: &[Option<i64>],
        ) -> Result<(), ProcessorError> {
            let stores = self.stores.iter_mut().map(|s| &mut **s);
            Ok(crate::state::write_all_flushed(
                stores,
                batches,
                checkpoints,
            )?)
        }

        fn reset(&mut self) -> Result<(), ProcessorError> {
            for (i, s) in self.stores.iter().enumerate() {
                self.counts[i] = s.get(b"count")?.map_or(0, |v| {
                    u64::from_be_bytes(v[..8].try_into().expect("8 bytes"))
                });
                self.dirty[i] = false;
            }
            Ok(())
        }

        fn close(self: Box<Self>) -> Vec<Box<dyn KeyValueStore>> {
            self.stores
        }

        fn stores(&self) -> Vec<&dyn KeyValueStore> {
            self.stores.iter().map(|s| &**s).collect()
        }

        fn stats(&self) -> ProcessorStats {
            let value = self.counts.iter().sum();
            ProcessorStats {
                counters: vec![Counter {
                    name: "readstate_events_folded_total",
                    label: None,
                    value,
                }],
            }
        }

        fn set_cache_budget(&mut self, _budget: CacheBudget) {}

        fn needs_flush(&self) -> bool {
            self.pending >= self.every
        }

        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    pub(crate) fn counting(n: usize, every: u64) -> CountingProcessor {
        let stores = (0..n)
            .map(|i| Box::new(InMemoryStore::new(format!("store-{i}").into())) as Box<_>)
            .collect();
        CountingProcessor::new(stores, every)
    }

    #[test]
    fn outputs_keep_every_record_in_one_buffer_in_order() {
        let mut o = Outputs::default();
        o.push(
            SinkId(1),
            |k| k.extend_from_slice(b"k1"),
            |v| v.extend_from_slice(b"v1"),
        );
        o.push(SinkId(0), |_| {}, |v| v.extend_from_slice(b"value"));
        let all: Vec<(SinkId, &[u8], &[u8])> = o.iter().collect();
        assert_eq!(
            all,
            [
                (SinkId(1), &b"k1"[..], &b"v1"[..]),
                (SinkId(0), &b""[..], &b"value"[..])
            ]
        );
        assert_eq!((o.len(), o.count(SinkId(0)), o.count(SinkId(2))), (2, 1, 0));
    }
}
