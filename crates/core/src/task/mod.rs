//! Tasks: one per input partition, each owning its processor and store.
//!
//! A [`StreamTask`] hands a batch of source records to its processor (which decodes,
//! validates and folds them, and turns the undecodable into dead letters); flushing is
//! delegated to its processor too. [`commit`] is the commit protocol over a set of tasks
//! (see `ARCHITECTURE.md` for the order in which a flush's outputs become durable), which
//! the runtime runs on Kafka and the test drivers on memory.

pub mod commit;

use crate::ids::{Origin, TaskId};
use crate::processor::{
    FlushOutput, InputId, Processor, ProcessorError, ProcessorStats, ReadStateNode,
    ReadStateProcessor,
};
use crate::state::{KeyValueStore, StoreBatch};

/// A record as consumed: where it is, and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct SourceRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Where the event first entered readstate (differs from topic/offset after a
    /// repartition); drives replay detection.
    pub origin: Origin,
    /// The record's timestamp (epoch milliseconds), when it has one.
    pub timestamp: Option<i64>,
}

/// A record that could not be processed, with everything needed to find and replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Bounded label (`DecodeError::reason`).
    pub reason: &'static str,
    pub error: String,
    /// The sizes of the record's key and value when the dead letter carries less of them.
    pub key_truncated_from: Option<usize>,
    pub value_truncated_from: Option<usize>,
}

/// A record found on a partition its key does not belong on, set aside by its processor
/// to be produced to `topic` (its source's rerouted topic) on `partition`, where the task
/// that owns its key reads it. Its origin rides along, so that a replay of the partition
/// it was found on is still recognised where it is folded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rerouted {
    pub topic: String,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub origin: Origin,
    pub timestamp: Option<i64>,
    /// Where it was found (topic, partition, offset), and why it belongs elsewhere.
    pub found: (String, i32, i64),
    pub why: String,
}

impl Rerouted {
    /// `r`, whole, for `partition` of `topic`.
    pub fn from_record(r: &SourceRecord<'_>, topic: &str, partition: i32, why: String) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
            key: r.key.map(<[u8]>::to_vec),
            value: r.value.map(<[u8]>::to_vec),
            origin: r.origin,
            timestamp: r.timestamp,
            found: (r.topic.to_owned(), r.partition, r.offset),
            why,
        }
    }
}

/// The most of a record's key a dead letter carries.
pub const DEAD_LETTER_MAX_KEY_BYTES: usize = 1024;

impl DeadLetter {
    /// A dead letter for `r` carrying at most `max_value_bytes` of its value (and
    /// [`DEAD_LETTER_MAX_KEY_BYTES`] of its key), so that it can always be produced.
    pub fn from_record(
        r: &SourceRecord<'_>,
        reason: &'static str,
        error: String,
        max_value_bytes: usize,
    ) -> Self {
        let (key, key_truncated_from) = capped(r.key, DEAD_LETTER_MAX_KEY_BYTES);
        let (value, value_truncated_from) = capped(r.value, max_value_bytes);
        Self {
            topic: r.topic.to_owned(),
            partition: r.partition,
            offset: r.offset,
            key,
            value,
            reason,
            error,
            key_truncated_from,
            value_truncated_from,
        }
    }
}

/// The first `max` bytes of `b`, and its full length when it was longer.
fn capped(b: Option<&[u8]>, max: usize) -> (Option<Vec<u8>>, Option<usize>) {
    match b {
        None => (None, None),
        Some(b) if b.len() <= max => (Some(b.to_vec()), None),
        Some(b) => (Some(b[..max].to_vec()), Some(b.len())),
    }
}

pub struct StreamTask {
    id: TaskId,
    processor: Box<dyn Processor>,
}

impl StreamTask {
    pub fn new(id: TaskId, processor: Box<dyn Processor>) -> Self {
        Self { id, processor }
    }

    pub fn id(&self) -> TaskId {
        self.id
    }

    /// Decode and fold a batch of raw records of input `input` (the source serdes must
    /// have prepared their writer schemas). Undecodable records are added to
    /// `dead_letters`; the rest are folded.
    pub fn process(
        &mut self,
        input: InputId,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        self.processor.process(input, records, dead_letters)
    }

    /// The records the processor set aside as misrouted since the last call (see
    /// [`Processor::drain_rerouted`]), appended to `out`.
    pub fn drain_rerouted(&mut self, out: &mut Vec<Rerouted>) {
        self.processor.drain_rerouted(out)
    }

    pub fn prepare_flush(&mut self, now_ms: i64) -> FlushOutput {
        self.processor.flush(now_ms)
    }

    /// Write the flush's store batches (indexed as the task's stores), each with the next
    /// offset of its changelog when records were written to it.
    pub fn commit_flush(
        &mut self,
        batches: Vec<StoreBatch>,
        checkpoints: &[Option<i64>],
    ) -> Result<(), ProcessorError> {
        self.processor.commit(batches, checkpoints)
    }

    /// Forget what was not committed (a failed flush): continue from the stores.
    pub fn reset_to_store(&mut self) -> Result<(), ProcessorError> {
        self.processor.reset()
    }

    pub fn processor(&self) -> &dyn Processor {
        &*self.processor
    }

    pub fn processor_mut(&mut self) -> &mut dyn Processor {
        &mut *self.processor
    }

    /// The read-state processor, when the task runs one (interactive queries: the test
    /// driver, benchmarks).
    pub fn read_state(&self) -> Option<&ReadStateProcessor> {
        self.processor
            .as_any()
            .downcast_ref::<ReadStateNode>()
            .map(ReadStateNode::processor)
    }

    pub fn stats(&self) -> ProcessorStats {
        self.processor.stats()
    }

    /// Close the task: its stores, indexed as the topology's.
    pub fn close(self) -> Vec<Box<dyn KeyValueStore>> {
        self.processor.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::api::tests::{counting, CountingProcessor};
    use crate::processor::SinkId;
    use crate::state::read_checkpoint;

    fn records<'a>(topic: &'a str, offsets: std::ops::Range<i64>) -> Vec<SourceRecord<'a>> {
        offsets
            .map(|offset| SourceRecord {
                topic,
                partition: 0,
                offset,
                key: None,
                value: Some(b"x"),
                origin: Origin { source: 1, offset },
                timestamp: None,
            })
            .collect()
    }

    /// The task drives any processor through the trait: records reach the input they were
    /// routed to, bad ones become dead letters, each store gets its own batch and
    /// changelog records and its own checkpoint, outputs are addressed to sinks; what was
    /// not committed is forgotten by a reset.
    #[test]
    fn a_task_drives_a_processor_over_several_stores() {
        let mut task = StreamTask::new(TaskId::new(0, 0), Box::new(counting(2, 3)));
        let mut dead = Vec::new();
        task.process(InputId(0), &records("reads", 0..2), &mut dead)
            .unwrap();
        assert!(!task.processor().needs_flush(), "2 of 3 records");
        let mut messages = records("messages", 9..11);
        messages[1].value = None;
        task.process(InputId(1), &messages, &mut dead).unwrap();
        assert_eq!(dead.len(), 1, "the record without a value");
        assert_eq!((dead[0].offset, dead[0].reason), (10, "empty_value"));
        assert!(task.processor().needs_flush());
        let mut out = task.prepare_flush(5);
        let logged: Vec<Vec<(Vec<u8>, Vec<u8>)>> = out
            .stores
            .iter()
            .map(|s| {
                s.changelog()
                    .map(|(k, v)| (k.to_vec(), v.unwrap_or_default().to_vec()))
                    .collect()
            })
            .collect();
        assert_eq!(
            logged[0],
            [(b"count".to_vec(), 2u64.to_be_bytes().to_vec())]
        );
        assert_eq!(
            logged[1],
            [(b"count".to_vec(), 1u64.to_be_bytes().to_vec())]
        );
        assert_eq!(
            out.outputs.count(SinkId(0)),
            2,
            "one output per counted input"
        );
        task.commit_flush(out.take_batches(), &[Some(11), Some(4)])
            .unwrap();
        let checkpoints: Vec<Option<i64>> = task
            .processor()
            .stores()
            .iter()
            .map(|s| read_checkpoint(*s).unwrap())
            .collect();
        assert_eq!(checkpoints, [Some(11), Some(4)], "a checkpoint per store");
        let counting = task
            .processor()
            .as_any()
            .downcast_ref::<CountingProcessor>();
        assert_eq!(counting.unwrap().flushed_at, [5], "flushed at its time");
        assert_eq!(task.stats().total("readstate_events_folded_total"), 3);
        // Processed but not committed: a reset continues from the stores.
        task.process(InputId(0), &records("reads", 2..4), &mut dead)
            .unwrap();
        task.reset_to_store().unwrap();
        let out = task.prepare_flush(6);
        assert!(out.is_empty(), "nothing uncommitted survives a reset");
        assert!(task.read_state().is_none(), "not a read-state processor");
        assert_eq!(task.close().len(), 2, "the stores come back on close");
    }
}
