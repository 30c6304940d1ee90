//! Processors: the logic that folds input records into state and decides what to emit.
//!
//! [`api`] is the seam a task drives ([`Processor`], made by a [`ProcessorSupplier`]);
//! [`read_state::ReadStateProcessor`] is the processor of the `read-state` topology node,
//! with [`unread`] keeping conversation heads when a message source feeds it.

pub mod api;
pub mod punctuation;
pub mod read_state;
pub mod unread;

pub use api::{
    CacheBudget, InputId, Processor, ProcessorContext, ProcessorStats, ProcessorSupplier,
    ReadStateSupplier, RecordKind, Records,
};
pub use read_state::{
    EmitPolicy, FlushOutput, ProcessStats, ReadStateProcessor, StoreFlush, HEADS_STORE, STATE_STORE,
};
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
    #[error("the processor's {0} store was not given to it at init (check the node's stores)")]
    MissingStore(&'static str),
}
