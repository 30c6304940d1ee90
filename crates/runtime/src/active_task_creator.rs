//! ActiveTaskCreator (Kafka Streams' `ActiveTaskCreator`): makes the running task of a
//! task whose stores are restored (its processor made by the topology's supplier over
//! them), and divides the instance's record-cache budget among the running tasks.

use super::state_updater::ReadyTask;
use super::tasks::{RunningTask, Tasks};
use super::RuntimeError;
use crate::processor::{CacheBudget, ProcessorContext, ProcessorSupplier};
use crate::task::StreamTask;

pub(super) struct ActiveTaskCreator {
    /// Makes each task's processor (init with its restored stores).
    supplier: Box<dyn ProcessorSupplier>,
    /// The instance's record-cache budget, shared equally by its running tasks.
    cache: CacheBudget,
    /// The input topics' partition count, once the topics are checked: processors check
    /// with it where producers put their records.
    partitions: Option<i32>,
}

impl ActiveTaskCreator {
    pub(super) fn new(supplier: Box<dyn ProcessorSupplier>, cache: CacheBudget) -> Self {
        Self {
            supplier,
            cache,
            partitions: None,
        }
    }

    /// The input topics' partition count (checked before the group is joined).
    pub(super) fn set_partitions(&mut self, partitions: i32) {
        self.partitions = Some(partitions);
    }

    pub(super) fn supplier(&self) -> &dyn ProcessorSupplier {
        &*self.supplier
    }

    /// The running task of `ready`, joining `running` others (its first cache share).
    pub(super) fn create(
        &self,
        ready: ReadyTask,
        running: usize,
    ) -> Result<RunningTask, RuntimeError> {
        let ctx = ProcessorContext {
            task: ready.id,
            stores: ready.stores,
            cache: self.cache.share(running + 1),
            partitions: self.partitions,
        };
        let processor = self.supplier.init(ctx)?;
        Ok(RunningTask {
            task: StreamTask::new(ready.id, processor),
            reported: Default::default(),
        })
    }

    /// `cache_max_entries` is the instance's record-cache budget (as Kafka Streams'
    /// `statestore.cache.max.bytes`): each running task gets an equal share.
    pub(super) fn share_cache(&self, tasks: &mut Tasks) {
        let share = self.cache.share(tasks.running.len());
        for t in tasks.running.values_mut() {
            t.task.processor_mut().set_cache_budget(share);
        }
    }
}
