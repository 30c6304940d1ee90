//! The sink's memory during a long PostgreSQL outage (issue 26): `readstate run` with its
//! embedded PostgreSQL sink, as a child process, on a real broker, fed at a steady rate.
//! The database refuses connections for `outage` (its connections terminated, new ones
//! refused, as when it is down), then comes back. The child's resident set is sampled every
//! 5 s before, during and after; the figures are its growth over the outage and the time
//! the sink takes to catch up. The sink pauses its partitions while the database is away,
//! so its memory should stay flat: the output topic is the backlog.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::BaseRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{create_topic, BenchError, Figure, PreProducer, Target};
use crate::loadgen::{Generated, Generator, WorkloadSpec};
use readstate::serde::avro::{AvroReadEvent, EventEncoder};
use readstate::serde::registry::LOCAL_READ_EVENT_ID;
use readstate::serde::READ_EVENT_SCHEMA;

/// How the outage figure runs.
#[derive(Debug, Clone)]
pub struct Outage {
    /// Read events per second, produced throughout.
    pub rate: u64,
    /// Steady state before the outage.
    pub before: Duration,
    /// How long the database refuses connections.
    pub outage: Duration,
    /// Production goes on this long after the database is back.
    pub after: Duration,
    pub partitions: i32,
}

/// One sample of the child: its RSS, and the sink's backlog (output records not yet
/// committed by the sink's group).
struct Sample {
    at: Duration,
    phase: &'static str,
    rss_mib: f64,
    backlog: i64,
}

/// The output topic's end offsets and the sink group's committed offsets, summed.
struct SinkProgress {
    consumer: BaseConsumer,
    output: String,
    partitions: i32,
}

impl SinkProgress {
    fn new(brokers: &str, app: &str, partitions: i32) -> Result<Self, BenchError> {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("{app}-pg-sink"))
            .create()
            .map_err(kafka)?;
        Ok(Self {
            consumer,
            output: format!("{app}.updates"),
            partitions,
        })
    }

    fn end(&self) -> Result<i64, BenchError> {
        let mut end = 0;
        for p in 0..self.partitions {
            let (_, high) = (self.consumer)
                .fetch_watermarks(&self.output, p, Duration::from_secs(5))
                .map_err(kafka)?;
            end += high;
        }
        Ok(end)
    }

    fn committed(&self) -> Result<i64, BenchError> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.output, p);
        }
        let got = (self.consumer)
            .committed_offsets(tpl, Duration::from_secs(5))
            .map_err(kafka)?;
        Ok((got.elements().iter())
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum())
    }
}

fn kafka(e: rdkafka::error::KafkaError) -> BenchError {
    BenchError::Other(format!("kafka: {e}"))
}

/// Run it: the samples printed as a table, and the figures.
pub fn sink_outage(
    brokers: &str,
    database_url: &str,
    spec: &WorkloadSpec,
    o: &Outage,
) -> Result<Vec<Figure>, BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let mut run = Instance::start(&rt, brokers, database_url, "outage", o.partitions)?;
    let app = run.app.clone();
    let result = measure(&rt, brokers, database_url, &app, spec, o, &mut run.child);
    drop(run);
    let (samples, catch_up) = result?;
    print_samples(&samples);
    Ok(figures(&samples, catch_up, o))
}

/// `readstate run` as a child process with its embedded PostgreSQL sink, on fresh topics
/// (`<app>.events`, `<app>.updates`) and a fresh database (`<app>`); killed when dropped.
pub(super) struct Instance {
    pub(super) app: String,
    pub(super) db_url: String,
    pub(super) child: Child,
    _state: tempfile::TempDir,
}

impl Instance {
    pub(super) fn start(
        rt: &tokio::runtime::Runtime,
        brokers: &str,
        database_url: &str,
        name: &str,
        partitions: i32,
    ) -> Result<Self, BenchError> {
        let app = format!("{name}{:08x}", rand::random::<u32>());
        let (source, output) = (format!("{app}.events"), format!("{app}.updates"));
        create_topic(brokers, &source, partitions)?;
        create_topic(brokers, &output, partitions)?;
        let db_url = crate::demo::fresh_database(rt, database_url, &app).map_err(other)?;
        let state = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
        let file = write_topology(state.path(), &app, &source, &output)?;
        let exe = std::env::current_exe().map_err(|e| BenchError::Other(e.to_string()))?;
        let migrated = Command::new(&exe)
            .args(["migrate", "--topology"])
            .arg(&file)
            .env("DATABASE_URL", &db_url)
            .status()
            .map_err(|e| BenchError::Other(format!("readstate migrate: {e}")))?;
        if !migrated.success() {
            return Err(BenchError::Other(format!("readstate migrate: {migrated}")));
        }
        let child = Command::new(&exe)
            .args(["run", "--local-schemas", "--brokers", brokers, "--topology"])
            .arg(&file)
            .env("DATABASE_URL", &db_url)
            .env("RUST_LOG", "error")
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Other(format!("readstate run: {e}")))?;
        Ok(Self {
            app,
            db_url,
            child,
            _state: state,
        })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produce throughout, block the database between `before` and `before + outage`, sample
/// the child's RSS and the sink's backlog every 5 s, until the end of production and the
/// sink has caught up (at most 5 minutes more).
fn measure(
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    admin_url: &str,
    app: &str,
    spec: &WorkloadSpec,
    o: &Outage,
    child: &mut Child,
) -> Result<(Vec<Sample>, Option<Duration>), BenchError> {
    let total = o.before + o.outage + o.after;
    let done = Arc::new(AtomicBool::new(false));
    let producer = {
        let (brokers, topic, done) = (brokers.to_owned(), format!("{app}.events"), done.clone());
        let spec = WorkloadSpec {
            events: o.rate * total.as_secs(),
            poison_rate: 0.0,
            ..spec.clone()
        };
        let rate = o.rate;
        std::thread::spawn(move || produce_paced(&brokers, &topic, &spec, rate, &done))
    };
    let sink = SinkProgress::new(brokers, app, o.partitions)?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut blocked = false;
    // The output's end when the database came back, and when the sink had written it.
    let (mut target, mut catch_up) = (None, None);
    let back = o.before + o.outage;
    // Sampling goes on after production until the sink has caught up (at most 5 min).
    let limit = total + Duration::from_secs(300);
    while started.elapsed() < total || (catch_up.is_none() && started.elapsed() < limit) {
        let at = started.elapsed();
        let phase = match at {
            t if t < o.before => "before",
            t if t < back => "outage",
            _ => "after",
        };
        if phase == "outage" && !blocked {
            block(rt, admin_url, app, true)?;
            blocked = true;
        }
        if phase == "after" && blocked {
            block(rt, admin_url, app, false)?;
            blocked = false;
            target = Some(sink.end()?);
        }
        if at >= total {
            done.store(true, Ordering::Relaxed);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Other(format!(
                "readstate run exited ({status})"
            )));
        }
        let rss_mib = rss_bytes(child.id()) as f64 / (1024.0 * 1024.0);
        let committed = sink.committed()?;
        if target.is_some_and(|t| catch_up.is_none() && committed >= t) {
            catch_up = Some(at - back);
        }
        let backlog = sink.end()? - committed;
        samples.push(Sample {
            at,
            phase,
            rss_mib,
            backlog,
        });
        std::thread::sleep(Duration::from_secs(5));
    }
    if blocked {
        block(rt, admin_url, app, false)?;
    }
    done.store(true, Ordering::Relaxed);
    producer
        .join()
        .map_err(|_| BenchError::Other("the producer panicked".into()))??;
    Ok((samples, catch_up))
}

/// Block (or unblock) connections to database `db`, terminating the open ones.
fn block(
    rt: &tokio::runtime::Runtime,
    admin_url: &str,
    db: &str,
    on: bool,
) -> Result<(), BenchError> {
    let sql = match on {
        true => format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
        ),
        false => format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"),
    };
    rt.block_on(crate::demo::admin(admin_url, &sql))
        .map_err(other)
}

/// `spec`'s events to `topic`, `rate` per second in 100 ms slices, until they are all
/// sent or `done`.
fn produce_paced(
    brokers: &str,
    topic: &str,
    spec: &WorkloadSpec,
    rate: u64,
    done: &AtomicBool,
) -> Result<(), BenchError> {
    let producer: PreProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Placed as Java clients and readstate place them (the source's partitioner).
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .create()
        .map_err(|e| BenchError::Other(format!("kafka: {e}")))?;
    let encoder = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)?;
    let per_slice = (rate / 10).max(1);
    let started = Instant::now();
    for (i, g) in Generator::new(spec.clone()).enumerate() {
        let Generated::Event(e) = g else { continue };
        let slice = i as u64 / per_slice;
        let due = started + Duration::from_millis(100 * slice);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if done.load(Ordering::Relaxed) {
            break;
        }
        let key = e.conversation_id.0.to_string();
        let value = encoder.encode(&AvroReadEvent::from(&e))?;
        readstate::kafka::send_waiting(&producer, BaseRecord::to(topic).key(&key).payload(&value))
            .map_err(|e| BenchError::Other(format!("kafka: producing to {topic}: {e}")))?;
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30))
        .map_err(|e| BenchError::Other(format!("kafka: {e}")))
}

/// The resident set of process `pid` (VmRSS), Linux only; 0 elsewhere.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (status.lines())
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn write_topology(
    dir: &std::path::Path,
    app: &str,
    source: &str,
    output: &str,
) -> Result<std::path::PathBuf, BenchError> {
    let text = format!(
        "[application]\nid = \"{app}\"\ncommit_interval = \"1s\"\nstate_dir = \"{}\"\ndead_letter_max_ratio = 1.0\n\
         [[source]]\nname = \"events\"\ntopic = \"{source}\"\n\
         [[store]]\nname = \"read-state\"\n\
         [[processor]]\nname = \"read-state\"\nkind = \"read-state\"\ninputs = [\"events\"]\nstore = \"read-state\"\nmin_emit_interval = \"0s\"\n\
         [[sink]]\nname = \"updates\"\nkind = \"kafka\"\ninput = \"read-state\"\ntopic = \"{output}\"\n\
         [[sink]]\nname = \"postgres\"\nkind = \"postgres\"\ninput = \"updates\"\n",
        dir.display(),
    );
    let file = dir.join("topology.toml");
    std::fs::write(&file, text).map_err(|e| BenchError::Other(e.to_string()))?;
    Ok(file)
}

fn print_samples(samples: &[Sample]) {
    println!("sink outage: the instance's RSS and the sink's backlog every 5 s");
    println!(
        "{:>8}  {:<7} {:>9} {:>12}",
        "t (s)", "phase", "RSS MiB", "backlog"
    );
    for s in samples {
        println!(
            "{:>8.0}  {:<7} {:>9.1} {:>12}",
            s.at.as_secs_f64(),
            s.phase,
            s.rss_mib,
            s.backlog
        );
    }
}

/// RSS growth over the outage (its largest sample against the last one before), and the
/// catch-up time after it.
fn figures(samples: &[Sample], catch_up: Option<Duration>, o: &Outage) -> Vec<Figure> {
    let max_of = |phase: &str| {
        (samples.iter())
            .filter(|s| s.phase == phase)
            .map(|s| s.rss_mib)
            .fold(0.0, f64::max)
    };
    let start = (samples.iter())
        .rfind(|s| s.phase == "before")
        .map_or(0.0, |s| s.rss_mib);
    let during = max_of("outage");
    let note = format!(
        "{} events/s; RSS {start:.1} MiB before the outage, at most {during:.1} during {} s, at most {:.1} after",
        o.rate,
        o.outage.as_secs(),
        max_of("after"),
    );
    vec![
        Figure {
            name: "sink outage: RSS growth over the outage".into(),
            value: during - start,
            unit: "MiB",
            target: Some(Target::AtMost(16.0)),
            note,
        },
        Figure {
            name: "sink outage: catch-up after the database is back".into(),
            value: catch_up.map_or(f64::NAN, |d| d.as_secs_f64()),
            unit: "s",
            target: None,
            note: match catch_up {
                Some(_) => "until the sink's group committed every output record there was when the database came back (production going on)".into(),
                None => "not caught up before the sampling ended".into(),
            },
        },
    ]
}

fn other(e: impl std::fmt::Display) -> BenchError {
    BenchError::Other(e.to_string())
}
