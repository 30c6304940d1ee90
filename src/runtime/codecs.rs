//! The record codecs of the running topology: the read-event and message decoders of its
//! sources, the receipt and head encoders of its sinks, and the repartition key. This is the
//! one place of the runtime that knows the domain's record types; the task executor asks it
//! to decode a batch into a task, to encode a flush's outputs, and to resolve writer schemas.

use std::collections::BTreeMap;

use rdkafka::message::BorrowedMessage;
use rdkafka::producer::BaseRecord;
use rdkafka::Message;

use super::record_collector::RecordCollector;
use crate::processor::{FlushOutput, InputId, ProcessorError, RecordKind};
use crate::serde::{
    DecodeError, EventDecoder, HeadEncoder, MessageDecoder, SerdeError, UpdateEncoder,
};
use crate::task::{DeadLetter, SourceRecord, StreamTask};

/// Output records of one flush, by sink.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sent {
    pub(super) updates: u64,
    pub(super) heads: u64,
}

pub(super) struct Codecs {
    reads: EventDecoder,
    /// With a message source, and its topic.
    messages: Option<(String, MessageDecoder)>,
    receipts: (String, UpdateEncoder),
    heads: Option<(String, HeadEncoder)>,
    buf: Vec<u8>,
}

impl Codecs {
    pub(super) fn new(
        reads: EventDecoder,
        messages: Option<(String, MessageDecoder)>,
        receipts: (String, UpdateEncoder),
    ) -> Self {
        Self {
            reads,
            messages,
            receipts,
            heads: None,
            buf: Vec::with_capacity(256),
        }
    }

    /// Encode conversation-head updates to `topic` too.
    pub(super) fn with_heads(&mut self, topic: String, encoder: HeadEncoder) {
        self.heads = Some((topic, encoder));
    }

    pub(super) fn max_record_bytes(&self) -> usize {
        self.reads.max_record_bytes()
    }

    /// Fetch the writer schemas of a polled batch not known yet.
    pub(super) async fn prepare(&mut self, msgs: &[BorrowedMessage<'_>]) -> Result<(), SerdeError> {
        let Self {
            reads, messages, ..
        } = self;
        let message_topic = messages.as_ref().map(|(t, _)| t.as_str());
        let is_message = |m: &BorrowedMessage<'_>| Some(m.topic()) == message_topic;
        reads
            .prepare(msgs.iter().filter(|m| !is_message(m)).map(|m| m.payload()))
            .await?;
        if let Some((t, d)) = messages {
            d.prepare(msgs.iter().filter(|m| m.topic() == t).map(|m| m.payload()))
                .await?;
        }
        Ok(())
    }

    /// Resolve writer schema ids: both decoders are asked (an id one of them cannot read
    /// is an incompatible writer for it, which only records of the other source carry).
    pub(super) async fn prepare_ids(&mut self, ids: &[u32]) -> Result<(), SerdeError> {
        self.reads.prepare_ids(ids).await?;
        if let Some((_, d)) = &mut self.messages {
            d.prepare_ids(ids).await?;
        }
        Ok(())
    }

    /// The writer schema id of `m` when its source's decoder has not resolved it yet.
    pub(super) fn unknown_schema(&self, m: &BorrowedMessage<'_>) -> Option<u32> {
        match &self.messages {
            Some((t, d)) if m.topic() == t => d.unknown_schema(m.payload()),
            _ => self.reads.unknown_schema(m.payload()),
        }
    }

    /// Decode records of one input of a task as `kind` and fold them; undecodable ones
    /// become dead letters.
    pub(super) fn process(
        &self,
        task: &mut StreamTask,
        input: InputId,
        kind: RecordKind,
        recs: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        match kind {
            RecordKind::ReadEvents => task.process_reads(input, &self.reads, recs, dead_letters),
            RecordKind::MessageEvents => {
                let (_, decoder) = self
                    .messages
                    .as_ref()
                    .ok_or(ProcessorError::NoMessageSource)?;
                task.process_messages(input, decoder, recs, dead_letters)
            }
        }
    }

    /// The repartition key of a source record (its conversation).
    pub(super) fn repartition_key(&self, payload: Option<&[u8]>) -> Result<i64, DecodeError> {
        self.reads.decode_ref(payload).map(|e| e.conversation_id.0)
    }

    /// A flush's outputs to their sinks' topics, keyed by conversation.
    pub(super) fn send_outputs(
        &mut self,
        out: &FlushOutput,
        collector: &mut RecordCollector,
    ) -> Sent {
        let (topic, encoder) = &self.receipts;
        for u in &out.updates {
            self.buf.clear();
            encoder.encode_update_into(u, &mut self.buf);
            let mut key = itoa::Buffer::new();
            let rec = BaseRecord::to(topic)
                .key(key.format(u.conversation_id.0).as_bytes())
                .payload(&self.buf);
            collector.send(rec);
        }
        let mut sent = Sent {
            updates: out.updates.len() as u64,
            heads: 0,
        };
        if let Some((topic, encoder)) = &self.heads {
            for u in &out.heads {
                self.buf.clear();
                encoder.encode_head_into(u, &mut self.buf);
                let mut key = itoa::Buffer::new();
                let rec = BaseRecord::to(topic.as_str())
                    .key(key.format(u.conversation_id.0).as_bytes())
                    .payload(&self.buf);
                collector.send(rec);
            }
            sent.heads = out.heads.len() as u64;
        }
        sent
    }
}

/// The first offset per partition of the records in `msgs` whose writer schema is unknown,
/// and the unknown ids.
pub(super) fn unknown_schemas(
    codecs: &Codecs,
    msgs: &[BorrowedMessage<'_>],
) -> (Vec<u32>, BTreeMap<(String, i32), i64>) {
    let mut ids: Vec<u32> = Vec::new();
    let mut first: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for m in msgs {
        if let Some(id) = codecs.unknown_schema(m) {
            if !ids.contains(&id) {
                ids.push(id);
            }
            first
                .entry((m.topic().to_owned(), m.partition()))
                .or_insert(m.offset());
        }
    }
    (ids, first)
}
