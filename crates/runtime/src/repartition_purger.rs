//! Repartition purging: as Kafka Streams does (`repartition.purge.interval.ms`), records of
//! the repartition topics below the committed offsets are deleted (DeleteRecords), so an
//! internal topic holds only what is not processed yet; the rerouted topics (misrouted
//! records on their way) are purged alike. The requests run on a thread of their own: the
//! commit path only hands over the offsets, at most once per interval.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::TopicPartition;
use crate::kafka::KafkaSettings;
use crate::topology::Source;

/// Offsets below which a repartition topic's records may go: (topic, partition, offset).
type Purge = Vec<(String, i32, i64)>;

pub(super) struct RepartitionPurger {
    tx: Option<mpsc::Sender<Purge>>,
    thread: Option<std::thread::JoinHandle<()>>,
    interval: Duration,
    last: Option<Instant>,
}

/// What an executor purges: the repartition topic its tasks read (if any) and the
/// rerouted topics. The purger (its thread and admin client) starts with the first
/// committed offset above 0 on one of them: most topologies never reroute a record.
pub(super) struct Purging {
    repartition: Option<String>,
    settings: KafkaSettings,
    interval: Duration,
    purger: Option<RepartitionPurger>,
}

impl Purging {
    pub(super) fn new(config: &super::RunConfig, source: &Source) -> Self {
        Self {
            repartition: source.repartition_topic.as_ref().map(|r| r.0.clone()),
            settings: config.kafka.clone(),
            interval: config.repartition_purge_interval,
            purger: None,
        }
    }

    /// Offsets just committed: those of the purged topics are passed on.
    pub(super) fn offer(&mut self, committed: &[(TopicPartition, i64)], rerouted: &[String]) {
        let purged = |t: &String| self.repartition.as_ref() == Some(t) || rerouted.contains(t);
        let below: Purge = (committed.iter())
            .filter(|((t, _), o)| *o > 0 && purged(t))
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect();
        if below.is_empty() {
            return;
        }
        let (settings, interval) = (&self.settings, self.interval);
        (self
            .purger
            .get_or_insert_with(|| RepartitionPurger::new(settings, interval)))
        .offer(below.into_iter());
    }
}

impl RepartitionPurger {
    pub(super) fn new(settings: &KafkaSettings, interval: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<Purge>();
        let admin: Option<AdminClient<DefaultClientContext>> = match settings
            .admin("purger")
            .create()
        {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "no admin client: repartition topics are not purged");
                None
            }
        };
        let thread = std::thread::Builder::new()
            .name("repartition-purge".into())
            .spawn(move || purge_loop(admin, rx))
            .ok();
        Self {
            tx: Some(tx),
            thread,
            interval,
            last: None,
        }
    }

    /// Offsets just committed; passed on when the interval has passed.
    pub(super) fn offer(&mut self, committed: impl Iterator<Item = (String, i32, i64)>) {
        if self.last.is_some_and(|t| t.elapsed() < self.interval) {
            return;
        }
        let purge: Purge = committed.collect();
        if purge.is_empty() {
            return;
        }
        self.last = Some(Instant::now());
        if let Some(tx) = &self.tx {
            let _ = tx.send(purge);
        }
    }
}

impl Drop for RepartitionPurger {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn purge_loop(admin: Option<AdminClient<DefaultClientContext>>, rx: mpsc::Receiver<Purge>) {
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let mut warned = false;
    while let Ok(purge) = rx.recv() {
        let Some(admin) = &admin else { continue };
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in &purge {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        match futures::executor::block_on(admin.delete_records(&tpl, &opts)) {
            Ok(result) => {
                let failed: Vec<String> = result
                    .elements()
                    .iter()
                    .filter_map(|e| {
                        e.error()
                            .err()
                            .map(|err| format!("{} [{}]: {err}", e.topic(), e.partition()))
                    })
                    .collect();
                if failed.is_empty() {
                    metrics::counter!("readstate_repartition_purges_total").increment(1);
                    tracing::debug!(
                        partitions = purge.len(),
                        "repartition records purged below the committed offsets"
                    );
                } else if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(errors = ?failed, "purging repartition records failed (repeats are logged at debug)");
                }
            }
            Err(e) if !std::mem::replace(&mut warned, true) => {
                tracing::warn!(error = %e, "purging repartition records failed (repeats are logged at debug)")
            }
            Err(e) => tracing::debug!(error = %e, "purging repartition records failed"),
        }
    }
}
