//! Dev-only tools of readstate, run through the `readstate` binary.
//!
//! # Layout
//!
//! - [`loadgen`]: a realistic chat workload generator and its oracle (`readstate loadgen`,
//!   the demo, the benchmarks and the tests).
//! - [`demo`]: `readstate demo`: embedded broker, generator, run + sink, PASS/FAIL check.
//! - [`bench`]: `readstate bench`: figures next to their targets (PERFORMANCE.md).

pub mod bench;
pub mod demo;
pub mod loadgen;
