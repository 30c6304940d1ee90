//! The stores an instance answers queries from (Kafka Streams' `QueryableStoreProvider`,
//! with IQv2's `Position`): per task (by partition) its stores' readers, whether it is
//! restoring or running, and its position, the last offset of each input partition its
//! stores reflect. The runtime publishes here; queries (`crate::query`) read. It knows no
//! domain type.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, RwLock};

use super::StoreReader;

/// Per input topic partition of a task: the offset of the last record its stores reflect.
pub type Position = BTreeMap<(String, i32), i64>;

/// Where a task of this instance is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    /// Its stores are being restored from their changelogs (behind the inputs).
    Restoring,
    /// Restored, processing: its stores reflect at least its position.
    Running,
}

/// A task's stores as queries see them.
#[derive(Clone)]
pub struct TaskView {
    pub status: TaskStatus,
    /// Indexed as the task's stores.
    pub stores: Vec<Arc<dyn StoreReader>>,
    /// Empty while restoring, and until the task's first commit.
    pub position: Position,
}

/// The instance's queryable tasks. Every change wakes the queries waiting for a position.
pub struct QueryableStores {
    tasks: RwLock<BTreeMap<i32, TaskView>>,
    /// The task topic's partition count (0 until the runtime checked the topics).
    partitions: AtomicI32,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for QueryableStores {
    fn default() -> Self {
        Self {
            tasks: RwLock::default(),
            partitions: AtomicI32::new(0),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl std::fmt::Debug for QueryableStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryableStores")
            .field("tasks", &self.read().keys().collect::<Vec<_>>())
            .field("partitions", &self.partitions())
            .finish()
    }
}

impl QueryableStores {
    /// The task of `partition`, when this instance has it.
    pub fn task(&self, partition: i32) -> Option<TaskView> {
        self.read().get(&partition).cloned()
    }

    /// The partitions whose tasks this instance has.
    pub fn owned(&self) -> Vec<i32> {
        self.read().keys().copied().collect()
    }

    /// The task topic's partition count, once known.
    pub fn partitions(&self) -> Option<i32> {
        Some(self.partitions.load(Ordering::Acquire)).filter(|n| *n > 0)
    }

    /// Notified of every change (a wait for a position re-checks on each).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn set_partitions(&self, partitions: i32) {
        self.partitions.store(partitions, Ordering::Release);
    }

    /// Task `partition` restores its stores (`stores`, once opened; none before).
    pub fn restoring(&self, partition: i32, stores: Vec<Arc<dyn StoreReader>>) {
        self.update(|t| {
            let view = TaskView {
                status: TaskStatus::Restoring,
                stores,
                position: Position::new(),
            };
            t.insert(partition, view);
        });
    }

    /// The partitions whose tasks restore.
    pub fn restoring_partitions(&self) -> Vec<i32> {
        (self.read().iter())
            .filter(|(_, t)| t.status == TaskStatus::Restoring)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Task `partition` runs over `stores`, which reflect at least `position`.
    pub fn running(&self, partition: i32, stores: Vec<Arc<dyn StoreReader>>, position: Position) {
        self.update(|t| {
            let view = TaskView {
                status: TaskStatus::Running,
                stores,
                position,
            };
            t.insert(partition, view);
        });
    }

    /// Keep only the tasks `keep` says this instance still has.
    pub fn retain(&self, keep: impl Fn(i32) -> bool) {
        self.update(|t| t.retain(|p, _| keep(*p)));
    }

    /// A commit made the stores of the tasks reflect `committed` (next offsets to read, by
    /// topic and partition; only task inputs): their positions move to the offset before.
    pub fn committed(&self, committed: &[((String, i32), i64)]) {
        if committed.is_empty() {
            return;
        }
        self.update(|tasks| {
            for ((topic, p), next) in committed {
                if let Some(t) = tasks.get_mut(p) {
                    let at = t.position.entry((topic.clone(), *p)).or_insert(-1);
                    *at = (*at).max(next - 1);
                }
            }
        });
    }

    fn update(&self, f: impl FnOnce(&mut BTreeMap<i32, TaskView>)) {
        f(&mut self.tasks.write().unwrap_or_else(|e| e.into_inner()));
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i32, TaskView>> {
        self.tasks.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::memory::InMemoryStore;
    use crate::state::KeyValueStore;

    #[test]
    fn tasks_restore_run_advance_and_go() {
        let q = QueryableStores::default();
        let mut rx = q.subscribe();
        q.restoring(3, Vec::new());
        assert_eq!(q.task(3).unwrap().status, TaskStatus::Restoring);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        let store = InMemoryStore::new("s".into());
        q.running(3, vec![store.reader()], Position::new());
        q.committed(&[(("in".into(), 3), 10), (("in".into(), 4), 7)]);
        let t = q.task(3).unwrap();
        assert_eq!(t.status, TaskStatus::Running);
        assert_eq!(
            t.position[&("in".to_owned(), 3)],
            9,
            "the last offset reflected"
        );
        assert!(q.task(4).is_none(), "no task, no position");
        q.committed(&[(("in".into(), 3), 5)]);
        assert_eq!(
            q.task(3).unwrap().position[&("in".to_owned(), 3)],
            9,
            "never back"
        );
        assert!(rx.has_changed().unwrap());
        q.retain(|p| p != 3);
        assert!(q.owned().is_empty());
    }
}
