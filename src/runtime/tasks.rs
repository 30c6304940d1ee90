//! The running tasks of one instance by partition (Kafka Streams' `Tasks`), and the source
//! partitions it forwards to a repartition topic (sub-topology 0). The task manager adds
//! and removes tasks; the task executor processes and commits them.

use std::collections::{BTreeMap, BTreeSet};

use super::offsets::TopicPartition;
use super::RuntimeError;
use crate::task::StreamTask;

pub(super) struct RunningTask {
    pub(super) task: StreamTask,
    /// The processor's counters already turned into metrics (by position).
    pub(super) reported: Vec<u64>,
}

/// Sub-topology 0 of a repartitioned topology: source partitions whose records are
/// re-keyed and forwarded to the repartition topic.
pub(super) struct Forwarding {
    pub(super) source_topic: String,
    pub(super) repartition_topic: String,
    /// Assigned partitions of the source topic.
    pub(super) partitions: BTreeSet<i32>,
}

pub(super) struct Tasks {
    /// The topic the stateful tasks consume (the source, or its repartition topic).
    task_topic: String,
    /// The topic co-partitioned with `task_topic`: task p reads partition p of both.
    message_topic: Option<String>,
    pub(super) running: BTreeMap<i32, RunningTask>,
    pub(super) forwarding: Option<Forwarding>,
}

impl Tasks {
    pub(super) fn new(
        task_topic: String,
        message_topic: Option<String>,
        forwarding: Option<Forwarding>,
    ) -> Self {
        Self {
            task_topic,
            message_topic,
            running: BTreeMap::new(),
            forwarding,
        }
    }

    pub(super) fn task_topic(&self) -> &str {
        &self.task_topic
    }

    pub(super) fn message_topic(&self) -> Option<&str> {
        self.message_topic.as_deref()
    }

    /// With a message source, both topics' partitions must come together (the range
    /// assignor guarantees it when every member subscribes to both with equal counts).
    pub(super) fn check_co_partitioned(
        &self,
        parts: &[TopicPartition],
    ) -> Result<(), RuntimeError> {
        let Some(mt) = self.message_topic() else {
            return Ok(());
        };
        let of = |topic: &str| -> BTreeSet<i32> {
            parts
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, p)| *p)
                .collect()
        };
        let task_topic = self.task_topic();
        let (reads, messages) = (of(task_topic), of(mt));
        if reads == messages {
            return Ok(());
        }
        Err(RuntimeError::Fatal(format!(
            "co-partitioning broken: this instance was assigned partitions {reads:?} of {task_topic} but {messages:?} of {mt}; every instance of the group must run the same topology (both topics subscribed, range assignment) and both topics must have the same partition count"
        )))
    }

    /// The co-partitioned message topic's partition joining task partition `p`.
    pub(super) fn message_partition(&self, p: i32) -> Option<TopicPartition> {
        self.message_topic.as_ref().map(|t| (t.clone(), p))
    }

    /// A record of a task's topic (the read events' or the co-partitioned messages').
    pub(super) fn is_task_topic(&self, topic: &str) -> bool {
        topic == self.task_topic || self.message_topic.as_deref() == Some(topic)
    }

    /// Whether this instance processes `tp` now (a running task's or a forwarded one).
    pub(super) fn owns(&self, topic: &str, partition: i32) -> bool {
        if self.is_task_topic(topic) {
            return self.running.contains_key(&partition);
        }
        self.forwarding
            .as_ref()
            .is_some_and(|f| topic == f.source_topic && f.partitions.contains(&partition))
    }

    /// Every topic-partition this instance processes: running tasks and forwarders.
    pub(super) fn owned(&self) -> Vec<TopicPartition> {
        let mut v: Vec<TopicPartition> = self
            .running
            .keys()
            .map(|p| (self.task_topic.clone(), *p))
            .collect();
        let messages: Vec<TopicPartition> = self
            .running
            .keys()
            .filter_map(|p| self.message_partition(*p))
            .collect();
        v.extend(messages);
        if let Some(f) = &self.forwarding {
            v.extend(f.partitions.iter().map(|p| (f.source_topic.clone(), *p)));
        }
        v
    }

    /// Nothing running and nothing forwarded.
    pub(super) fn is_idle(&self) -> bool {
        self.running.is_empty()
            && self
                .forwarding
                .as_ref()
                .is_none_or(|f| f.partitions.is_empty())
    }

    /// True when some task's cache holds so many dirty keys that it should flush now.
    pub(super) fn needs_flush(&self) -> bool {
        self.running
            .values()
            .any(|t| t.task.processor().needs_flush())
    }

    /// Take a forwarded source partition on.
    pub(super) fn forward(&mut self, topic: &str, partition: i32) {
        if let Some(f) = &mut self.forwarding {
            if topic == f.source_topic {
                f.partitions.insert(partition);
            }
        }
    }

    /// Close a revoked partition: its task (when running), or its forwarding. True when a
    /// task was closed.
    pub(super) fn close(&mut self, tp: &TopicPartition) -> bool {
        if tp.0 == self.task_topic {
            return self.running.remove(&tp.1).is_some();
        }
        if let Some(f) = &mut self.forwarding {
            f.partitions.remove(&tp.1);
        }
        false
    }

    /// Drop every task and forwarding (lost, or closed at shutdown); their partitions.
    pub(super) fn clear(&mut self) -> Vec<i32> {
        if let Some(f) = &mut self.forwarding {
            f.partitions.clear();
        }
        let running = std::mem::take(&mut self.running);
        running.into_keys().collect()
    }
}
