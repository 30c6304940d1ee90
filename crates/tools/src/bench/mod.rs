//! `readstate bench`: figures for a stated workload, each printed next to its target.
//!
//! - **core**: decode (Confluent wire format, Avro) → fold → coalesce → flush into RocksDB,
//!   in-process on one thread, no broker; events/s. **json decode**: users' JSON read events
//!   through a field mapping, decoding alone; events/s.
//! - **restore**: changelog records applied into an empty RocksDB store in the batches the
//!   runtime uses (`RESTORE_BATCH` records, each batch atomic with its checkpoint); records/s. The
//!   records come from memory, so this is the store side of a restore, not the fetch.
//! - **sink**: version-guarded `UNNEST` upserts into PostgreSQL through the sink's
//!   [`PostgresTable`], one transaction per batch with its offsets; rows/s per batch size.
//!
//! - **startup** ([`startup`]): process start to the first record processed, new and
//!   restarted, on a real broker, with the phases from the instance's log.
//! - **versus** ([`versus`]): readstate and the Kafka Streams application of
//!   `bench/kafka-streams` on the same pre-produced topic of a real broker, as processes.
//!
//! Figures are printed, never asserted: this machine is shared and noisy.

pub mod ids;
pub mod latency;
pub mod outage;
pub mod queries;
pub mod startup;
pub mod unread;
pub mod versus;

use std::time::{Duration, Instant};

use crate::loadgen::{Generated, Generator, WorkloadSpec};
use readstate::ids::{Origin, StoreName};
use readstate::model::ReceiptUpdate;
use readstate::processor::restorers::ReadStateRestorer;
use readstate::processor::{EmitPolicy, ReadStateProcessor};
use readstate::serde::avro::{AvroReadEvent, EventEncoder};
use readstate::serde::registry::LOCAL_READ_EVENT_ID;
use readstate::serde::{EventDecoder, LocalRegistry, READ_EVENT_SCHEMA};
use readstate::sink::batch::{PartitionRange, WriteBatch};
use readstate::sink::table::ReceiptTable;
use readstate::sink::PostgresTable;
use readstate::state::rocks::{RocksDbOptions, RocksDbStore};
use readstate::state::KeyValueStore;
use readstate::task::SourceRecord;

/// One printed figure.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub target: Option<Target>,
    pub note: String,
}

/// A figure's target: a floor (throughput) or a ceiling (memory, time).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    pub fn met(self, value: f64) -> bool {
        match self {
            Target::AtLeast(t) => value >= t,
            Target::AtMost(t) => value <= t,
        }
    }

    fn render(self) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {}", fmt_value(t)),
            Target::AtMost(t) => format!("<= {}", fmt_value(t)),
        }
    }
}

impl Figure {
    pub fn render(&self) -> String {
        let target = match self.target {
            Some(t) => format!(
                "{:>12} {}",
                t.render(),
                if t.met(self.value) { "met" } else { "NOT met" }
            ),
            None => format!("{:>12}", "-"),
        };
        format!(
            "{:<34} {:>12} {:<10} {target}  {}",
            self.name,
            fmt_value(self.value),
            self.unit,
            self.note
        )
    }
}

/// A figure's value: ratios (below 100) with two decimals, larger values as [`fmt_num`].
fn fmt_value(v: f64) -> String {
    if v.abs() < 100.0 && v.fract() != 0.0 {
        format!("{v:.2}")
    } else {
        fmt_num(v)
    }
}

pub(crate) fn fmt_num(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Store(#[from] readstate::state::StoreError),
    #[error(transparent)]
    Processor(#[from] readstate::processor::ProcessorError),
    #[error(transparent)]
    Serde(#[from] readstate::serde::SerdeError),
    #[error(transparent)]
    Sink(#[from] readstate::sink::SinkError),
    #[error("{0}")]
    Other(String),
}

/// When the core benchmark flushes.
#[derive(Debug, Clone, Copy)]
pub enum CoreFlush {
    /// Every this many events (a stress setting: far more flushes than the runtime makes).
    EveryEvents(usize),
    /// As the runtime does: when the commit interval has elapsed, or a task holds half its
    /// record-cache share dirty, and at the end.
    Interval(Duration),
}

/// The core benchmark's input: the workload's events in the Confluent wire format.
pub fn core_records(spec: &WorkloadSpec) -> Result<Vec<Vec<u8>>, BenchError> {
    let encoder = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)?;
    Ok(Generator::new(spec.clone())
        .filter_map(|g| match g {
            Generated::Event(e) => encoder.encode(&AvroReadEvent::from(&e)).ok(),
            Generated::Poison(_) => None,
        })
        .collect())
}

/// Core: wire bytes → decode → fold → flush to RocksDB, on one thread, in poll batches of
/// the runtime's size (10,000 records).
pub fn core(records: &[Vec<u8>], flush: CoreFlush) -> Result<Figure, BenchError> {
    let mut decoder = EventDecoder::new(std::sync::Arc::new(LocalRegistry::new()))?;
    futures::executor::block_on(decoder.prepare(records.iter().take(1).map(|r| Some(&r[..]))))?;
    let mut dead = 0usize;
    let run = fold_and_flush(records, flush, |batch| {
        decode_reads(&decoder, batch, &mut dead)
    })?;
    let policy = match flush {
        CoreFlush::EveryEvents(n) => format!("flush every {n} events"),
        CoreFlush::Interval(d) => format!("flush every {d:?} (the default commit interval)"),
    };
    Ok(Figure {
        name: match flush {
            CoreFlush::EveryEvents(_) => "core, frequent flushes".into(),
            CoreFlush::Interval(_) => "core: decode→fold→flush (1 thread)".into(),
        },
        value: records.len() as f64 / run.secs,
        unit: "events/s",
        // Issue 14's target is for the runtime's flushing; the stress line keeps the older 2M.
        target: Some(match flush {
            CoreFlush::EveryEvents(_) => Target::AtLeast(2_000_000.0),
            CoreFlush::Interval(_) => Target::AtLeast(4_000_000.0),
        }),
        note: format!(
            "{} events, {policy}: {} flushes, {} updates",
            records.len(),
            run.flushes,
            run.updates
        ),
    })
}

/// What one run of [`fold_and_flush`] did.
pub(crate) struct CoreRun {
    pub secs: f64,
    /// utime + stime of the process (RocksDB's background threads included).
    pub cpu_secs: f64,
    pub flushes: usize,
    pub updates: usize,
}

/// `records` decoded by `decode` in poll batches of the runtime's size (10,000), folded by
/// a read-state processor over a fresh RocksDB store and flushed by `flush`.
pub(crate) fn fold_and_flush<'r>(
    records: &'r [Vec<u8>],
    flush: CoreFlush,
    mut decode: impl FnMut(&[SourceRecord<'r>]) -> Vec<(readstate::model::EventRef<'r>, Origin)>,
) -> Result<CoreRun, BenchError> {
    const POLL: usize = 10_000;
    let dir = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let store = RocksDbStore::open(
        StoreName::from("bench"),
        &dir.path().join("store"),
        &RocksDbOptions::default(),
    )?;
    let cache = readstate::topology::DEFAULT_CACHE_MAX_ENTRIES;
    let mut processor = ReadStateProcessor::open(Box::new(store), EmitPolicy::default(), cache)?;
    let source = Origin::source_id("bench", 0);
    let (mut updates, mut flushes) = (0usize, 0usize);
    let (started, cpu_started) = (Instant::now(), versus::cpu_seconds(std::process::id()));
    let (mut last_flush, mut since_flush) = (Instant::now(), 0usize);
    let mut batch: Vec<SourceRecord<'r>> = Vec::with_capacity(POLL);
    for (chunk_no, chunk) in records.chunks(POLL).enumerate() {
        let base = (chunk_no * POLL) as i64;
        batch.clear();
        batch.extend(chunk.iter().enumerate().map(|(i, r)| SourceRecord {
            topic: "bench",
            partition: 0,
            offset: base + i as i64,
            key: None,
            value: Some(r),
            origin: Origin {
                source,
                offset: base + i as i64,
            },
            timestamp: None,
        }));
        let events = decode(&batch);
        processor.process(&events)?;
        since_flush += chunk.len();
        let last = base as usize + chunk.len() == records.len();
        let due = match flush {
            CoreFlush::EveryEvents(n) => since_flush >= n,
            CoreFlush::Interval(d) => {
                last_flush.elapsed() >= d || processor.dirty_len() >= processor.cache_capacity() / 2
            }
        };
        if due || last {
            let mut out = processor.prepare_flush(0);
            updates += out.updates.len();
            flushes += 1;
            processor.commit_flush(out.flush.take_batches(), &[Some(base + chunk.len() as i64)])?;
            (last_flush, since_flush) = (Instant::now(), 0);
        }
    }
    Ok(CoreRun {
        secs: started.elapsed().as_secs_f64(),
        cpu_secs: versus::cpu_seconds(std::process::id()) - cpu_started,
        flushes,
        updates,
    })
}

/// The read events of `spec` in a Go service's JSON shape (issue 23): ids as strings of
/// digits, a UUID-shaped message id, `read_at` in seconds, a device, and a field readstate
/// does not map.
pub fn json_records(spec: &WorkloadSpec) -> Vec<Vec<u8>> {
    Generator::new(spec.clone())
        .filter_map(|g| match g {
            Generated::Event(e) => Some(crate::loadgen::go_service_json(&e).into_bytes()),
            Generated::Poison(_) => None,
        })
        .collect()
}

/// JSON decoding alone (the mapping of `topologies/json_read_receipts.toml`), one thread.
pub fn json_decode(records: &[Vec<u8>]) -> Result<Figure, BenchError> {
    use readstate::serde::json::JsonDecoder;
    use readstate::topology::SourceFormat;
    let t = readstate::topology::compile(include_str!(
        "../../../../topologies/json_read_receipts.toml"
    ))
    .map_err(|e| BenchError::Other(format!("topologies/json_read_receipts.toml: {e:?}")))?;
    let SourceFormat::Json(mapping) = &t.sources[0].format else {
        return Err(BenchError::Other(
            "json_read_receipts.toml has no JSON source".into(),
        ));
    };
    let mapping = (**mapping).clone();
    let decoder = JsonDecoder::new(mapping, 65_536);
    let started = Instant::now();
    let mut checksum = 0i64;
    for r in records {
        let e = decoder
            .decode_ref(Some(r))
            .map_err(|e| BenchError::Other(format!("json bench record: {e}")))?;
        checksum = checksum.wrapping_add(e.message_seq ^ e.reader_id.as_int().unwrap_or(1));
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = records.iter().map(Vec::len).sum::<usize>() / records.len().max(1);
    Ok(Figure {
        name: "json decode (1 thread)".into(),
        value: records.len() as f64 / secs,
        unit: "events/s",
        target: Some(Target::AtLeast(1_000_000.0)),
        note: format!(
            "{} events of ~{bytes} bytes, 6 fields mapped (checksum {})",
            records.len(),
            checksum & 0xff
        ),
    })
}

/// Decode a batch of read events as the read-state node does (one allocation per batch,
/// ids borrowed from the records); undecodable ones are counted in `dead`.
pub(crate) fn decode_reads<'a>(
    decoder: &EventDecoder,
    batch: &[SourceRecord<'a>],
    dead: &mut usize,
) -> Vec<(readstate::model::EventRef<'a>, Origin)> {
    let mut events = Vec::with_capacity(batch.len());
    for r in batch {
        match decoder.decode_ref(r.value) {
            Ok(e) => events.push((e, r.origin)),
            Err(_) => *dead += 1,
        }
    }
    events
}

/// Restore: `records` changelog records (distinct keys, in random order) into an empty
/// store. `flush_run`: the records come in key-sorted runs of this many, as the runtime
/// writes them (each flush's keys in key order); `None`: no order at all (worst case).
pub fn restore(records: usize, flush_run: Option<usize>) -> Result<Figure, BenchError> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(records);
    for i in 0..records as i64 {
        let key = readstate::model::StateKey {
            conversation: readstate::ids::ConversationId::from(i / 8),
            reader: readstate::ids::ReaderId::from(i % 8),
        };
        let state = readstate::state::ReadState {
            last_read_seq: i,
            version: 3,
            emitted_version: 3,
            events_total: 7,
            device_id: Some("dev-1".into()),
            message_id: Some(format!("m-{i}").into()),
            marks: [(1, i)].into_iter().collect(),
            ..Default::default()
        };
        pairs.push((
            readstate::state::StoreKey::state(&key).as_bytes().to_vec(),
            state.to_bytes(),
        ));
    }
    {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        pairs.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    }
    if let Some(run) = flush_run {
        for r in pairs.chunks_mut(run.max(1)) {
            r.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
    }
    let dir = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let mut store = RocksDbStore::open(
        StoreName::from("restore"),
        &dir.path().join("store"),
        &RocksDbOptions::default(),
    )?;
    let started = Instant::now();
    let mut next = 0i64;
    let mut restorer = ReadStateRestorer::new(&store)?;
    for chunk in pairs.chunks(readstate::runtime::RESTORE_BATCH) {
        next += chunk.len() as i64;
        restorer.apply(
            &mut store,
            chunk
                .iter()
                .map(|(k, v)| (k.as_slice(), Some(v.as_slice()))),
            next,
        )?;
    }
    store.flush()?;
    let secs = started.elapsed().as_secs_f64();
    let order = match flush_run {
        Some(run) => format!("random keys in sorted runs of {run} (flushes)"),
        None => "random key order".into(),
    };
    Ok(Figure {
        name: format!(
            "restore: changelog → RocksDB{}",
            if flush_run.is_none() { " (worst)" } else { "" }
        ),
        value: records as f64 / secs,
        unit: "records/s",
        target: flush_run.map(|_| Target::AtLeast(2_000_000.0)),
        note: format!(
            "{records} records, {order}, batches of {}; store side only (no fetch)",
            readstate::runtime::RESTORE_BATCH
        ),
    })
}

/// Sink: `rows` distinct rows written in batches of `batch_size` into a fresh table.
pub fn sink(
    url: &str,
    rows: usize,
    batch_size: usize,
    connections: usize,
) -> Result<Figure, BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let table_name = format!("bench_{batch_size}_{:08x}", rand::random::<u32>());
    // A pool of `connections` (the sink's pool_size): batches split over disjoint
    // partitions are written on all of them at once, as the sink does.
    let table = PostgresTable::connect(url, &table_name, connections, Duration::from_secs(60))?;
    rt.block_on(table.migrate())?;
    let group = format!("bench-{table_name}");
    const PARTITIONS: i64 = 8;
    let parts: Vec<i32> = (0..PARTITIONS as i32).collect();
    rt.block_on(table.claim(&group, "bench", &parts))?;
    let started = Instant::now();
    let mut expected = vec![-1i64; PARTITIONS as usize];
    let mut written = 0u64;
    for chunk in (0..rows as i64)
        .collect::<Vec<_>>()
        .chunks(batch_size.max(1))
    {
        let rows: Vec<ReceiptUpdate> = chunk
            .iter()
            .map(|i| ReceiptUpdate {
                conversation_id: readstate::ids::ConversationId::from(i / 8),
                reader_id: readstate::ids::ReaderId::from(i % 8),
                last_read_seq: *i,
                message_id: Some(format!("m-{i}")),
                sender_id: Some(readstate::ids::SenderId::from(7)),
                device_id: Some("dev-1".into()),
                read_at_ms: Some(1_760_000_000_000),
                version: 1,
                events_folded: 3,
                stale_events: 1,
                events_total: 3,
                stale_total: 1,
                emitted_at_ms: 0,
                counts: None,
            })
            .collect();
        // Row i is record i / PARTITIONS of partition i % PARTITIONS.
        let mut ranges = Vec::new();
        for p in 0..PARTITIONS {
            let mine: Vec<i64> = chunk
                .iter()
                .filter(|i| *i % PARTITIONS == p)
                .copied()
                .collect();
            if let Some(last) = mine.last() {
                let next = last / PARTITIONS + 1;
                ranges.push(PartitionRange {
                    partition: p as i32,
                    expected: expected[p as usize],
                    next,
                    records: mine.len() as i64,
                });
                expected[p as usize] = next;
            }
        }
        let batch = WriteBatch {
            row_partitions: chunk.iter().map(|i| (i % PARTITIONS) as i32).collect(),
            row_offsets: chunk.iter().map(|i| i / PARTITIONS).collect(),
            ranges,
            rows,
        };
        let split = batch.split(table.parallel_writes());
        let reports = rt.block_on(futures::future::join_all(
            split.iter().map(|w| table.write(&group, "bench", w)),
        ));
        for r in reports {
            written += r?.rows_changed;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let drop = format!(
        "DROP TABLE {table_name}; DELETE FROM readstate_migrations WHERE table_name = '{table_name}'; DELETE FROM readstate_sink_offsets WHERE consumer_group = '{group}'"
    );
    rt.block_on(async {
        let client = table.client().await?;
        client
            .batch_execute(&drop)
            .await
            .map_err(|e| readstate::sink::SinkError::from_db(&e))
    })?;
    Ok(Figure {
        name: format!("sink: upsert, batch {batch_size}"),
        value: written as f64 / secs,
        unit: "rows/s",
        target: Some(Target::AtLeast(150_000.0)),
        note: format!(
            "{rows} new rows over {PARTITIONS} partitions; each batch split in {} transactions (rows + offsets) written at once",
            table.parallel_writes()
        ),
    })
}

/// Where the end-to-end figure runs.
#[derive(Debug, Clone, Default)]
pub struct Broker {
    /// A real Kafka; `None`: an in-process MockCluster.
    pub brokers: Option<String>,
    pub exactly_once: bool,
}

/// The pre-producer, and the mock cluster it owns when there is no real broker.
pub(crate) type PreProducer =
    rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>;

/// A producer for the pre-produced workload: on a real broker, its topic made through the
/// admin API; else one owning an in-process broker with every topic the run needs.
fn bench_producer(
    on: &Broker,
    names: &BenchTopics,
    partitions: i32,
) -> Result<(PreProducer, String), BenchError> {
    use rdkafka::producer::Producer;
    let other = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let mut config = rdkafka::ClientConfig::new();
    // Batches of up to 1 s so that the broker holds few, large message sets: the mock
    // answers a fetch with one message set per partition (a real broker fills the fetch),
    // so small sets would make the fetch round trip, not readstate, the bound.
    config
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1000")
        .set("batch.num.messages", "1000000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000");
    if let Some(b) = &on.brokers {
        config.set("bootstrap.servers", b);
        let producer: PreProducer = config.create().map_err(other)?;
        create_topic(b, &names.events, partitions)?;
        return Ok((producer, b.clone()));
    }
    config.set("test.mock.num.brokers", "1");
    let producer: PreProducer = config.create().map_err(other)?;
    let mock = producer
        .client()
        .mock_cluster()
        .ok_or_else(|| BenchError::Other("no mock cluster".into()))?;
    // Kafka's broker default delays the first rebalance of a new group by 3 s
    // (group.initial.rebalance.delay.ms); test clusters set it to 0, as here.
    // SAFETY: the handle is the live mock cluster owned by `producer`.
    unsafe {
        rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(
            rdkafka::bindings::rd_kafka_handle_mock_cluster(producer.client().native_ptr()),
            0,
        );
    }
    let changelog = format!("{}-read-state-changelog", names.app);
    for t in [&names.events, &names.updates, &changelog] {
        mock.create_topic(t, partitions, 1).map_err(other)?;
    }
    mock.create_topic(&format!("{}-dlq", names.app), 1, 1)
        .map_err(other)?;
    let brokers = mock.bootstrap_servers();
    drop(mock);
    Ok((producer, brokers))
}

pub(crate) fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), BenchError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let other = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(other)?;
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in futures::executor::block_on(admin.create_topics([&t], &opts)).map_err(other)? {
        r.map_err(|(t, e)| BenchError::Other(format!("creating {t}: {e}")))?;
    }
    Ok(())
}

/// Produce the workload of `spec` to `topic` (keyed by conversation, local schema id);
/// returns the records and bytes sent (not yet flushed).
pub(crate) fn send_workload(
    producer: &PreProducer,
    topic: &str,
    spec: &WorkloadSpec,
) -> Result<(u64, usize), BenchError> {
    use rdkafka::producer::BaseRecord;
    let encoder = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)?;
    let (mut records, mut bytes) = (0u64, 0usize);
    for g in Generator::new(spec.clone()) {
        let (key, value) = match g {
            Generated::Event(e) => (
                e.conversation_id.0.to_string(),
                encoder.encode(&AvroReadEvent::from(&e))?,
            ),
            Generated::Poison(b) => ("poison".to_owned(), b),
        };
        bytes += key.len() + value.len();
        readstate::kafka::send_waiting(producer, BaseRecord::to(topic).key(&key).payload(&value))
            .map_err(|e| BenchError::Other(format!("kafka: producing to {topic}: {e}")))?;
        records += 1;
    }
    Ok((records, bytes))
}

/// A fresh broker loads its group and producer-id coordinators on first use (seconds,
/// "Coordinator load in progress"): use both once before the timed run, so the figure is
/// readstate's start-up and not the broker's.
pub(crate) fn warm_up(brokers: &str, app: &str) -> Result<(), BenchError> {
    use rdkafka::consumer::Consumer;
    use rdkafka::producer::{BaseRecord, Producer};
    let other = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let topic = format!("{app}-warmup");
    create_topic(brokers, &topic, 1)?;
    let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{app}-warmup"))
        .create()
        .map_err(other)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(&topic, 0);
    // While the coordinator loads, the broker answers NotCoordinator or
    // CoordinatorLoadInProgress: ask again (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = c.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
        if Instant::now() > deadline {
            return Err(other(e));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let p: PreProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .map_err(other)?;
    p.send(BaseRecord::<str, str>::to(&topic).payload("warm-up"))
        .map_err(|(e, _)| other(e))?;
    p.flush(Duration::from_secs(60)).map_err(other)
}

/// Topic and application names of one end-to-end run (fresh on a real broker).
struct BenchTopics {
    app: String,
    events: String,
    updates: String,
}

/// End to end: the workload pre-produced into a broker (an in-process MockCluster, or a
/// real Kafka) over `partitions` partitions (on the mock, enough that each stays under its
/// 5 MB retention), then `run` timed from start until it has consumed every record, with
/// its final commit.
pub fn end_to_end(spec: &WorkloadSpec, partitions: i32, on: &Broker) -> Result<Figure, BenchError> {
    use rdkafka::producer::Producer;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let other = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let names = match on.brokers {
        None => BenchTopics {
            app: "readstate-bench".into(),
            events: "bench.events".into(),
            updates: "bench.updates".into(),
        },
        Some(_) => {
            let run = format!("{:08x}", rand::random::<u32>());
            BenchTopics {
                app: format!("readstate-bench-{run}"),
                events: format!("bench-{run}.events"),
                updates: format!("bench-{run}.updates"),
            }
        }
    };
    let (producer, brokers) = bench_producer(on, &names, partitions)?;
    let app = names.app.as_str();
    let (records, bytes) = send_workload(&producer, &names.events, spec)?;
    producer.flush(Duration::from_secs(120)).map_err(other)?;
    // Verify the broker kept everything (the mock deletes old data past its retention).
    {
        use rdkafka::consumer::Consumer;
        let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .map_err(other)?;
        let mut kept = 0i64;
        for p in 0..partitions {
            let (low, high) = c
                .fetch_watermarks(&names.events, p, Duration::from_secs(10))
                .map_err(other)?;
            kept += high - low;
        }
        if kept != records as i64 {
            return Err(BenchError::Other(format!(
                "the broker holds {kept} of {records} records produced (the mock broker's retention deleted the rest); use more partitions or fewer events"
            )));
        }
    }
    if on.brokers.is_some() {
        warm_up(&brokers, app)?;
    }
    if on.brokers.is_none() && bytes / partitions.max(1) as usize > 4_000_000 {
        return Err(BenchError::Other(format!(
            "{bytes} bytes over {partitions} partitions exceeds the mock broker's 5 MB per partition; use more partitions"
        )));
    }
    let state = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let guarantee = match on.exactly_once {
        true => "exactly_once_v2",
        false => "at_least_once",
    };
    let (events_topic, updates_topic) = (&names.events, &names.updates);
    let text = format!(
        "[application]\nid = \"{app}\"\ncommit_interval = \"1s\"\nstate_dir = \"{}\"\nprocessing_guarantee = \"{guarantee}\"\n\
         [[source]]\nname = \"events\"\ntopic = \"{events_topic}\"\n\
         [[store]]\nname = \"read-state\"\n\
         [[processor]]\nname = \"read-state\"\nkind = \"read-state\"\ninputs = [\"events\"]\nstore = \"read-state\"\n\
         [[sink]]\nname = \"updates\"\nkind = \"kafka\"\ninput = \"read-state\"\ntopic = \"{updates_topic}\"\n",
        state.path().display()
    );
    let topology = readstate::topology::compile(&text)
        .map_err(|e| BenchError::Other(format!("bench topology: {e:?}")))?;
    let cfg = readstate::runtime::RunConfig::new(
        topology,
        readstate::kafka::KafkaSettings::new(brokers),
        std::sync::Arc::new(LocalRegistry::new()),
    );
    let progress = cfg.progress.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let instance = {
        let stop = stop.clone();
        std::thread::spawn(move || readstate::runtime::run(cfg, stop))
    };
    let (mut seen, mut moved) = (u64::MAX, Instant::now());
    let mut first_record: Option<Instant> = None;
    while readstate::telemetry::Progress::get(&progress.records_consumed) < records {
        let now = readstate::telemetry::Progress::get(&progress.records_consumed);
        if now != seen {
            (seen, moved) = (now, Instant::now());
        }
        if now > 0 && first_record.is_none() {
            first_record = Some(Instant::now());
        }
        // No progress for 30 s: the mock broker dropped data (retention) or run is stuck.
        if instance.is_finished() || moved.elapsed() > Duration::from_secs(30) {
            return Err(BenchError::Other(format!(
                "run consumed {} of {records} records",
                readstate::telemetry::Progress::get(&progress.records_consumed)
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let caught_up = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let summary = instance
        .join()
        .map_err(|_| BenchError::Other("run panicked".into()))?
        .map_err(|e| BenchError::Other(e.to_string()))?;
    // Caught up: every record processed and the final commit done (outputs acknowledged,
    // stores written, offsets committed). Closing the stores and clients afterwards is
    // shut-down, reported apart.
    let done = summary.final_commit_at.unwrap_or_else(Instant::now);
    let secs = done.duration_since(started).as_secs_f64();
    let shutdown_secs = done.elapsed().as_secs_f64();
    drop(producer);
    if summary.records_consumed != records {
        return Err(BenchError::Other(format!(
            "run accounted for {} of {records} records",
            summary.records_consumed
        )));
    }
    Ok(Figure {
        name: match &on.brokers {
            None => "end to end: run, MockCluster".into(),
            Some(_) => format!("end to end: run, Apache Kafka, {guarantee}"),
        },
        value: records as f64 / secs,
        unit: "events/s",
        target: Some(Target::AtLeast(500_000.0)),
        note: format!(
            "{records} records over {partitions} partitions, start to caught up and committed; start-up {:.2} s; {:.0} events/s from the first record; {:.1} events per update; then {shutdown_secs:.2} s to close",
            first_record.map(|f| f.duration_since(started).as_secs_f64()).unwrap_or(0.0),
            records as f64 / first_record.map(|f| caught_up.duration_since(f).as_secs_f64()).unwrap_or(secs).max(1e-9),
            summary.events_folded as f64 / summary.updates_emitted.max(1) as f64
        ),
    })
}

/// Peak memory and state size with `keys` distinct keys: one event per key through a task
/// (RocksDB store, record cache of `cache_entries`), flushed every 100,000 events. Run it
/// first in a process: the peak RSS it reports is the process's.
pub fn many_keys(keys: u64, cache_entries: usize) -> Result<Vec<Figure>, BenchError> {
    let dir = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let opts = RocksDbOptions::default();
    let store = RocksDbStore::open(StoreName::from("keys"), &dir.path().join("store"), &opts)?;
    let mut task = ReadStateProcessor::open(Box::new(store), EmitPolicy::default(), cache_entries)?;
    let source = Origin::source_id("keys", 0);
    let started = Instant::now();
    let chunk = 100_000u64;
    let mut events = Vec::with_capacity(chunk as usize);
    let mut done = 0u64;
    while done < keys {
        events.clear();
        for i in done..(done + chunk).min(keys) {
            let e = readstate::model::ReadEvent {
                reader_id: readstate::ids::ReaderId::from((i % 8) as i64),
                conversation_id: readstate::ids::ConversationId::from((i / 8) as i64),
                message_seq: (i % 1000) as i64,
                message_id: None,
                sender_id: None,
                device_id: Some("dev-1".into()),
                read_at_ms: 1_760_000_000_000,
            };
            events.push((
                e,
                Origin {
                    source,
                    offset: i as i64,
                },
            ));
        }
        done += events.len() as u64;
        let views: Vec<_> = events.iter().map(|(e, o)| (e.view(), *o)).collect();
        task.process(&views)?;
        let mut out = task.prepare_flush(0);
        task.commit_flush(out.flush.take_batches(), &[Some(done as i64)])?;
    }
    for mut store in task.into_stores() {
        store.flush()?;
    }
    let secs = started.elapsed().as_secs_f64();
    let disk = dir_size(dir.path());
    let rss = peak_rss_bytes();
    Ok(vec![
        Figure {
            name: format!("peak RSS, {keys} keys"),
            value: rss as f64 / (1024.0 * 1024.0),
            unit: "MiB",
            target: Some(Target::AtMost(512.0)),
            note: format!(
                "cache {cache_entries} entries, RocksDB defaults; {:.0} keys/s",
                keys as f64 / secs
            ),
        },
        Figure {
            name: format!("state on disk, {keys} keys"),
            value: disk as f64 / (1024.0 * 1024.0),
            unit: "MiB",
            target: None,
            note: format!(
                "{:.0} bytes per key (lz4/zstd by level)",
                disk as f64 / keys.max(1) as f64
            ),
        },
    ])
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// This process's peak resident set (VmHWM), Linux only; 0 elsewhere.
fn peak_rss_bytes() -> u64 {
    vm_hwm_bytes("/proc/self/status")
}

/// VmHWM from a `/proc/<pid>/status` file, in bytes; 0 when unreadable.
pub(crate) fn vm_hwm_bytes(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
