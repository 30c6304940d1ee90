//! Partition parking: partitions paused in the group consumer while their task restores, or
//! while the schema registry cannot resolve their records. Records of a parked partition
//! that were already fetched are dropped, and the partition is rewound to the first of them
//! when it resumes. The registry wait is retried with one [`Backoff`].

use std::collections::HashMap;
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::TopicPartition;
use super::RuntimeError;
use crate::backoff::Backoff;
use crate::kafka::KafkaError;

/// Why a partition is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ParkReason {
    Restoring,
    Registry,
    /// One half of a co-partitioned pair, held without the other (KIP-848).
    CoPartition,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Parked {
    pub(super) reason: ParkReason,
    /// First offset dropped while parked: where to seek when resuming.
    pub(super) rewind: Option<i64>,
}

/// Waiting for the schema registry to resolve writer schemas.
#[derive(Debug)]
pub(super) struct RegistryWait {
    pub(super) ids: Vec<u32>,
    pub(super) retry_at: Instant,
    pub(super) backoff: Backoff,
    pub(super) since: Instant,
}

impl RegistryWait {
    /// Another failed attempt at `now`: when to ask again.
    pub(super) fn failed(&mut self, now: Instant) {
        self.retry_at = now + self.backoff.fail();
    }
}

#[derive(Debug, Default)]
pub(super) struct Parking {
    parked: HashMap<TopicPartition, Parked>,
    registry_wait: Option<RegistryWait>,
}

impl Parking {
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.parked.len()
    }

    pub(super) fn contains(&self, tp: &TopicPartition) -> bool {
        self.parked.contains_key(tp)
    }

    /// Note a record fetched for a parked partition (dropped, rewound to on resume);
    /// false when the partition is not parked.
    pub(super) fn drop_record(&mut self, topic: &str, partition: i32, offset: i64) -> bool {
        // Parking is rare: no key (and no allocation) per record unless something is parked.
        if self.parked.is_empty() {
            return false;
        }
        let key = (topic.to_owned(), partition);
        match self.parked.get_mut(&key) {
            Some(parked) => {
                parked.rewind = Some(parked.rewind.map_or(offset, |r| r.min(offset)));
                true
            }
            None => false,
        }
    }

    /// Remember a partition as parked (the caller pauses it, or it is paused already).
    pub(super) fn mark(&mut self, tp: TopicPartition, reason: ParkReason, rewind: Option<i64>) {
        let e = self.parked.entry(tp).or_insert(Parked { reason, rewind });
        e.reason = reason;
        e.rewind = match (e.rewind, rewind) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Pause a partition; records of it already fetched are dropped (and rewound to).
    pub(super) fn park<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tp: TopicPartition,
        reason: ParkReason,
        rewind: Option<i64>,
    ) -> Result<(), RuntimeError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        consumer.pause(&tpl).map_err(KafkaError::from)?;
        self.mark(tp, reason, rewind);
        Ok(())
    }

    /// Resume a parked partition, first rewinding to the first record dropped meanwhile.
    pub(super) fn unpark<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tp: &TopicPartition,
    ) -> Result<(), RuntimeError> {
        let Some(parked) = self.parked.remove(tp) else {
            return Ok(());
        };
        if let Some(offset) = parked.rewind {
            rewind(consumer, tp, offset)?;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        consumer.resume(&tpl).map_err(KafkaError::from)?;
        Ok(())
    }

    /// A parked partition resumes at `offset` (the last committed one).
    pub(super) fn set_rewind(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        match self.parked.get_mut(tp) {
            Some(p) => {
                p.rewind = Some(offset);
                true
            }
            None => false,
        }
    }

    /// Whether tasks run (`running`: their partitions of `task_topic`) and every one of
    /// them is parked until the registry answers.
    pub(super) fn all_wait_for_registry<'a>(
        &self,
        task_topic: &str,
        mut running: impl Iterator<Item = &'a i32>,
    ) -> bool {
        let parked = self.parked_for(ParkReason::Registry);
        let mut any = false;
        let all = running.all(|p| {
            any = true;
            parked.iter().any(|(t, q)| t == task_topic && q == p)
        });
        any && all
    }

    /// The partitions parked for `reason`.
    pub(super) fn parked_for(&self, reason: ParkReason) -> Vec<TopicPartition> {
        self.parked
            .iter()
            .filter(|(_, p)| p.reason == reason)
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    pub(super) fn forget(&mut self, tp: &TopicPartition) {
        self.parked.remove(tp);
    }

    pub(super) fn clear(&mut self) {
        self.parked.clear();
        self.registry_wait = None;
    }

    /// Wait for the registry to resolve `ids` (first failure at `now`, or one more id).
    pub(super) fn wait_for_registry(&mut self, ids: Vec<u32>, now: Instant) {
        let w = self.registry_wait.get_or_insert_with(|| RegistryWait {
            ids: Vec::new(),
            retry_at: now,
            backoff: Backoff::remote(),
            since: now,
        });
        for id in ids {
            if !w.ids.contains(&id) {
                w.ids.push(id);
            }
        }
        w.failed(now);
    }

    /// The registry wait whose retry is due at `now`.
    pub(super) fn registry_due(&mut self, now: Instant) -> Option<&mut RegistryWait> {
        self.registry_wait.as_mut().filter(|w| now >= w.retry_at)
    }

    pub(super) fn registry_answered(&mut self) {
        self.registry_wait = None;
    }
}

/// Seek a partition back to `offset` (records after it are read again); failing leaves
/// the position unknown, which is fatal.
impl Parking {
    /// Partitions queued again after their tasks were lost: each goes back to its last
    /// committed offset in `rewinds` (when its partition resumes, if parked, else now),
    /// and `pause` is paused.
    pub(super) fn requeue<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parts: &[TopicPartition],
        rewinds: &HashMap<TopicPartition, i64>,
        pause: &[TopicPartition],
    ) -> Result<(), RuntimeError> {
        for tp in parts {
            let Some(&offset) = rewinds.get(tp) else {
                continue;
            };
            if !self.set_rewind(tp, offset) {
                rewind(consumer, tp, offset)?;
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p) in pause {
            tpl.add_partition(t, *p);
        }
        consumer
            .pause(&tpl)
            .map_err(|e| RuntimeError::Fatal(format!("cannot pause requeued partitions: {e}")))
    }
}

pub(super) fn rewind<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tp: &TopicPartition,
    offset: i64,
) -> Result<(), RuntimeError> {
    consumer
        .seek(
            &tp.0,
            tp.1,
            Offset::Offset(offset),
            std::time::Duration::from_secs(10),
        )
        .map_err(|e| RuntimeError::Rewind {
            topic: tp.0.clone(),
            partition: tp.1,
            offset,
            source: Box::new(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_partition_remembers_the_first_record_it_dropped() {
        let mut p = Parking::default();
        assert!(!p.drop_record("t", 0, 7), "nothing parked");
        p.mark(("t".into(), 0), ParkReason::Registry, None);
        assert!(p.drop_record("t", 0, 9));
        assert!(p.drop_record("t", 0, 7));
        assert!(!p.drop_record("t", 1, 3), "another partition");
        p.mark(("t".into(), 0), ParkReason::Registry, Some(8));
        assert_eq!(p.parked[&("t".to_owned(), 0)].rewind, Some(7));
        assert_eq!(p.parked_for(ParkReason::Registry).len(), 1);
        assert!(p.parked_for(ParkReason::Restoring).is_empty());
    }

    #[test]
    fn the_registry_is_asked_again_only_when_due() {
        let mut p = Parking::default();
        let t0 = Instant::now();
        p.wait_for_registry(vec![3, 3, 4], t0);
        assert!(p.registry_due(t0).is_none(), "backing off");
        let later = t0 + std::time::Duration::from_secs(1);
        let w = p.registry_due(later).expect("due");
        assert_eq!(w.ids, [3, 4]);
        w.failed(later);
        assert!(p.registry_due(later).is_none());
        p.registry_answered();
        assert!(p
            .registry_due(later + std::time::Duration::from_secs(60))
            .is_none());
    }
}
