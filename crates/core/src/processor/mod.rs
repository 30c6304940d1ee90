//! Processors: the logic that folds input records into state and decides what to emit.
//!
//! [`api`] is the seam a task drives ([`Processor`], made by a [`ProcessorSupplier`], its
//! sources decoded by a [`SourceSerdes`]): bytes in, bytes out, no domain type.
//! [`node`] builds the `read-state` node behind it: [`read_state::ReadStateProcessor`], with
//! [`unread`] keeping conversation heads when a message source feeds it. [`typed`] is the
//! API to write processors with: typed records, `forward`, named stores, punctuation.

pub mod api;
pub mod groups;
pub mod node;
pub mod punctuation;
pub mod read_state;
pub mod registry;
pub mod resolve;
pub mod restorers;
pub mod typed;
pub mod unread;

pub use api::{
    CacheBudget, Counter, FlushOutput, InputId, Outputs, Processor, ProcessorContext,
    ProcessorStats, ProcessorSupplier, RecordKind, SinkId, SourceSerdes, StoreFlush,
};
pub use node::{BuiltNode, ReadStateNode, ReadStateSerdes, ReadStateSupplier};
pub use read_state::{
    EmitPolicy, ProcessStats, ReadStateFlush, ReadStateProcessor, HEADS_STORE, STATE_STORE,
};
pub use registry::{NodeBuilder, ProcessorRegistry, RawSerdes};
pub use resolve::{DEFAULT_MAX_WAITING_READS, DEFAULT_MESSAGE_WAIT, UNRESOLVED_MESSAGE};
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
    #[error(transparent)]
    Serde(#[from] crate::serde::SerdeError),
    #[error("store {store}: a value does not decode: {reason}")]
    StoreValue { store: String, reason: String },
    #[error(
        "the processor has no store named {0:?} (declare it to the supplier and the topology)"
    )]
    NoSuchStore(String),
    #[error("store {0:?} was asked for with other key or value types than declared")]
    StoreType(String),
    #[error("the processor has no sink named {0:?}")]
    NoSuchSink(String),
    #[error("no processor kind {0:?} is registered")]
    UnknownKind(String),
    #[error("the supplier declares {declared} stores but the task was given {given}")]
    StoreCount { declared: usize, given: usize },
}
