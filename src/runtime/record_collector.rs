//! RecordCollector (Kafka Streams' `RecordCollectorImpl`): every record an instance
//! produces goes through it: outputs, changelog records, dead letters, repartitioned
//! records. It counts what is in flight, remembers the highest acknowledged offset per
//! changelog partition (the next checkpoint), and surfaces every send error at `flush`:
//! an error is never swallowed, and names the topic and partition it happened on.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, PurgeConfig, ThreadedProducer};
use rdkafka::{ClientContext, Message};

use crate::kafka::{KafkaError, KafkaSettings};

/// How long `flush` waits beyond the producer's own message timeout before it reports a
/// failure.
const FLUSH_MARGIN: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Deliveries {
    /// Records handed to the producer whose delivery has not been reported yet.
    outstanding: u64,
    failed: u64,
    first_error: Option<String>,
    /// Highest offset acknowledged per changelog partition since the last `take`.
    changelog_high: HashMap<i32, i64>,
}

/// Producer context: counts outstanding and failed deliveries and remembers changelog
/// offsets. Waiting for acknowledgements waits on `drained` (signalled by the last delivery
/// report) rather than `flush`, which polls in 100 ms steps when another thread serves the
/// reports.
pub struct DeliveryTracker {
    changelog_topic: Option<String>,
    state: Mutex<Deliveries>,
    drained: Condvar,
}

impl DeliveryTracker {
    fn new(changelog_topic: Option<String>) -> Self {
        Self {
            changelog_topic,
            state: Mutex::new(Deliveries::default()),
            drained: Condvar::new(),
        }
    }

    fn sending(&self) {
        self.state.lock().expect("delivery lock").outstanding += 1;
    }

    fn settle(&self, s: &mut Deliveries, outcome: Result<(&str, i32, i64), String>) {
        s.outstanding = s.outstanding.saturating_sub(1);
        match outcome {
            Ok((topic, partition, offset)) => {
                if self.changelog_topic.as_deref() == Some(topic) {
                    let e = s.changelog_high.entry(partition).or_insert(offset);
                    *e = (*e).max(offset);
                }
            }
            Err(e) => {
                s.failed += 1;
                s.first_error.get_or_insert(e);
            }
        }
        if s.outstanding == 0 {
            self.drained.notify_all();
        }
    }

    /// Wait until nothing is in flight (or `timeout`), then report the first failure.
    fn wait(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().expect("delivery lock");
        while s.outstanding > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KafkaError::Delivery {
                    failed: s.outstanding,
                    last: format!("not acknowledged within {timeout:?}"),
                });
            }
            s = self.drained.wait_timeout(s, left).expect("delivery lock").0;
        }
        if s.failed > 0 {
            let err = KafkaError::Delivery {
                failed: s.failed,
                last: s.first_error.take().unwrap_or_default(),
            };
            s.failed = 0;
            return Err(err);
        }
        Ok(())
    }

    fn forget_failures(&self) {
        let mut s = self.state.lock().expect("delivery lock");
        s.failed = 0;
        s.first_error = None;
        s.changelog_high.clear();
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut s = self.state.lock().expect("delivery lock");
        let outcome = match result {
            Ok(m) => Ok((m.topic(), m.partition(), m.offset())),
            Err((e, m)) => Err(format!("{} [{}]: {e}", m.topic(), m.partition())),
        };
        self.settle(&mut s, outcome);
    }
}

/// Every produce of one instance.
pub struct RecordCollector {
    producer: ThreadedProducer<DeliveryTracker>,
    flush_timeout: Duration,
}

impl RecordCollector {
    /// A record not delivered within the group session timeout is not delivered at all
    /// (`message.timeout.ms` = `session.timeout.ms` unless set): once the session has
    /// expired another instance may own the partition, and a record queued before a pause
    /// must not be written after the new owner's. librdkafka drops expired records before
    /// it sends anything after a pause (its first loop turn scans for timeouts).
    pub fn new(
        settings: &KafkaSettings,
        changelog_topic: Option<String>,
    ) -> Result<Self, KafkaError> {
        let mut config = settings.producer();
        let explicit = settings
            .properties
            .iter()
            .any(|(k, _)| k == "message.timeout.ms" || k == "delivery.timeout.ms");
        if !explicit {
            let ms = settings.session_timeout().as_millis().max(1000);
            config.set("message.timeout.ms", ms.to_string());
        }
        let message_timeout = config
            .get("message.timeout.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(120), Duration::from_millis);
        let producer = config.create_with_context(DeliveryTracker::new(changelog_topic))?;
        Ok(Self {
            producer,
            flush_timeout: message_timeout + FLUSH_MARGIN,
        })
    }

    /// Enqueue a record (waiting while the local queue is full). A record the client
    /// refuses is counted as failed: `flush` reports it.
    pub fn send<K, P>(&self, rec: BaseRecord<'_, K, P>)
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let ctx = self.producer.context();
        ctx.sending();
        let (topic, partition) = (rec.topic.to_owned(), rec.partition);
        if let Err(e) = crate::kafka::send_waiting(&self.producer, rec) {
            let at = partition.map_or(String::new(), |p| format!(" [{p}]"));
            let mut s = ctx.state.lock().expect("delivery lock");
            ctx.settle(&mut s, Err(format!("{topic}{at}: {e}")));
        }
    }

    /// Wait until every record sent so far is acknowledged; the first failure since the
    /// last flush is returned.
    pub fn flush(&self) -> Result<(), KafkaError> {
        self.producer.context().wait(self.flush_timeout)
    }

    /// Forget changelog offsets acknowledged before this point.
    pub fn clear_changelog_offsets(&self) {
        let ctx = self.producer.context();
        ctx.state
            .lock()
            .expect("delivery lock")
            .changelog_high
            .clear();
    }

    /// Highest acknowledged changelog offset per partition since the last clear.
    pub fn take_changelog_offsets(&self) -> HashMap<i32, i64> {
        let ctx = self.producer.context();
        std::mem::take(&mut ctx.state.lock().expect("delivery lock").changelog_high)
    }

    /// Close dirty: records still queued locally are dropped (they belong to tasks this
    /// instance no longer owns), failures are forgotten.
    pub fn abandon(&self) {
        self.producer.purge(PurgeConfig::default().queue());
        let _ = self.producer.context().wait(Duration::from_secs(10));
        self.producer.context().forget_failures();
    }

    /// Close clean: wait for what is in flight (bounded).
    pub fn close(&self) {
        let _ = self.producer.flush(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_changelog_offsets_and_surfaces_the_first_error() {
        let t = DeliveryTracker::new(Some("cl".into()));
        for _ in 0..4 {
            t.sending();
        }
        {
            let mut s = t.state.lock().unwrap();
            t.settle(&mut s, Ok(("cl", 1, 7)));
            t.settle(&mut s, Ok(("cl", 1, 5)));
            t.settle(&mut s, Ok(("out", 1, 99)));
        }
        assert!(
            t.wait(Duration::from_millis(10)).is_err(),
            "one record still in flight"
        );
        t.settle(
            &mut t.state.lock().unwrap(),
            Err("out [2]: too large".into()),
        );
        let e = t.wait(Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("out [2]: too large"), "{e}");
        assert!(t.wait(Duration::from_secs(1)).is_ok(), "reported once");
        assert_eq!(t.state.lock().unwrap().changelog_high.get(&1), Some(&7));
        t.forget_failures();
        assert!(t.state.lock().unwrap().changelog_high.is_empty());
    }
}
