//! readstate-sink: the PostgreSQL sink: the output topic, batched, into `read_receipts`
//! (the sender-receipts topic into `sender_receipts`, the conversation-heads topic into
//! `conversation_heads`, the members topic into `conversation_members`), exactly once.
//!
//! # Layout
//!
//! - [`migrate`]: the SQL in `migrations/`, applied once each and checked before start.
//! - [`batch`]: the in-memory batch: one row per key (highest version), and per partition
//!   the offset range it covers.
//! - [`row`]: [`SinkRow`], what a table's rows are (receipt updates, conversation heads):
//!   key, version, upsert and columns.
//! - [`table`]: the [`ReceiptTable`](table::ReceiptTable) seam: [`PostgresTable`] (one
//!   transaction per batch: version-guarded `UNNEST` upsert + fenced offsets update) and
//!   [`MemoryTable`] for tests.
//! - [`runner`]: the consumer loop in group `<application.id>-pg-sink`: claims and seeks to
//!   the offsets stored in PostgreSQL on assignment, batches by size and linger, retries
//!   with backoff while the partitions are paused, sends rejected rows to the dead-letter
//!   topic.
//!
//! Errors are classified once, here, at the sink's boundary ([`classify`]).

// The core's modules, at this crate's root as in the core's.
use readstate_core::{
    backoff, dead_letter_log, ids, kafka, model, processor, serde, task, telemetry, topology,
};

pub mod batch;
pub mod connect;
mod lag;
pub mod migrate;
pub mod row;
pub mod runner;
pub mod table;

pub use row::SinkRow;
pub use runner::{run_sink, SinkConfig, SinkSummary};
pub use table::{MemoryTable, PostgresTable, ReceiptTable};

/// Errors of the sink layer, by what the sink does about them.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying: connection lost or refused, server restarting, serialization
    /// failure, deadlock, statement timeout, too many connections.
    #[error("database unavailable: {0}")]
    Retriable(String),
    /// Rows the database rejects for good (data exceptions, constraint violations), by
    /// index in the batch, with the error. The batch was rolled back.
    #[error("{} row(s) rejected by the database", .0.len())]
    Rejected(Vec<(usize, String)>),
    /// Another sink instance moved the stored offsets of these partitions: this one no
    /// longer owns them (a zombie after a rebalance). The batch was rolled back.
    #[error("offsets of partitions {0:?} were moved by another sink instance")]
    Fenced(Vec<i32>),
    /// The database is not migrated for this table.
    #[error("database is not migrated for table {table}: {detail}; run `readstate migrate`")]
    NotMigrated { table: String, detail: String },
    /// PostgreSQL stores an offset beyond the end of the topic: the topic was deleted and
    /// recreated (or truncated) while the table kept its offsets. Reading on would skip
    /// every record below the stored offset, so the sink stops.
    #[error("readstate_sink_offsets stores next offset {stored} for group {group}, {topic} [{partition}], but the topic ends at offset {end}: it was recreated or truncated since. Stop every instance and run `readstate reset --topology <file> --sink-offsets` to write it again from the beginning")]
    OffsetBeyondEnd {
        group: String,
        topic: String,
        partition: i32,
        stored: i64,
        end: i64,
    },
    /// Anything else (bad URL, undefined table, permission denied): stop.
    #[error("database: {0}")]
    Fatal(String),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    #[error(transparent)]
    Serde(#[from] crate::serde::SerdeError),
}

/// What the sink does about a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Retriable,
    /// The data of some row is at fault (SQLSTATE classes 22 and 23).
    RowRejected,
    Fatal,
}

/// Classify a `tokio_postgres` error by SQLSTATE; no code means the connection failed.
pub fn classify(e: &tokio_postgres::Error) -> ErrorClass {
    match e.code() {
        None => ErrorClass::Retriable,
        Some(code) => classify_sqlstate(code.code()),
    }
}

/// Classify a SQLSTATE (five characters; the first two are its class).
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code.get(..2).unwrap_or("") {
        // connection exception, transaction rollback (serialization, deadlock),
        // insufficient resources, operator intervention (shutdown, cancel: statement
        // timeout), system error.
        "08" | "40" | "53" | "57" | "58" => ErrorClass::Retriable,
        // object not in prerequisite state: lock not available, a database not accepting
        // connections (ALLOW_CONNECTIONS false during maintenance), object in use.
        "55" => ErrorClass::Retriable,
        "22" | "23" => ErrorClass::RowRejected,
        _ => ErrorClass::Fatal,
    }
}

impl SinkError {
    /// Wrap a database error according to its class (row rejections need the batch
    /// context, so here they become retriable only through [`table`]'s bisection).
    pub fn from_db(e: &tokio_postgres::Error) -> Self {
        let text = db_error_text(e);
        match classify(e) {
            ErrorClass::Retriable => SinkError::Retriable(text),
            ErrorClass::RowRejected | ErrorClass::Fatal => SinkError::Fatal(text),
        }
    }
}

/// The most useful text of a database error: the server's message and SQLSTATE when there
/// is one, else the error with its causes (`error performing TLS handshake: ...: certificate
/// verify failed`, `error connecting to server: Connection refused`).
pub fn db_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(d) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", d.message(), d.code().code());
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text = format!("{text}: {c_text}");
        }
        cause = c.source();
    }
    text
}

/// The receipts sink of `topology` against `url`: connects, checks the migrations, and
/// returns the runner's configuration.
pub fn from_topology(
    topology: &crate::topology::Topology,
    kafka: crate::kafka::KafkaSettings,
    resolver: std::sync::Arc<dyn crate::serde::registry::SchemaResolver>,
    url: &str,
) -> Result<SinkConfig, SinkError> {
    let pg = topology.postgres.as_ref().ok_or_else(|| {
        SinkError::Fatal("the topology has no [[sink]] of kind \"postgres\"".into())
    })?;
    sink_config(topology, pg, kafka, resolver, url)
}

/// The conversation-heads sink of `topology`, when it has one.
pub fn heads_from_topology(
    topology: &crate::topology::Topology,
    kafka: crate::kafka::KafkaSettings,
    resolver: std::sync::Arc<dyn crate::serde::registry::SchemaResolver>,
    url: &str,
) -> Result<Option<SinkConfig<crate::model::HeadUpdate>>, SinkError> {
    match &topology.heads_postgres {
        Some(pg) => sink_config(topology, pg, kafka, resolver, url).map(Some),
        None => Ok(None),
    }
}

/// The sender-receipts sink of `topology` (table `sender_receipts`), when it has one.
pub fn senders_from_topology(
    topology: &crate::topology::Topology,
    kafka: crate::kafka::KafkaSettings,
    resolver: std::sync::Arc<dyn crate::serde::registry::SchemaResolver>,
    url: &str,
) -> Result<Option<SinkConfig<crate::model::SenderReceipt>>, SinkError> {
    match &topology.senders_postgres {
        Some(pg) => sink_config(topology, pg, kafka, resolver, url).map(Some),
        None => Ok(None),
    }
}

/// The members sink of `topology` (table `conversation_members`), when it has one.
pub fn members_from_topology(
    topology: &crate::topology::Topology,
    kafka: crate::kafka::KafkaSettings,
    resolver: std::sync::Arc<dyn crate::serde::registry::SchemaResolver>,
    url: &str,
) -> Result<Option<SinkConfig<row::MemberListRow>>, SinkError> {
    match &topology.members_postgres {
        Some(pg) => sink_config(topology, pg, kafka, resolver, url).map(Some),
        None => Ok(None),
    }
}

fn sink_config<R: SinkRow>(
    topology: &crate::topology::Topology,
    pg: &crate::topology::PostgresSink,
    kafka: crate::kafka::KafkaSettings,
    resolver: std::sync::Arc<dyn crate::serde::registry::SchemaResolver>,
    url: &str,
) -> Result<SinkConfig<R>, SinkError> {
    let table = PostgresTable::<R>::open(url, &pg.table, pg.pool_size, pg.statement_timeout)?
        .with_ids(topology.ids);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SinkError::Fatal(format!("tokio runtime: {e}")))?;
    // An unmigrated database is refused at once; one that cannot be reached yet is waited
    // for by the sink itself (stream processing does not need it).
    match rt.block_on(table.check_migrated()) {
        Err(SinkError::Retriable(e)) => {
            tracing::warn!(error = %e, "database unavailable at start: the sink waits for it")
        }
        r => r?,
    }
    Ok(SinkConfig {
        group: pg.consumer_group.clone(),
        topic: pg.topic.0.clone(),
        dead_letter_topic: topology.dead_letter_topic.0.clone(),
        batch_size: pg.batch_size,
        linger: pg.linger,
        kafka,
        resolver,
        table: std::sync::Arc::new(table),
        progress: Default::default(),
        health: crate::telemetry::Health::new(),
        topics_ready: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified_once() {
        assert_eq!(classify_sqlstate("40001"), ErrorClass::Retriable); // serialization
        assert_eq!(classify_sqlstate("40P01"), ErrorClass::Retriable); // deadlock
        assert_eq!(classify_sqlstate("57014"), ErrorClass::Retriable); // statement timeout
        assert_eq!(classify_sqlstate("57P01"), ErrorClass::Retriable); // admin shutdown
        assert_eq!(classify_sqlstate("08006"), ErrorClass::Retriable); // connection failure
        assert_eq!(classify_sqlstate("53300"), ErrorClass::Retriable); // too many connections
        assert_eq!(classify_sqlstate("55P03"), ErrorClass::Retriable); // lock not available
        assert_eq!(classify_sqlstate("55000"), ErrorClass::Retriable); // not accepting conns
        assert_eq!(classify_sqlstate("22008"), ErrorClass::RowRejected); // datetime overflow
        assert_eq!(classify_sqlstate("22021"), ErrorClass::RowRejected); // bad encoding
        assert_eq!(classify_sqlstate("23514"), ErrorClass::RowRejected); // check violation
        assert_eq!(classify_sqlstate("42P01"), ErrorClass::Fatal); // undefined table
        assert_eq!(classify_sqlstate("28000"), ErrorClass::Fatal); // bad authorization
    }
}
