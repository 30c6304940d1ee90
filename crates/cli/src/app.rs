//! `App`, the composition root of `readstate run` (and of `readstate sink`): it builds the
//! embedded PostgreSQL sinks, serves telemetry, and starts the stream thread and the sink
//! threads; `RunningApp` stops and joins them. The binary and the end-to-end tests start
//! an instance the same way, through this type.
//!
//! Order of `start`, each step refusing before anything runs:
//! 1. the state directory is checked (one instance per directory);
//! 2. the embedded sinks connect and check their migrations (an unmigrated database stops
//!    the instance before it consumes anything);
//! 3. `/metrics`, `/health` and `/ready` are served on the metrics address;
//! 4. the sinks start on threads of their own, then the stream thread.
//!
//! A sink that stops for good sets the shutdown flag, so the whole instance stops and a
//! supervisor restarts it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use readstate::model::{HeadUpdate, ReceiptUpdate, SenderReceipt};
use readstate::query::directory::{DirectoryThread, InstanceDirectory};
use readstate::query::{self, ReadStateQueries};
use readstate::runtime::{check_state_dir, run, RunConfig, RunSummary, RuntimeError};
use readstate::sink::row::MemberListRow;
use readstate::sink::{run_sink, SinkConfig, SinkError, SinkRow, SinkSummary};
use readstate::telemetry::{serve_with, Health, Server, TelemetryError};
use readstate::topology::READ_STATE_KIND;

/// Errors of composing and running an instance, by the part that failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("postgres sink ({name}): {source}")]
    Sink {
        name: &'static str,
        #[source]
        source: SinkError,
    },
    #[error("telemetry on {addr}: {source}")]
    Telemetry {
        addr: SocketAddr,
        #[source]
        source: TelemetryError,
    },
    #[error("starting thread {name}: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no database: set DATABASE_URL (or --database-url), or the postgres sink's url in the topology")]
    NoDatabase,
    #[error("thread {0} panicked")]
    Panicked(&'static str),
}

/// One instance of `readstate run`, composed but not started.
pub struct App {
    config: RunConfig,
    database_url: Option<String>,
    metrics_addr: Option<SocketAddr>,
    /// Where other instances reach this one's read API (Kafka Streams'
    /// `application.server`).
    application_server: Option<String>,
    shutdown: Arc<AtomicBool>,
}

impl App {
    /// An instance of `config`'s topology. Its embedded PostgreSQL sinks (the topology's
    /// `[[sink]]`s of kind "postgres" with `embedded = true`) use `with_database`'s URL, or
    /// the sink's own `url`.
    pub fn new(config: RunConfig) -> Self {
        Self {
            config,
            database_url: None,
            metrics_addr: None,
            application_server: None,
            shutdown: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The database of the embedded sinks.
    pub fn with_database(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// Serve `/metrics`, `/health` and `/ready` on `addr` (port 0 picks a free one).
    pub fn with_metrics(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// The `host:port` other instances forward queries to (default: the metrics address
    /// bound, if it is not a wildcard).
    pub fn with_application_server(mut self, addr: impl Into<String>) -> Self {
        self.application_server = Some(addr.into());
        self
    }

    /// Stop on `flag` (the binary's signal handler sets it; installed before `start`, so a
    /// signal during start-up is not lost).
    pub fn with_shutdown(mut self, flag: Arc<AtomicBool>) -> Self {
        self.shutdown = flag;
        self
    }

    /// The configuration the stream thread will run with.
    pub fn config_mut(&mut self) -> &mut RunConfig {
        &mut self.config
    }

    /// Check, build and start everything (see the module's order).
    pub fn start(self) -> Result<RunningApp, AppError> {
        let mut config = self.config;
        let topology = &config.topology;
        check_state_dir(&config.state_dir.join(topology.application_id.as_str()))?;
        let sinks = match &topology.postgres {
            Some(pg) if pg.embedded => {
                let url = (self.database_url.clone())
                    .or_else(|| pg.url.clone())
                    .ok_or(AppError::NoDatabase)?;
                PostgresSinks::build(&config, &url)?.after(&config.topics_ready)
            }
            _ => PostgresSinks::default(),
        };
        let advertised = self.application_server.as_deref();
        let (metrics, directory) = serve_metrics(self.metrics_addr, advertised, &config)?;
        config.instance_directory = directory.is_some();
        let shutdown = self.shutdown;
        let health = config.health.clone();
        let sinks = sinks.spawn(&shutdown)?;
        let directory = match directory {
            Some(d) => Some(spawn_directory(&config, d, &shutdown)?),
            None => None,
        };
        let stop = shutdown.clone();
        let stream = spawn("stream-thread", move || run(config, stop)).inspect_err(|_| {
            shutdown.store(true, Ordering::Relaxed);
        })?;
        Ok(RunningApp {
            shutdown,
            stream,
            sinks,
            directory,
            metrics,
            health,
        })
    }
}

/// A started instance.
pub struct RunningApp {
    shutdown: Arc<AtomicBool>,
    stream: JoinHandle<Result<RunSummary, RuntimeError>>,
    sinks: Vec<SinkThread>,
    /// Publishes this instance's partitions and reads the others' (with the read API).
    directory: Option<JoinHandle<()>>,
    metrics: Option<Server>,
    health: Arc<Health>,
}

impl RunningApp {
    /// The flag that stops the instance (set by SIGINT/SIGTERM in the binary).
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Where telemetry is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(Server::addr)
    }

    /// Liveness and readiness of the instance.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Whether the stream thread has stopped (by itself, or after `shutdown_flag`).
    pub fn is_finished(&self) -> bool {
        self.stream.is_finished()
    }

    /// Ask the instance to stop (flush, commit, close), then wait for it.
    pub fn stop(self) -> Result<RunSummary, AppError> {
        self.shutdown.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Wait for the instance to stop; the stream thread's summary. The sinks stop with
    /// it; the first error wins (the stream thread's before the sinks').
    pub fn join(self) -> Result<RunSummary, AppError> {
        let result = self
            .stream
            .join()
            .map_err(|_| AppError::Panicked("stream-thread"));
        self.shutdown.store(true, Ordering::Relaxed);
        let mut sinks = Ok(());
        for sink in self.sinks {
            let joined = sink.join();
            sinks = sinks.and(joined);
        }
        if let Some(d) = self.directory {
            d.join()
                .map_err(|_| AppError::Panicked("instance-directory"))?;
        }
        let summary = result??;
        sinks?;
        Ok(summary)
    }
}

/// The PostgreSQL sinks of a topology: receipts, and conversation heads when the topology
/// has a heads table (embedded in `readstate run`, or alone in `readstate sink`).
#[derive(Default)]
pub struct PostgresSinks {
    receipts: Option<SinkConfig<ReceiptUpdate>>,
    heads: Option<SinkConfig<HeadUpdate>>,
    senders: Option<SinkConfig<SenderReceipt>>,
    members: Option<SinkConfig<MemberListRow>>,
}

impl PostgresSinks {
    /// Connect the sinks of `config`'s topology to `url` and check their migrations; they
    /// report on the instance's `/ready` while they wait for the database.
    pub fn build(config: &RunConfig, url: &str) -> Result<Self, AppError> {
        let sink_error = |source| AppError::Sink {
            name: "pg-sink",
            source,
        };
        let (t, kafka, resolver) = (&config.topology, &config.kafka, &config.resolver);
        let mut receipts = readstate::sink::from_topology(t, kafka.clone(), resolver.clone(), url)
            .map_err(sink_error)?;
        receipts.health = config.health.clone();
        // Each optional sink, reporting on the instance's health, its errors named.
        fn optional<R: SinkRow>(
            name: &'static str,
            built: Result<Option<SinkConfig<R>>, SinkError>,
            config: &RunConfig,
        ) -> Result<Option<SinkConfig<R>>, AppError> {
            let mut sink = built.map_err(|source| AppError::Sink { name, source })?;
            if let Some(s) = &mut sink {
                s.health = config.health.clone();
            }
            Ok(sink)
        }
        use readstate::sink::{heads_from_topology, members_from_topology, senders_from_topology};
        let (k, r) = (|| kafka.clone(), || resolver.clone());
        let heads = optional(
            "pg-heads-sink",
            heads_from_topology(t, k(), r(), url),
            config,
        )?;
        let senders = optional(
            "pg-senders-sink",
            senders_from_topology(t, k(), r(), url),
            config,
        )?;
        let members = optional(
            "pg-members-sink",
            members_from_topology(t, k(), r(), url),
            config,
        )?;
        Ok(Self {
            receipts: Some(receipts),
            heads,
            senders,
            members,
        })
    }

    /// Embedded beside a stream thread: subscribe only once `ready` is set (the stream
    /// thread has created the output topics).
    pub fn after(mut self, ready: &Arc<AtomicBool>) -> Self {
        if let Some(r) = &mut self.receipts {
            r.topics_ready = Some(ready.clone());
        }
        if let Some(h) = &mut self.heads {
            h.topics_ready = Some(ready.clone());
        }
        if let Some(s) = &mut self.senders {
            s.topics_ready = Some(ready.clone());
        }
        if let Some(s) = &mut self.members {
            s.topics_ready = Some(ready.clone());
        }
        self
    }

    /// Start each sink on its own thread.
    pub fn spawn(self, shutdown: &Arc<AtomicBool>) -> Result<Vec<SinkThread>, AppError> {
        let mut threads = Vec::new();
        if let Some(cfg) = self.receipts {
            threads.push(SinkThread::spawn("pg-sink", cfg, shutdown.clone())?);
        }
        if let Some(cfg) = self.heads {
            threads.push(SinkThread::spawn("pg-heads-sink", cfg, shutdown.clone())?);
        }
        if let Some(cfg) = self.senders {
            threads.push(SinkThread::spawn("pg-senders-sink", cfg, shutdown.clone())?);
        }
        if let Some(cfg) = self.members {
            threads.push(SinkThread::spawn("pg-members-sink", cfg, shutdown.clone())?);
        }
        Ok(threads)
    }
}

/// A sink on its own thread; a sink that stops for good stops the instance.
pub struct SinkThread {
    name: &'static str,
    handle: JoinHandle<Result<SinkSummary, SinkError>>,
}

impl SinkThread {
    /// Run `cfg` until `stop` is set (or the sink fails, which sets it).
    pub fn spawn<R: SinkRow>(
        name: &'static str,
        cfg: SinkConfig<R>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, AppError> {
        let handle = spawn(name, move || {
            let r = run_sink(cfg, stop.clone());
            stop.store(true, Ordering::Relaxed);
            r
        })?;
        Ok(Self { name, handle })
    }

    /// Wait for the sink; its summary is logged.
    pub fn join(self) -> Result<(), AppError> {
        let summary = self
            .handle
            .join()
            .map_err(|_| AppError::Panicked(self.name))?
            .map_err(|source| AppError::Sink {
                name: self.name,
                source,
            })?;
        tracing::info!(?summary, sink = self.name, "sink stopped");
        Ok(())
    }
}

/// `/metrics`, `/health`, `/ready` and, for a read-state topology, the read API with the
/// directory of instances it routes by (advertised at `advertised`, else the bound
/// address).
fn serve_metrics(
    addr: Option<SocketAddr>,
    advertised: Option<&str>,
    config: &RunConfig,
) -> Result<(Option<Server>, Option<Arc<InstanceDirectory>>), AppError> {
    let Some(addr) = addr else {
        return Ok((None, None));
    };
    let t = &config.topology;
    let mut directory = None;
    let routes = |bound: SocketAddr| {
        if t.processor.kind != READ_STATE_KIND {
            return Default::default();
        }
        let d = Arc::new(InstanceDirectory::new(advertise(bound, advertised)));
        directory = Some(d.clone());
        let queries = ReadStateQueries::new(t, config.queryable.clone());
        query::http::routes(Arc::new(queries), Some(d))
    };
    let server = serve_with(addr, config.health.clone(), routes)
        .map_err(|source| AppError::Telemetry { addr, source })?;
    Ok((Some(server), directory))
}

/// The thread of the instance directory (`query::directory`): a failure to reach the
/// brokers is logged, and queries not owned here get 421 without an owner.
fn spawn_directory(
    config: &RunConfig,
    directory: Arc<InstanceDirectory>,
    shutdown: &Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AppError> {
    let thread = DirectoryThread {
        directory,
        stores: config.queryable.clone(),
        topic: config.topology.instances_topic().0,
        kafka: config.kafka.clone(),
        topics_ready: config.topics_ready.clone(),
    };
    let stop = shutdown.clone();
    spawn("instance-directory", move || {
        if let Err(e) = thread.run(&stop) {
            tracing::error!(error = %e, "instance directory stopped: queries owned elsewhere are not forwarded");
        }
    })
}

/// The address other instances reach the read API at.
fn advertise(bound: SocketAddr, advertised: Option<&str>) -> String {
    if let Some(a) = advertised {
        return a.to_owned();
    }
    if bound.ip().is_unspecified() {
        tracing::warn!(%bound, "the read API listens on every interface: set --application-server to the host:port other instances reach it at; 127.0.0.1 is advertised meanwhile");
        return format!("127.0.0.1:{}", bound.port());
    }
    bound.to_string()
}

fn spawn<T: Send + 'static>(
    name: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, AppError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| AppError::Thread { name, source })
}
