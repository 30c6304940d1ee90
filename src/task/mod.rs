//! Tasks: one per input partition, each owning its processor and store.
//!
//! A [`StreamTask`] turns a batch of source records into folded state (decode, validate,
//! fold) and dead letters; flushing is delegated to its processor (see `ARCHITECTURE.md`
//! for the order in which a flush's outputs become durable).

use crate::ids::{Origin, TaskId};
use crate::model::{MessageEvent, ReadEvent};
use crate::processor::{FlushOutput, ProcessStats, ProcessorError, ReadStateProcessor};
use crate::serde::{EventDecoder, MessageDecoder};
use crate::state::StoreBatch;

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
    processor: ReadStateProcessor,
}

impl StreamTask {
    pub fn new(id: TaskId, processor: ReadStateProcessor) -> Self {
        Self { id, processor }
    }

    pub fn id(&self) -> TaskId {
        self.id
    }

    /// Decode and fold a batch. The decoder must have been prepared for the batch (writer
    /// schemas fetched). Undecodable records are returned as dead letters; the rest are
    /// folded with one bulk store read for cache misses.
    pub fn process(
        &mut self,
        decoder: &EventDecoder,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        // One allocation per batch; the events borrow their ids from the records.
        let mut events = Vec::with_capacity(records.len());
        for r in records {
            match decoder.decode_ref(r.value) {
                Ok(e) => events.push((e, r.origin)),
                Err(e) => dead_letters.push(DeadLetter::from_record(
                    r,
                    e.reason(),
                    e.to_string(),
                    decoder.max_record_bytes(),
                )),
            }
        }
        self.processor.process(&events)
    }

    /// Decode message events and fold them into their conversations' heads; undecodable
    /// records are returned as dead letters.
    pub fn process_messages(
        &mut self,
        decoder: &MessageDecoder,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        let mut messages = Vec::with_capacity(records.len());
        for r in records {
            match decoder.decode(r.value) {
                Ok(m) => messages.push((m, r.origin)),
                Err(e) => dead_letters.push(DeadLetter::from_record(
                    r,
                    e.reason(),
                    e.to_string(),
                    decoder.max_record_bytes(),
                )),
            }
        }
        self.processor.process_messages(&messages)
    }

    /// Fold already-decoded message events (test driver, benchmarks).
    pub fn process_message_events(
        &mut self,
        messages: &[(MessageEvent, Origin)],
    ) -> Result<(), ProcessorError> {
        self.processor.process_messages(messages)
    }

    /// Fold already-decoded events (used by benchmarks and the test driver's typed input).
    pub fn process_events(&mut self, events: &[(ReadEvent, Origin)]) -> Result<(), ProcessorError> {
        let views: Vec<_> = events.iter().map(|(e, o)| (e.view(), *o)).collect();
        self.processor.process(&views)
    }

    pub fn prepare_flush(&mut self, now_ms: i64) -> FlushOutput {
        self.processor.prepare_flush(now_ms)
    }

    pub fn commit_flush(
        &mut self,
        batch: StoreBatch,
        changelog_next_offset: Option<i64>,
    ) -> Result<(), ProcessorError> {
        self.processor.commit_flush(batch, changelog_next_offset)
    }

    /// Forget what was not committed (a failed flush): continue from the store.
    pub fn reset_to_store(&mut self) -> Result<(), ProcessorError> {
        self.processor.reset_to_store()
    }

    pub fn processor(&self) -> &ReadStateProcessor {
        &self.processor
    }

    pub fn processor_mut(&mut self) -> &mut ReadStateProcessor {
        &mut self.processor
    }

    pub fn stats(&self) -> ProcessStats {
        self.processor.stats()
    }

    pub fn into_processor(self) -> ReadStateProcessor {
        self.processor
    }
}
