//! The state updater (Kafka Streams' `DefaultStateUpdater`, run between polls): the tasks
//! of this instance that are assigned but not running yet. Their stores are opened, each
//! store's checkpoint judged against its changelog (a checkpoint outside `[low, high]` is
//! *corrupted*: wipe, restore from the start), each restore registered with the
//! [`ChangelogReader`] and advanced by bounded steps; a task whose every store is restored
//! is handed back, ready to run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::changelog_reader::{ChangelogReader, Restored};
use super::state_manager::{check_checkpoint, CheckpointCheck, StateManager};
use super::RuntimeError;
use crate::ids::TaskId;
use crate::processor::ProcessorSupplier;
use crate::state::{read_checkpoint, KeyValueStore, StoreReader};

/// A task whose stores are all restored: ready to start.
pub(super) struct ReadyTask {
    pub(super) id: TaskId,
    /// Indexed as the task's stores.
    pub(super) stores: Vec<Box<dyn KeyValueStore>>,
    /// Changelog records restored.
    pub(super) records: u64,
}

pub(super) struct StateUpdater {
    state: StateManager,
    reader: Option<ChangelogReader>,
    /// Sub-topology number of the stateful tasks.
    subtopology: u32,
    /// Partitions assigned but not yet opened.
    to_open: Vec<i32>,
    /// Stores restored of tasks whose other stores are still restoring, by partition
    /// (indexed as the task's stores).
    restored: BTreeMap<i32, Vec<Option<Restored>>>,
    /// Stores wiped because their checkpoint lay outside their changelog.
    pub(super) corrupted: u64,
    /// Readers of the stores of tasks not ready yet, by partition (indexed as the task's
    /// stores): stale reads while they restore.
    opened: BTreeMap<i32, Vec<Option<Arc<dyn StoreReader>>>>,
}

impl StateUpdater {
    pub(super) fn new(
        state: StateManager,
        reader: Option<ChangelogReader>,
        subtopology: u32,
    ) -> Self {
        Self {
            state,
            reader,
            subtopology,
            to_open: Vec::new(),
            restored: BTreeMap::new(),
            corrupted: 0,
            opened: BTreeMap::new(),
        }
    }

    pub(super) fn state(&self) -> &StateManager {
        &self.state
    }

    pub(super) fn task_id(&self, partition: i32) -> TaskId {
        TaskId::new(self.subtopology, partition)
    }

    /// Partition `p`'s task is queued, opening or restoring.
    pub(super) fn has(&self, p: i32) -> bool {
        self.to_open.contains(&p)
            || self.restored.contains_key(&p)
            || self
                .reader
                .as_ref()
                .is_some_and(|r| r.tasks().iter().any(|t| t.partition == p))
    }

    /// Some assigned task is not ready yet.
    pub(super) fn is_busy(&self) -> bool {
        !self.to_open.is_empty() || self.reader.as_ref().is_some_and(|r| r.is_restoring())
    }

    /// The ids of the tasks not ready yet (their series are still live).
    pub(super) fn task_ids(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = self.to_open.iter().map(|p| self.task_id(*p)).collect();
        if let Some(r) = &self.reader {
            ids.extend(r.tasks());
        }
        ids
    }

    /// Queue partition `p`'s task for opening.
    pub(super) fn queue(&mut self, p: i32) {
        self.to_open.push(p);
    }

    /// Open the stores of the queued tasks and register their restores; tasks with
    /// nothing to restore are ready at once.
    pub(super) fn open_queued(
        &mut self,
        supplier: &dyn ProcessorSupplier,
    ) -> Result<Vec<ReadyTask>, RuntimeError> {
        let parts: Vec<i32> = std::mem::take(&mut self.to_open);
        let mut ready = Vec::new();
        if parts.is_empty() {
            return Ok(ready);
        }
        let ids: Vec<TaskId> = parts.iter().map(|p| self.task_id(*p)).collect();
        let started = Instant::now();
        let stores = self.state.open_many(&ids);
        tracing::debug!(tasks = ids.len(), opened = ?started.elapsed(), startup_ms = crate::telemetry::since_start_ms(), "stores opened");
        for (id, stores) in ids.into_iter().zip(stores) {
            for (index, store) in stores?.into_iter().enumerate() {
                if let Some(done) = self.register(supplier, id, index, store)? {
                    ready.extend(self.store_restored(done));
                }
            }
        }
        tracing::debug!(
            startup_ms = crate::telemetry::since_start_ms(),
            "checkpoints checked against the changelogs"
        );
        Ok(ready)
    }

    /// Judge a store's checkpoint and start its restore; a store with nothing to restore
    /// is returned at once.
    fn register(
        &mut self,
        supplier: &dyn ProcessorSupplier,
        id: TaskId,
        index: usize,
        store: Box<dyn KeyValueStore>,
    ) -> Result<Option<Restored>, RuntimeError> {
        self.note_opened(id.partition, index, &*store);
        let Some(reader) = self.reader.as_mut().filter(|r| r.has_changelog(index)) else {
            return Ok(Some(Restored {
                task: id,
                index,
                store,
                records: 0,
                elapsed: Duration::ZERO,
            }));
        };
        let (low, high) = reader.watermarks(index, id.partition)?;
        let (store, from) = match check_checkpoint(read_checkpoint(&*store)?, low, high) {
            CheckpointCheck::RestoreFrom(from) => (store, from),
            CheckpointCheck::Corrupted(why) => {
                tracing::warn!(task = %id, store = %store.name(), reason = %why, "store does not match its changelog: wiping it and restoring from the start");
                metrics::counter!("readstate_tasks_corrupted_total").increment(1);
                self.corrupted += 1;
                drop(store);
                self.state.wipe_store(id, index)?;
                let store = self.state.open(id, index)?;
                self.note_opened(id.partition, index, &*store);
                (store, low)
            }
        };
        let restorer = supplier.restorer(index, &*store)?;
        let reader = self.reader.as_mut().expect("checked above");
        reader.register(id, index, store, restorer, from, high)
    }

    fn note_opened(&mut self, p: i32, index: usize, store: &dyn KeyValueStore) {
        let n = self.state.stores().len();
        let slots = (self.opened.entry(p)).or_insert_with(|| vec![None; n]);
        slots[index] = Some(store.reader());
    }

    /// The readers of task `p`'s stores while it restores (every store opened).
    pub(super) fn restoring_readers(&self, p: i32) -> Option<Vec<Arc<dyn StoreReader>>> {
        self.opened.get(&p)?.iter().cloned().collect()
    }

    /// Apply one step of every running restore; the tasks that became ready.
    pub(super) fn step(&mut self) -> Result<Vec<ReadyTask>, RuntimeError> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(Vec::new());
        };
        if !reader.is_restoring() {
            return Ok(Vec::new());
        }
        let mut ready = Vec::new();
        for done in reader.step()? {
            ready.extend(self.store_restored(done));
        }
        Ok(ready)
    }

    /// One store of a task is restored: the task is ready once all of its stores are.
    fn store_restored(&mut self, done: Restored) -> Option<ReadyTask> {
        let n = self.state.stores().len();
        let p = done.task.partition;
        let slots = self
            .restored
            .entry(p)
            .or_insert_with(|| (0..n).map(|_| None).collect());
        let index = done.index;
        slots[index] = Some(done);
        if slots.iter().any(Option::is_none) {
            return None;
        }
        let done: Vec<Restored> = self.restored.remove(&p)?.into_iter().flatten().collect();
        self.opened.remove(&p);
        let id = done[0].task;
        let records = done.iter().map(|r| r.records).sum();
        let elapsed = done.iter().map(|r| r.elapsed).max().unwrap_or_default();
        if self.reader.is_some() {
            tracing::info!(task = %id, records, ?elapsed, "task restored");
        }
        Some(ReadyTask {
            id,
            stores: done.into_iter().map(|r| r.store).collect(),
            records,
        })
    }

    /// Partition `p` was revoked before its task was ready.
    pub(super) fn revoke(&mut self, p: i32) {
        self.to_open.retain(|q| *q != p);
        self.restored.remove(&p);
        self.opened.remove(&p);
        if let Some(r) = self.reader.as_mut() {
            r.remove(p);
        }
    }

    /// Every task not ready yet is lost (with `running`, the partitions of the running
    /// ones). With `wipe`, their stores are wiped so that whoever owns them next restores
    /// them from the changelog; else they are closed as they are (they hold only committed
    /// data and its checkpoint). The lost tasks, and the first wipe that failed.
    pub(super) fn lose_all(
        &mut self,
        running: Vec<i32>,
        wipe: bool,
    ) -> (Vec<TaskId>, Option<String>) {
        let mut lost: Vec<TaskId> = running.into_iter().map(|p| self.task_id(p)).collect();
        let restoring: Vec<i32> = self
            .reader
            .as_ref()
            .map(|r| r.tasks().iter().map(|t| t.partition).collect())
            .unwrap_or_default();
        for p in restoring {
            if let Some(t) = self.reader.as_mut().and_then(|r| r.remove(p)) {
                lost.push(t);
            }
        }
        // Stores restored while another store of their task still restored.
        for p in std::mem::take(&mut self.restored).into_keys() {
            let id = self.task_id(p);
            if !lost.contains(&id) {
                lost.push(id);
            }
        }
        let mut failed = None;
        for id in lost.iter().filter(|_| wipe) {
            if let Err(e) = self.state.wipe(*id) {
                failed.get_or_insert(format!(
                    "task {id} was lost and its store cannot be wiped: {e}"
                ));
            }
        }
        self.to_open.clear();
        self.opened.clear();
        (lost, failed)
    }

    /// Nothing more will be opened (shutdown).
    pub(super) fn clear(&mut self) {
        self.to_open.clear();
        self.opened.clear();
    }
}
