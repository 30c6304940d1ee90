//! The read API's latency (issue 25): two `readstate run` children serving the read API on
//! a real broker, a store of `keys` read states, read events arriving at `input_rate`
//! throughout. Requests are sent open-loop at `rate` per second over at most 64 keep-alive
//! connections, and each latency counts from when its request was sent, its wait for a
//! connection included (a slow answer delays no later request's sending, so nothing is
//! hidden by coordinated omission):
//!
//! - a local point lookup (the instance asked owns the conversation);
//! - a forwarded one (asked of the other instance, which forwards it);
//! - failover: from the kill -9 of an owner to the first answer for one of its
//!   conversations from the instance left (no standby replicas: a restore from the
//!   changelog).
//!
//! The load generator, the producer, both instances and the broker share the machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::BaseRecord;
use rdkafka::ClientConfig;

use super::{create_topic, BenchError, Figure, PreProducer, Target};
use readstate::ids::{ConversationId, ReaderId};
use readstate::model::ReadEvent;
use readstate::serde::avro::{AvroReadEvent, EventEncoder};
use readstate::serde::registry::LOCAL_READ_EVENT_ID;
use readstate::serde::READ_EVENT_SCHEMA;

/// Readers per conversation in the store.
const READERS: u64 = 4;

/// Requests in flight at most (each on its own keep-alive connection).
const IN_FLIGHT: usize = 64;

/// How the read API figures run.
#[derive(Debug, Clone)]
pub struct Queries {
    /// Read states in the store (conversations × 4 readers).
    pub keys: u64,
    /// Requests per second of each latency figure.
    pub rate: u64,
    /// Seconds of each latency figure.
    pub duration: Duration,
    /// Read events per second produced while measuring.
    pub input_rate: u64,
    pub partitions: i32,
}

/// One `readstate run` child serving the read API.
struct Served {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn other(e: impl std::fmt::Display) -> BenchError {
    BenchError::Other(e.to_string())
}

/// The figures: local and forwarded p99, and the failover time.
pub fn queries(brokers: &str, q: &Queries) -> Result<Vec<Figure>, BenchError> {
    let app = format!("queries{:08x}", rand::random::<u32>());
    let (source, output) = (format!("{app}.events"), format!("{app}.updates"));
    create_topic(brokers, &source, q.partitions)?;
    create_topic(brokers, &output, q.partitions)?;
    let topology = tempfile::tempdir().map_err(other)?;
    let file = write_topology(topology.path(), &app, &source, &output)?;
    let a = serve(brokers, &file)?;
    let mut b = serve(brokers, &file)?;
    let loaded = Instant::now();
    produce(brokers, &source, 0, q.keys, q.keys)?;
    let conversations = q.keys / READERS;
    let last = format!(
        "/v1/conversations/{}/readers/{}",
        conversations - 1,
        READERS - 1
    );
    wait_answered(&a.addr, &last, Duration::from_secs(600))?;
    let load_s = loaded.elapsed().as_secs_f64();
    let (local, remote) = split_by_owner(&a.addr, conversations.min(20_000))?;
    let stop = Arc::new(AtomicBool::new(false));
    let input = steady_input(brokers, &source, q, &stop);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(other)?;
    let local_ms = rt.block_on(open_loop(&a.addr, &local, q.rate, q.duration))?;
    let remote_ms = rt.block_on(open_loop(&a.addr, &remote, q.rate, q.duration))?;
    stop.store(true, Ordering::Relaxed);
    let produced = input.join().map_err(|_| other("the producer panicked"))??;
    let failover = failover(&a.addr, &mut b, &remote)?;
    let setting = format!(
        "{} read states ({load_s:.0} s to load), {produced:.0} read events/s arriving, 2 instances, {} partitions",
        q.keys, q.partitions
    );
    Ok(vec![
        latency_figure("local point lookup", q.rate, &local_ms, 1.0, &setting),
        latency_figure("forwarded point lookup", q.rate, &remote_ms, 5.0, &setting),
        Figure {
            name: "read API failover, kill -9 of the owner -> first answer".into(),
            value: failover.as_secs_f64(),
            unit: "s",
            target: None,
            note: format!("no standby replicas (not built): the new owner restores from the changelog; {setting}"),
        },
    ])
}

fn latency_figure(what: &str, rate: u64, ms: &Spread, target: f64, setting: &str) -> Figure {
    Figure {
        name: format!("read API {what} at {rate}/s (p99)"),
        value: ms.at(0.99),
        unit: "ms",
        target: Some(Target::AtMost(target)),
        note: format!("{}; {setting}", ms.note()),
    }
}

fn write_topology(
    dir: &Path,
    app: &str,
    source: &str,
    output: &str,
) -> Result<PathBuf, BenchError> {
    let text = format!(
        "[application]\nid = \"{app}\"\ncommit_interval = \"1s\"\nstate_dir = \"{}\"\n\
         [[source]]\nname = \"events\"\ntopic = \"{source}\"\n\
         [[store]]\nname = \"read-state\"\n\
         [[processor]]\nname = \"read-state\"\nkind = \"read-state\"\ninputs = [\"events\"]\nstore = \"read-state\"\nmin_emit_interval = \"0s\"\n\
         [[sink]]\nname = \"updates\"\nkind = \"kafka\"\ninput = \"read-state\"\ntopic = \"{output}\"\n",
        dir.display(),
    );
    let file = dir.join("topology.toml");
    std::fs::write(&file, text).map_err(other)?;
    Ok(file)
}

/// Start a child serving the read API on a free port; its address from its log.
fn serve(brokers: &str, topology: &Path) -> Result<Served, BenchError> {
    let dir = tempfile::tempdir().map_err(other)?;
    let log = dir.path().join("readstate.log");
    let exe = std::env::current_exe().map_err(other)?;
    let child = Command::new(exe)
        .args(["run", "--local-schemas", "--brokers", brokers, "--topology"])
        .arg(topology)
        .arg("--state-dir")
        .arg(dir.path())
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,readstate=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(other)?)
        .spawn()
        .map_err(|e| other(format!("readstate run: {e}")))?;
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let at = (text.lines().find(|l| l.contains("serving /metrics")))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next());
        if let Some(addr) = at {
            return Ok(Served {
                child,
                addr: addr.to_owned(),
                _dir: dir,
            });
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(other(format!(
                "readstate run did not serve within 60 s: {text}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Read events `from..from + n` of the workload: event `i` reads key `i % keys` up to seq
/// `i / keys` (the first `keys` load the store at seq 0; later ones advance it).
fn produce(brokers: &str, topic: &str, from: u64, n: u64, keys: u64) -> Result<(), BenchError> {
    let producer: PreProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .map_err(other)?;
    let encoder = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)?;
    for i in from..from + n {
        let k = i % keys;
        let e = ReadEvent {
            reader_id: ReaderId::from((k % READERS) as i64),
            conversation_id: ConversationId::from((k / READERS) as i64),
            message_seq: (i / keys) as i64,
            message_id: None,
            sender_id: None,
            device_id: Some("bench".into()),
            read_at_ms: 0,
        };
        let key = e.conversation_id.0.to_string();
        let value = encoder.encode(&AvroReadEvent::from(&e))?;
        readstate::kafka::send_waiting(&producer, BaseRecord::to(topic).key(&key).payload(&value))
            .map_err(other)?;
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60)).map_err(other)
}

/// Read events at `q.input_rate` until `stop`; the rate reached.
fn steady_input(
    brokers: &str,
    topic: &str,
    q: &Queries,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<f64, BenchError>> {
    let (brokers, topic, stop) = (brokers.to_owned(), topic.to_owned(), stop.clone());
    let (rate, keys) = (q.input_rate.max(10), q.keys);
    std::thread::spawn(move || {
        let started = Instant::now();
        let per_tick = rate / 10;
        let mut ticks = 0u64;
        while !stop.load(Ordering::Relaxed) {
            produce(&brokers, &topic, keys + ticks * per_tick, per_tick, keys)?;
            ticks += 1;
            // The pace of the input, 10 slices a second.
            let due = started + Duration::from_millis(100 * ticks);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Ok((ticks * per_tick) as f64 / started.elapsed().as_secs_f64())
    })
}

/// GET `path` of `addr` until it answers 200 (bounded).
fn wait_answered(addr: &str, path: &str, limit: Duration) -> Result<(), BenchError> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if get_status(addr, &format!("{path}?timeout_ms=1000"))? == Some(200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(other(format!(
        "{addr}{path} was not answered within {limit:?}"
    )))
}

/// The status of a GET (`None`: not reachable).
fn get_status(addr: &str, path: &str) -> Result<Option<u16>, BenchError> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return Ok(None);
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(other)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(other)?;
    let mut out = String::new();
    if s.read_to_string(&mut out).is_err() {
        return Ok(None);
    }
    Ok(out.split_whitespace().nth(1).and_then(|s| s.parse().ok()))
}

/// Paths of the first `conversations` conversations' reader 0, split into those `addr`
/// owns and those it forwards.
fn split_by_owner(
    addr: &str,
    conversations: u64,
) -> Result<(Vec<String>, Vec<String>), BenchError> {
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for c in 0..conversations {
        let path = format!("/v1/conversations/{c}/readers/0");
        // Until the instance has the partition and the key (or knows its owner).
        loop {
            match get_status(addr, &format!("{path}?forward=false&timeout_ms=1000"))? {
                Some(200) => local.push(path),
                Some(421) => remote.push(path),
                status if started.elapsed() < Duration::from_secs(300) => {
                    let _ = status;
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                status => return Err(other(format!("{addr}{path}: {status:?}"))),
            }
            break;
        }
    }
    // The other instance holds the forwarded keys too.
    if let Some(last) = remote.last() {
        wait_answered(addr, last, Duration::from_secs(300))?;
    }
    if local.is_empty() || remote.is_empty() {
        return Err(other(
            "one instance owns every conversation: no figure to take",
        ));
    }
    Ok((local, remote))
}

/// Latencies in milliseconds, with their percentiles.
struct Spread {
    samples: Vec<f64>,
    failed: usize,
}

impl Spread {
    fn at(&self, q: f64) -> f64 {
        match self.samples.len() {
            0 => f64::NAN,
            n => self.samples[((n - 1) as f64 * q).round() as usize],
        }
    }

    fn note(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms over {} requests, {} not 200",
            self.at(0.5),
            self.at(0.99),
            self.at(1.0),
            self.samples.len(),
            self.failed
        )
    }
}

/// `rate` requests per second for `duration`, cycling through `paths`, each timed from
/// when it was due.
async fn open_loop(
    addr: &str,
    paths: &[String],
    rate: u64,
    duration: Duration,
) -> Result<Spread, BenchError> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .map_err(other)?;
    let n = rate * duration.as_secs();
    // At most this many requests in flight (connections): a request past them waits, and
    // its wait counts in its latency.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        // Timed from its sending (the timer wakes up to 1 ms late, which is the load
        // generator's, not the server's), waits for a connection included.
        let sent = Instant::now();
        let url = format!("http://{addr}{}", paths[i as usize % paths.len()]);
        let (client, in_flight) = (client.clone(), in_flight.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = in_flight.acquire().await;
            let ok = client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            (sent.elapsed().as_secs_f64() * 1000.0, ok)
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    let mut failed = 0;
    for t in tasks {
        let (ms, ok) = t.await.map_err(other)?;
        samples.push(ms);
        failed += usize::from(!ok);
    }
    samples.sort_unstable_by(f64::total_cmp);
    Ok(Spread { samples, failed })
}

/// Kill -9 `owner` and ask `addr` for one of its conversations until answered.
fn failover(addr: &str, owner: &mut Served, owned: &[String]) -> Result<Duration, BenchError> {
    let path = &owned[0];
    let killed = Instant::now();
    owner.child.kill().map_err(other)?;
    owner.child.wait().map_err(other)?;
    while killed.elapsed() < Duration::from_secs(180) {
        if get_status(addr, path)? == Some(200) {
            return Ok(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(other(format!(
        "{addr}{path} unanswered 180 s after the owner's kill -9"
    )))
}
