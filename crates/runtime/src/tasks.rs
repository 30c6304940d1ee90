//! The running tasks of one instance by partition (Kafka Streams' `Tasks`), and the source
//! partitions it forwards to a repartition topic (sub-topology 0). The task manager adds
//! and removes tasks; the task executor processes and commits them.

use std::collections::{BTreeMap, BTreeSet};

use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use rdkafka::Message;

use super::offsets::TopicPartition;
use super::{RunSummary, RuntimeError};
use crate::ids::Origin;
use crate::task::StreamTask;
use crate::telemetry::series::{self, Owner};
use crate::telemetry::Progress;
use crate::topology::{Source, Topology};

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

impl RunningTask {
    /// Summary and metrics after a commit: counters advance by what the task did since the
    /// last report; gauges are per task (bounded by the partition count).
    pub(super) fn report(&mut self, summary: &mut RunSummary, progress: &Progress, owner: Owner) {
        let stats = self.task.stats();
        self.reported.resize(stats.counters.len(), 0);
        for (c, was) in stats.counters.iter().zip(self.reported.iter_mut()) {
            let d = c.value.saturating_sub(*was);
            *was = c.value;
            match c.label {
                Some((k, v)) => metrics::counter!(c.name, k => v).increment(d),
                None => metrics::counter!(c.name).increment(d),
            }
            match c.name {
                "readstate_events_folded_total" => summary.events_folded += d,
                "readstate_events_replayed_skipped_total" => summary.replayed_skipped += d,
                "readstate_updates_emitted_total" => {
                    summary.updates_emitted += d;
                    Progress::add(&progress.updates_emitted, d);
                }
                _ => {}
            }
        }
        let id = self.task.id().to_string();
        for store in self.task.processor().stores() {
            let labels = [("task", id.as_str()), ("store", store.name().as_str())];
            let keys = store.approximate_num_keys() as f64;
            series::set(owner, "readstate_store_estimated_keys", &labels, keys);
            let bytes = store.approximate_size_bytes() as f64;
            series::set(owner, "readstate_store_size_bytes", &labels, bytes);
        }
    }
}

impl Forwarding {
    /// The repartition record of a source record: re-keyed (`key`), its origin in a header.
    pub(super) fn record<'a>(
        &'a self,
        key: &'a [u8],
        value: Option<&'a [u8]>,
        origin: Origin,
    ) -> BaseRecord<'a, [u8], [u8]> {
        let headers = OwnedHeaders::new().insert(Header {
            key: Origin::HEADER,
            value: Some(&origin.to_bytes()),
        });
        let rec = BaseRecord::to(&self.repartition_topic)
            .key(key)
            .headers(headers);
        match value {
            Some(v) => rec.payload(v),
            None => rec,
        }
    }

    /// The origin a repartitioned record carries in its header (none when it was not
    /// written by readstate).
    pub(super) fn carried_origin(m: &BorrowedMessage<'_>) -> Option<Origin> {
        m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == Origin::HEADER)
                .and_then(|h| h.value)
                .and_then(Origin::from_bytes)
        })
    }
}

pub(super) struct Tasks {
    /// The topic the stateful tasks consume (the source, or its repartition topic).
    task_topic: String,
    /// The topics co-partitioned with `task_topic` (messages, members): task p reads
    /// partition p of each.
    sides: Vec<String>,
    pub(super) running: BTreeMap<i32, RunningTask>,
    pub(super) forwarding: Option<Forwarding>,
    /// Parts of co-partitioned groups held without the rest (KIP-848's incremental
    /// assignment may give one before another): parked until the group is complete.
    lone: BTreeSet<TopicPartition>,
}

impl Tasks {
    pub(super) fn new(
        task_topic: String,
        sides: Vec<String>,
        forwarding: Option<Forwarding>,
    ) -> Self {
        Self {
            task_topic,
            sides,
            running: BTreeMap::new(),
            forwarding,
            lone: BTreeSet::new(),
        }
    }

    /// The tasks of `t`, whose one source is `source` (forwarded to its repartition topic
    /// when it has one).
    pub(super) fn for_source(source: &Source, t: &Topology) -> Self {
        let forwarding = source.repartition_topic.as_ref().map(|r| Forwarding {
            source_topic: source.topic.0.clone(),
            repartition_topic: r.0.clone(),
            partitions: BTreeSet::new(),
        });
        let mut sides: Vec<String> = t.side_sources().iter().map(|m| m.topic.0.clone()).collect();
        // Created with the sources' partition count: misrouted records come back on the
        // partition they belong on.
        sides.extend(t.rerouted_topics().into_iter().map(|r| r.0));
        Self::new(source.task_input_topic().0.clone(), sides, forwarding)
    }

    pub(super) fn task_topic(&self) -> &str {
        &self.task_topic
    }

    /// The task topic and its co-partitioned topics.
    fn group(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.task_topic).chain(&self.sides)
    }

    /// With co-partitioned sources, every topic's partitions must come together (the
    /// range assignor guarantees it when every member subscribes to all with equal
    /// counts).
    pub(super) fn check_co_partitioned(
        &self,
        parts: &[TopicPartition],
    ) -> Result<(), RuntimeError> {
        let of = |topic: &str| -> BTreeSet<i32> {
            parts
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, p)| *p)
                .collect()
        };
        let task_topic = self.task_topic();
        let reads = of(task_topic);
        for side in &self.sides {
            let other = of(side);
            if other != reads {
                return Err(RuntimeError::Fatal(format!(
                    "co-partitioning broken: this instance was assigned partitions {reads:?} of {task_topic} but {other:?} of {side}; every instance of the group must run the same topology (all co-partitioned topics subscribed, range assignment) and the topics must have the same partition count"
                )));
            }
        }
        Ok(())
    }

    /// Group newly assigned partitions: the partitions to take on (forwarded ones, and the
    /// task partitions whose group of co-partitioned partitions is now complete), and the
    /// parts still alone (to park until the rest comes).
    pub(super) fn pair(
        &mut self,
        parts: &[TopicPartition],
    ) -> (Vec<TopicPartition>, Vec<TopicPartition>) {
        let (mut take, mut fresh) = (Vec::new(), Vec::new());
        for tp in parts {
            if !self.is_task_topic(&tp.0) {
                take.push(tp.clone());
            } else if self.lone.insert(tp.clone()) {
                fresh.push(tp.clone());
            }
        }
        let grouped: Vec<i32> = (parts.iter())
            .filter(|tp| self.is_task_topic(&tp.0))
            .map(|tp| tp.1)
            .collect();
        for p in grouped {
            let members: Vec<TopicPartition> = self.group().map(|t| (t.clone(), p)).collect();
            if members.iter().all(|m| self.lone.contains(m)) {
                for m in &members {
                    self.lone.remove(m);
                }
                take.push((self.task_topic.clone(), p));
            }
        }
        fresh.retain(|tp| self.lone.contains(tp));
        (take, fresh)
    }

    /// Partitions revoked: the task partitions touched (any part of their group revoked),
    /// and the other parts still assigned, now alone (to park until the group is back).
    pub(super) fn unpair(&mut self, parts: &[TopicPartition]) -> (Vec<i32>, Vec<TopicPartition>) {
        let (mut touched, mut alone) = (Vec::new(), Vec::new());
        for tp in parts {
            if self.lone.remove(tp) {
                continue;
            }
            if self.sides.is_empty() || !self.is_task_topic(&tp.0) {
                continue;
            }
            touched.push(tp.1);
            let others: Vec<TopicPartition> = (self.group())
                .filter(|t| **t != tp.0)
                .map(|t| (t.clone(), tp.1))
                .collect();
            for other in others {
                if !parts.contains(&other) && self.lone.insert(other.clone()) {
                    alone.push(other);
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        (touched, alone)
    }

    /// The co-partitioned topics' partitions joining task partition `p`.
    pub(super) fn side_partitions(&self, p: i32) -> Vec<TopicPartition> {
        self.sides.iter().map(|t| (t.clone(), p)).collect()
    }

    /// Every input partition of task `p`: its task topic's and its co-partitioned ones.
    pub(super) fn inputs_of(&self, p: i32) -> impl Iterator<Item = TopicPartition> + '_ {
        let sides = self.sides.iter().map(move |t| (t.clone(), p));
        std::iter::once((self.task_topic.clone(), p)).chain(sides)
    }

    /// A record of a task's topic (the read events' or a co-partitioned one's).
    pub(super) fn is_task_topic(&self, topic: &str) -> bool {
        topic == self.task_topic || self.sides.iter().any(|t| t == topic)
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
        let sides: Vec<TopicPartition> = (self.running.keys())
            .flat_map(|p| self.side_partitions(*p))
            .collect();
        v.extend(sides);
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

    /// The running tasks of `parts` (task partition, task), in partition order.
    pub(super) fn of(&mut self, parts: &[TopicPartition]) -> Vec<(i32, &mut StreamTask)> {
        let wanted: BTreeSet<i32> = (parts.iter())
            .filter(|(t, _)| *t == self.task_topic)
            .map(|(_, p)| *p)
            .collect();
        (self.running.iter_mut())
            .filter(|(p, _)| wanted.contains(p))
            .map(|(p, t)| (*p, &mut t.task))
            .collect()
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
        let mut t = Tasks::new("reads".into(), vec!["msgs".into()], None);
        let (take, lone) = t.pair(&[tp("reads", 0), tp("msgs", 0), tp("reads", 1)]);
        assert_eq!((take, lone), (vec![tp("reads", 0)], vec![tp("reads", 1)]));
        let (take, lone) = t.pair(&[tp("msgs", 1), tp("msgs", 2)]);
        assert_eq!((take, lone), (vec![tp("reads", 1)], vec![tp("msgs", 2)]));
        let (touched, alone) = t.unpair(&[tp("msgs", 0), tp("msgs", 2)]);
        assert_eq!((touched, alone), (vec![0], vec![tp("reads", 0)]));
        let (take, lone) = t.pair(&[tp("msgs", 0)]);
        assert_eq!((take, lone), (vec![tp("reads", 0)], vec![]));
        let mut plain = Tasks::new("reads".into(), vec![], None);
        let parts = [tp("reads", 0), tp("reads", 1)];
        assert_eq!(plain.pair(&parts), (parts.to_vec(), vec![]));
        assert_eq!(plain.unpair(&parts), (vec![], vec![]));
    }

    /// Three co-partitioned topics (reads, messages, members): a task starts once all
    /// three of its partitions are held, in any order.
    #[test]
    fn groups_of_three_complete_in_any_order() {
        let mut t = Tasks::new("reads".into(), vec!["msgs".into(), "members".into()], None);
        let (take, lone) = t.pair(&[tp("msgs", 0), tp("reads", 0)]);
        assert_eq!((take, lone), (vec![], vec![tp("msgs", 0), tp("reads", 0)]));
        let (take, lone) = t.pair(&[tp("members", 0), tp("members", 1)]);
        assert_eq!((take, lone), (vec![tp("reads", 0)], vec![tp("members", 1)]));
        let (touched, alone) = t.unpair(&[tp("members", 0)]);
        assert_eq!(touched, vec![0]);
        assert_eq!(alone, vec![tp("reads", 0), tp("msgs", 0)]);
        assert!(t
            .check_co_partitioned(&[tp("reads", 0), tp("msgs", 0), tp("members", 1)])
            .is_err());
    }
}
