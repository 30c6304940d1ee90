//! SchemaGate: the sources' deserializers and the schema registry's park and resume
//! protocol. Before a polled batch is processed its unknown writer schemas are fetched;
//! while the registry cannot answer, the partitions whose records need them are parked
//! (paused, rewound to the first such record: nothing is dead-lettered, polling goes on)
//! and asked again on the registry's backoff; once it answers they resume.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;

use super::offsets::TopicPartition;
use super::parking::{ParkReason, Parking};
use super::tasks::Tasks;
use super::RuntimeError;
use crate::processor::SourceSerdes;
use crate::serde::SerdeError;

pub(super) struct SchemaGate {
    serdes: Arc<dyn SourceSerdes>,
    /// Registry calls are async; the poll loop blocks on them here.
    rt: tokio::runtime::Runtime,
}

impl SchemaGate {
    pub(super) fn new(serdes: Arc<dyn SourceSerdes>, rt: tokio::runtime::Runtime) -> Self {
        Self { serdes, rt }
    }

    pub(super) fn serdes(&self) -> &dyn SourceSerdes {
        &*self.serdes
    }

    /// Fetch unknown writer schemas. While the registry is unavailable the partitions
    /// whose records need them are parked (nothing is dead-lettered, polling goes on).
    pub(super) fn prepare<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tasks: &Tasks,
        parking: &mut Parking,
        msgs: &[BorrowedMessage<'_>],
    ) -> Result<(), RuntimeError> {
        let values: Vec<(&str, Option<&[u8]>)> =
            msgs.iter().map(|m| (m.topic(), m.payload())).collect();
        match self.rt.block_on(self.serdes.prepare(&values)) {
            Ok(()) => return Ok(()),
            Err(SerdeError::RegistryUnavailable(e)) => {
                tracing::warn!(error = %e, "schema registry unavailable: parking the partitions that need it")
            }
            Err(e) => return Err(e.into()),
        }
        let (ids, first) = unknown_schemas(&*self.serdes, msgs);
        // Everything polled for those partitions from the first record needing a schema on.
        for (tp, off) in first {
            let from = msgs
                .iter()
                .find(|m| m.topic() == tp.0 && m.partition() == tp.1)
                .map_or(off, |m| m.offset());
            if parking.contains(&tp) || !tasks.owns(&tp.0, tp.1) {
                continue;
            }
            parking.park(consumer, tp, ParkReason::Registry, Some(from))?;
        }
        parking.wait_for_registry(ids, Instant::now());
        Ok(())
    }

    /// Ask the registry again when due; once it answers, resume the parked partitions.
    pub(super) fn retry<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        parking: &mut Parking,
    ) -> Result<(), RuntimeError> {
        let Some(w) = parking.registry_due(Instant::now()) else {
            return Ok(());
        };
        let ids = w.ids.clone();
        match self.rt.block_on(self.serdes.prepare_ids(&ids)) {
            Ok(()) => {
                let w = parking.registry_due(Instant::now()).expect("due above");
                tracing::info!(after = ?w.since.elapsed(), "schema registry available again: resuming parked partitions");
                parking.registry_answered();
                for tp in parking.parked_for(ParkReason::Registry) {
                    parking.unpark(consumer, &tp)?;
                }
                Ok(())
            }
            Err(SerdeError::RegistryUnavailable(e)) => {
                let w = parking.registry_due(Instant::now()).expect("due above");
                tracing::warn!(error = %e, retry_in = ?w.backoff.peek(), down_for = ?w.since.elapsed(), "schema registry still unavailable");
                w.failed(Instant::now());
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The first offset per partition of the records in `msgs` whose writer schema is unknown,
/// and the unknown ids.
fn unknown_schemas(
    serdes: &dyn SourceSerdes,
    msgs: &[BorrowedMessage<'_>],
) -> (Vec<u32>, BTreeMap<TopicPartition, i64>) {
    let mut ids: Vec<u32> = Vec::new();
    let mut first: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    for m in msgs {
        if let Some(id) = serdes.unknown_schema(m.topic(), m.payload()) {
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
