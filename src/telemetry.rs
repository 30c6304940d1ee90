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
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Live counters for progress displays (the demo) and flow control; one atomic add per
/// batch, not per event.
#[derive(Debug, Default)]
pub struct Progress {
    pub records_consumed: AtomicU64,
    pub updates_emitted: AtomicU64,
    pub dead_letters: AtomicU64,
    pub sink_records: AtomicU64,
    pub sink_rows_written: AtomicU64,
    pub sink_statements: AtomicU64,
}

impl Progress {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Liveness and readiness as the runtime sees them.
#[derive(Debug, Default)]
pub struct Health {
    live: AtomicBool,
    ready: AtomicBool,
    /// Why a component cannot work now (e.g. the sink waiting for PostgreSQL): `/ready`
    /// answers 503 with this text while it is set.
    waiting: std::sync::Mutex<Option<String>>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            live: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            waiting: std::sync::Mutex::new(None),
        })
    }

    /// Ready: joined the group and every assigned task has restored its stores.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.waiting().is_none()
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
    e.handle.render()
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
    if let Some(why) = e.health.waiting() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    }
    let (code, text) = status(
        e.health.is_ready(),
        "ready\n",
        "restoring or not assigned yet\n",
    );
    (code, text.to_owned())
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
    let handle = install()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_answer_metrics_health_and_readiness() {
        let health = Health::new();
        let server = serve("127.0.0.1:0".parse().unwrap(), health.clone()).unwrap();
        metrics::counter!("readstate_telemetry_selftest_total").increment(3);
        let get = |path: &str| crate::testing::http_get(server.addr(), path).unwrap();
        assert!(get("/ready").starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get("/ready").starts_with("HTTP/1.1 200"));
        assert!(get("/health").starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").contains("readstate_telemetry_selftest_total 3"));
    }
}
