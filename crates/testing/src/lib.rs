//! Test utilities of readstate, for its own tests and for programs that write processors.
//!
//! # Layout
//!
//! - [`topology_driver`]: `TopologyTestDriver`, a read-state topology without a broker
//!   (Kafka Streams' `TopologyTestDriver`), and `DriverStores`.
//! - [`task_driver`]: `TaskDriver`, any processor supplier through the task, flush,
//!   changelog, checkpoint and restore path.
//! - [`wait`]: the one bounded wait (`wait_until`, `wait_for`, `wait_until_explained`).
//! - [`fixtures`]: topology texts, workloads and the independent oracle the tests share.
//! - [`kafka`], [`db`], [`process`], [`fake_registry`], [`chat`], [`http`]: the private
//!   broker, PostgreSQL, `readstate` child processes, a schema registry double, the chat
//!   workload producer and a blocking HTTP GET.
//! - [`cluster`]: a real three-node KRaft cluster whose nodes the fault tests kill, stop
//!   and start.

pub mod chat;
pub mod cluster;
pub mod db;
pub mod fake_registry;
pub mod fixtures;
pub mod http;
pub mod kafka;
pub mod process;
pub mod task_driver;
pub mod topology_driver;
pub mod wait;

pub use http::http_get;
pub use task_driver::TaskDriver;
pub use topology_driver::{DriverStores, TopologyTestDriver, START_MS};
pub use wait::{wait_for, wait_for_every, wait_until, wait_until_explained};
