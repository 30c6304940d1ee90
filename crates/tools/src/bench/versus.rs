//! readstate against Kafka Streams on the same job, broker and pre-produced topic: each
//! runs as a process of its own from the first offset until its group has committed every
//! record; events/s, CPU-seconds per million events (from `/proc/<pid>/stat`), peak RSS
//! (`VmHWM`) and output records are measured for both, under both guarantees.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{create_topic, fmt_num, BenchError};
use crate::loadgen::WorkloadSpec;

/// How to start the Kafka Streams application of `bench/kafka-streams`.
#[derive(Debug, Clone)]
pub struct Yardstick {
    /// The `java` to run.
    pub java: String,
    /// Its classpath (the built classes and their dependencies).
    pub classpath: String,
    /// `schemas/` (read_event.avsc, receipt_update.avsc).
    pub schemas: PathBuf,
    /// JVM options, e.g. `-Xmx1g`.
    pub jvm_options: Vec<String>,
}

/// What one system did on the workload.
#[derive(Debug, Clone)]
pub struct Run {
    pub system: &'static str,
    pub guarantee: &'static str,
    pub events: u64,
    /// From process start until every record's offset was committed.
    pub elapsed: Duration,
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
    pub outputs: i64,
}

impl Run {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub fn cpu_seconds_per_million(&self) -> f64 {
        self.cpu_seconds / self.events as f64 * 1e6
    }

    pub fn render(&self) -> String {
        format!(
            "{:<14} {:<16} {:>12} {:>14} {:>10} {:>10}",
            self.system,
            self.guarantee,
            fmt_num(self.events_per_second()),
            format!("{:.2}", self.cpu_seconds_per_million()),
            fmt_num((self.peak_rss_bytes >> 20) as f64),
            fmt_num(self.outputs as f64),
        )
    }
}

/// The workload into a fresh topic of `partitions` partitions; returns (topic, records).
pub fn produce(
    brokers: &str,
    spec: &WorkloadSpec,
    partitions: i32,
) -> Result<(String, u64), BenchError> {
    let run = format!("versus-{:08x}", rand::random::<u32>());
    super::warm_up(brokers, &run)?;
    let topic = format!("{run}.events");
    create_topic(brokers, &topic, partitions)?;
    let records = append(brokers, &topic, spec)?;
    Ok((topic, records))
}

/// `spec`'s workload appended to an existing topic (keyed by conversation, partitioned as
/// Java clients do); returns the records sent.
pub(super) fn append(brokers: &str, topic: &str, spec: &WorkloadSpec) -> Result<u64, BenchError> {
    let other = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let producer: super::PreProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "50")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .map_err(other)?;
    let (records, _) = super::send_workload(&producer, topic, spec)?;
    producer.flush(Duration::from_secs(120)).map_err(other)?;
    Ok(records)
}

/// Run one system over the whole topic under `guarantee`.
pub fn run_one(
    brokers: &str,
    source: &str,
    records: u64,
    partitions: i32,
    system: &'static str,
    guarantee: &'static str,
    yardstick: &Yardstick,
) -> Result<Run, BenchError> {
    let app = format!("versus-{:08x}-{system}", rand::random::<u32>());
    let output = format!("{app}.updates");
    create_topic(brokers, &output, partitions)?;
    let state = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let job = Job {
        brokers,
        source,
        app: &app,
        output: &output,
        guarantee,
        state: state.path(),
    };
    let mut cmd = match system {
        "readstate" => readstate_command(&job)?,
        _ => yardstick_command(yardstick, &job),
    };
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Other(format!("starting {system}: {e}")))?;
    let done = wait_committed(brokers, &app, source, partitions, records, &mut child);
    let elapsed = started.elapsed();
    let (cpu_seconds, peak_rss_bytes) = (cpu_seconds(child.id()), peak_rss(child.id()));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    done?;
    Ok(Run {
        system,
        guarantee,
        events: records,
        elapsed,
        cpu_seconds,
        peak_rss_bytes,
        outputs: count_committed(brokers, &output, partitions)?,
    })
}

/// One run's names and settings.
pub(super) struct Job<'a> {
    pub(super) brokers: &'a str,
    pub(super) source: &'a str,
    pub(super) app: &'a str,
    pub(super) output: &'a str,
    pub(super) guarantee: &'a str,
    pub(super) state: &'a std::path::Path,
}

pub(super) fn readstate_command(job: &Job<'_>) -> Result<Command, BenchError> {
    let Job {
        brokers,
        source,
        app,
        output,
        guarantee,
        state,
    } = *job;
    let text = format!(
        "[application]\nid = \"{app}\"\ncommit_interval = \"1s\"\nstate_dir = \"{}\"\nprocessing_guarantee = \"{guarantee}\"\ndead_letter_max_ratio = 1.0\n\
         [[source]]\nname = \"events\"\ntopic = \"{source}\"\n\
         [[store]]\nname = \"read-state\"\n{store}\n\
         [[processor]]\nname = \"read-state\"\nkind = \"read-state\"\ninputs = [\"events\"]\nstore = \"read-state\"\n\
         [[sink]]\nname = \"updates\"\nkind = \"kafka\"\ninput = \"read-state\"\ntopic = \"{output}\"\n",
        state.display(),
        // Extra store settings, e.g. "write_buffer_mb = 8" (for measuring them).
        store = std::env::var("READSTATE_VERSUS_STORE").unwrap_or_default(),
    );
    let file = state.join("topology.toml");
    std::fs::write(&file, text).map_err(|e| BenchError::Other(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|e| BenchError::Other(e.to_string()))?;
    let mut c = Command::new(exe);
    c.args(["run", "--local-schemas", "--brokers", brokers, "--topology"])
        .arg(&file)
        .env("RUST_LOG", "error");
    // Extra arguments for readstate (e.g. -X consumer.queued.max.messages.kbytes=8192).
    if let Ok(extra) = std::env::var("READSTATE_VERSUS_ARGS") {
        c.args(extra.split_whitespace());
    }
    Ok(c)
}

fn yardstick_command(y: &Yardstick, job: &Job<'_>) -> Command {
    let mut c = Command::new(&y.java);
    c.args(&y.jvm_options)
        .args(["-cp", &y.classpath, "dev.readstate.bench.ReadStateStreams"])
        .args(["--brokers", job.brokers, "--source", job.source])
        .args(["--output", job.output, "--application-id", job.app])
        .args(["--guarantee", job.guarantee])
        .arg("--state-dir")
        .arg(job.state)
        .arg("--schemas")
        .arg(&y.schemas);
    c
}

/// Wait (bounded, 15 minutes) until `group` has committed every record of `topic`.
pub(super) fn wait_committed(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    records: u64,
    child: &mut Child,
) -> Result<(), BenchError> {
    let other = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .map_err(other)?;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let committed: i64 = match c.committed_offsets(tpl, Duration::from_secs(5)) {
            Ok(got) => got
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                })
                .sum(),
            Err(_) => 0,
        };
        if committed >= records as i64 {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Other(format!(
                "{group} exited ({status}) at {committed} of {records}"
            )));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Other(format!(
                "{group}: {committed} of {records} after 15 minutes"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Output records a read_committed consumer sees (transaction markers and aborted
/// records excluded): read until the position of every partition reaches its end.
fn count_committed(brokers: &str, topic: &str, partitions: i32) -> Result<i64, BenchError> {
    let other = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("versus-count-{:08x}", rand::random::<u32>()),
        )
        .set("isolation.level", "read_committed")
        .create()
        .map_err(other)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(other)?;
        ends.push(
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_err(other)?
                .1,
        );
    }
    c.assign(&tpl).map_err(other)?;
    let mut count = 0i64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        while let Some(m) = c.poll(Duration::from_millis(100)) {
            if m.is_ok() {
                count += 1;
            }
        }
        let at_end = c.position().map_err(other)?.elements().iter().all(|e| {
            matches!(e.offset(), Offset::Offset(o) if o >= ends[e.partition() as usize])
                || ends[e.partition() as usize] == 0
        });
        if at_end {
            return Ok(count);
        }
    }
    Err(BenchError::Other(format!(
        "{topic}: not read to its end in 5 minutes"
    )))
}

/// utime + stime of a process, in seconds (Linux; 0 elsewhere).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; 11 and 12 after the ")".
    (ticks(11) + ticks(12)) / 100.0
}

/// VmHWM of a process in bytes (Linux; 0 elsewhere).
fn peak_rss(pid: u32) -> u64 {
    super::vm_hwm_bytes(&format!("/proc/{pid}/status"))
}

/// What to run: the systems and guarantees, on a fresh topic or an existing one.
#[derive(Debug, Clone)]
pub struct Plan {
    pub partitions: i32,
    /// Reuse this topic (already holding the workload) instead of producing one.
    pub topic: Option<String>,
    /// Only readstate (no Kafka Streams): for measuring readstate's own settings.
    pub readstate_only: bool,
    pub guarantees: Vec<&'static str>,
}

/// Both systems (or readstate alone) under each guarantee on one pre-produced topic; the
/// table and the ratios.
pub fn versus(
    brokers: &str,
    spec: &WorkloadSpec,
    plan: &Plan,
    yardstick: &Yardstick,
) -> Result<String, BenchError> {
    let partitions = plan.partitions;
    let (source, records) = match &plan.topic {
        Some(t) => (t.clone(), topic_records(brokers, t, partitions)?),
        None => produce(brokers, spec, partitions)?,
    };
    let mut out = format!(
        "versus Kafka Streams: {records} records (Zipf over {} conversations) in {partitions} partitions of {source}\n{:<14} {:<16} {:>12} {:>14} {:>10} {:>10}\n",
        spec.conversations, "system", "guarantee", "events/s", "CPU-s/M events", "peak MiB", "outputs"
    );
    for guarantee in &plan.guarantees {
        let rs = run_one(
            brokers,
            &source,
            records,
            partitions,
            "readstate",
            guarantee,
            yardstick,
        )?;
        out.push_str(&rs.render());
        out.push('\n');
        out.push_str(&rss_figure(&rs, partitions).render());
        out.push('\n');
        if plan.readstate_only {
            continue;
        }
        let ks = run_one(
            brokers,
            &source,
            records,
            partitions,
            "kafka-streams",
            guarantee,
            yardstick,
        )?;
        out.push_str(&ks.render());
        out.push('\n');
        out.push_str(&ratios(guarantee, &rs, &ks));
    }
    Ok(out)
}

/// Issue 14's memory target for this workload: readstate's own peak RSS.
pub const RSS_TARGET_MIB: f64 = 128.0;

fn rss_figure(rs: &Run, partitions: i32) -> super::Figure {
    super::Figure {
        name: format!("peak RSS, {partitions} partitions"),
        value: (rs.peak_rss_bytes as f64) / (1024.0 * 1024.0),
        unit: "MiB",
        target: Some(super::Target::AtMost(RSS_TARGET_MIB)),
        note: format!(
            "readstate, {} events, {}, defaults",
            rs.events, rs.guarantee
        ),
    }
}

fn ratios(guarantee: &str, rs: &Run, ks: &Run) -> String {
    let per_cpu = |r: &Run| r.events as f64 / r.cpu_seconds.max(1e-9);
    let cpu_ratio = per_cpu(rs) / per_cpu(ks);
    let rss_ratio = rs.peak_rss_bytes as f64 / ks.peak_rss_bytes.max(1) as f64;
    format!(
        "  {guarantee}: readstate {:.1}x the events/s, {cpu_ratio:.1}x the events per CPU-second (target >= 5: {}), {rss_ratio:.2}x the peak RSS (target <= 0.5: {})\n",
        rs.events_per_second() / ks.events_per_second(),
        if cpu_ratio >= 5.0 { "met" } else { "NOT met" },
        if rss_ratio <= 0.5 { "met" } else { "NOT met" },
    )
}

/// Records held by an existing topic.
fn topic_records(brokers: &str, topic: &str, partitions: i32) -> Result<u64, BenchError> {
    let other = |e: rdkafka::error::KafkaError| BenchError::Other(format!("kafka: {e}"));
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(other)?;
    let mut n = 0;
    for p in 0..partitions {
        let (low, high) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(other)?;
        n += high - low;
    }
    Ok(n as u64)
}
