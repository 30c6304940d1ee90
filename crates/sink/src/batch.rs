//! The sink's in-memory batch: one row per key (the highest version seen), and per
//! partition the range of output-topic offsets it covers.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::row::SinkRow;
use crate::model::ReceiptUpdate;

/// The offsets one batch covers in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    pub partition: i32,
    /// `next_offset` stored in the database before this batch (-1: none yet). The write
    /// succeeds only if it is still there (fencing).
    pub expected: i64,
    /// `next_offset` after this batch.
    pub next: i64,
    /// Output records this batch covers (rows, duplicates and dead letters alike).
    pub records: i64,
}

/// What one transaction writes.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteBatch<R = ReceiptUpdate> {
    pub rows: Vec<R>,
    /// Partition and offset of each row (same index as `rows`).
    pub row_partitions: Vec<i32>,
    pub row_offsets: Vec<i64>,
    pub ranges: Vec<PartitionRange>,
}

impl<R> Default for WriteBatch<R> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            row_partitions: Vec::new(),
            row_offsets: Vec::new(),
            ranges: Vec::new(),
        }
    }
}

impl<R: Clone> WriteBatch<R> {
    /// Drop rows by index (rows the database rejected for good).
    pub fn remove_rows(&mut self, indexes: &[usize]) {
        let mut keep = vec![true; self.rows.len()];
        for &i in indexes {
            if let Some(k) = keep.get_mut(i) {
                *k = false;
            }
        }
        let mut i = 0;
        self.rows.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        let mut i = 0;
        self.row_partitions.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        let mut i = 0;
        self.row_offsets.retain(|_| {
            i += 1;
            keep[i - 1]
        });
    }

    /// Drop everything of `partition` (revoked or fenced).
    pub fn remove_partition(&mut self, partition: i32) {
        let idx: Vec<usize> = self
            .row_partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| **p == partition)
            .map(|(i, _)| i)
            .collect();
        self.remove_rows(&idx);
        self.ranges.retain(|r| r.partition != partition);
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Split into at most `n` batches over disjoint partitions, balanced by rows. Each is
    /// a transaction of its own: the offsets are fenced per partition, so they commit
    /// independently, and a key's rows stay in its partition's batch.
    pub fn split(self, n: usize) -> Vec<WriteBatch<R>> {
        if n <= 1 || self.ranges.len() <= 1 {
            return vec![self];
        }
        let mut rows_of: HashMap<i32, usize> = HashMap::new();
        for p in &self.row_partitions {
            *rows_of.entry(*p).or_default() += 1;
        }
        let mut parts: Vec<i32> = self.ranges.iter().map(|r| r.partition).collect();
        parts.sort_by_key(|p| std::cmp::Reverse(rows_of.get(p).copied().unwrap_or(0)));
        let k = n.min(parts.len());
        let mut load = vec![0usize; k];
        let mut group_of: HashMap<i32, usize> = HashMap::new();
        for p in parts {
            let g = (0..k).min_by_key(|g| load[*g]).expect("k >= 1");
            load[g] += rows_of.get(&p).copied().unwrap_or(0);
            group_of.insert(p, g);
        }
        let mut out: Vec<WriteBatch<R>> = (0..k).map(|_| WriteBatch::default()).collect();
        for r in self.ranges {
            out[group_of[&r.partition]].ranges.push(r);
        }
        for ((row, p), off) in self
            .rows
            .into_iter()
            .zip(self.row_partitions)
            .zip(self.row_offsets)
        {
            let w = &mut out[group_of[&p]];
            w.rows.push(row);
            w.row_partitions.push(p);
            w.row_offsets.push(off);
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
struct Span {
    next: i64,
    records: i64,
}

/// Collects decoded rows until the batch is full or old enough.
#[derive(Debug)]
pub struct Batcher<R: SinkRow = ReceiptUpdate> {
    rows: HashMap<R::Key, (R, i32, i64)>,
    spans: BTreeMap<i32, Span>,
    started: Option<Instant>,
}

impl<R: SinkRow> Default for Batcher<R> {
    fn default() -> Self {
        Self {
            rows: HashMap::new(),
            spans: BTreeMap::new(),
            started: None,
        }
    }
}

impl<R: SinkRow> Batcher<R> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add the record at `offset` of `partition`: an update, or `None` for a record that
    /// became a dead letter (it still counts as consumed).
    pub fn add(&mut self, partition: i32, offset: i64, update: Option<R>) {
        self.started.get_or_insert_with(Instant::now);
        let span = self.spans.entry(partition).or_insert(Span {
            next: offset + 1,
            records: 0,
        });
        span.next = span.next.max(offset + 1);
        span.records += 1;
        if let Some(u) = update {
            match self.rows.get_mut(&u.key()) {
                Some((old, _, _)) if old.version() >= u.version() => {}
                Some(slot) => *slot = (u, partition, offset),
                None => {
                    self.rows.insert(u.key(), (u, partition, offset));
                }
            }
        }
    }

    /// Distinct keys in the batch.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Time since the first record of this batch.
    pub fn age(&self) -> Option<Duration> {
        self.started.map(|s| s.elapsed())
    }

    /// Forget a partition (revoked before its batch was written).
    pub fn drop_partition(&mut self, partition: i32) {
        self.rows.retain(|_, (_, p, _)| *p != partition);
        self.spans.remove(&partition);
        if self.spans.is_empty() {
            self.started = None;
        }
    }

    /// Take the batch; `stored(p)` is the database's `next_offset` for `p` (-1: none).
    pub fn take(&mut self, stored: impl Fn(i32) -> i64) -> WriteBatch<R> {
        let mut b = WriteBatch::default();
        for (_, (u, p, o)) in self.rows.drain() {
            b.rows.push(u);
            b.row_partitions.push(p);
            b.row_offsets.push(o);
        }
        for (p, s) in std::mem::take(&mut self.spans) {
            b.ranges.push(PartitionRange {
                partition: p,
                expected: stored(p),
                next: s.next,
                records: s.records,
            });
        }
        self.started = None;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConversationId, ReaderId};
    use crate::model::StateKey;

    fn update(conv: i64, reader: i64, version: i64) -> ReceiptUpdate {
        ReceiptUpdate {
            conversation_id: ConversationId::from(conv),
            reader_id: ReaderId::from(reader),
            last_read_seq: version * 10,
            message_id: None,
            sender_id: None,
            device_id: None,
            read_at_ms: None,
            version,
            events_folded: 1,
            stale_events: 0,
            events_total: version,
            stale_total: 0,
            emitted_at_ms: 0,
            counts: None,
        }
    }

    #[test]
    fn keeps_the_highest_version_per_key_and_covers_every_offset() {
        let mut b = Batcher::new();
        b.add(0, 10, Some(update(1, 1, 2)));
        b.add(0, 11, Some(update(1, 1, 1))); // reordered duplicate: older version
        b.add(0, 12, Some(update(1, 1, 3)));
        b.add(1, 5, Some(update(2, 1, 1)));
        b.add(1, 6, None); // dead letter
        assert_eq!(b.rows(), 2);
        let w = b.take(|p| if p == 0 { 10 } else { -1 });
        assert!(b.is_empty());
        let v: HashMap<StateKey, i64> = w.rows.iter().map(|u| (u.key(), u.version)).collect();
        assert_eq!(v[&update(1, 1, 0).key()], 3);
        assert_eq!(
            w.ranges,
            vec![
                PartitionRange {
                    partition: 0,
                    expected: 10,
                    next: 13,
                    records: 3
                },
                PartitionRange {
                    partition: 1,
                    expected: -1,
                    next: 7,
                    records: 2
                }
            ]
        );
    }

    #[test]
    fn split_keeps_partitions_whole_and_balances_rows() {
        let mut b = Batcher::new();
        let mut off = 0;
        // Partition 0: 4 rows; 1: 3; 2: 1; 3: none (a dead letter only).
        for (p, n) in [(0, 4), (1, 3), (2, 1)] {
            for i in 0..n {
                off += 1;
                b.add(p, off, Some(update(p as i64 * 100 + i, 1, 1)));
            }
        }
        b.add(3, 1, None);
        let w = b.take(|_| -1);
        let total = w.rows.len();
        let parts = w.clone().split(2);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts.iter().map(|w| w.rows.len()).sum::<usize>(), total);
        assert_eq!(parts.iter().map(|w| w.ranges.len()).sum::<usize>(), 4);
        for w in &parts {
            let mine: Vec<i32> = w.ranges.iter().map(|r| r.partition).collect();
            assert!(w.row_partitions.iter().all(|p| mine.contains(p)));
            assert_eq!(w.rows.len(), w.row_offsets.len());
        }
        let mut loads: Vec<usize> = parts.iter().map(|w| w.rows.len()).collect();
        loads.sort();
        assert_eq!(loads, vec![4, 4], "0 alone; 1 and 2 together");
        assert_eq!(w.split(1).len(), 1);
    }

    #[test]
    fn removing_a_partition_or_rows_keeps_the_rest_aligned() {
        let mut b = Batcher::new();
        b.add(0, 1, Some(update(1, 1, 1)));
        b.add(1, 1, Some(update(2, 1, 1)));
        b.add(1, 2, Some(update(3, 1, 1)));
        let mut w = b.take(|_| -1);
        w.remove_partition(1);
        assert_eq!(w.rows.len(), 1);
        assert_eq!(w.row_partitions, vec![0]);
        assert_eq!(w.ranges.len(), 1);
        w.remove_rows(&[0]);
        assert!(w.rows.is_empty() && w.row_partitions.is_empty());
        assert!(!w.is_empty(), "the range is still covered");
    }
}
