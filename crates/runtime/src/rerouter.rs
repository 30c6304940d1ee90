//! Misrouted records on their way to where they belong. A task's processor sets aside a
//! record found on a partition its conversation does not belong on (`Processor::
//! drain_rerouted`); the [`Rerouter`] produces it to its source's rerouted topic
//! (`<application>-<source>-rerouted`), on the partition it belongs on, with its origin in
//! a header. It goes through the record collector, so the next commit covers it like every
//! output: acknowledged before the offsets under at-least-once, in the transaction under
//! exactly_once_v2. The task that owns that partition reads it back as a record of the
//! source; its origin makes a replay of the partition it was found on a no-op there.

use std::time::Instant;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use super::record_collector::RecordCollector;
use super::repeat_log::{RepeatLog, REPEAT_INTERVAL};
use crate::ids::Origin;
use crate::task::{Rerouted, StreamTask};
use crate::topology::Topology;

pub(super) struct Rerouter {
    /// The rerouted topics of the topology (their records carry their origin).
    topics: Vec<String>,
    /// What the last task set aside (the buffer is reused).
    pending: Vec<Rerouted>,
    /// A warning per source topic per interval, with the count left out.
    log: RepeatLog,
}

impl Rerouter {
    pub(super) fn for_topology(t: &Topology) -> Self {
        Self {
            topics: (t.rerouted_topics().into_iter()).map(|r| r.0).collect(),
            pending: Vec::new(),
            log: RepeatLog::new(REPEAT_INTERVAL),
        }
    }

    /// Whether records of `topic` were produced by a rerouter (and carry their origin).
    pub(super) fn is_rerouted_topic(&self, topic: &str) -> bool {
        self.topics.iter().any(|t| t == topic)
    }

    /// The rerouted topics (purged below the committed offsets, as repartition topics).
    pub(super) fn topics(&self) -> &[String] {
        &self.topics
    }

    /// Produce what `task` set aside since the last call; returns how many records.
    pub(super) fn send(&mut self, task: &mut StreamTask, collector: &RecordCollector) -> u64 {
        task.drain_rerouted(&mut self.pending);
        let n = self.pending.len() as u64;
        for r in self.pending.drain(..) {
            collector.send(record(&r));
            if let Some(left_out) = self.log.admit(&r.found.0, Instant::now()) {
                let (topic, partition, offset) = &r.found;
                tracing::warn!(
                    topic, partition, offset,
                    to = %r.topic, belongs_on = r.partition,
                    left_out_since_last = left_out,
                    "misrouted record rerouted: {}", r.why
                );
            }
            metrics::counter!("readstate_rerouted_records_total").increment(1);
        }
        n
    }
}

/// The record of `r`: its key and value as found, its origin in a header.
fn record(r: &Rerouted) -> BaseRecord<'_, [u8], [u8]> {
    let headers = OwnedHeaders::new().insert(Header {
        key: Origin::HEADER,
        value: Some(&r.origin.to_bytes()),
    });
    let mut rec = BaseRecord::to(&r.topic)
        .partition(r.partition)
        .headers(headers);
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(v) = &r.value {
        rec = rec.payload(v.as_slice());
    }
    if let Some(ts) = r.timestamp {
        rec = rec.timestamp(ts);
    }
    rec
}
