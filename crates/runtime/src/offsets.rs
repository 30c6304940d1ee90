//! Source offsets of one instance: how far each consumed partition was processed (what the
//! next commit commits), what was last committed (what a membership probe commits again and
//! what an aborted transaction rewinds to), and the origin id of each source partition (the
//! replay marks' key).

use std::collections::{BTreeMap, HashMap};

use rdkafka::{Offset, TopicPartitionList};

use crate::ids::Origin;

/// A topic and a partition.
pub(super) type TopicPartition = (String, i32);

#[derive(Debug, Default)]
pub(super) struct SourceOffsets {
    /// Next offset to commit per topic and partition (keyed by topic first, so the hot
    /// path looks up by `&str` without allocating).
    positions: HashMap<String, BTreeMap<i32, i64>>,
    /// Offsets last committed (or first consumed) per partition.
    committed: HashMap<TopicPartition, i64>,
    origin_ids: HashMap<String, HashMap<i32, u32>>,
}

impl SourceOffsets {
    /// The origin id of a source partition (computed once per partition).
    pub(super) fn origin_id(&mut self, topic: &str, partition: i32) -> u32 {
        if !self.origin_ids.contains_key(topic) {
            self.origin_ids.insert(topic.to_owned(), HashMap::new());
        }
        let ids = self.origin_ids.get_mut(topic).expect("inserted above");
        *ids.entry(partition)
            .or_insert_with(|| Origin::source_id(topic, partition))
    }

    /// Everything below `next` of (topic, partition) has been processed; `first` is the
    /// first offset processed in this batch.
    pub(super) fn advance(&mut self, topic: &str, partition: i32, first: i64, next: i64) {
        if !self.positions.contains_key(topic) {
            self.positions.insert(topic.to_owned(), BTreeMap::new());
        }
        let pos = self.positions.get_mut(topic).expect("inserted above");
        match pos.get_mut(&partition) {
            Some(e) => *e = (*e).max(next),
            None => {
                pos.insert(partition, next);
                // Where this partition started: what the membership probe may commit.
                self.committed
                    .entry((topic.to_owned(), partition))
                    .or_insert(first);
            }
        }
    }

    /// The next offset of every partition in `parts`, as a list to commit and as entries.
    pub(super) fn to_commit(
        &self,
        parts: &[TopicPartition],
    ) -> (TopicPartitionList, Vec<(TopicPartition, i64)>) {
        let mut tpl = TopicPartitionList::new();
        let mut entries = Vec::new();
        for (topic, p) in parts {
            if let Some(off) = self.positions.get(topic).and_then(|m| m.get(p)) {
                entries.push(((topic.clone(), *p), *off));
                if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(*off)) {
                    tracing::warn!(error = %e, topic, partition = p, "offset not committed");
                }
            }
        }
        (tpl, entries)
    }

    /// The last committed offsets, as a list (the membership probe commits them again).
    pub(super) fn committed_list(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &self.committed {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        tpl
    }

    pub(super) fn committed(&self, tp: &TopicPartition) -> Option<i64> {
        self.committed.get(tp).copied()
    }

    pub(super) fn committed_now(&mut self, entries: Vec<(TopicPartition, i64)>) {
        self.committed.extend(entries);
    }

    /// The group's committed offset of `tp` as the broker told it (kept unless this
    /// instance committed since).
    pub(super) fn learn_committed(&mut self, tp: TopicPartition, offset: i64) {
        self.committed.entry(tp).or_insert(offset);
    }

    /// Forget what was processed of `tp` but not committed (its records are read again).
    pub(super) fn drop_position(&mut self, tp: &TopicPartition) {
        if let Some(pos) = self.positions.get_mut(&tp.0) {
            pos.remove(&tp.1);
        }
    }

    /// Forget a partition (revoked).
    pub(super) fn forget(&mut self, tp: &TopicPartition) {
        self.drop_position(tp);
        self.committed.remove(tp);
    }

    /// Forget everything (tasks lost); returns the committed offsets, where partitions
    /// still assigned resume.
    pub(super) fn clear(&mut self) -> HashMap<TopicPartition, i64> {
        self.positions.clear();
        std::mem::take(&mut self.committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_advance_monotonically_and_commit_what_was_processed() {
        let mut o = SourceOffsets::default();
        o.advance("t", 0, 5, 10);
        o.advance("t", 0, 3, 8);
        let tp = ("t".to_owned(), 0);
        let (tpl, entries) = o.to_commit(&[tp.clone(), ("t".to_owned(), 1)]);
        assert_eq!(
            entries,
            [(tp.clone(), 10)],
            "the furthest, only processed ones"
        );
        assert_eq!(tpl.count(), 1);
        assert_eq!(
            o.committed(&tp),
            Some(5),
            "where it started, until a commit"
        );
        o.committed_now(entries);
        assert_eq!(o.committed(&tp), Some(10));
        o.drop_position(&tp);
        assert!(o.to_commit(std::slice::from_ref(&tp)).1.is_empty());
        assert_eq!(o.clear().get(&tp), Some(&10));
        assert_eq!(o.committed_list().count(), 0);
    }
}
