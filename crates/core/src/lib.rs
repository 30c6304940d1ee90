//! readstate-core: what the processor API is and what it stands on. The runtime
//! (`readstate-runtime`) and the sinks (`readstate-sink`) build on it; `readstate`
//! re-exports all three.
//!
//! # Layout
//!
//! - [`backoff`]: the one `Backoff` of every retry loop, and the `Clock` seam.
//! - [`ids`]: newtypes for identifiers; `ids::Id`, a domain id of a topology's types.
//! - [`model`]: the domain records.
//! - [`config`]: topology files as written (TOML).
//! - [`topology`]: a spec compiled into a checked `Topology` and its graph; describe,
//!   schema checks.
//! - [`serde`]: Avro in the Confluent wire format, users' JSON and Avro mapped by fields,
//!   the `SchemaResolver` seam.
//! - [`processor`]: the processor API (`processor::api`, the runtime's seam;
//!   `processor::typed`, the API to write processors with), the registry of kinds and
//!   the built-in `read-state` node.
//! - [`state`]: key-value stores (RocksDB, in-memory), entry codecs, the record cache.
//! - [`task`]: one task per input partition and its processor over its stores.
//! - [`dead_letter_log`]: the dead-letter queue, its rate-limited log and circuit breaker
//!   (the runtime's and the sinks').
//! - [`kafka`]: client settings, partitioners and internal-topic admin.
//! - [`telemetry`]: the Prometheus recorder and `/metrics`, `/health`, `/ready`.
//! - [`query`]: interactive queries of the read-state stores, and their HTTP API.

pub mod backoff;
pub mod config;
pub mod dead_letter_log;
pub mod ids;
pub mod kafka;
pub mod model;
pub mod processor;
pub mod query;
pub mod serde;
pub mod state;
pub mod task;
pub mod telemetry;
pub mod topology;
