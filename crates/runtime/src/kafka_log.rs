//! KafkaLog: the commit protocol's log ([`CommitLog`]) on Kafka, for one commit. Records
//! go through the instance's [`RecordCollector`]: outputs to their sink nodes' topics,
//! dead letters to the dead-letter topic, changelog records to partition p of their
//! store's changelog for task p. The completion commits the source offsets through the
//! group consumer (at-least-once) or in the collector's transaction (exactly_once_v2).

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::producer::BaseRecord;
use rdkafka::TopicPartitionList;
use std::collections::HashMap;

use super::membership::{refusal, Refusal};
use super::record_collector::{RecordCollector, TxnError};
use super::RuntimeError;
use crate::kafka::dead_letter_headers;
use crate::processor::SinkId;
use crate::task::commit::CommitLog;
use crate::task::DeadLetter;

/// Why a completion did not commit.
#[derive(Debug)]
pub(super) enum Refused {
    /// At-least-once: the coordinator refused the offsets while the group rebalances.
    Rebalancing(String),
    /// At-least-once: the coordinator refused the offsets because this member left.
    Gone(String),
    /// Exactly_once_v2: the transaction did not commit.
    Transaction(TxnError),
}

pub(super) struct KafkaLog<'a, C: ConsumerContext> {
    pub(super) collector: &'a RecordCollector,
    pub(super) consumer: &'a BaseConsumer<C>,
    /// The topic of each sink node, by `SinkId`.
    pub(super) sinks: &'a [String],
    /// The changelog topic of each store of a task.
    pub(super) changelogs: &'a [Option<String>],
    pub(super) dead_letter_topic: &'a str,
    /// The source offsets this commit completes with.
    pub(super) offsets: TopicPartitionList,
    /// Whether the coordinator (or the transaction) took `offsets`.
    pub(super) committed: bool,
}

impl<C: ConsumerContext> CommitLog for KafkaLog<'_, C> {
    type Error = RuntimeError;
    type Refusal = Refused;

    fn send_output(&mut self, _partition: i32, sink: SinkId, key: &[u8], value: &[u8]) {
        let rec = BaseRecord::to(self.sinks[sink.0].as_str())
            .key(key)
            .payload(value);
        self.collector.send(rec);
    }

    fn send_dead_letter(&mut self, d: &DeadLetter) {
        let headers = dead_letter_headers(d);
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(self.dead_letter_topic).headers(headers);
        if let Some(k) = d.key.as_deref() {
            rec = rec.key(k);
        }
        if let Some(v) = d.value.as_deref() {
            rec = rec.payload(v);
        }
        self.collector.send(rec);
    }

    fn send_changelog(&mut self, store: usize, partition: i32, key: &[u8], value: Option<&[u8]>) {
        let Some(topic) = &self.changelogs[store] else {
            return;
        };
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic.as_str()).partition(partition).key(key);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        self.collector.send(rec);
    }

    fn flush(&mut self) -> Result<(), RuntimeError> {
        Ok(self.collector.flush()?)
    }

    fn clear_changelog_offsets(&mut self) {
        self.collector.clear_changelog_offsets();
    }

    fn take_changelog_offsets(&mut self) -> HashMap<(usize, i32), i64> {
        self.collector.take_changelog_offsets()
    }

    /// A refusal while the group rebalances postpones the offsets; one because this
    /// member left the group is `Gone`; other failures are left to the next commit (replay
    /// marks make a replay harmless).
    fn commit_offsets(&mut self) -> Result<Result<(), Refused>, RuntimeError> {
        if self.offsets.count() == 0 {
            return Ok(Ok(()));
        }
        match self.consumer.commit(&self.offsets, CommitMode::Sync) {
            Ok(()) => self.committed = true,
            Err(e) => match refusal(&e) {
                Some(Refusal::Rebalancing) => return Ok(Err(Refused::Rebalancing(e.to_string()))),
                Some(Refusal::Gone) => {
                    let why = format!("offset commit refused: {e}");
                    return Ok(Err(Refused::Gone(why)));
                }
                None => {
                    metrics::counter!("readstate_commits_failed_total").increment(1);
                    tracing::warn!(error = %e, "offset commit failed; the next commit covers it");
                }
            },
        }
        Ok(Ok(()))
    }

    fn commit_transaction(&mut self) -> Result<Result<(), Refused>, RuntimeError> {
        let group = (self.consumer)
            .group_metadata()
            .ok_or(RuntimeError::NoGroupMetadata)?;
        match self.collector.commit_transaction(&self.offsets, &group) {
            Ok(()) => {
                self.committed = true;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(Refused::Transaction(e))),
        }
    }
}
