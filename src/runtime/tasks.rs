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
    /// Halves of co-partitioned pairs held without their other half (KIP-848's
    /// incremental assignment may give one before the other): parked until it comes.
    lone: BTreeSet<TopicPartition>,
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
            lone: BTreeSet::new(),
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

    /// The other half of a co-partitioned pair (None without a message source, or for a
    /// forwarded source partition).
    fn partner(&self, tp: &TopicPartition) -> Option<TopicPartition> {
        let mt = self.message_topic.as_ref()?;
        if tp.0 == self.task_topic {
            Some((mt.clone(), tp.1))
        } else if tp.0 == *mt {
            Some((self.task_topic.clone(), tp.1))
        } else {
            None
        }
    }

    /// Pair newly assigned partitions: the partitions to take on (forwarded ones, and the
    /// task partitions whose pair is now complete), and the halves still alone (to park
    /// until their other half comes).
    pub(super) fn pair(
        &mut self,
        parts: &[TopicPartition],
    ) -> (Vec<TopicPartition>, Vec<TopicPartition>) {
        let (mut take, mut lone) = (Vec::new(), Vec::new());
        for tp in parts {
            let Some(other) = self.partner(tp) else {
                take.push(tp.clone());
                continue;
            };
            let task = if tp.0 == self.task_topic { tp } else { &other };
            if self.lone.remove(&other) {
                take.push(task.clone());
            } else if parts.contains(&other) {
                // Both halves in this assignment: taken once, at the task topic's.
                if task == tp {
                    take.push(tp.clone());
                }
            } else if self.lone.insert(tp.clone()) {
                lone.push(tp.clone());
            }
        }
        (take, lone)
    }

    /// Partitions revoked: the task partitions touched (either half revoked), and the
    /// other halves still assigned, now alone (to park until their pair comes back).
    pub(super) fn unpair(&mut self, parts: &[TopicPartition]) -> (Vec<i32>, Vec<TopicPartition>) {
        let (mut touched, mut alone) = (Vec::new(), Vec::new());
        for tp in parts {
            if self.lone.remove(tp) {
                continue;
            }
            let Some(other) = self.partner(tp) else {
                continue;
            };
            touched.push(tp.1);
            if !parts.contains(&other) && self.lone.insert(other.clone()) {
                alone.push(other);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        (touched, alone)
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
        self.lone.clear();
        if let Some(f) = &mut self.forwarding {
            f.partitions.clear();
        }
        let running = std::mem::take(&mut self.running);
        running.into_keys().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(t: &str, p: i32) -> TopicPartition {
        (t.to_owned(), p)
    }

    /// KIP-848's incremental assignment: a task starts once both halves of its pair are
    /// held; a revoked half closes the task and leaves the other alone.
    #[test]
    fn pairs_complete_across_assignments_and_split_on_revoke() {
        let mut t = Tasks::new("reads".into(), Some("msgs".into()), None);
        let (take, lone) = t.pair(&[tp("reads", 0), tp("msgs", 0), tp("reads", 1)]);
        assert_eq!((take, lone), (vec![tp("reads", 0)], vec![tp("reads", 1)]));
        let (take, lone) = t.pair(&[tp("msgs", 1), tp("msgs", 2)]);
        assert_eq!((take, lone), (vec![tp("reads", 1)], vec![tp("msgs", 2)]));
        let (touched, alone) = t.unpair(&[tp("msgs", 0), tp("msgs", 2)]);
        assert_eq!((touched, alone), (vec![0], vec![tp("reads", 0)]));
        let (take, lone) = t.pair(&[tp("msgs", 0)]);
        assert_eq!((take, lone), (vec![tp("reads", 0)], vec![]));
        let mut plain = Tasks::new("reads".into(), None, None);
        let parts = [tp("reads", 0), tp("reads", 1)];
        assert_eq!(plain.pair(&parts), (parts.to_vec(), vec![]));
        assert_eq!(plain.unpair(&parts), (vec![], vec![]));
    }
}
