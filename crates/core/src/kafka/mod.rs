//! Kafka clients: settings shared by consumers and producers, and internal-topic admin.

pub mod admin;
pub mod partitioner;

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
/// How many records of a partition a consumer has not consumed yet, from its statistics:
/// from the position after the last record handed to the application to the log's end
/// (the last stable offset under read_committed). None before either is known.
///
/// librdkafka's own `consumer_lag` counts from the committed offset, which offsets
/// committed through a transaction never move, and it counts a transaction's commit
/// marker as a record; so a fetcher that has passed the end with nothing queued is 0
/// behind, whatever the marker.
pub fn records_behind(s: &rdkafka::statistics::Partition) -> Option<i64> {
    let end = if s.ls_offset >= 0 {
        s.ls_offset
    } else {
        s.hi_offset
    };
    if end < 0 {
        return None;
    }
    if s.fetchq_cnt == 0 && s.next_offset >= end {
        return Some(0);
    }
    let position = s.app_offset.max(s.committed_offset);
    (position >= 0).then(|| (end - position).max(0))
}

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

/// The longest error message a dead letter's header carries.
const DEAD_LETTER_MAX_MESSAGE: usize = 1024;

/// The provenance headers of a dead-letter record: `readstate.source.topic`, `.partition`,
/// `.offset`, `readstate.error.reason` and `.message`, and, when the dead letter carries
/// less than the record, `readstate.key.truncated` / `readstate.value.truncated` with the
/// record's sizes.
pub fn dead_letter_headers(d: &DeadLetter) -> OwnedHeaders {
    let partition = d.partition.to_string();
    let offset = d.offset.to_string();
    let mut end = d.error.len().min(DEAD_LETTER_MAX_MESSAGE);
    while !d.error.is_char_boundary(end) {
        end -= 1;
    }
    let truncated = [
        ("readstate.key.truncated", d.key_truncated_from),
        ("readstate.value.truncated", d.value_truncated_from),
    ]
    .map(|(k, n)| (k, n.map(|n| n.to_string())));
    let fixed = [
        ("readstate.source.topic", d.topic.as_bytes()),
        ("readstate.source.partition", partition.as_bytes()),
        ("readstate.source.offset", offset.as_bytes()),
        ("readstate.error.reason", d.reason.as_bytes()),
        ("readstate.error.message", &d.error.as_bytes()[..end]),
    ];
    let sizes = truncated
        .iter()
        .filter_map(|(k, n)| n.as_ref().map(|n| (*k, n.as_bytes())));
    fixed
        .into_iter()
        .chain(sizes)
        .fold(OwnedHeaders::new_with_capacity(7), |h, (key, v)| {
            h.insert(Header {
                key,
                value: Some(v),
            })
        })
}

/// Drop a librdkafka client on a thread of its own: closing one waits for its threads
/// (tens of milliseconds, ~100 ms for a consumer), which start-up need not wait for.
pub fn close_in_background<T: Send + 'static>(client: T) {
    std::thread::spawn(move || drop(client));
}

/// How long closing a group consumer may take before the instance stops without it:
/// KafkaConsumer's default close timeout.
pub const CONSUMER_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Drop (close) a group consumer, waiting at most `limit`; false if it did not close in
/// time. Closing waits for librdkafka's group state machine to leave the group, and
/// librdkafka 2.12.1 can wait forever when a close meets a rebalance in progress (seen
/// once in the chaos test: a consumer's close still waiting 60 s after a rebalance the
/// session timeout had long ended). Past the limit the consumer is left to close on its
/// own thread: the instance has already committed and closed its tasks, and the group
/// drops the member at its session timeout, as after a crash.
pub fn close_within<T: Send + 'static>(what: &str, client: T, limit: std::time::Duration) -> bool {
    let (done, closed) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            drop(client);
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(what, error = %e, "cannot start a thread to close the consumer");
        return false;
    }
    let ok = closed.recv_timeout(limit).is_ok();
    if !ok {
        tracing::warn!(what, limit_s = limit.as_secs(), "consumer did not close in time; stopping without it (the group drops the member at its session timeout)");
    }
    ok
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
    /// Records the producer could not deliver. `expired`: every failure was a timeout
    /// (the records outlived `message.timeout.ms`, as after a pause), none a refusal.
    #[error("delivery of {failed} record(s) failed: {last}")]
    Delivery {
        failed: u64,
        last: String,
        expired: bool,
    },
    #[error("invalid kafka property {0:?} (expected [consumer.|producer.|admin.]key=value)")]
    Property(String),
    #[error("kafka property {key} cannot be set: readstate sets it ({why})")]
    Guarded { key: String, why: &'static str },
    #[error("kafka properties file {0}")]
    PropertyFile(String),
    /// A `READSTATE_KAFKA_*` variable that librdkafka refuses as a property.
    #[error("environment variable {var} is read as the librdkafka property {key:?}, which librdkafka refuses ({why}); every READSTATE_KAFKA_* variable is a client property: fix its name or value, or unset it")]
    EnvProperty {
        var: String,
        key: String,
        why: String,
    },
}

/// Which clients a librdkafka property is for: `consumer.`, `producer.` and `admin.`
/// prefixes, as in Kafka Streams; without a prefix, every client it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    Consumer,
    Producer,
    Admin,
}

/// One `-X` (or file, or environment) property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientProperty {
    pub scope: Scope,
    pub key: String,
    pub value: String,
}

/// Properties readstate's guarantees rely on: set by readstate, refused from users.
const GUARDED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use --brokers (KAFKA_BROKERS)"),
    ("group.id", "it is the topology's application.id"),
    (
        "enable.auto.commit",
        "offsets are committed only after outputs are durable",
    ),
    (
        "auto.commit.enable",
        "offsets are committed only after outputs are durable",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored by the commit protocol",
    ),
    (
        "enable.idempotence",
        "retries must not duplicate or reorder outputs",
    ),
    (
        "acks",
        "outputs must be on every in-sync replica before offsets commit",
    ),
    (
        "request.required.acks",
        "outputs must be on every in-sync replica before offsets commit",
    ),
    (
        "isolation.level",
        "aborted transactions must stay invisible",
    ),
    (
        "transactional.id",
        "it is derived from application.id and the instance's process id",
    ),
    (
        "enable.partition.eof",
        "the poll loop does not handle end-of-partition events",
    ),
    (
        "partitioner",
        "repartitioned and output records are placed with murmur2, as the tasks check them; declare a source's producers' partitioner in the topology",
    ),
];

/// librdkafka's consumer-only properties (CONFIGURATION.md, type C): not given to producers
/// or admin clients when set without a prefix.
const CONSUMER_ONLY: &[&str] = &[
    "auto.commit.interval.ms",
    "auto.offset.reset",
    "check.crcs",
    "consume.callback.max.messages",
    "coordinator.query.interval.ms",
    "fetch.error.backoff.ms",
    "fetch.max.bytes",
    "fetch.message.max.bytes",
    "fetch.min.bytes",
    "fetch.queue.backoff.ms",
    "fetch.wait.max.ms",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "heartbeat.interval.ms",
    "max.partition.fetch.bytes",
    "max.poll.interval.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "partition.assignment.strategy",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "session.timeout.ms",
];

/// librdkafka's producer-only properties (type P).
const PRODUCER_ONLY: &[&str] = &[
    "batch.num.messages",
    "batch.size",
    "compression.codec",
    "compression.level",
    "compression.type",
    "delivery.report.only.error",
    "delivery.timeout.ms",
    "enable.gapless.guarantee",
    "linger.ms",
    "message.send.max.retries",
    "message.timeout.ms",
    "partitioner",
    "queue.buffering.backpressure.threshold",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "queue.buffering.max.ms",
    "queuing.strategy",
    "request.timeout.ms",
    "retries",
    "sticky.partitioning.linger.ms",
    "transaction.timeout.ms",
];

/// Environment variables read as client properties: `READSTATE_KAFKA_SASL_PASSWORD` is
/// `sasl.password`, `READSTATE_KAFKA_CONSUMER_FETCH_MAX_BYTES` is
/// `consumer.fetch.max.bytes` (`_` is `.`, `__` is `_`). `READSTATE_KAFKA_CONFIG` names a
/// properties file instead; the names of [`ENV_NOT_PROPERTIES`] are not properties.
pub const ENV_PREFIX: &str = "READSTATE_KAFKA_";

/// Variables under [`ENV_PREFIX`] that are not client properties: the properties file,
/// and the names older versions of `scripts/kafka` printed and read (now
/// `READSTATE_BROKER_DIR` and `READSTATE_BROKER_CACHE`), still exported in users' shells.
pub const ENV_NOT_PROPERTIES: [&str; 3] = [
    "READSTATE_KAFKA_CONFIG",
    "READSTATE_KAFKA_RUN",
    "READSTATE_KAFKA_CACHE",
];

/// Broker address and librdkafka properties passed through (from a file, the environment
/// and `-X key=value`, later ones winning), and the client id prefix of this instance.
#[derive(Debug, Clone, Default)]
pub struct KafkaSettings {
    pub brokers: String,
    pub properties: Vec<ClientProperty>,
    /// `client.id` of every client is `<prefix>-<role>` (consumer, producer, ...).
    pub client_id: Option<String>,
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// Add `[consumer.|producer.|admin.]key=value` pairs; anything else, and the
    /// properties readstate sets itself, are refused.
    pub fn with_properties(mut self, props: &[String]) -> Result<Self, KafkaError> {
        for p in props {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| KafkaError::Property(p.clone()))?;
            self.add(k.trim(), v.trim())?;
        }
        Ok(self)
    }

    /// Add the properties of a Java-style properties file (`key=value` lines, `#` and `!`
    /// comments), e.g. secrets kept out of the command line.
    pub fn with_properties_file(mut self, path: &std::path::Path) -> Result<Self, KafkaError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            KafkaError::PropertyFile(format!("{}: cannot read: {e}", path.display()))
        })?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| {
                KafkaError::PropertyFile(format!(
                    "{}:{}: expected key=value",
                    path.display(),
                    i + 1
                ))
            })?;
            self.add(k.trim(), v.trim()).map_err(|e| {
                KafkaError::PropertyFile(format!("{}:{}: {e}", path.display(), i + 1))
            })?;
        }
        Ok(self)
    }

    /// Add the `READSTATE_KAFKA_*` variables of `vars` (see [`ENV_PREFIX`]).
    pub fn with_env(
        mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, KafkaError> {
        let mut found: Vec<(String, String, String)> = vars
            .into_iter()
            .filter(|(k, _)| !ENV_NOT_PROPERTIES.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((env_property(k.strip_prefix(ENV_PREFIX)?), v, k)))
            .collect();
        found.sort();
        for (k, v, var) in found {
            check_env_property(&var, &k, &v)?;
            self.add(&k, &v)?;
        }
        Ok(self)
    }

    /// `client.id` of every client: `<prefix>-<role>`.
    pub fn with_client_id(mut self, prefix: impl Into<String>) -> Self {
        self.client_id = Some(prefix.into());
        self
    }

    fn add(&mut self, key: &str, value: &str) -> Result<(), KafkaError> {
        let (scope, key) = match key.split_once('.') {
            Some(("consumer", k)) => (Scope::Consumer, k),
            Some(("producer", k)) => (Scope::Producer, k),
            Some(("admin", k)) => (Scope::Admin, k),
            _ => (Scope::All, key),
        };
        if key.is_empty() {
            return Err(KafkaError::Property(format!("{key}={value}")));
        }
        if let Some((_, why)) = GUARDED.iter().find(|(g, _)| *g == key) {
            return Err(KafkaError::Guarded {
                key: key.to_owned(),
                why,
            });
        }
        self.properties.push(ClientProperty {
            scope,
            key: key.to_owned(),
            value: value.to_owned(),
        });
        Ok(())
    }

    /// The value of `key` as the clients of `scope` get it (the last one set).
    pub fn property(&self, scope: Scope, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .rev()
            .find(|p| p.key == key && (p.scope == scope || p.scope == Scope::All))
            .map(|p| p.value.as_str())
    }

    fn base(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        // librdkafka connects to one broker at a time, at most every reconnect.backoff.ms
        // / 2 (default 100 ms): each new client waited ~50 ms to reach the broker named in
        // the bootstrap metadata. 20 ms (the Java client's default is 50) makes that 11 ms;
        // reconnects still back off exponentially up to reconnect.backoff.max.ms.
        c.set("reconnect.backoff.ms", "20");
        let prefix = self
            .property(Scope::All, "client.id")
            .map(str::to_owned)
            .or_else(|| self.client_id.clone());
        if let Some(p) = prefix {
            c.set("client.id", format!("{p}-{role}"));
        }
        c
    }

    fn apply_overrides(&self, c: &mut ClientConfig, scope: Scope) {
        for p in &self.properties {
            let applies = match p.scope {
                Scope::All => match scope {
                    Scope::Consumer => !PRODUCER_ONLY.contains(&p.key.as_str()),
                    _ => !CONSUMER_ONLY.contains(&p.key.as_str()),
                },
                s => s == scope,
            };
            if applies && p.key != "client.id" {
                c.set(&p.key, &p.value);
            }
        }
    }

    /// Whether the group consumers use the consumer group protocol of KIP-848
    /// (`group.protocol=consumer`): assignment by the group coordinator
    /// (`group.remote.assignor`), session and heartbeat set broker side, and every
    /// rebalance incremental.
    pub fn consumer_protocol(&self) -> bool {
        self.property(Scope::Consumer, "group.protocol")
            .is_some_and(|v| v.eq_ignore_ascii_case("consumer"))
    }

    /// A group consumer: manual offset commits, cooperative-sticky assignment (under the
    /// classic protocol; the consumer protocol's are the coordinator's).
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base("consumer");
        if !self.consumer_protocol() {
            c.set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "1000");
        }
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Aborted transactions stay invisible (librdkafka's default, made explicit).
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "50")
            // The queue thresholds count the whole consumer queue (all partitions): once it
            // holds queued.min.messages, every partition's next fetch waits this long
            // (librdkafka's default of 1 s left the consumer idle for most of each second).
            .set("fetch.queue.backoff.ms", "10")
            // Records fetched ahead, for all partitions together. librdkafka's defaults
            // (64 MiB, 100,000 messages) held a third of a 32-partition instance's peak
            // RSS: each queued message is also a ~200-byte op (heaptrack: 19 MiB of ops).
            // 2 MiB and 20,000 messages (two polls of max_poll_records) are still ~20 ms
            // of input at 1M events/s; measured: the same events/s, -60 MiB.
            .set("queued.max.messages.kbytes", "2048")
            .set("queued.min.messages", "20000");
        self.apply_overrides(&mut c, Scope::Consumer);
        c
    }

    /// The group consumer's `session.timeout.ms` (an override, or readstate's 10 s).
    pub fn session_timeout(&self) -> std::time::Duration {
        let ms = self
            .property(Scope::Consumer, "session.timeout.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(10_000);
        std::time::Duration::from_millis(ms)
    }

    /// A consumer without a group, for restoring changelogs by manual assignment (and
    /// metadata requests); `group` only names its offsets, nothing joins it.
    pub fn restore_consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base("restore-consumer");
        c.set("group.id", group)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10")
            .set("fetch.queue.backoff.ms", "10");
        self.apply_overrides(&mut c, Scope::Consumer);
        c
    }

    /// An admin client (topics, records deletion, configs).
    pub fn admin(&self, role: &str) -> ClientConfig {
        let mut c = self.base(role);
        self.apply_overrides(&mut c, Scope::Admin);
        c
    }

    /// An idempotent producer (no duplicates or reordering from retries), batched and
    /// compressed; Java-compatible key partitioning.
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.base("producer");
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4")
            .set("partitioner", "murmur2_random")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "120000");
        self.apply_overrides(&mut c, Scope::Producer);
        c
    }
}

/// `SASL_PASSWORD` → `sasl.password`; `__` → `_`.
/// librdkafka must know the property a `READSTATE_KAFKA_*` variable names (scope prefix
/// aside), and take its value: else the error names the variable, not only the property.
fn check_env_property(var: &str, key: &str, value: &str) -> Result<(), KafkaError> {
    let bare = ["consumer.", "producer.", "admin."]
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key);
    match ClientConfig::new().set(bare, value).create_native_config() {
        Err(rdkafka::error::KafkaError::ClientConfig(_, why, _, _)) => {
            Err(KafkaError::EnvProperty {
                var: var.to_owned(),
                key: bare.to_owned(),
                why,
            })
        }
        _ => Ok(()),
    }
}

fn env_property(name: &str) -> String {
    name.to_ascii_lowercase()
        .split("__")
        .map(|part| part.replace('_', "."))
        .collect::<Vec<_>>()
        .join("_")
}

#[cfg(test)]
mod tests {
    #[test]
    fn records_behind_counts_from_the_position_and_ignores_markers() {
        use rdkafka::statistics::Partition;
        let p = |app, committed, next, ls, hi, queued| Partition {
            app_offset: app,
            committed_offset: committed,
            next_offset: next,
            ls_offset: ls,
            hi_offset: hi,
            fetchq_cnt: queued,
            ..Partition::default()
        };
        // Offsets committed in transactions: librdkafka's committed offset stays behind.
        assert_eq!(
            super::records_behind(&p(900, 100, 1000, 1000, 1000, 5)),
            Some(100)
        );
        // Consumed to the end, the last offset a commit marker.
        assert_eq!(
            super::records_behind(&p(999, -1001, 1000, 1000, 1000, 0)),
            Some(0)
        );
        // Not consuming yet (restoring): from the committed offset.
        assert_eq!(
            super::records_behind(&p(-1001, 40, 40, 100, 100, 0)),
            Some(60)
        );
        assert_eq!(
            super::records_behind(&p(-1001, -1001, -1001, -1, -1, 0)),
            None
        );
    }

    use super::*;

    fn props(list: &[&str]) -> Result<KafkaSettings, KafkaError> {
        let v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        KafkaSettings::new("b:9092").with_properties(&v)
    }

    #[test]
    fn prefixes_pick_the_client_and_unprefixed_properties_go_where_they_apply() {
        let s = props(&[
            "session.timeout.ms=6000",
            "linger.ms=20",
            "producer.compression.type=zstd",
            "consumer.fetch.max.bytes=1000",
            "admin.socket.timeout.ms=7000",
            "security.protocol=SSL",
        ])
        .unwrap()
        .with_client_id("app-1");
        let c = s.consumer("g");
        let p = s.producer();
        let a = s.admin("admin");
        assert_eq!(c.get("session.timeout.ms"), Some("6000"));
        assert_eq!(p.get("session.timeout.ms"), None, "consumer-only");
        assert_eq!(a.get("session.timeout.ms"), None);
        assert_eq!(p.get("linger.ms"), Some("20"));
        assert_eq!(c.get("linger.ms"), None, "producer-only");
        assert_eq!(p.get("compression.type"), Some("zstd"));
        assert_eq!(c.get("fetch.max.bytes"), Some("1000"));
        assert_eq!(p.get("fetch.max.bytes"), None);
        assert_eq!(a.get("socket.timeout.ms"), Some("7000"));
        assert_eq!(c.get("socket.timeout.ms"), None);
        for cfg in [&c, &p, &a] {
            assert_eq!(cfg.get("security.protocol"), Some("SSL"));
        }
        assert_eq!(c.get("client.id"), Some("app-1-consumer"));
        assert_eq!(p.get("client.id"), Some("app-1-producer"));
        assert_eq!(s.session_timeout().as_millis(), 6000);
    }

    #[test]
    fn guarded_properties_are_refused_with_or_without_a_prefix() {
        for bad in [
            "enable.auto.commit=true",
            "consumer.isolation.level=read_uncommitted",
            "producer.acks=1",
            "enable.idempotence=false",
            "producer.transactional.id=x",
            "producer.partitioner=consistent",
        ] {
            let e = props(&[bad]).unwrap_err().to_string();
            assert!(e.contains("readstate sets it"), "{bad}: {e}");
        }
        assert!(props(&["nonsense"]).is_err());
    }

    #[test]
    fn files_and_environment_variables_give_properties_too() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("client.properties");
        std::fs::write(
            &f,
            "# secrets\nsasl.username = reader\n\nconsumer.fetch.min.bytes=10\n",
        )
        .unwrap();
        let s = KafkaSettings::new("b")
            .with_properties_file(&f)
            .unwrap()
            .with_env([
                (
                    "READSTATE_KAFKA_SASL_PASSWORD".to_owned(),
                    "s3cret".to_owned(),
                ),
                (
                    "READSTATE_KAFKA_PRODUCER_LINGER_MS".to_owned(),
                    "7".to_owned(),
                ),
                ("OTHER".to_owned(), "z".to_owned()),
                // What older scripts/kafka printed: not properties.
                ("READSTATE_KAFKA_RUN".to_owned(), "/tmp/k".to_owned()),
                ("READSTATE_KAFKA_CACHE".to_owned(), "/tmp/c".to_owned()),
            ])
            .unwrap();
        assert!(
            (s.properties.iter()).all(|p| !matches!(p.key.as_str(), "run" | "cache")),
            "{:?}",
            s.properties
        );
        let c = s.consumer("g");
        assert_eq!(c.get("sasl.username"), Some("reader"));
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("fetch.min.bytes"), Some("10"));
        assert_eq!(s.producer().get("linger.ms"), Some("7"));
        // A variable librdkafka does not take is refused naming the variable (`__` is `_`).
        for (var, key) in [
            ("READSTATE_KAFKA_SSL__X", "ssl_x"),
            ("READSTATE_KAFKA_BROKER_DIR", "broker.dir"),
        ] {
            let e = KafkaSettings::new("b")
                .with_env([(var.to_owned(), "y".to_owned())])
                .unwrap_err()
                .to_string();
            assert!(e.contains(var) && e.contains(&format!("{key:?}")), "{e}");
        }
        std::fs::write(&f, "enable.auto.commit=true\n").unwrap();
        let e = KafkaSettings::new("b")
            .with_properties_file(&f)
            .unwrap_err();
        assert!(e.to_string().contains("client.properties:1"), "{e}");
    }

    /// A client whose drop waits until the test lets it go.
    struct BlockingDrop(std::sync::mpsc::Receiver<()>);

    impl Drop for BlockingDrop {
        fn drop(&mut self) {
            let _ = self.0.recv();
        }
    }

    #[test]
    fn a_close_that_hangs_is_given_up_after_the_limit_and_a_quick_one_is_not() {
        let (release, blocked) = std::sync::mpsc::channel();
        let limit = std::time::Duration::from_millis(50);
        assert!(!close_within("test", BlockingDrop(blocked), limit));
        release.send(()).unwrap();
        let (release, quick) = std::sync::mpsc::channel();
        release.send(()).unwrap();
        assert!(close_within(
            "test",
            BlockingDrop(quick),
            std::time::Duration::from_secs(60)
        ));
    }
}
