//! The `readstate` binary's library: the composition root that `main` and the end-to-end
//! tests both start instances with.
//!
//! # Layout
//!
//! - [`app`]: `App` (check, build the embedded PostgreSQL sinks, serve telemetry, start the
//!   stream and sink threads), `RunningApp` (stop, join), `PostgresSinks`, `SinkThread`.
//! - `main.rs` (the binary): the command line (`run`, `sink`, `migrate`, `validate`,
//!   `describe`, `reset`, and the dev tools `demo`, `loadgen`, `bench` from
//!   `readstate-tools`).

pub mod app;

pub use app::{App, AppError, PostgresSinks, RunningApp, SinkThread};
