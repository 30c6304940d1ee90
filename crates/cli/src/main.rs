//! The `readstate` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use readstate::kafka::KafkaSettings;
use readstate::model::{HeadUpdate, SenderReceipt};
use readstate::runtime::RunConfig;
use readstate::serde::registry::SchemaResolver;
use readstate::serde::{ConfluentRegistry, LocalRegistry};
use readstate::sink::row::MemberListRow;
use readstate::sink::PostgresTable;
use readstate::topology::{describe, Topology};
use readstate_cli::{App, PostgresSinks};

#[derive(Parser)]
#[command(
    name = "readstate",
    version,
    about = "Kafka Streams-style stateful stream processing for chat read state"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text (colour only on a terminal) or one JSON object per line.
    #[arg(long, global = true, env = "READSTATE_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check a topology file; print every error and exit non-zero if there is any.
    Validate {
        /// Topology file (TOML).
        file: PathBuf,
        /// Also check each source against the latest schema registered under
        /// `<topic>-value` in this registry: a JSON Schema source's field mapping (every
        /// path present, of a type its role can be read from), an Avro source's writer
        /// schema readable as readstate's.
        #[arg(long)]
        schema_registry_url: Option<String>,
    },
    /// Print a topology: sources → processors → stores → sinks, and its internal topics.
    Describe {
        /// Topology file (TOML).
        file: PathBuf,
    },
    /// Run an instance: join the consumer group and process until SIGINT/SIGTERM (with the
    /// PostgreSQL sink inside unless the topology says `embedded = false`).
    Run(RunArgs),
    /// Run the PostgreSQL sink alone (group `<application.id>-pg-sink`) until SIGINT/SIGTERM.
    Sink(SinkArgs),
    /// Apply the SQL migrations for the topology's PostgreSQL table (each once).
    Migrate(MigrateArgs),
    /// Everything on this machine: an embedded broker, a generated workload, run + sink into
    /// PostgreSQL, and a PASS/FAIL check of every row against the generator.
    Demo(DemoArgs),
    /// Produce the demo's workload to any Kafka cluster (Avro, Confluent wire format).
    Loadgen(LoadgenArgs),
    /// Print performance figures next to their targets (see PERFORMANCE.md).
    Bench(BenchArgs),
    /// Reset the application (Kafka Streams' application reset tool): with every instance
    /// stopped, move the group's committed offsets, delete the internal topics and,
    /// optionally, the sink's stored offsets and the local state.
    Reset(ResetArgs),
}

#[derive(clap::Args)]
struct ResetArgs {
    /// Topology file (TOML).
    #[arg(long, short)]
    topology: PathBuf,
    #[command(flatten)]
    kafka: ClientArgs,
    /// Move the committed offsets to the start of the source topics (the default).
    #[arg(long, conflicts_with_all = ["to_latest", "to_datetime"])]
    to_earliest: bool,
    /// Move the committed offsets to the end of the source topics (skip what is there).
    #[arg(long, conflicts_with = "to_datetime")]
    to_latest: bool,
    /// Move the committed offsets to the first record at or after this time (RFC 3339,
    /// e.g. 2026-11-29T10:00:00Z).
    #[arg(long)]
    to_datetime: Option<String>,
    /// Also delete the PostgreSQL sink's stored offsets (it writes the output topic again
    /// from its start; rows never move backwards).
    #[arg(long)]
    sink_offsets: bool,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Also delete this machine's local state of the application
    /// (`<state dir>/<application.id>`).
    #[arg(long)]
    local_state: bool,
    /// Local state root (overrides the topology's state_dir).
    #[arg(long, env = "STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Partitions for the end-to-end figure (the mock broker keeps 5 MB per partition).
    #[arg(long, default_value_t = 64)]
    partitions: i32,
    /// Events for the end-to-end figure: pre-produced, so bounded by the mock broker's 5 MB
    /// per partition (hot Zipf conversations fill their partitions first).
    #[arg(long, default_value_t = 400_000)]
    e2e_events: u64,
    /// Distinct keys for the peak-RSS and state-size figures (0: skip).
    #[arg(long, default_value_t = 10_000_000)]
    keys: u64,
    /// Record-cache entries for the peak-RSS figure (the topology's cache_max_entries).
    #[arg(long, default_value_t = readstate::topology::DEFAULT_CACHE_MAX_ENTRIES)]
    cache_entries: usize,
    /// Changelog records for the restore figure.
    #[arg(long, default_value_t = 2_000_000)]
    restore_records: usize,
    /// Rows per sink figure (skipped without DATABASE_URL).
    #[arg(long, default_value_t = 200_000)]
    sink_rows: usize,
    /// PostgreSQL for the sink figures.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Events for the core figures: enough to span several commit intervals.
    #[arg(long, default_value_t = 5_000_000)]
    core_events: u64,
    /// Connections the sink figures write on at once (the topology's pool_size).
    #[arg(long, default_value_t = 2)]
    sink_connections: usize,
    /// Only these figures (comma-separated: keys, core, json, ids, unread, senders, e2e,
    /// versus, startup, restore, sink); all by default. `latency` and `sink-outage`
    /// (minutes long, need --brokers and DATABASE_URL) and `queries` (the read API, needs
    /// --brokers) run only when named.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run the end-to-end figure on this Kafka (e.g. what `scripts/kafka start` prints)
    /// instead of the in-process mock broker.
    #[arg(long)]
    brokers: Option<String>,
    /// The end-to-end figure under exactly_once_v2 (needs a real broker to mean anything).
    #[arg(long)]
    exactly_once: bool,
    #[command(flatten)]
    versus: VersusArgs,
    #[command(flatten)]
    long_runs: LongRunArgs,
}

/// The settings of the figures that run for minutes on a real broker ("latency",
/// "sink-outage").
#[derive(clap::Args)]
struct LongRunArgs {
    /// Read events per second of the "latency" figures, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 50_000, 100_000])]
    latency_rates: Vec<u64>,
    /// Seconds of production per rate of the "latency" figures.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Read events per second produced throughout the "sink-outage" figure.
    #[arg(long, default_value_t = 5_000)]
    outage_rate: u64,
    /// Seconds PostgreSQL refuses connections in the "sink-outage" figure.
    #[arg(long, default_value_t = 300)]
    outage_seconds: u64,
    /// Seconds of steady state before the outage, and of production after it.
    #[arg(long, default_value_t = 60)]
    outage_margin_seconds: u64,
    /// Requests per second of the "queries" latency figures (the read API).
    #[arg(long, default_value_t = 20_000)]
    query_rate: u64,
    /// Seconds of each "queries" latency figure.
    #[arg(long, default_value_t = 10)]
    query_seconds: u64,
    /// Read states in the store of the "queries" figures.
    #[arg(long, default_value_t = 1_000_000)]
    query_keys: u64,
    /// Read events per second arriving during the "queries" figures.
    #[arg(long, default_value_t = 5_000)]
    query_input_rate: u64,
}

/// The "versus" figure's settings (readstate against the Kafka Streams yardstick).
#[derive(clap::Args)]
struct VersusArgs {
    /// For the "versus" figure (needs --brokers): a file with the classpath of the Kafka
    /// Streams application in bench/kafka-streams (scripts/bench builds it with Maven).
    #[arg(long)]
    kafka_streams_classpath: Option<PathBuf>,
    /// JVM options of the Kafka Streams application (space-separated).
    #[arg(long, default_value = "-Xms256m -Xmx1g")]
    kafka_streams_jvm: String,
    /// Partitions of the "versus" figure's topic.
    #[arg(long, default_value_t = 32)]
    versus_partitions: i32,
    /// "versus" on this existing topic (holding a workload) instead of a fresh one.
    #[arg(long)]
    versus_topic: Option<String>,
    /// "versus" with readstate alone (to measure its settings; READSTATE_VERSUS_ARGS adds
    /// arguments to its command line).
    #[arg(long)]
    versus_readstate_only: bool,
    /// "versus" under at_least_once only.
    #[arg(long, conflicts_with = "versus_exactly_once_only")]
    versus_at_least_once_only: bool,
    /// "versus" under exactly_once_v2 only.
    #[arg(long)]
    versus_exactly_once_only: bool,
}

#[derive(clap::Args)]
struct WorkloadArgs {
    /// Read events to generate.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Distinct conversations (Zipf-distributed activity).
    #[arg(long, default_value_t = 50_000)]
    conversations: u64,
    /// Zipf exponent.
    #[arg(long, default_value_t = 1.05)]
    zipf: f64,
    /// Random seed (same seed, same workload).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of records that are poison pills.
    #[arg(long, default_value_t = 0.0005)]
    poison_rate: f64,
}

impl WorkloadArgs {
    fn spec(&self) -> readstate_tools::loadgen::WorkloadSpec {
        readstate_tools::loadgen::WorkloadSpec {
            events: self.events,
            conversations: self.conversations,
            zipf: self.zipf,
            seed: self.seed,
            poison_rate: self.poison_rate,
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 16)]
    partitions: i32,
    /// PostgreSQL to create the database readstate_demo on (dropped and recreated).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Serve /metrics, /health and /ready here while the demo runs.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:0")]
    metrics_addr: std::net::SocketAddr,
    /// Sink batch size.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Run on this Kafka instead of the embedded broker (e.g. the one `scripts/kafka start`
    /// prints); topics are created per run.
    #[arg(long)]
    brokers: Option<String>,
    /// processing_guarantee = "exactly_once_v2" instead of "at_least_once".
    #[arg(long)]
    exactly_once: bool,
    /// Messages and reads together (topologies/read_state_with_unread.toml's shape): checks
    /// every member's unread and mention counts in PostgreSQL (database
    /// readstate_demo_unread) against the generator; embedded broker only.
    #[arg(long, conflicts_with_all = ["brokers", "exactly_once"])]
    unread: bool,
    /// Produce the events as a Go service's JSON (topologies/json_read_receipts.toml's
    /// shape: string ids of digits, keyed by sender with FNV-1a, read_at in seconds as the
    /// position) and read them through that mapping.
    #[arg(long, conflicts_with = "unread")]
    json: bool,
    /// With --unread: conversations (each of 2 to --unread-max-members members, up to
    /// 300 messages).
    #[arg(long, default_value_t = 300)]
    unread_conversations: u64,
    /// With --unread: the largest conversation's members.
    #[arg(long, default_value_t = 300)]
    unread_max_members: u64,
}

#[derive(clap::Args)]
struct LoadgenArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: String,
    /// Topic to produce to (keyed by conversation_id).
    #[arg(long, default_value = "chat.read-events")]
    topic: String,
    /// Register read_event.avsc under <topic>-value in this registry and use its id.
    #[arg(long, env = "SCHEMA_REGISTRY_URL", hide_env_values = true)]
    schema_registry_url: Option<String>,
    /// Without a registry: the schema id to put in the wire header.
    #[arg(long, default_value_t = 1)]
    schema_id: u32,
    /// Events per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// librdkafka property for the producer (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    kafka_property: Vec<String>,
}

/// Where Kafka is and how its clients are configured.
#[derive(clap::Args)]
struct ClientArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: String,
    /// librdkafka property, e.g. -X security.protocol=SSL (repeatable). `consumer.`,
    /// `producer.` and `admin.` prefixes set it for those clients only; without one it goes
    /// to every client it applies to. Wins over --kafka-config and READSTATE_KAFKA_*.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    kafka_property: Vec<String>,
    /// A properties file (key=value lines) of librdkafka properties, e.g. SASL secrets.
    #[arg(long, env = "READSTATE_KAFKA_CONFIG")]
    kafka_config: Option<PathBuf>,
}

impl ClientArgs {
    /// File, then READSTATE_KAFKA_* variables, then -X.
    fn settings(&self) -> anyhow::Result<KafkaSettings> {
        let mut s = KafkaSettings::new(self.brokers.clone());
        if let Some(f) = &self.kafka_config {
            s = s.with_properties_file(f)?;
        }
        Ok(s.with_env(std::env::vars())?
            .with_properties(&self.kafka_property)?)
    }
}

#[derive(clap::Args)]
struct KafkaArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Confluent-compatible schema registry URL.
    #[arg(
        long,
        env = "SCHEMA_REGISTRY_URL",
        hide_env_values = true,
        conflicts_with = "local_schemas"
    )]
    schema_registry_url: Option<String>,
    /// Use the schemas in schemas/ with fixed ids (read events 1, receipt updates 2) instead
    /// of a registry.
    #[arg(long)]
    local_schemas: bool,
}

impl KafkaArgs {
    /// Client settings, with `client.id` = `<application.id>-<host>-<pid>-<role>`.
    fn settings(&self, t: &Topology) -> anyhow::Result<KafkaSettings> {
        Ok(self
            .client
            .settings()?
            .with_client_id(instance_client_id(t.application_id.as_str())))
    }

    /// The schema resolver; a registry must answer once at start (its URL is named if not).
    fn resolver(&self) -> anyhow::Result<Arc<dyn SchemaResolver>> {
        Ok(match (&self.schema_registry_url, self.local_schemas) {
            (Some(url), _) => {
                let registry = ConfluentRegistry::new(url, Duration::from_secs(10))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(registry.ping())
                    .context("the schema registry does not answer at start")?;
                Arc::new(registry)
            }
            (None, true) => Arc::new(LocalRegistry::new()),
            (None, false) => anyhow::bail!("no schema registry: set SCHEMA_REGISTRY_URL (or --schema-registry-url), or pass --local-schemas"),
        })
    }
}

#[derive(clap::Args)]
struct DatabaseArgs {
    /// PostgreSQL URL (postgres://user@host:port/db?sslmode=require); overrides the
    /// topology's sink `url`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

impl DatabaseArgs {
    fn url(&self, t: &Topology) -> anyhow::Result<String> {
        self.database_url
            .clone()
            .or_else(|| t.postgres.as_ref().and_then(|p| p.url.clone()))
            .ok_or_else(|| anyhow::anyhow!("no database: set DATABASE_URL (or --database-url), or the postgres sink's url in the topology"))
    }
}

#[derive(clap::Args)]
struct SinkArgs {
    /// Topology file (TOML) with a postgres sink.
    #[arg(long, short)]
    topology: PathBuf,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Serve /metrics, /health and /ready on this address, e.g. 0.0.0.0:9465.
    #[arg(long, env = "METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// Topology file (TOML) with a postgres sink (for its table name).
    #[arg(long, short)]
    topology: PathBuf,
    #[command(flatten)]
    database: DatabaseArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Topology file (TOML).
    #[arg(long, short)]
    topology: PathBuf,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Local state root (overrides the topology's state_dir).
    #[arg(long, env = "STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Replication factor of internal topics readstate creates.
    #[arg(long, env = "READSTATE_REPLICATION", default_value_t = 1)]
    replication: i32,
    /// Serve /metrics (Prometheus), /health, /ready and the read API (README "Query read
    /// state") on this address, e.g. 0.0.0.0:9464.
    #[arg(long, env = "METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// The host:port other instances reach this one's read API at (Kafka Streams'
    /// application.server); default: the metrics address, if it is not a wildcard.
    #[arg(long, env = "READSTATE_APPLICATION_SERVER")]
    application_server: Option<String>,
}

/// `<application.id>-<host>-<pid>`: tells instances apart in the broker's logs and in
/// `kafka-consumer-groups --describe`.
fn instance_client_id(app: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned());
    format!("{app}-{host}-{}", std::process::id())
}

/// glibc's malloc gives each contending thread an arena of its own (up to 8 per core);
/// with librdkafka's and RocksDB's threads that fragmentation was 15-30 MiB of a
/// 32-partition instance's peak RSS (measured). Two arenas, as `MALLOC_ARENA_MAX=2`
/// would do, unless that variable is set. Runs before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> ExitCode {
    readstate::telemetry::mark_process_start();
    limit_malloc_arenas();
    let cli = Cli::parse();
    readstate::telemetry::init_logging(match cli.log_format {
        LogFormatArg::Text => readstate::telemetry::LogFormat::Text,
        LogFormatArg::Json => readstate::telemetry::LogFormat::Json,
    });
    match cli.command {
        Command::Validate {
            file,
            schema_registry_url,
        } => match Topology::from_file(&file) {
            Ok(t) => {
                if let Some(url) = schema_registry_url {
                    match check_registered_schemas(&t, &url) {
                        Ok(errors) if errors.is_empty() => {}
                        Ok(errors) => {
                            eprintln!(
                                "{}: {} error(s) against {url}:",
                                file.display(),
                                errors.len()
                            );
                            for e in errors {
                                eprintln!("  - {e}");
                            }
                            return ExitCode::from(2);
                        }
                        Err(e) => {
                            eprintln!("{}: {e:#}", file.display());
                            return ExitCode::from(1);
                        }
                    }
                }
                let messages = match &t.messages {
                    Some(m) => format!(" + message source {}", m.topic),
                    None => String::new(),
                };
                let stores: Vec<&str> = t.stores().iter().map(|s| s.name.as_str()).collect();
                println!(
                    "{}: ok (application {}, {} source(s){messages}, store{} {}, output {})",
                    file.display(),
                    t.application_id,
                    t.sources.len(),
                    if stores.len() > 1 { "s" } else { "" },
                    stores.join(", "),
                    t.output.topic
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Describe { file } => match Topology::from_file(&file) {
            Ok(t) => {
                print!("{}", describe(&t));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run(args) => exit(run_command(args)),
        Command::Sink(args) => exit(sink_command(args)),
        Command::Migrate(args) => exit(migrate_command(args)),
        Command::Demo(args) => match demo_command(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Loadgen(args) => exit(loadgen_command(args)),
        Command::Bench(args) => exit(bench_command(args)),
        Command::Reset(args) => exit(reset_command(args)),
    }
}

fn reset_command(args: ResetArgs) -> anyhow::Result<()> {
    use readstate::reset::{reset, ResetOptions, ResetTo};
    let topology = Topology::from_file(&args.topology)?;
    let to = match (&args.to_datetime, args.to_latest) {
        (Some(t), _) => {
            let at = humantime::parse_rfc3339_weak(t).with_context(|| {
                format!("--to-datetime {t:?}: expected RFC 3339, e.g. 2026-11-29T10:00:00Z")
            })?;
            let ms = at.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            ResetTo::Timestamp(ms)
        }
        (None, true) => ResetTo::Latest,
        (None, false) => ResetTo::Earliest,
    };
    let database_url = match args.sink_offsets {
        true => Some(args.database.url(&topology)?),
        false => None,
    };
    let opts = ResetOptions {
        to,
        sink_offsets: args.sink_offsets,
        database_url,
        local_state: args
            .local_state
            .then(|| args.state_dir.clone().unwrap_or(topology.state_dir.clone())),
        dry_run: args.dry_run,
    };
    let kafka = args
        .kafka
        .settings()?
        .with_client_id(format!("{}-reset", topology.application_id));
    for line in reset(&topology, &kafka, &opts)? {
        println!("{line}");
    }
    if args.dry_run {
        println!("dry run: nothing was changed");
    }
    Ok(())
}

fn bench_command(args: BenchArgs) -> anyhow::Result<()> {
    use readstate_tools::bench;
    let spec = args.workload.spec();
    println!(
        "workload: {} events ({} for the core figures, one partition), {} conversations, Zipf s={}, seed {}",
        spec.events, args.core_events, spec.conversations, spec.zipf, spec.seed
    );
    println!(
        "{:<34} {:>12} {:<10} {:>12}",
        "figure", "measured", "unit", "target"
    );
    let want = |f: &str| args.only.is_empty() || args.only.iter().any(|o| o == f);
    // First: its peak RSS is the process's so far.
    if args.keys > 0 && want("keys") {
        for f in bench::many_keys(args.keys, args.cache_entries)? {
            println!("{}", f.render());
        }
    }
    if want("core") {
        let core = readstate_tools::loadgen::WorkloadSpec {
            events: args.core_events,
            ..spec.clone()
        };
        let records = bench::core_records(&core)?;
        let interval = bench::CoreFlush::Interval(std::time::Duration::from_secs(1));
        println!("{}", bench::core(&records, interval)?.render());
        let frequent = bench::CoreFlush::EveryEvents(100_000);
        println!("{}", bench::core(&records, frequent)?.render());
    }
    if want("core") || want("json") {
        let json = readstate_tools::loadgen::WorkloadSpec {
            events: args.core_events.min(1_000_000),
            ..spec.clone()
        };
        println!(
            "{}",
            bench::json_decode(&bench::json_records(&json))?.render()
        );
    }
    if want("ids") {
        let ids = readstate_tools::loadgen::WorkloadSpec {
            events: args.core_events.min(1_000_000),
            ..spec.clone()
        };
        for f in bench::ids::id_costs(&ids)? {
            println!("{}", f.render());
        }
    }
    if want("unread") {
        println!("{}", bench::unread::writes_per_message(10_000)?.render());
        println!("{}", bench::unread::both_sources(2_000)?.render());
    }
    if want("senders") {
        for f in bench::unread::sender_outputs(2_000)? {
            println!("{}", f.render());
        }
    }
    // Before the figures that leave large changelogs for the broker to compact.
    match &args.brokers {
        Some(brokers) if want("startup") => {
            for partitions in [32, 64] {
                for f in bench::startup::startup(brokers, partitions)? {
                    println!("{}", f.render());
                }
            }
        }
        None if want("startup") && !args.only.is_empty() => {
            println!("startup figures skipped: need --brokers (scripts/bench)")
        }
        _ => {}
    }
    if want("e2e") {
        let e2e = readstate_tools::loadgen::WorkloadSpec {
            events: args.e2e_events,
            ..spec.clone()
        };
        let on = bench::Broker {
            brokers: args.brokers.clone(),
            exactly_once: args.exactly_once,
        };
        println!(
            "{}",
            bench::end_to_end(&e2e, args.partitions, &on)?.render()
        );
    }
    if let (Some(brokers), Some(cp), true) = (
        &args.brokers,
        &args.versus.kafka_streams_classpath,
        want("versus"),
    ) {
        let classes = cp.parent().map(|d| d.join("classes")).unwrap_or_default();
        let deps =
            std::fs::read_to_string(cp).with_context(|| format!("reading {}", cp.display()))?;
        let yardstick = bench::versus::Yardstick {
            java: "java".into(),
            classpath: format!("{}:{}", classes.display(), deps.trim()),
            schemas: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas")),
            jvm_options: (args.versus.kafka_streams_jvm)
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        };
        let plan = bench::versus::Plan {
            partitions: args.versus.versus_partitions,
            topic: args.versus.versus_topic.clone(),
            readstate_only: args.versus.versus_readstate_only,
            guarantees: match (
                args.versus.versus_at_least_once_only,
                args.versus.versus_exactly_once_only,
            ) {
                (true, _) => vec!["at_least_once"],
                (_, true) => vec!["exactly_once_v2"],
                _ => vec!["at_least_once", "exactly_once_v2"],
            },
        };
        print!(
            "{}",
            bench::versus::versus(brokers, &spec, &plan, &yardstick)?
        );
    } else if want("versus") && !args.only.is_empty() {
        println!(
            "versus figure skipped: needs --brokers and --kafka-streams-classpath (scripts/bench)"
        );
    }
    if want("restore") {
        println!(
            "{}",
            bench::restore(args.restore_records, Some(50_000))?.render()
        );
        println!("{}", bench::restore(args.restore_records, None)?.render());
    }
    match &args.database_url {
        _ if !want("sink") => {}
        Some(url) => {
            for b in [100, 500, 2000] {
                println!(
                    "{}",
                    bench::sink(url, args.sink_rows, b, args.sink_connections)?.render()
                );
            }
        }
        None => println!("sink figures skipped: set DATABASE_URL"),
    }
    if args.only.iter().any(|o| o == "latency") {
        latency(&args)?;
    }
    if args.only.iter().any(|o| o == "sink-outage") {
        sink_outage(&args, &spec)?;
    }
    if args.only.iter().any(|o| o == "queries") {
        queries(&args)?;
    }
    Ok(())
}

/// The read API's figures, when named in --only.
fn queries(args: &BenchArgs) -> anyhow::Result<()> {
    let Some(brokers) = &args.brokers else {
        println!("queries figures skipped: need --brokers (scripts/bench)");
        return Ok(());
    };
    let l = &args.long_runs;
    let q = readstate_tools::bench::queries::Queries {
        keys: l.query_keys,
        rate: l.query_rate,
        duration: Duration::from_secs(l.query_seconds),
        input_rate: l.query_input_rate,
        partitions: 8,
    };
    for f in readstate_tools::bench::queries::queries(brokers, &q)? {
        println!("{}", f.render());
    }
    Ok(())
}

/// The "latency" figures, when named in --only.
fn latency(args: &BenchArgs) -> anyhow::Result<()> {
    let (Some(brokers), Some(url)) = (&args.brokers, &args.database_url) else {
        println!("latency figures skipped: need --brokers and DATABASE_URL (scripts/bench)");
        return Ok(());
    };
    let l = readstate_tools::bench::latency::Latency {
        rates: args.long_runs.latency_rates.clone(),
        duration: Duration::from_secs(args.long_runs.latency_seconds),
        partitions: 8,
    };
    for f in readstate_tools::bench::latency::latency(brokers, url, &l)? {
        println!("{}", f.render());
    }
    Ok(())
}

/// The "sink-outage" figure, when named in --only.
fn sink_outage(
    args: &BenchArgs,
    spec: &readstate_tools::loadgen::WorkloadSpec,
) -> anyhow::Result<()> {
    let (Some(brokers), Some(url)) = (&args.brokers, &args.database_url) else {
        println!("sink-outage figure skipped: needs --brokers and DATABASE_URL (scripts/bench)");
        return Ok(());
    };
    let margin = Duration::from_secs(args.long_runs.outage_margin_seconds);
    let o = readstate_tools::bench::outage::Outage {
        rate: args.long_runs.outage_rate,
        before: margin,
        outage: Duration::from_secs(args.long_runs.outage_seconds),
        after: margin,
        partitions: 8,
    };
    for f in readstate_tools::bench::outage::sink_outage(brokers, url, spec, &o)? {
        println!("{}", f.render());
    }
    Ok(())
}

fn demo_command(args: DemoArgs) -> anyhow::Result<bool> {
    if args.unread {
        use readstate_tools::demo::unread::{run_unread_demo, UnreadDemoConfig};
        let report = run_unread_demo(UnreadDemoConfig {
            spec: readstate_tools::loadgen::chat::ChatSpec {
                seed: args.workload.seed,
                conversations: args.unread_conversations,
                max_members: args.unread_max_members,
                max_messages: 300,
                ..Default::default()
            },
            partitions: args.partitions,
            database_url: args.database_url,
            database_name: "readstate_demo_unread".into(),
        })?;
        print!("{}", report.render());
        return Ok(report.pass());
    }
    let report = readstate_tools::demo::run_demo(readstate_tools::demo::DemoConfig {
        spec: args.workload.spec(),
        partitions: args.partitions,
        database_url: args.database_url,
        database_name: "readstate_demo".into(),
        metrics_addr: Some(args.metrics_addr),
        batch_size: args.batch_size,
        progress_every: Duration::from_secs(2),
        brokers: args.brokers,
        exactly_once: args.exactly_once,
        json: args.json,
    })?;
    print!("{}", report.render());
    Ok(report.pass())
}

fn loadgen_command(args: LoadgenArgs) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let settings = KafkaSettings::new(args.brokers)
        .with_env(std::env::vars())?
        .with_properties(&args.kafka_property)?;
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        settings.producer().create()?;
    let schema_id = match &args.schema_registry_url {
        Some(url) => {
            let registry = ConfluentRegistry::new(url, Duration::from_secs(10))?;
            let subject = format!("{}-value", args.topic);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(registry.register(&subject, readstate::serde::READ_EVENT_SCHEMA))?
        }
        None => args.schema_id,
    };
    let encoder =
        readstate::serde::avro::EventEncoder::new(readstate::serde::READ_EVENT_SCHEMA, schema_id)?;
    let started = std::time::Instant::now();
    let mut last = started;
    let mut oracle = readstate_tools::loadgen::Oracle::default();
    let mut buf = Vec::with_capacity(256);
    for (i, g) in readstate_tools::loadgen::Generator::new(args.workload.spec()).enumerate() {
        if args.rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / args.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        oracle.record(&g);
        let key = match &g {
            readstate_tools::loadgen::Generated::Event(e) => {
                buf.clear();
                encoder.encode_into(&readstate::serde::avro::AvroReadEvent::from(e), &mut buf)?;
                e.conversation_id.0.to_string()
            }
            readstate_tools::loadgen::Generated::Poison(b) => {
                buf.clone_from(b);
                "poison".to_owned()
            }
        };
        readstate::kafka::send_waiting(
            &producer,
            BaseRecord::to(&args.topic)
                .key(key.as_str())
                .payload(buf.as_slice()),
        )?;
        if last.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "    produced {} records, {:.0}/s",
                i + 1,
                (i + 1) as f64 / started.elapsed().as_secs_f64()
            );
            last = std::time::Instant::now();
        }
    }
    producer.flush(Duration::from_secs(60))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {} events + {} poison pills to {} in {secs:.1} s ({:.0}/s); {} distinct (conversation, reader) keys",
        oracle.events,
        oracle.poison,
        args.topic,
        (oracle.events + oracle.poison) as f64 / secs,
        oracle.keys.len()
    );
    Ok(())
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every source of `t` with a registered schema checked against the latest version of its
/// subject (`topology::schema_check`); the problems, all of them.
fn check_registered_schemas(
    t: &Topology,
    url: &str,
) -> anyhow::Result<Vec<readstate::topology::TopologyError>> {
    use readstate::topology::schema_check;
    let registry =
        readstate::serde::ConfluentRegistry::new(url, std::time::Duration::from_secs(10))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut errors = Vec::new();
    let sources = t.sources.iter().map(|s| (s, false));
    for (s, messages) in sources.chain(t.messages.iter().map(|m| (m, true))) {
        if !schema_check::has_schema(s) {
            continue;
        }
        let subject = schema_check::subject(s);
        let Some(schema) = rt.block_on(registry.latest(&subject))? else {
            errors.push(readstate::topology::TopologyError {
                at: format!("source {:?}.topic", s.name),
                message: format!("no schema is registered under {subject}"),
            });
            continue;
        };
        errors.extend(match &s.format {
            readstate::topology::SourceFormat::AvroConfluent => {
                let reader = match messages {
                    true => readstate::serde::MESSAGE_EVENT_SCHEMA,
                    false => readstate::serde::READ_EVENT_SCHEMA,
                };
                schema_check::check_avro(s, &schema, reader)
            }
            readstate::topology::SourceFormat::Json(_) => schema_check::check(s, &schema),
            readstate::topology::SourceFormat::AvroMapped(_) => {
                schema_check::check_avro_mapping(s, &schema)
            }
        });
    }
    Ok(errors)
}

fn migrate_command(args: MigrateArgs) -> anyhow::Result<()> {
    let topology = Topology::from_file(&args.topology)?;
    let pg = topology
        .postgres
        .as_ref()
        .context("the topology has no [[sink]] of kind \"postgres\"")?;
    let url = args.database.url(&topology)?;
    let table =
        PostgresTable::connect(&url, &pg.table, 1, pg.statement_timeout)?.with_ids(topology.ids);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let applied = rt.block_on(table.migrate())?;
    report_migrations(&pg.table, &applied);
    if let Some(h) = &topology.heads_postgres {
        let heads = PostgresTable::<HeadUpdate>::open(&url, &h.table, 1, h.statement_timeout)?
            .with_ids(topology.ids);
        let applied = rt.block_on(heads.migrate_beside(&h.receipts_table))?;
        report_migrations(&h.table, &applied);
    }
    if let Some(m) = &topology.members_postgres {
        let members = PostgresTable::<MemberListRow>::open(&url, &m.table, 1, m.statement_timeout)?
            .with_ids(topology.ids);
        let applied = rt.block_on(members.migrate_beside(&m.receipts_table))?;
        report_migrations(&m.table, &applied);
    }
    if let Some(s) = &topology.senders_postgres {
        let senders = PostgresTable::<SenderReceipt>::open(&url, &s.table, 1, s.statement_timeout)?
            .with_ids(topology.ids);
        let applied = rt.block_on(senders.migrate())?;
        report_migrations(&s.table, &applied);
    }
    Ok(())
}

fn report_migrations(table: &str, applied: &[i32]) {
    if applied.is_empty() {
        println!("{table}: up to date");
    } else {
        println!("{table}: applied migrations {applied:?}");
    }
}

fn sink_command(args: SinkArgs) -> anyhow::Result<()> {
    let topology = Topology::from_file(&args.topology)?;
    let url = args.database.url(&topology)?;
    let kafka = args.kafka.settings(&topology)?;
    let config = RunConfig::new(topology, kafka, args.kafka.resolver()?);
    let sinks = PostgresSinks::build(&config, &url)?;
    let _metrics = match args.metrics_addr {
        Some(addr) => Some(readstate::telemetry::serve(addr, config.health.clone())?),
        None => None,
    };
    config.health.set_ready(true);
    let shutdown = Arc::new(AtomicBool::new(false));
    spawn_signal_handler(shutdown.clone())?;
    for sink in sinks.spawn(&shutdown)? {
        sink.join()?;
    }
    Ok(())
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let topology = Topology::from_file(&args.topology)?;
    let kafka = args.kafka.settings(&topology)?;
    let mut config = RunConfig::new(topology, kafka, args.kafka.resolver()?);
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    config.replication = args.replication;
    let shutdown = Arc::new(AtomicBool::new(false));
    spawn_signal_handler(shutdown.clone())?;
    let mut app = App::new(config).with_shutdown(shutdown);
    if let Some(url) = args.database.database_url {
        app = app.with_database(url);
    }
    if let Some(addr) = args.metrics_addr {
        app = app.with_metrics(addr);
    }
    if let Some(addr) = args.application_server {
        app = app.with_application_server(addr);
    }
    let summary = app.start()?.join().context("readstate run")?;
    tracing::info!(?summary, "stopped");
    Ok(())
}

/// Set `flag` on SIGINT or SIGTERM.
fn spawn_signal_handler(flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("install SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("shutdown requested: flushing, committing, closing");
                flag.store(true, Ordering::Relaxed);
            })
        })?;
    Ok(())
}
