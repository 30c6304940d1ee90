//! Processors: the logic that folds input records into state and decides what to emit.
//!
//! [`read_state::ReadStateProcessor`] is the read-pointer processor of the
//! `read-state` topology node.

pub mod read_state;

pub use read_state::{EmitPolicy, FlushOutput, ProcessStats, ReadStateProcessor};

/// Errors of the processing layer.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
}
