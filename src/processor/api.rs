//! The processor API (Kafka Streams' `Processor` / `ProcessorSupplier` /
//! `ProcessorContext`): what a stream task asks of the processor node of its sub-topology.
//!
//! - **init**: [`ProcessorSupplier::init`] hands a new processor its stores (restored, in
//!   the order its topology node names them) and its context (task, cache budget); the
//!   processor reloads whatever it keeps between flushes (e.g. advances held back).
//! - **process**: a batch of records from input `i` (the position of its source in the
//!   node's `inputs`), decoded by that source's codec ([`Records`]).
//! - **punctuate**: due work (emits held back by the minimum emit interval) popped from a
//!   due-time queue ([`super::punctuation::DueQueue`]), never found by a scan.
//! - **flush**: memory only: the outputs and each store's batch and changelog records
//!   ([`FlushOutput`]); the task makes them durable in the commit protocol's order, then
//!   **commit**s the batches back with each store's checkpoint. **reset** drops what was not
//!   committed (a failed flush).
//! - **close**: the stores are handed back to the task (closed, or wiped when lost).
//!
//! [`ReadStateProcessor`](super::ReadStateProcessor) is the implementation of the
//! `read-state` node; `tests::CountingProcessor` is the test implementation beside the
//! trait.

use super::read_state::{EmitPolicy, FlushOutput, ProcessStats, ReadStateProcessor};
use super::unread::MessageStats;
use super::ProcessorError;
use crate::ids::{Origin, TaskId};
use crate::model::{EventRef, MessageEvent};
use crate::state::{KeyValueStore, StoreBatch};
use crate::topology::Topology;

/// Which input of a processor a batch comes from: its source's position in the node's
/// `inputs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputId(pub usize);

/// The kinds of record a source decodes to (its `records` in the topology).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    ReadEvents,
    MessageEvents,
}

/// A batch of decoded records of one input, each with where it first entered readstate.
#[derive(Debug, Clone, Copy)]
pub enum Records<'a, 'r> {
    ReadEvents(&'a [(EventRef<'r>, Origin)]),
    MessageEvents(&'a [(MessageEvent, Origin)]),
}

impl Records<'_, '_> {
    pub fn len(&self) -> usize {
        match self {
            Self::ReadEvents(r) => r.len(),
            Self::MessageEvents(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The record-cache budget of one task (its share of the instance's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheBudget {
    /// Entries of the first store's cache (read states).
    pub entries: usize,
    /// Window positions of the heads store's cache (0 without one).
    pub positions: usize,
}

/// What a processor is initialised with: its task, its stores (in the order its node
/// names them), and its cache budget.
pub struct ProcessorContext {
    pub task: TaskId,
    pub stores: Vec<Box<dyn KeyValueStore>>,
    pub cache: CacheBudget,
}

/// Counters of what a processor did; monotone over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessorStats {
    pub events: ProcessStats,
    /// With a message input.
    pub messages: Option<MessageStats>,
}

/// The processor node of a sub-topology, as a task drives it.
pub trait Processor: Send {
    /// Fold a batch of records of input `input`.
    fn process(&mut self, input: InputId, records: Records<'_, '_>) -> Result<(), ProcessorError>;

    /// Add the work due at `now_ms` (held-back emits) to `out`.
    fn punctuate(&mut self, now_ms: i64, out: &mut FlushOutput);

    /// The outputs and store writes of everything processed since the last flush, and of
    /// the work due at `now_ms` (memory only; see [`Processor::commit`]).
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

/// Makes the processor of a topology node for each task (`init`).
pub trait ProcessorSupplier: Send + Sync {
    fn init(&self, ctx: ProcessorContext) -> Result<Box<dyn Processor>, ProcessorError>;
}

/// The `read-state` node of a topology.
#[derive(Debug, Clone)]
pub struct ReadStateSupplier {
    policy: EmitPolicy,
    /// With a message input: positions kept per conversation head.
    unread_cap: Option<usize>,
}

impl ReadStateSupplier {
    pub fn new(topology: &Topology) -> Self {
        let node = &topology.processor;
        Self {
            policy: EmitPolicy {
                min_emit_interval_ms: node.min_emit_interval.as_millis() as i64,
            },
            unread_cap: node.unread_cap,
        }
    }

    /// The concrete processor (the test driver and benchmarks query its state).
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
        Ok(p)
    }
}

impl ProcessorSupplier for ReadStateSupplier {
    fn init(&self, ctx: ProcessorContext) -> Result<Box<dyn Processor>, ProcessorError> {
        Ok(Box::new(self.open(ctx)?))
    }
}

impl Processor for ReadStateProcessor {
    fn process(&mut self, _input: InputId, records: Records<'_, '_>) -> Result<(), ProcessorError> {
        match records {
            Records::ReadEvents(events) => ReadStateProcessor::process(self, events),
            Records::MessageEvents(messages) => self.process_messages(messages),
        }
    }

    fn punctuate(&mut self, now_ms: i64, out: &mut FlushOutput) {
        self.emit_due(now_ms, out);
    }

    fn flush(&mut self, now_ms: i64) -> FlushOutput {
        self.prepare_flush(now_ms)
    }

    fn commit(
        &mut self,
        batches: Vec<StoreBatch>,
        checkpoints: &[Option<i64>],
    ) -> Result<(), ProcessorError> {
        self.commit_flush(batches, checkpoints)
    }

    fn reset(&mut self) -> Result<(), ProcessorError> {
        self.reset_to_store()
    }

    fn close(self: Box<Self>) -> Vec<Box<dyn KeyValueStore>> {
        self.into_stores()
    }

    fn stores(&self) -> Vec<&dyn KeyValueStore> {
        ReadStateProcessor::stores(self)
    }

    fn stats(&self) -> ProcessorStats {
        ProcessorStats {
            events: ReadStateProcessor::stats(self),
            messages: self.message_stats(),
        }
    }

    fn set_cache_budget(&mut self, budget: CacheBudget) {
        self.set_cache_capacity(budget.entries, budget.positions);
    }

    fn needs_flush(&self) -> bool {
        self.dirty_len() >= self.cache_capacity() / 2
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::memory::InMemoryStore;

    /// The test implementation beside the trait: counts the records of each input into
    /// its own store (one key per input), emits nothing, and flushes every `every`
    /// records. It shows the seams: inputs routed by id, several stores each with its own
    /// changelog records, punctuation, and commit with per-store checkpoints.
    pub(crate) struct CountingProcessor {
        stores: Vec<Box<dyn KeyValueStore>>,
        counts: Vec<u64>,
        dirty: Vec<bool>,
        every: u64,
        pending: u64,
        /// When punctuation ran.
        pub(crate) punctuated: Vec<i64>,
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
                punctuated: Vec::new(),
            }
        }
    }

    impl Processor for CountingProcessor {
        fn process(
            &mut self,
            input: InputId,
            records: Records<'_, '_>,
        ) -> Result<(), ProcessorError> {
            self.counts[input.0] += records.len() as u64;
            self.dirty[input.0] = true;
            self.pending += records.len() as u64;
            Ok(())
        }

        fn punctuate(&mut self, now_ms: i64, _out: &mut FlushOutput) {
            self.punctuated.push(now_ms);
        }

        fn flush(&mut self, now_ms: i64) -> FlushOutput {
            let mut out = FlushOutput::for_stores(self.stores.len());
            for (i, dirty) in self.dirty.iter_mut().enumerate() {
                if std::mem::take(dirty) {
                    let v = self.counts[i].to_be_bytes();
                    out.stores[i].put_logged(b"count", |b| b.extend_from_slice(&v));
                }
            }
            self.pending = 0;
            self.punctuate(now_ms, &mut out);
            out
        }

        fn commit(
            &mut self,
            batches: Vec<StoreBatch>,
            checkpoints: &[Option<i64>],
        ) -> Result<(), ProcessorError> {
            for (i, b) in batches.into_iter().enumerate() {
                let checkpoint = checkpoints.get(i).copied().flatten();
                crate::state::write_flushed(&mut *self.stores[i], b, checkpoint)?;
            }
            Ok(())
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
            ProcessorStats::default()
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
}
