//! Kafka helpers shared by the MockCluster tests: producing, reading topics, offsets.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};

use crate::wait::{wait_for, wait_until, wait_until_explained};

pub fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A producer partitioning keys as Java clients (and readstate) do.
pub fn producer(brokers: &str) -> TestProducer {
    producer_with(brokers, "murmur2_random")
}

/// A producer with librdkafka's `partitioner` (e.g. `consistent_random`, its default).
pub fn producer_with(brokers: &str, partitioner: &str) -> TestProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", partitioner)
        .set("linger.ms", "5")
        .create_with_context(Deliveries::default())
        .unwrap()
}

/// A test's producer: its delivery failures are counted, and [`flush`] fails on them (a
/// record the test meant to send is never dropped unseen).
pub type TestProducer = ThreadedProducer<Deliveries>;

#[derive(Default)]
pub struct Deliveries {
    failures: std::sync::Mutex<Vec<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            let what = format!("{} [{}]: {e}", m.topic(), m.partition());
            self.failures.lock().unwrap().push(what);
        }
    }
}

/// Wait until every record sent is delivered; a failed delivery fails the test.
pub fn flush(p: &TestProducer) {
    p.flush(Duration::from_secs(30)).unwrap();
    let failures = p.context().failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} test record(s) not delivered, first: {}",
        failures.len(),
        failures[0]
    );
}

/// Send, waiting while the local queue is full.
pub fn send(p: &TestProducer, mut r: BaseRecord<'_, str, [u8]>) {
    loop {
        match p.send(r) {
            Ok(()) => return,
            Err((_, back)) => {
                r = back;
                p.flush(Duration::from_millis(100)).ok();
            }
        }
    }
}

fn partitions(c: &BaseConsumer, topic: &str) -> i32 {
    c.fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap()
        .topics()[0]
        .partitions()
        .len() as i32
}

/// Read a whole topic from the beginning until `done` holds and nothing more arrives
/// (bounded in time).
pub fn read_until<T>(
    brokers: &str,
    topic: &str,
    decode: impl Fn(&BorrowedMessage<'_>) -> T,
    done: impl Fn(&[T]) -> bool,
) -> Vec<T> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", suffix()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions(&c, topic) {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let out = std::cell::RefCell::new(Vec::new());
    wait_until_explained(
        &format!("reading {topic}"),
        Duration::from_secs(90),
        || {
            drain(&c, |r| match r {
                Ok(m) => out.borrow_mut().push(decode(&m)),
                Err(e) => eprintln!("reader: {e}"),
            });
            done(&out.borrow()).then_some(())
        },
        || format!("{} records read", out.borrow().len()),
    );
    out.into_inner()
}

/// Hand what `c` has (up to 100,000 records, each poll waiting at most 200 ms) to `f`.
fn drain(c: &BaseConsumer, mut f: impl FnMut(KafkaResult<BorrowedMessage<'_>>)) {
    for _ in 0..100_000 {
        match c.poll(Duration::from_millis(200)) {
            Some(r) => f(r),
            None => return,
        }
    }
}

/// High watermark per partition.
pub fn end_offsets(brokers: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    // A topic just created may not have its leaders yet: retry (bounded).
    let high = |p: i32| {
        wait_until(
            &format!("the watermarks of {topic} [{p}]"),
            Duration::from_secs(30),
            || match c.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                Ok((_, high)) => Some(high),
                Err(e) => {
                    eprintln!("watermarks of {topic} [{p}]: {e}; retrying");
                    None
                }
            },
        )
    };
    (0..partitions(&c, topic)).map(high).collect()
}

/// Offsets committed in Kafka by `group` per partition (-1: none).
pub fn committed(brokers: &str, group: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let n = partitions(&c, topic);
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    let out = (0..n)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect();
    drop(got); // before the consumer, or closing it can hang
    out
}

/// Encode read events (local schema id) and send them keyed by conversation, without
/// waiting for acknowledgements.
pub fn send_events(p: &TestProducer, topic: &str, events: &[readstate::model::ReadEvent]) {
    use readstate::serde::avro::{AvroReadEvent, EventEncoder};
    let enc = EventEncoder::new(
        readstate::serde::READ_EVENT_SCHEMA,
        readstate::serde::registry::LOCAL_READ_EVENT_ID,
    )
    .unwrap();
    for e in events {
        let v = enc.encode(&AvroReadEvent::from(e)).unwrap();
        let key = e.conversation_id.0.to_string();
        send(
            p,
            BaseRecord::to(topic)
                .key(key.as_str())
                .payload(v.as_slice()),
        );
    }
}

/// How many records a topic holds now (compaction and deletion make this less than the
/// end offsets; transaction markers and aborted records are not records).
pub fn count_records(brokers: &str, topic: &str) -> i64 {
    read_all(brokers, topic, |_| ()).len() as i64
}

/// Every record a read_committed consumer sees in a topic now, decoded, in offset order
/// per partition: read from the beginning until every partition reports its end.
pub fn read_all<T>(
    brokers: &str,
    topic: &str,
    decode: impl Fn(&BorrowedMessage<'_>) -> T,
) -> Vec<T> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("counter-{}", suffix()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let n = partitions(&c, topic);
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut at_end = std::collections::HashSet::new();
    let mut out = Vec::new();
    wait_for(
        &format!("reading {topic} to its end"),
        Duration::from_secs(90),
        || {
            drain(&c, |r| match r {
                Ok(m) => out.push(decode(&m)),
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                    at_end.insert(p);
                }
                Err(e) => eprintln!("reader: {e}"),
            });
            at_end.len() as i32 >= n
        },
    );
    out
}

/// Create a topic through the admin API (a real broker), with topic `config`.
pub fn create_topic(brokers: &str, name: &str, partitions: i32, config: &[(&str, &str)]) {
    create_replicated_topic(brokers, name, partitions, 1, config);
}

/// Create a topic with `replication` replicas of each partition.
pub fn create_replicated_topic(
    brokers: &str,
    name: &str,
    partitions: i32,
    replication: i32,
    config: &[(&str, &str)],
) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    for (k, v) in config {
        t = t.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in futures::executor::block_on(admin.create_topics([&t], &opts)).unwrap() {
        r.unwrap();
    }
}

/// Delete a topic through the admin API (a real broker) and wait until the metadata no
/// longer has it.
pub fn delete_topic(brokers: &str, name: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in futures::executor::block_on(admin.delete_topics(&[name], &opts)).unwrap() {
        r.unwrap();
    }
    wait_for(
        &format!("{name} to leave the metadata"),
        Duration::from_secs(30),
        || !topic_exists(brokers, name),
    );
}

/// Whether the cluster's metadata lists `name`.
pub fn topic_exists(brokers: &str, name: &str) -> bool {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let md = c.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    md.topics().iter().any(|t| t.name() == name)
}

/// Produce `events` at a steady pace (`per_100ms` every 100 ms) on a thread of its own;
/// each chunk is delivered before the next (waiting out a broker outage of up to 5
/// minutes), so an outage holds the pace.
pub fn produce_paced(
    brokers: String,
    topic: String,
    events: Vec<readstate::model::ReadEvent>,
    per_100ms: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let p = producer(&brokers);
        for chunk in events.chunks(per_100ms) {
            let started = std::time::Instant::now();
            send_events(&p, &topic, chunk);
            crate::wait::wait_until(
                "a paced chunk to be delivered",
                Duration::from_secs(300),
                || p.flush(Duration::from_secs(5)).ok(),
            );
            flush(&p);
            // The pace of the load, not a synchronisation.
            std::thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
        }
    })
}

/// Produce `(key, value)` records to `topic` with Sarama (Go), its default hash partitioner
/// (FNV-1a over the key): `bench/sarama-producer`, built by `scripts/test`
/// (`READSTATE_SARAMA_PRODUCER`).
pub fn sarama_produce(brokers: &str, topic: &str, records: &[(String, String)]) {
    use std::io::Write;
    let bin = std::env::var("READSTATE_SARAMA_PRODUCER").expect(
        "READSTATE_SARAMA_PRODUCER is not set: run scripts/test, which builds bench/sarama-producer",
    );
    let mut child = std::process::Command::new(bin)
        .args(["-brokers", brokers, "-topic", topic])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for (k, v) in records {
        writeln!(stdin, "{k}\t{v}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sarama-producer failed: {out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.trim(), format!("produced {} records", records.len()));
}

/// Create `t`'s internal topics on a mock cluster (which does not answer CreateTopics),
/// as `readstate run` would: `partitions` each (the sources' count), one for the dead
/// letters. A topic that exists already is left as it is.
pub fn create_internal_topics<C: ProducerContext>(
    mock: &rdkafka::mocking::MockCluster<'_, C>,
    t: &readstate::topology::Topology,
    partitions: i32,
) {
    for (topic, _) in t.internal_topics() {
        let n = match topic == t.dead_letter_topic {
            true => 1,
            false => partitions,
        };
        mock.create_topic(topic.as_str(), n, 1)
            .unwrap_or_else(|e| panic!("creating {topic} on the mock cluster: {e}"));
    }
}
