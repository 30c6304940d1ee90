//! readstate: a Kafka Streams-style stateful stream processor for chat read state.
//!
//! # Layout
//!
//! This crate is the library's one name: it re-exports three crates under the paths
//! users write (`readstate::processor`, `readstate::runtime`, `readstate::sink`, ...):
//!
//! - `readstate-core` (`crates/core`): every module below but `runtime`, `sink` and
//!   `reset`: the processor API and what it stands on;
//! - `readstate-runtime` (`crates/runtime`): `runtime`, which builds on the core only;
//! - `readstate-sink` (`crates/sink`): `sink`, which builds on the core only;
//! - `reset` lives here: it reaches across all three.
//!
//! The data path, in order (see `ARCHITECTURE.md` for the commit protocol):
//!
//! - [`backoff`]: the one `Backoff` (cap, jitter) of every retry loop, and the `Clock` seam
//!   of timing heuristics (`ManualClock` in tests).
//! - [`ids`]: newtypes for identifiers (`ConversationId`, `ReaderId`, `TaskId`, `TopicName`,
//!   `StoreName`, `Origin`, ...); `ids::Id`, a domain id of the type a topology declares
//!   (`i64`, `string`, `uuid`: `ids::IdTypes`).
//! - [`model`]: the domain records, `ReadEvent` in and `ReceiptUpdate` out.
//! - [`config`]: topology files as written (TOML), unknown fields collected.
//! - [`topology`]: compile a spec into a checked `Topology` (one function per section,
//!   every error at once: `topology::compile`), into the graph the runtime routes on
//!   (`topology::graph`), and describe it; `topology::schema_check` checks sources against
//!   their registered schemas (`validate --schema-registry-url`).
//! - [`serde`]: Avro in the Confluent wire format; the `SchemaResolver` seam (Confluent
//!   registry or local schemas); users' JSON read events mapped by field paths
//!   (`serde::json`).
//! - [`processor`]: the processor API. `processor::api` is the runtime's seam and names no
//!   domain type (`Processor`: raw records in, encoded `Outputs` by sink and store batches
//!   out; `SourceSerdes`; `ProcessorSupplier` with per-store restorers);
//!   `processor::registry` maps processor kinds to node builders; `processor::typed` is the
//!   API to write processors with (typed records, `forward`, named stores, punctuation);
//!   `processor::node` is the built-in `read-state` node (monotonic fold, replay marks,
//!   coalescing, the minimum emit interval, conversation heads); `processor::resolve`
//!   keeps the reads positioned by message id that wait for their messages.
//! - [`state`]: key-value stores (RocksDB, in-memory), the entry codecs (`EntryCodec`), the
//!   record cache, restore.
//! - [`task`]: one task per input partition and its processor over its stores: decode per
//!   input, dead letters, flush.
//! - [`kafka`]: client settings (consumer, producer) and internal-topic admin.
//! - [`runtime`]: `readstate run` in Kafka Streams' roles, one type each: the poll loop
//!   (StreamThread), the task manager (the lifecycle: assign, revoke, lost, corrupted,
//!   fatal), the task executor (processing and the one commit path), the running tasks,
//!   membership, parking, the schema gate (registry park/resume), offsets, the record
//!   collector, the state manager and the incremental changelog reader. It knows no domain
//!   type.
//! - [`sink`]: the PostgreSQL sink: migrations, batching, the version-guarded upsert with
//!   offsets in the same transaction, and its consumer loop.
//! - [`reset`]: `readstate reset`, the application reset tool (offsets, internal topics,
//!   sink offsets, local state).
//! - [`telemetry`]: the Prometheus recorder and `/metrics`, `/health`, `/ready`.
//! - [`query`]: interactive queries of the read-state stores, and their HTTP API.
//!
//! Outside the library (the workspace, see `ARCHITECTURE.md`): `crates/cli` is the
//! `readstate` binary (`App`, the composition root, and the command line) with the
//! end-to-end tests that start it; `crates/tools` holds the dev-only tools (loadgen, demo,
//! bench); `crates/testing` holds `TopologyTestDriver`, `TaskDriver`, the one bounded wait
//! and the test fixtures.

pub use readstate_core::{
    backoff, config, dead_letter_log, ids, kafka, model, processor, query, serde, state, task,
    telemetry, topology,
};
pub use readstate_runtime as runtime;
pub use readstate_sink as sink;

pub mod reset;
