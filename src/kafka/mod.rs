//! Kafka clients: settings shared by consumers and producers, and internal-topic admin.

pub mod admin;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};

use crate::task::DeadLetter;

/// Enqueue a record, waiting while the producer's local queue is full (back-pressure: the
/// producer's own thread drains it); any other error is returned.
pub fn send_waiting<C, K, P>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    mut rec: rdkafka::producer::BaseRecord<'_, K, P, C::DeliveryOpaque>,
) -> Result<(), rdkafka::error::KafkaError>
where
    C: rdkafka::producer::ProducerContext + 'static,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    use rdkafka::error::KafkaError as E;
    use rdkafka::types::RDKafkaErrorCode::QueueFull;
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((E::MessageProduction(QueueFull), r)) => {
                rec = r;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// The consumer's current group member id (librdkafka's `rd_kafka_memberid`); `None`
/// while it has none (not joined yet, or reset after a session timeout). A member id that
/// changed means the assignment made under the old one was lost.
pub fn member_id<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
) -> Option<String> {
    use rdkafka::consumer::Consumer;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live client handle of `consumer`; rd_kafka_memberid returns
    // either null or a NUL-terminated string allocated by librdkafka, which is copied and
    // then released with rd_kafka_mem_free as its documentation requires.
    unsafe {
        let p = rdkafka::bindings::rd_kafka_memberid(rk);
        if p.is_null() {
            return None;
        }
        let id = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        rdkafka::bindings::rd_kafka_mem_free(rk, p.cast());
        (!id.is_empty()).then_some(id)
    }
}

/// The provenance headers of a dead-letter record: `readstate.source.topic`, `.partition`,
/// `.offset`, `readstate.error.reason` and `.message`.
pub fn dead_letter_headers(d: &DeadLetter) -> OwnedHeaders {
    let partition = d.partition.to_string();
    let offset = d.offset.to_string();
    [
        ("readstate.source.topic", d.topic.as_bytes()),
        ("readstate.source.partition", partition.as_bytes()),
        ("readstate.source.offset", offset.as_bytes()),
        ("readstate.error.reason", d.reason.as_bytes()),
        ("readstate.error.message", d.error.as_bytes()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(5), |h, (key, v)| {
        h.insert(Header {
            key,
            value: Some(v),
        })
    })
}

/// Errors of the Kafka layer.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("topic {topic} does not exist and could not be created: {reason}")]
    MissingTopic { topic: String, reason: String },
    #[error("topic {topic} cannot be used: {reason}")]
    InvalidTopic { topic: String, reason: String },
    #[error("delivery of {failed} record(s) failed: {last}")]
    Delivery { failed: u64, last: String },
    #[error("invalid kafka property {0:?} (expected key=value)")]
    Property(String),
}

/// Broker address and librdkafka properties passed through (`-X key=value`).
#[derive(Debug, Clone, Default)]
pub struct KafkaSettings {
    pub brokers: String,
    pub properties: Vec<(String, String)>,
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            properties: Vec::new(),
        }
    }

    /// Add `key=value` pairs, rejecting anything else.
    pub fn with_properties(mut self, props: &[String]) -> Result<Self, KafkaError> {
        for p in props {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| KafkaError::Property(p.clone()))?;
            self.properties
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(self)
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    fn apply_overrides(&self, c: &mut ClientConfig) {
        for (k, v) in &self.properties {
            c.set(k, v);
        }
    }

    /// A group consumer: manual offset commits, cooperative-sticky assignment.
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Aborted transactions stay invisible (librdkafka's default, made explicit).
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "50")
            // The queue thresholds count the whole consumer queue (all partitions): once it
            // holds queued.min.messages, every partition's next fetch waits this long
            // (librdkafka's default of 1 s left the consumer idle for most of each second).
            .set("fetch.queue.backoff.ms", "10");
        self.apply_overrides(&mut c);
        c
    }

    /// The group consumer's `session.timeout.ms` (an override, or readstate's 10 s).
    pub fn session_timeout(&self) -> std::time::Duration {
        let ms = self
            .properties
            .iter()
            .rev()
            .find(|(k, _)| k == "session.timeout.ms")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(10_000);
        std::time::Duration::from_millis(ms)
    }

    /// A consumer without a group, for restoring changelogs by manual assignment.
    pub fn restore_consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10")
            .set("fetch.queue.backoff.ms", "10");
        self.apply_overrides(&mut c);
        c
    }

    /// An idempotent producer (no duplicates or reordering from retries), batched and
    /// compressed; Java-compatible key partitioning.
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4")
            .set("partitioner", "murmur2_random")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "120000");
        self.apply_overrides(&mut c);
        c
    }
}
