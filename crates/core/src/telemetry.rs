//! Observability endpoints: Prometheus `/metrics`, liveness `/health`, readiness `/ready`.
//!
//! Metrics are recorded with the `metrics` facade everywhere in the crate (names start with
//! `readstate_`, units in names, counters end in `_total`); [`install`] puts the Prometheus
//! recorder behind the facade once per process and [`serve`] answers scrapes over HTTP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Errors of the telemetry layer.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics recorder: {0}")]
    Recorder(String),
    #[error("metrics endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Histogram buckets (seconds) for flush, commit and statement durations.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS_START: OnceLock<std::time::Instant> = OnceLock::new();

/// Remember when the process started (call first thing in `main`); the start-up figures
/// count from here. A library caller that never calls it counts from the first
/// [`process_started`] call.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(std::time::Instant::now);
}

/// When the process started (see [`mark_process_start`]).
pub fn process_started() -> std::time::Instant {
    *PROCESS_START.get_or_init(std::time::Instant::now)
}

/// Milliseconds since the process started: the `startup_ms` field of the start-up log
/// lines, which `readstate bench --only startup` reads.
pub fn since_start_ms() -> u64 {
    process_started().elapsed().as_millis() as u64
}

/// The kind of a metric, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric readstate exports: name, kind and help text. Counters are registered at
/// zero at start (with every bounded label value), so rates work from the first scrape.
pub const METRICS: &[(&str, Kind, &str)] = &[
    ("readstate_build_info", Kind::Gauge, "Always 1; the version label says which readstate runs."),
    ("readstate_startup_seconds", Kind::Gauge, "Seconds from process start to the first record processed (set once)."),
    ("readstate_events_consumed_total", Kind::Counter, "Source records polled by stream tasks (events and bad records)."),
    ("readstate_events_folded_total", Kind::Counter, "Events folded into read state."),
    ("readstate_events_stale_total", Kind::Counter, "Folded events that did not advance the read pointer."),
    ("readstate_events_replayed_skipped_total", Kind::Counter, "Replayed records skipped by the replay marks."),
    ("readstate_dead_letters_total", Kind::Counter, "Records sent to the dead-letter topic, by reason."),
    ("readstate_bad_record_stops_total", Kind::Counter, "Instance stops by on_bad_record = fail or by the dead-letter circuit breaker."),
    ("readstate_updates_emitted_total", Kind::Counter, "Coalesced updates produced to the output topic."),
    ("readstate_messages_folded_total", Kind::Counter, "Message events folded into conversation heads, by result (counted, duplicate, late: below the window)."),
    ("readstate_reads_by_message_id_total", Kind::Counter, "Reads positioned by message id, by result: immediate (message known), waited, and how waits ended (after_wait, fallback to read_at, unresolved: dead letter)."),
    ("readstate_sender_receipts_emitted_total", Kind::Counter, "Read receipts for senders produced to the sender-receipts topic (one per sender of the messages an emitted advance passed)."),
    ("readstate_read_by_emitted_total", Kind::Counter, "Read-by (N of M) records produced for the senders' latest messages (members source)."),
    ("readstate_member_lists_total", Kind::Counter, "Member lists applied from the members source."),
    ("readstate_messages_read_before_arrival_total", Kind::Counter, "Messages that arrived after an emitted read had passed them (sender receipts): each one's readers are found by a scan of its conversation and owe its sender a receipt."),
    ("readstate_head_updates_emitted_total", Kind::Counter, "Conversation-head updates produced to the conversation-heads topic."),
    ("readstate_records_processed_total", Kind::Counter, "Records given to a typed processor (processor::typed)."),
    ("readstate_records_forwarded_total", Kind::Counter, "Records a typed processor forwarded to its sinks."),
    ("readstate_punctuations_total", Kind::Counter, "Punctuations run by typed processors."),
    ("readstate_repartition_records_total", Kind::Counter, "Records forwarded to a repartition topic."),
    ("readstate_rerouted_records_total", Kind::Counter, "Misrouted records produced to the partition they belong on (a rerouted topic)."),
    ("readstate_repartition_purges_total", Kind::Counter, "DeleteRecords requests that removed repartition records below the committed offsets."),
    ("readstate_flush_duration_seconds", Kind::Histogram, "Preparing one task's flush, seconds."),
    ("readstate_commit_duration_seconds", Kind::Histogram, "One whole commit (outputs, changelog, stores, offsets), seconds."),
    ("readstate_changelog_records_written_total", Kind::Counter, "Changelog records produced."),
    ("readstate_changelog_records_restored_total", Kind::Counter, "Changelog records replayed into stores."),
    ("readstate_restore_remaining_records", Kind::Gauge, "Changelog records a restoring task has left to restore."),
    ("readstate_tasks_assigned", Kind::Gauge, "Open stream tasks of this instance."),
    ("readstate_rebalances_total", Kind::Counter, "Assignments received from the consumer group."),
    ("readstate_tasks_lost_total", Kind::Counter, "Tasks closed dirty because the group moved on without this instance."),
    ("readstate_tasks_corrupted_total", Kind::Counter, "Stores wiped because their checkpoint lay outside the changelog."),
    ("readstate_commits_failed_total", Kind::Counter, "Offset commits refused or failed."),
    ("readstate_commits_postponed_total", Kind::Counter, "Commits the group refused while it rebalanced, postponed until the rebalance completed (no task lost)."),
    ("readstate_store_estimated_keys", Kind::Gauge, "RocksDB's estimate of the keys in a task's store."),
    ("readstate_store_size_bytes", Kind::Gauge, "A task's store on disk and in memtables, bytes."),
    ("readstate_rocksdb_memory_bytes", Kind::Gauge, "The instance's shared RocksDB block cache in use (memtables charged to it), bytes."),
    ("readstate_consumer_lag_records", Kind::Gauge, "Records of an assigned source partition not consumed yet: the log's end (last stable offset) minus the position after the last record consumed (librdkafka statistics)."),
    ("readstate_sink_records_total", Kind::Counter, "Output records consumed by the PostgreSQL sink."),
    ("readstate_sink_rows_total", Kind::Counter, "Rows sent in sink batches (one per key per batch)."),
    ("readstate_sink_rows_written_total", Kind::Counter, "Rows inserted or moved forward in PostgreSQL."),
    ("readstate_sink_batches_total", Kind::Counter, "Sink transactions committed."),
    ("readstate_sink_statements_total", Kind::Counter, "Upsert statements executed by the sink."),
    ("readstate_sink_statement_duration_seconds", Kind::Histogram, "One upsert statement, seconds."),
    ("readstate_sink_batch_duration_seconds", Kind::Histogram, "One sink batch transaction with its retries, seconds."),
    ("readstate_sink_retries_total", Kind::Counter, "Retried database operations of the sink."),
    ("readstate_sink_lag_records", Kind::Gauge, "Output records of an owned partition not yet written to PostgreSQL."),
    ("readstate_sink_partitions_stopped_total", Kind::Counter, "Sink partitions stopped because their topic was recreated since their offsets were stored."),
];

/// Label values of `readstate_dead_letters_total{reason}`.
pub const DEAD_LETTER_REASONS: &[&str] = &[
    "empty_value",
    "not_wire_format",
    "too_large",
    "unknown_schema",
    "incompatible_schema",
    "malformed",
    "invalid_event",
    "rejected_by_database",
    "misrouted",
];

/// Label values of `readstate_messages_folded_total{result}`.
pub const MESSAGE_RESULTS: &[&str] = &["counted", "duplicate", "late"];

/// The bounded label of a labelled counter, with its values (registered at zero).
fn counter_labels(name: &str) -> Option<(&'static str, &'static [&'static str])> {
    match name {
        "readstate_dead_letters_total" => Some(("reason", DEAD_LETTER_REASONS)),
        "readstate_messages_folded_total" => Some(("result", MESSAGE_RESULTS)),
        _ => None,
    }
}

/// Describe every metric, register the counters at zero and set `readstate_build_info`.
fn register_all() {
    for (name, kind, help) in METRICS {
        let name: &'static str = name;
        match kind {
            Kind::Counter => {
                metrics::describe_counter!(name, *help);
                match counter_labels(name) {
                    Some((label, values)) => {
                        for v in values {
                            metrics::counter!(name, label => *v).increment(0);
                        }
                    }
                    None => metrics::counter!(name).increment(0),
                }
            }
            Kind::Gauge => metrics::describe_gauge!(name, *help),
            Kind::Histogram => metrics::describe_histogram!(name, *help),
        }
    }
    metrics::gauge!("readstate_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The help text of a metric in [`METRICS`].
fn help_of(name: &str) -> &'static str {
    METRICS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or("", |(_, _, h)| h)
}

pub mod series {
    //! Gauges of one task or one partition (`task`, `partition` labels), kept out of the
    //! recorder so that they can be removed when the task closes or the partition moves: a
    //! series of a task now on another instance would be counted twice by dashboards.
    //!
    //! Each series is set by an [`Owner`] (an instance's task manager, a sink), and an
    //! owner removes or prunes only its own: instances sharing a process (tests, an
    //! embedding program) never remove each other's series. When two owners export the
    //! same series, the newest owner's value is rendered.
    use std::collections::BTreeMap;
    use std::fmt::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    type Labels = Vec<(&'static str, String)>;

    /// Who set a series.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub struct Owner(u64);

    impl Owner {
        /// A new owner (a new instance, a new sink).
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(1);
            Owner(NEXT.fetch_add(1, Ordering::Relaxed))
        }
    }

    type Family = BTreeMap<Labels, BTreeMap<Owner, f64>>;

    static FAMILIES: Mutex<BTreeMap<&'static str, Family>> = Mutex::new(BTreeMap::new());

    fn labels(l: &[(&'static str, &str)]) -> Labels {
        l.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    /// Keep only `owner`'s series of `name` whose labels pass `keep` (others' untouched).
    fn retain_own(owner: Owner, name: &'static str, keep: impl Fn(&Labels) -> bool) {
        let mut f = FAMILIES.lock().expect("series lock");
        if let Some(s) = f.get_mut(name) {
            s.retain(|l, owners| {
                if !keep(l) {
                    owners.remove(&owner);
                }
                !owners.is_empty()
            });
        }
    }

    /// Set one series.
    pub fn set(owner: Owner, name: &'static str, l: &[(&'static str, &str)], value: f64) {
        let mut f = FAMILIES.lock().expect("series lock");
        let family = f.entry(name).or_default();
        family.entry(labels(l)).or_default().insert(owner, value);
    }

    /// Remove one series.
    pub fn remove(owner: Owner, name: &'static str, l: &[(&'static str, &str)]) {
        let gone = labels(l);
        retain_own(owner, name, |x| *x != gone);
    }

    /// Keep only the series of `name` whose labels pass `keep`.
    pub fn retain_by(
        owner: Owner,
        name: &'static str,
        keep: impl Fn(&[(&'static str, String)]) -> bool,
    ) {
        retain_own(owner, name, |l| keep(l));
    }

    /// Keep only the series of `name` whose `label` value passes `keep`.
    pub fn retain(owner: Owner, name: &'static str, label: &str, keep: impl Fn(&str) -> bool) {
        retain_own(owner, name, |l| {
            l.iter().all(|(k, v)| *k != label || keep(v))
        });
    }

    /// Append the families in Prometheus text format.
    pub fn render(out: &mut String) {
        let f = FAMILIES.lock().expect("series lock");
        for (name, series) in f.iter().filter(|(_, s)| !s.is_empty()) {
            let _ = writeln!(out, "# HELP {name} {}", super::help_of(name));
            let _ = writeln!(out, "# TYPE {name} gauge");
            for (l, owners) in series {
                let Some((_, v)) = owners.iter().next_back() else {
                    continue;
                };
                let l: Vec<String> = l
                    .iter()
                    .map(|(k, v)| {
                        format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                    })
                    .collect();
                let _ = writeln!(out, "{name}{{{}}} {v}", l.join(","));
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// One instance closing its tasks prunes only its own series: another instance's
        /// series of the same task stays (the CI failure of a shared recorder).
        #[test]
        fn an_owner_prunes_only_its_own_series() {
            let (a, b) = (Owner::new(), Owner::new());
            const NAME: &str = "readstate_restore_remaining_records";
            set(a, NAME, &[("task", "owned_test_0_0")], 1.0);
            set(b, NAME, &[("task", "owned_test_0_0")], 2.0);
            set(b, NAME, &[("task", "owned_test_0_1")], 3.0);
            retain(a, NAME, "task", |_| false);
            let mut out = String::new();
            render(&mut out);
            assert!(out.contains("{task=\"owned_test_0_0\"} 2"), "{out}");
            assert!(out.contains("{task=\"owned_test_0_1\"} 3"), "{out}");
            remove(b, NAME, &[("task", "owned_test_0_0")]);
            retain(b, NAME, "task", |t| t != "owned_test_0_1");
            let mut out = String::new();
            render(&mut out);
            assert!(!out.contains("owned_test_"), "{out}");
        }
    }
}

/// Install the Prometheus recorder (once per process) and return its handle.
pub fn install() -> Result<PrometheusHandle, TelemetryError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets(DURATION_BUCKETS)
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    // Losing a race with another thread (or a recorder installed by an embedding program)
    // leaves the first one in place.
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::debug!("a metrics recorder is already installed");
    }
    let handle = HANDLE.get_or_init(|| handle).clone();
    register_all();
    Ok(handle)
}

/// Live counters for progress displays (the demo) and flow control; one atomic add per
/// batch, not per event.
#[derive(Debug, Default)]
pub struct Progress {
    /// Every record consumed, a repartitioned event twice (from its source, then from the
    /// repartition topic); `RunSummary::records_consumed` counts it once.
    pub records_consumed: AtomicU64,
    pub updates_emitted: AtomicU64,
    pub dead_letters: AtomicU64,
    pub sink_records: AtomicU64,
    pub sink_rows_written: AtomicU64,
    pub sink_statements: AtomicU64,
    /// Stream tasks running now (a level, not a count).
    pub tasks_running: AtomicU64,
}

impl Progress {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn set(c: &AtomicU64, n: u64) {
        c.store(n, Ordering::Relaxed);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why an instance is not ready (what `/ready` answers with its 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NotReady {
    /// No assignment: the group is forming, or every task was lost and the group has not
    /// assigned partitions again.
    NoAssignment = 1,
    /// A task's stores are restoring from their changelogs.
    Restoring = 2,
    /// Every running task is parked until the schema registry answers.
    SchemaRegistry = 3,
}

impl NotReady {
    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::NoAssignment),
            2 => Some(Self::Restoring),
            3 => Some(Self::SchemaRegistry),
            _ => None,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::NoAssignment => "no assignment: the group has not assigned partitions (yet, or since every task was lost)",
            Self::Restoring => "restoring: a task's stores are loading from their changelogs",
            Self::SchemaRegistry => "waiting for the schema registry: every task is parked until it answers",
        }
    }
}

/// Liveness and readiness as the runtime sees them.
#[derive(Debug, Default)]
pub struct Health {
    live: AtomicBool,
    ready: AtomicBool,
    /// Why not ready (a [`NotReady`] code; 0 when unknown or ready).
    not_ready: std::sync::atomic::AtomicU8,
    /// Why a component cannot work now (e.g. the sink waiting for PostgreSQL): `/ready`
    /// answers 503 with this text while it is set.
    waiting: std::sync::Mutex<Option<String>>,
    /// Why part of the work stopped until an operator acts (e.g. a sink partition whose
    /// topic was recreated): `/ready` answers 503 with this text until a restart.
    stopped: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            live: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            not_ready: std::sync::atomic::AtomicU8::new(NotReady::NoAssignment as u8),
            waiting: std::sync::Mutex::new(None),
            stopped: std::sync::Mutex::new(None),
        })
    }

    /// Ready: joined the group and every assigned task has restored its stores.
    pub fn set_ready(&self, ready: bool) {
        if ready {
            self.not_ready.store(0, Ordering::Relaxed);
        }
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Not ready, and why.
    pub fn set_not_ready(&self, why: NotReady) {
        self.not_ready.store(why as u8, Ordering::Relaxed);
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Why the instance is not ready, when the runtime said.
    pub fn not_ready(&self) -> Option<NotReady> {
        NotReady::from_code(self.not_ready.load(Ordering::Relaxed))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.waiting().is_none() && self.stopped().is_none()
    }

    /// Part of the work stopped until an operator acts; the first reason is kept.
    pub fn set_stopped(&self, why: String) {
        self.stopped.lock().expect("health lock").get_or_insert(why);
    }

    pub fn stopped(&self) -> Option<String> {
        self.stopped.lock().expect("health lock").clone()
    }

    /// Set (or clear, with `None`) what the instance is waiting for.
    pub fn set_waiting(&self, why: Option<String>) {
        *self.waiting.lock().expect("health lock") = why;
    }

    pub fn waiting(&self) -> Option<String> {
        self.waiting.lock().expect("health lock").clone()
    }

    /// Live until the instance stops (a failed instance turns not live).
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Relaxed);
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Endpoints {
    handle: PrometheusHandle,
    health: Arc<Health>,
}

async fn metrics_page(State(e): State<Endpoints>) -> String {
    let mut page = e.handle.render();
    series::render(&mut page);
    page
}

fn status(ok: bool, yes: &'static str, no: &'static str) -> (StatusCode, &'static str) {
    match ok {
        true => (StatusCode::OK, yes),
        false => (StatusCode::SERVICE_UNAVAILABLE, no),
    }
}

async fn health_page(State(e): State<Endpoints>) -> (StatusCode, &'static str) {
    status(e.health.is_live(), "live\n", "stopped\n")
}

async fn ready_page(State(e): State<Endpoints>) -> (StatusCode, String) {
    if let Some(why) = e.health.stopped().or_else(|| e.health.waiting()) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    }
    if e.health.is_ready() {
        return (StatusCode::OK, "ready\n".to_owned());
    }
    let why = e.health.not_ready().map_or("not ready", NotReady::text);
    (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
}

/// A running endpoint; dropping it stops the server.
pub struct Server {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl Server {
    /// The bound address (useful when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serve `/metrics`, `/health` and `/ready` on `addr` from a thread of its own.
pub fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<Server, TelemetryError> {
    serve_with(addr, health, |_| Router::new())
}

/// As [`serve`], with more routes beside them (the read API), made once the address is
/// bound.
pub fn serve_with(
    addr: SocketAddr,
    health: Arc<Health>,
    routes: impl FnOnce(SocketAddr) -> Router,
) -> Result<Server, TelemetryError> {
    let handle = install()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("metrics-http")
        .enable_all()
        .build()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/health", get(health_page))
        .route("/ready", get(ready_page))
        .with_state(Endpoints {
            handle: handle.clone(),
            health,
        })
        .merge(routes(bound));
    rt.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    // Histogram upkeep (the recorder drains its buckets lazily).
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /health, /ready");
    Ok(Server {
        addr: bound,
        _runtime: rt,
    })
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines; colour only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Install the process's log subscriber: `RUST_LOG` filtering (default `info`, the Kafka
/// client's own chatter at `warn`), the chosen format, and Kafka client lines repeated
/// within a minute dropped (a closed port otherwise logs hundreds of lines a second).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| "info,rdkafka=warn,librdkafka=warn".into());
    let repeats = RepeatFilter::new(Duration::from_secs(60));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(repeats)
            .boxed(),
        LogFormat::Json => fmt.json().with_filter(repeats).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

/// Drops a Kafka client log line (targets `librdkafka`, `rdkafka::*`) that repeats one
/// seen within `window`; digits are ignored when comparing, so "after 0ms" and "after
/// 3ms" are the same line. Every other line passes.
pub struct RepeatFilter {
    window: Duration,
    seen: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl RepeatFilter {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether a line with this target and text is written now.
    pub fn admit(&self, target: &str, text: &str, now: std::time::Instant) -> bool {
        if target != "librdkafka" && !target.starts_with("rdkafka") {
            return true;
        }
        // librdkafka appends how many identical lines it suppressed itself, and timings.
        let text = text.split(" (after ").next().unwrap_or(text);
        let key: String = text
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(300)
            .collect();
        let mut seen = self.seen.lock().expect("log filter lock");
        if seen.len() > 10_000 {
            seen.retain(|_, t| now.duration_since(*t) < self.window);
        }
        match seen.get(&key) {
            Some(t) if now.duration_since(*t) < self.window => false,
            _ => {
                seen.insert(key, now);
                true
            }
        }
    }
}

/// The text of an event's `message` field, and the `log` crate's target for events that
/// came through the `log` bridge (their metadata target is just "log").
#[derive(Default)]
struct MessageText {
    text: String,
    log_target: Option<String>,
}

impl tracing::field::Visit for MessageText {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "log.target" => self.log_target = Some(value.to_owned()),
            "message" => self.text.push_str(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write;
            let _ = write!(self.text, "{value:?}");
        }
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for RepeatFilter {
    fn enabled(
        &self,
        _meta: &tracing::Metadata<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let target = event.metadata().target();
        if target != "log" && target != "librdkafka" && !target.starts_with("rdkafka") {
            return true;
        }
        let mut m = MessageText::default();
        event.record(&mut m);
        let target = m.log_target.as_deref().unwrap_or(target);
        self.admit(target, &m.text, std::time::Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_client_lines_repeated_within_the_window_are_dropped() {
        let f = RepeatFilter::new(Duration::from_secs(60));
        let t0 = std::time::Instant::now();
        let refused = |ms: u32| {
            format!("librdkafka: FAIL [thrd:127.0.0.1:9/bootstrap]: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after {ms}ms in state CONNECT)")
        };
        assert!(f.admit("librdkafka", &refused(0), t0));
        let later = t0 + Duration::from_secs(5);
        assert!(
            !f.admit("librdkafka", &refused(3), later),
            "same line, other digits"
        );
        assert!(
            !f.admit("rdkafka::client", &refused(1), later),
            "from another client"
        );
        assert!(f.admit("librdkafka", "librdkafka: other line", later));
        assert!(
            f.admit("readstate::runtime", "dead letter", later),
            "our own lines pass"
        );
        assert!(f.admit("readstate::runtime", "dead letter", later));
        assert!(
            f.admit("librdkafka", &refused(9), t0 + Duration::from_secs(61)),
            "window over"
        );
    }
}
