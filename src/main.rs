//! The `readstate` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use readstate::kafka::KafkaSettings;
use readstate::runtime::{run, RunConfig};
use readstate::serde::registry::SchemaResolver;
use readstate::serde::{ConfluentRegistry, LocalRegistry};
use readstate::topology::{describe, Topology};

#[derive(Parser)]
#[command(
    name = "readstate",
    version,
    about = "Kafka Streams-style stateful stream processing for chat read state"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a topology file; print every error and exit non-zero if there is any.
    Validate {
        /// Topology file (TOML).
        file: PathBuf,
    },
    /// Print a topology: sources → processors → stores → sinks, and its internal topics.
    Describe {
        /// Topology file (TOML).
        file: PathBuf,
    },
    /// Run an instance: join the consumer group and process until SIGINT/SIGTERM.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Topology file (TOML).
    #[arg(long, short)]
    topology: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: String,
    /// Confluent-compatible schema registry URL.
    #[arg(long, env = "SCHEMA_REGISTRY_URL", conflicts_with = "local_schemas")]
    schema_registry_url: Option<String>,
    /// Use the schemas in schemas/ with fixed ids (read events 1, receipt updates 2) instead
    /// of a registry.
    #[arg(long)]
    local_schemas: bool,
    /// Local state root (overrides the topology's state_dir).
    #[arg(long, env = "STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// librdkafka property passed to every client, e.g. -X security.protocol=SSL (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    kafka_property: Vec<String>,
    /// Replication factor of internal topics readstate creates.
    #[arg(long, env = "READSTATE_REPLICATION", default_value_t = 1)]
    replication: i32,
    /// Serve /metrics (Prometheus), /health and /ready on this address, e.g. 0.0.0.0:9464.
    #[arg(long, env = "METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file } => match Topology::from_file(&file) {
            Ok(t) => {
                println!(
                    "{}: ok (application {}, {} source(s), store {}, output {})",
                    file.display(),
                    t.application_id,
                    t.sources.len(),
                    t.store.name,
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
        Command::Run(args) => match run_command(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let topology = Topology::from_file(&args.topology)?;
    let kafka = KafkaSettings::new(args.brokers).with_properties(&args.kafka_property)?;
    let resolver: Arc<dyn SchemaResolver> = match (args.schema_registry_url, args.local_schemas) {
        (Some(url), _) => Arc::new(ConfluentRegistry::new(&url, Duration::from_secs(10))?),
        (None, true) => Arc::new(LocalRegistry::new()),
        (None, false) => anyhow::bail!("no schema registry: set SCHEMA_REGISTRY_URL (or --schema-registry-url), or pass --local-schemas"),
    };
    let mut config = RunConfig::new(topology, kafka, resolver);
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    config.replication = args.replication;
    let _metrics = match args.metrics_addr {
        Some(addr) => Some(readstate::telemetry::serve(addr, config.health.clone())?),
        None => None,
    };
    let shutdown = Arc::new(AtomicBool::new(false));
    spawn_signal_handler(shutdown.clone())?;
    let summary = run(config, shutdown).context("readstate run")?;
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
