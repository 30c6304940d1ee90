//! State manager (Kafka Streams' `ProcessorStateManager`): where a task's stores live,
//! opening them, judging their checkpoint against the changelog, and wiping them.
//!
//! A store's checkpoint (`m/changelog-offset`, written atomically with the state it
//! describes) is the next changelog offset the store reflects. It must lie within the
//! changelog partition's `[low, high]`: above the end, or below the start, the store does
//! not belong to this changelog (the topic was recreated, records were deleted, or a zombie
//! wrote past the real owner) and is wiped and restored from the start.

use std::path::PathBuf;

use crate::ids::TaskId;
use crate::state::memory::InMemoryStore;
use crate::state::rocks::{RocksDbMemory, RocksDbStore};
use crate::state::{KeyValueStore, StoreError};
use crate::topology::{Store, StoreKind};

/// Where a restore starts, or why the store must be wiped first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointCheck {
    /// Replay the changelog from this offset (the checkpoint, or the start).
    RestoreFrom(i64),
    /// The checkpoint lies outside the changelog: wipe, then restore from `low`.
    Corrupted(String),
}

/// Judge a store's checkpoint against its changelog partition's watermarks.
pub fn check_checkpoint(checkpoint: Option<i64>, low: i64, high: i64) -> CheckpointCheck {
    match checkpoint {
        None => CheckpointCheck::RestoreFrom(low),
        Some(c) if c > high => CheckpointCheck::Corrupted(format!(
            "checkpoint {c} is beyond the changelog's end {high}"
        )),
        Some(c) if c < low => CheckpointCheck::Corrupted(format!(
            "checkpoint {c} is below the changelog's start {low}"
        )),
        Some(c) => CheckpointCheck::RestoreFrom(c),
    }
}

/// The stores of one instance's tasks. A task has one store per entry of `stores`
/// (`Topology::stores()`), each in its own directory with its own changelog; a store's
/// memory budget (block cache and memtables) is shared by that store of every task.
pub struct StateManager {
    /// `<state_dir>/<application.id>`.
    root: PathBuf,
    stores: Vec<Store>,
    /// Block cache and memtable budget of each store, shared by its tasks.
    memory: Vec<RocksDbMemory>,
}

/// Make sure `dir` exists and is writable (a file is written and removed), naming the path
/// when it is not.
pub fn check_state_dir(dir: &std::path::Path) -> Result<(), super::RuntimeError> {
    let fail = |what: &str, e: std::io::Error| {
        super::RuntimeError::Config(format!(
            "state directory {} {what}: {e} (set state_dir in the topology, --state-dir or STATE_DIR)",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("cannot be created", e))?;
    let probe = dir.join(".write-check");
    std::fs::write(&probe, b"ok").map_err(|e| fail("is not writable", e))?;
    std::fs::remove_file(&probe).map_err(|e| fail("is not writable", e))?;
    Ok(())
}

impl StateManager {
    pub fn new(root: PathBuf, stores: Vec<Store>) -> Self {
        let memory = stores
            .iter()
            .map(|s| RocksDbMemory::new(&s.rocksdb))
            .collect();
        Self {
            root,
            stores,
            memory,
        }
    }

    /// RocksDB memory in use by every store of this instance.
    pub fn memory_bytes(&self) -> usize {
        self.memory.iter().map(RocksDbMemory::usage_bytes).sum()
    }

    /// The stores each task has, in their index order.
    pub fn stores(&self) -> &[Store] {
        &self.stores
    }

    /// `<state_dir>/<application.id>/<task>/<store>`.
    pub fn store_dir(&self, task: TaskId, store: usize) -> PathBuf {
        self.root
            .join(task.to_string())
            .join(self.stores[store].name.as_str())
    }

    /// Open store `store` (an index into [`Self::stores`]) of `task`.
    pub fn open(&self, task: TaskId, store: usize) -> Result<Box<dyn KeyValueStore>, StoreError> {
        let spec = &self.stores[store];
        Ok(match spec.kind {
            StoreKind::RocksDb => Box::new(RocksDbStore::open_with(
                spec.name.clone(),
                &self.store_dir(task, store),
                &spec.rocksdb,
                &self.memory[store],
            )?),
            StoreKind::Memory => Box::new(InMemoryStore::new(spec.name.clone())),
        })
    }

    /// Every store of `task`, in index order.
    pub fn open_task(&self, task: TaskId) -> Result<Vec<Box<dyn KeyValueStore>>, StoreError> {
        (0..self.stores.len()).map(|i| self.open(task, i)).collect()
    }

    /// Open the stores of `tasks` (in that order), several at a time: opening is mostly
    /// waiting on the file system.
    pub fn open_many(
        &self,
        tasks: &[TaskId],
    ) -> Vec<Result<Vec<Box<dyn KeyValueStore>>, StoreError>> {
        const OPENERS: usize = 8;
        if tasks.len() <= 1 {
            return tasks.iter().map(|t| self.open_task(*t)).collect();
        }
        let chunk = tasks.len().div_ceil(OPENERS);
        std::thread::scope(|s| {
            let handles: Vec<_> = tasks
                .chunks(chunk)
                .map(|c| s.spawn(|| c.iter().map(|t| self.open_task(*t)).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("store opener panicked"))
                .collect()
        })
    }

    /// This instance's process id, kept in `<state_dir>/<application.id>/process-id` (made
    /// once): it names the instance's transactional producer, so a restarted instance
    /// fences its earlier incarnation and aborts what that left open.
    pub fn process_id(&self) -> Result<String, StoreError> {
        let io = |source| StoreError::Io {
            store: self.stores[0].name.clone(),
            source,
        };
        let file = self.root.join("process-id");
        if let Ok(id) = std::fs::read_to_string(&file) {
            if !id.trim().is_empty() {
                return Ok(id.trim().to_owned());
            }
        }
        std::fs::create_dir_all(&self.root).map_err(io)?;
        let id = format!("{:032x}", rand::random::<u128>());
        let tmp = self.root.join("process-id.tmp");
        std::fs::write(&tmp, &id).map_err(io)?;
        std::fs::rename(&tmp, &file).map_err(io)?;
        Ok(id)
    }

    /// Delete every store of a task (they must be closed): the next open starts empty,
    /// and the restores replay the whole changelogs.
    pub fn wipe(&self, task: TaskId) -> Result<(), StoreError> {
        (0..self.stores.len()).try_for_each(|i| self.wipe_store(task, i))
    }

    /// Delete one store of a task (it must be closed).
    pub fn wipe_store(&self, task: TaskId, store: usize) -> Result<(), StoreError> {
        let dir = self.store_dir(task, store);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                store: self.stores[store].name.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{put_checkpoint, read_checkpoint, StoreBatch};

    #[test]
    fn checkpoints_outside_the_changelog_are_corrupted() {
        assert_eq!(
            check_checkpoint(None, 3, 10),
            CheckpointCheck::RestoreFrom(3)
        );
        assert_eq!(
            check_checkpoint(Some(7), 3, 10),
            CheckpointCheck::RestoreFrom(7)
        );
        assert_eq!(
            check_checkpoint(Some(10), 3, 10),
            CheckpointCheck::RestoreFrom(10)
        );
        assert!(
            matches!(check_checkpoint(Some(11), 0, 10), CheckpointCheck::Corrupted(m) if m.contains("beyond"))
        );
        assert!(
            matches!(check_checkpoint(Some(2), 3, 10), CheckpointCheck::Corrupted(m) if m.contains("below"))
        );
    }

    #[test]
    fn wiping_a_store_leaves_it_empty_on_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::topology::compile(include_str!(
            "../../../topologies/read_state_with_unread.toml"
        ))
        .unwrap();
        let specs: Vec<Store> = t.stores().into_iter().cloned().collect();
        let sm = StateManager::new(dir.path().join("app"), specs);
        let id = TaskId::new(0, 3);
        for (store, checkpoint) in [(0, 42), (1, 7)] {
            let mut s = sm.open(id, store).unwrap();
            let mut b = StoreBatch::default();
            put_checkpoint(&mut b, checkpoint);
            s.write(b).unwrap();
            assert_eq!(read_checkpoint(&*s).unwrap(), Some(checkpoint));
        }
        assert_ne!(sm.store_dir(id, 0), sm.store_dir(id, 1), "a directory each");
        let pid = sm.process_id().unwrap();
        assert_eq!(sm.process_id().unwrap(), pid, "kept");
        assert_eq!(pid.len(), 32);
        sm.wipe_store(id, 1).unwrap();
        let stores = sm.open_task(id).unwrap();
        let checkpoints: Vec<_> = stores
            .iter()
            .map(|s| read_checkpoint(&**s).unwrap())
            .collect();
        assert_eq!(
            checkpoints,
            [Some(42), None],
            "only the wiped store is empty"
        );
        drop(stores);
        sm.wipe(id).unwrap();
        sm.wipe(id).unwrap(); // idempotent
        let stores = sm.open_task(id).unwrap();
        assert!(stores
            .iter()
            .all(|s| read_checkpoint(&**s).unwrap().is_none()));
    }
}
