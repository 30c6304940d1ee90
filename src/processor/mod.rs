//! Processors: the logic that folds input records into state and decides what to emit.
//!
//! [`read_state::ReadStateProcessor`] is the read-pointer processor of the
//! `read-state` topology node.

pub mod punctuation;
pub mod read_state;
pub mod unread;

pub use read_state::{EmitPolicy, FlushOutput, ProcessStats, ReadStateProcessor};
pub use unread::{MessageStats, DEFAULT_UNREAD_CAP};

/// Errors of the processing layer.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
    #[error(
        "message events reached a processor without a message source (no unread counts configured)"
    )]
    NoMessageSource,
}
