//! Readiness (`/ready`) as the task lifecycle sees it: an assignment held, every assigned
//! task restored, and not every running task waiting for the schema registry.

use std::sync::Arc;

use crate::telemetry::{Health, NotReady};

pub(super) struct Readiness {
    health: Arc<Health>,
    /// The group has assigned partitions (even none) since the tasks were last lost.
    has_assignment: bool,
}

/// What the lifecycle knows of its tasks now.
pub(super) struct TaskStates {
    pub(super) restoring: bool,
    pub(super) all_wait_for_registry: bool,
}

impl Readiness {
    pub(super) fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            has_assignment: false,
        }
    }

    /// The group assigned partitions (or the lost ones were queued again).
    pub(super) fn assigned(&mut self) {
        self.has_assignment = true;
    }

    /// Every task was lost: nothing runs until the group assigns partitions again.
    pub(super) fn unassigned(&mut self) {
        self.has_assignment = false;
    }

    #[cfg(test)]
    pub(super) fn is_ready(&self) -> bool {
        self.health.is_ready()
    }

    /// A task was queued for restoring.
    pub(super) fn restoring(&self) {
        self.health.set_not_ready(NotReady::Restoring);
    }

    /// Ready once the group has given us an assignment (even an empty one; none since
    /// every task was lost is no assignment), every assigned task has restored, and not
    /// every running task waits for the schema registry.
    pub(super) fn update(&self, tasks: TaskStates) {
        let why = if !self.has_assignment {
            Some(NotReady::NoAssignment)
        } else if tasks.restoring {
            Some(NotReady::Restoring)
        } else if tasks.all_wait_for_registry {
            Some(NotReady::SchemaRegistry)
        } else {
            None
        };
        match why {
            Some(why) => self.health.set_not_ready(why),
            None => self.health.set_ready(true),
        }
    }
}
