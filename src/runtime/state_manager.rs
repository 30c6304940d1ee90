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

/// The stores of one instance's tasks.
pub struct StateManager {
    /// `<state_dir>/<application.id>`.
    root: PathBuf,
    store: Store,
    /// Block cache and memtable budget shared by every store of this instance.
    memory: RocksDbMemory,
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
    pub fn new(root: PathBuf, store: Store) -> Self {
        let memory = RocksDbMemory::new(&store.rocksdb);
        Self {
            root,
            store,
            memory,
        }
    }

    pub fn memory(&self) -> &RocksDbMemory {
        &self.memory
    }

    /// `<state_dir>/<application.id>/<task>/<store>`.
    pub fn store_dir(&self, task: TaskId) -> PathBuf {
        self.root
            .join(task.to_string())
            .join(self.store.name.as_str())
    }

    pub fn open(&self, task: TaskId) -> Result<Box<dyn KeyValueStore>, StoreError> {
        Ok(match self.store.kind {
            StoreKind::RocksDb => Box::new(RocksDbStore::open_with(
                self.store.name.clone(),
                &self.store_dir(task),
                &self.store.rocksdb,
                &self.memory,
            )?),
            StoreKind::Memory => Box::new(InMemoryStore::new(self.store.name.clone())),
        })
    }

    /// Open the stores of `tasks` (in that order), several at a time: opening is mostly
    /// waiting on the file system.
    pub fn open_many(&self, tasks: &[TaskId]) -> Vec<Result<Box<dyn KeyValueStore>, StoreError>> {
        const OPENERS: usize = 8;
        if tasks.len() <= 1 {
            return tasks.iter().map(|t| self.open(*t)).collect();
        }
        let chunk = tasks.len().div_ceil(OPENERS);
        std::thread::scope(|s| {
            let handles: Vec<_> = tasks
                .chunks(chunk)
                .map(|c| s.spawn(|| c.iter().map(|t| self.open(*t)).collect::<Vec<_>>()))
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
            store: self.store.name.clone(),
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

    /// Delete a task's store (it must be closed): the next open starts empty, and the
    /// restore replays the whole changelog.
    pub fn wipe(&self, task: TaskId) -> Result<(), StoreError> {
        let dir = self.store_dir(task);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                store: self.store.name.clone(),
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
        let spec = crate::topology::compile(include_str!("../../topologies/read_receipts.toml"))
            .unwrap()
            .store;
        let sm = StateManager::new(dir.path().join("app"), spec);
        let id = TaskId::new(0, 3);
        {
            let mut s = sm.open(id).unwrap();
            let mut b = StoreBatch::default();
            put_checkpoint(&mut b, 42);
            s.write(b).unwrap();
            assert_eq!(read_checkpoint(&*s).unwrap(), Some(42));
        }
        assert!(sm.store_dir(id).exists());
        let pid = sm.process_id().unwrap();
        assert_eq!(sm.process_id().unwrap(), pid, "kept");
        assert_eq!(pid.len(), 32);
        sm.wipe(id).unwrap();
        sm.wipe(id).unwrap(); // idempotent
        let s = sm.open(id).unwrap();
        assert_eq!(read_checkpoint(&*s).unwrap(), None);
    }
}
