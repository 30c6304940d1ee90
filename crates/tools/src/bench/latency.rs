//! Latency (issue 27): a read produced → its receipt update on the output topic, and → its
//! row committed in PostgreSQL, at steady rates on a real broker, with
//! `min_emit_interval = "0s"`, the 1 s commit interval and the embedded sink's defaults
//! (batches of 500 rows or 1 s).
//!
//! Every event advances its key (its seq is the event's number) and carries its produce
//! time as `read_at`. An update's latency is when a consumer of the output topic receives
//! it minus its `read_at`; a row's is its `updated_at` (the sink's transaction) minus its
//! `read_at`, for the rows the sink changed, read every 250 ms. The first 5 s of each
//! rate (joining the group, the first assignment) are left out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::BaseRecord;
use rdkafka::{ClientConfig, Message};

use super::outage::Instance;
use super::{BenchError, Figure, PreProducer, Target};
use readstate::ids::{ConversationId, ReaderId};
use readstate::model::{ReadEvent, ReceiptUpdate};
use readstate::serde::avro::{AvroReadEvent, EventEncoder, UpdateDecoder};
use readstate::serde::registry::{LOCAL_READ_EVENT_ID, LOCAL_RECEIPT_UPDATE_ID};
use readstate::serde::{LocalRegistry, READ_EVENT_SCHEMA, RECEIPT_UPDATE_SCHEMA};

/// Left out of the figures: the group's first assignment.
const WARM_UP: Duration = Duration::from_secs(5);
/// Keys: conversations × readers; an event's key is its number modulo these.
const CONVERSATIONS: u64 = 10_000;
const READERS: u64 = 5;

/// How the latency figures run.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Read events per second, one run each.
    pub rates: Vec<u64>,
    /// Production per rate.
    pub duration: Duration,
    pub partitions: i32,
}

/// Latencies in milliseconds, with their percentiles.
struct Spread {
    samples: Vec<i64>,
}

impl Spread {
    fn new(mut samples: Vec<i64>) -> Self {
        samples.sort_unstable();
        Self { samples }
    }

    fn at(&self, q: f64) -> f64 {
        match self.samples.len() {
            0 => f64::NAN,
            n => self.samples[((n - 1) as f64 * q).round() as usize] as f64,
        }
    }

    fn note(&self) -> String {
        format!(
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} samples",
            self.at(0.5),
            self.at(0.99),
            self.at(1.0),
            self.samples.len()
        )
    }
}

/// The figures at each rate: p99 to the output topic and to PostgreSQL.
pub fn latency(brokers: &str, database_url: &str, l: &Latency) -> Result<Vec<Figure>, BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Other(e.to_string()))?;
    // The database and topics of each rate are made on `rt`.
    let mut figures = Vec::new();
    for &rate in &l.rates {
        let run = Instance::start(&rt, brokers, database_url, "latency", l.partitions)?;
        let (output, rows, reached) = at_rate(brokers, &run, rate, l.duration)?;
        drop(run);
        let produced = format!("produced at {reached:.0}/s");
        figures.push(Figure {
            name: format!("latency read -> receipt update at {rate}/s (p99)"),
            value: output.at(0.99),
            unit: "ms",
            target: Some(Target::AtMost(2000.0)),
            note: format!("{}; {produced}", output.note()),
        });
        figures.push(Figure {
            name: format!("latency read -> PostgreSQL row at {rate}/s (p99)"),
            value: rows.at(0.99),
            unit: "ms",
            target: None,
            note: format!("{}; {produced}", rows.note()),
        });
    }
    Ok(figures)
}

/// One rate: produce for `duration`, read the output and the table meanwhile, and 10 s
/// after.
fn at_rate(
    brokers: &str,
    run: &Instance,
    rate: u64,
    duration: Duration,
) -> Result<(Spread, Spread, f64), BenchError> {
    let started_ms = now_ms() + WARM_UP.as_millis() as i64;
    let last_sent = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (brokers, topic) = (brokers.to_owned(), format!("{}.events", run.app));
        let last_sent = last_sent.clone();
        std::thread::spawn(move || produce(&brokers, &topic, rate, duration, &last_sent))
    };
    let rows = {
        let (url, stop) = (run.db_url.clone(), stop.clone());
        std::thread::spawn(move || row_latencies(&url, started_ms, &stop))
    };
    let output = output_latencies(brokers, &run.app, started_ms, &last_sent);
    stop.store(true, Ordering::Relaxed);
    let reached = producer
        .join()
        .map_err(|_| BenchError::Other("the producer panicked".into()))??;
    let rows = (rows.join()).map_err(|_| BenchError::Other("the row reader panicked".into()))?;
    Ok((Spread::new(output?), Spread::new(rows?), reached))
}

fn now_ms() -> i64 {
    (SystemTime::now().duration_since(UNIX_EPOCH)).map_or(0, |d| d.as_millis() as i64)
}

/// `rate` events per second for `duration`, in 10 ms slices; each advances its key and
/// carries its produce time. `last_sent`: the last one's `read_at`, once all are sent.
/// Returns the rate reached (one producer thread may fall short of `rate`).
fn produce(
    brokers: &str,
    topic: &str,
    rate: u64,
    duration: Duration,
    last_sent: &std::sync::atomic::AtomicI64,
) -> Result<f64, BenchError> {
    let producer: PreProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Placed as Java clients and readstate place them (the source's partitioner).
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .map_err(|e| BenchError::Other(format!("kafka: {e}")))?;
    let encoder = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)?;
    let per_slice = (rate / 100).max(1);
    let events = rate * duration.as_secs();
    let started = Instant::now();
    let mut read_at = 0;
    for i in 0..events {
        let due = started + Duration::from_millis(10 * (i / per_slice));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        read_at = now_ms();
        let e = ReadEvent {
            reader_id: ReaderId::from(((i / CONVERSATIONS) % READERS) as i64),
            conversation_id: ConversationId::from((i % CONVERSATIONS) as i64),
            message_seq: i as i64,
            message_id: None,
            sender_id: None,
            device_id: None,
            read_at_ms: read_at,
        };
        let key = e.conversation_id.0.to_string();
        let value = encoder.encode(&AvroReadEvent::from(&e))?;
        readstate::kafka::send_waiting(&producer, BaseRecord::to(topic).key(&key).payload(&value))
            .map_err(|e| BenchError::Other(format!("kafka: producing to {topic}: {e}")))?;
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30))
        .map_err(|e| BenchError::Other(format!("kafka: {e}")))?;
    last_sent.store(read_at, Ordering::Relaxed);
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Receive time minus `read_at` of every update of events read at `from_ms` or later,
/// until 10 s after the last event was sent (an update later than that would be a
/// latency over 10 s, which the figures would show as missing samples).
fn output_latencies(
    brokers: &str,
    app: &str,
    from_ms: i64,
    last_sent: &std::sync::atomic::AtomicI64,
) -> Result<Vec<i64>, BenchError> {
    let kafka = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{app}-latency"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(kafka)?;
    c.subscribe(&[&format!("{app}.updates")]).map_err(kafka)?;
    let mut dec = UpdateDecoder::new(Arc::new(LocalRegistry::new()), RECEIPT_UPDATE_SCHEMA)?;
    let mut header = vec![0u8];
    header.extend_from_slice(&LOCAL_RECEIPT_UPDATE_ID.to_be_bytes());
    futures::executor::block_on(dec.prepare(std::iter::once(Some(header.as_slice()))))?;
    let mut samples = Vec::new();
    loop {
        let last = last_sent.load(Ordering::Relaxed);
        if last != i64::MAX && now_ms() > last + 10_000 {
            return Ok(samples);
        }
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let received = now_ms();
        let Some(payload) = m.map_err(kafka)?.payload().map(<[u8]>::to_vec) else {
            continue;
        };
        let u = ReceiptUpdate::from(dec.decode(&payload).map_err(other)?);
        let Some(read_at) = u.read_at_ms else {
            continue;
        };
        if read_at >= from_ms {
            samples.push(received - read_at);
        }
    }
}

/// `updated_at - read_at` of the rows the sink changed, read every 250 ms until `stop`.
fn row_latencies(url: &str, from_ms: i64, stop: &AtomicBool) -> Result<Vec<i64>, BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Other(e.to_string()))?;
    rt.block_on(async {
        let client = crate::demo::connect(url).await.map_err(other)?;
        let (mut samples, mut since) = (Vec::new(), 0i64);
        while !stop.load(Ordering::Relaxed) {
            let rows = client
                .query(
                    "SELECT (extract(epoch FROM updated_at) * 1000)::int8,
                            (extract(epoch FROM read_at) * 1000)::int8
                     FROM read_receipts WHERE updated_at > to_timestamp($1::int8 / 1000.0)",
                    &[&since],
                )
                .await
                .map_err(other)?;
            for r in rows {
                let (updated, read_at): (i64, i64) = (r.get(0), r.get(1));
                since = since.max(updated);
                if read_at >= from_ms {
                    samples.push(updated - read_at);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(samples)
    })
}

fn other(e: impl std::fmt::Display) -> BenchError {
    BenchError::Other(e.to_string())
}
