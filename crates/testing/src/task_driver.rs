//! A driver for any processor node, through the byte-level seam the runtime drives: pipe
//! raw records into one task, advance the wall clock (a commit every commit interval: the
//! runtime's commit protocol, [`commit::commit`], on an in-memory log: the processor's
//! flush with its due punctuations, outputs "acknowledged", each store's changelog records
//! appended to an in-memory changelog whose next offset is the store's checkpoint, then the
//! store batches written), read the outputs by sink, inspect stores and changelogs, and
//! crash the task: its stores are lost and restored from their changelogs through the
//! supplier's own restorers, as a new owner would.

use std::time::Duration;

use readstate::ids::{Origin, StoreName, TaskId};
use readstate::processor::{CacheBudget, InputId, ProcessorContext, ProcessorSupplier, SinkId};
use readstate::state::memory::InMemoryStore;
use readstate::state::{read_checkpoint, KeyValueStore};
use readstate::task::commit::{self, MemoryLog};
use readstate::task::{DeadLetter, SourceRecord, StreamTask};
use readstate::topology::ProcessingGuarantee;

use crate::topology_driver::START_MS;

/// One output record: its sink, key and value.
pub type Output = (SinkId, Vec<u8>, Vec<u8>);

pub use readstate::task::commit::ChangelogRecord;

pub struct TaskDriver {
    supplier: Box<dyn ProcessorSupplier>,
    stores: Vec<StoreName>,
    task: StreamTask,
    /// Outputs, dead letters and changelogs as the commits wrote them.
    log: MemoryLog,
    /// Every dead letter of processing (those of commits so far also in `log`).
    dead_letters: Vec<DeadLetter>,
    now_ms: i64,
    last_commit_ms: i64,
    commit_interval: Duration,
    /// Next offset per input.
    offsets: Vec<i64>,
}

impl TaskDriver {
    /// A task of `supplier` over in-memory stores named `stores` (the task's store order),
    /// committing every `commit_interval` of wall-clock time.
    pub fn new(
        supplier: Box<dyn ProcessorSupplier>,
        stores: &[&str],
        commit_interval: Duration,
    ) -> Self {
        let stores: Vec<StoreName> = stores.iter().map(|s| StoreName::from(*s)).collect();
        let fresh = Self::fresh_stores(&stores);
        let task = Self::init(&*supplier, fresh);
        Self {
            supplier,
            stores,
            task,
            log: MemoryLog::default(),
            dead_letters: Vec::new(),
            now_ms: START_MS,
            last_commit_ms: START_MS,
            commit_interval,
            offsets: Vec::new(),
        }
    }

    fn fresh_stores(names: &[StoreName]) -> Vec<Box<dyn KeyValueStore>> {
        names
            .iter()
            .map(|n| Box::new(InMemoryStore::new(n.clone())) as Box<dyn KeyValueStore>)
            .collect()
    }

    fn init(supplier: &dyn ProcessorSupplier, stores: Vec<Box<dyn KeyValueStore>>) -> StreamTask {
        let id = TaskId::new(0, 0);
        let ctx = ProcessorContext {
            task: id,
            stores,
            cache: CacheBudget {
                entries: 100_000,
                positions: 100_000,
            },
            partitions: None,
        };
        StreamTask::new(id, supplier.init(ctx).expect("init the processor"))
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Pipe one record into input `input` (its topic named `topic`).
    pub fn pipe(
        &mut self,
        input: InputId,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        timestamp: i64,
    ) {
        if self.offsets.len() <= input.0 {
            self.offsets.resize(input.0 + 1, 0);
        }
        let offset = self.offsets[input.0];
        self.offsets[input.0] += 1;
        let rec = SourceRecord {
            topic,
            partition: 0,
            offset,
            key,
            value,
            origin: Origin {
                source: Origin::source_id(topic, 0),
                offset,
            },
            timestamp: Some(timestamp),
        };
        self.task
            .process(input, &[rec], &mut self.dead_letters)
            .expect("process");
    }

    /// Advance the wall clock; commits when a commit interval has passed.
    pub fn advance_wall_clock(&mut self, by: Duration) {
        self.now_ms += by.as_millis() as i64;
        if self.now_ms - self.last_commit_ms >= self.commit_interval.as_millis() as i64 {
            self.commit();
        }
    }

    /// The commit protocol now (at-least-once): flush (due wall-clock punctuations
    /// included), outputs, changelogs, then each store's batch with its checkpoint.
    pub fn commit(&mut self) {
        let unsent = &self.dead_letters[self.log.dead_letters().len()..];
        let guarantee = ProcessingGuarantee::AtLeastOnce;
        let mut tasks = [(0, &mut self.task)];
        commit::commit(&mut self.log, guarantee, &mut tasks, unsent, self.now_ms)
            .expect("the in-memory log commits");
        self.last_commit_ms = self.now_ms;
    }

    /// The process dies: what was not committed is gone, and so are the stores (a new
    /// owner); each store is restored from its changelog by the supplier's restorer, then
    /// the processor is initialised again.
    pub fn crash_and_restore(&mut self) {
        let stores = Self::fresh_stores(&self.stores);
        let mut restored = Vec::with_capacity(stores.len());
        for (i, mut store) in stores.into_iter().enumerate() {
            let mut restorer = self.supplier.restorer(i, &*store).expect("a restorer");
            let log = self.log.changelog(i, 0);
            let mut records = log.iter().map(|(k, v)| (&k[..], v.as_deref()));
            restorer
                .restore(&mut *store, &mut records, log.len() as i64)
                .expect("restore");
            restored.push(store);
        }
        let old = std::mem::replace(&mut self.task, Self::init(&*self.supplier, restored));
        drop(old);
    }

    /// Take the outputs of the commits so far.
    pub fn read_outputs(&mut self) -> Vec<Output> {
        let sent = self.log.take_outputs().into_iter();
        sent.map(|(_, sink, k, v)| (sink, k, v)).collect()
    }

    pub fn dead_letters(&self) -> &[DeadLetter] {
        &self.dead_letters
    }

    /// Store `index` of the task, as committed.
    pub fn store(&self, index: usize) -> &dyn KeyValueStore {
        self.task.processor().stores()[index]
    }

    /// The checkpoint of store `index` (its changelog's next offset).
    pub fn checkpoint(&self, index: usize) -> Option<i64> {
        read_checkpoint(self.store(index)).expect("read the checkpoint")
    }

    /// Store `index`'s changelog so far.
    pub fn changelog(&self, index: usize) -> &[ChangelogRecord] {
        self.log.changelog(index, 0)
    }
}
