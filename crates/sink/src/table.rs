//! Where the sink writes: the [`ReceiptTable`] seam.
//!
//! - [`PostgresTable`]: one transaction per batch: a set-based upsert of every row
//!   (`INSERT … SELECT FROM unnest(…) ON CONFLICT … DO UPDATE … WHERE version < EXCLUDED.version`)
//!   and an update of the stored offsets that succeeds only if they are still what this
//!   instance loaded (fencing).
//! - [`MemoryTable`]: the same contract in memory, with injectable faults, for tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::future::BoxFuture;
use tokio_postgres::types::ToSql;

use super::batch::WriteBatch;
use super::row::SinkRow;
use super::{classify, db_error_text, ErrorClass, SinkError};
use crate::ids::IdTypes;
use crate::model::ReceiptUpdate;

/// What a successful write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Rows inserted or moved forward (a row at an equal or higher version is untouched).
    pub rows_changed: u64,
    /// Upsert statements executed (one per non-empty batch).
    pub statements: u64,
}

/// The sink's target: version-guarded rows plus the offsets they cover, atomically.
pub trait ReceiptTable<R: SinkRow = ReceiptUpdate>: Send + Sync {
    /// Register `partitions` for this group and topic (as -1 when new) and return each
    /// one's stored `next_offset` (-1: nothing written yet).
    fn claim<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partitions: &'a [i32],
    ) -> BoxFuture<'a, Result<HashMap<i32, i64>, SinkError>>;

    /// Upsert the batch's rows and move its partitions' offsets from `expected` to `next`,
    /// all or nothing.
    fn write<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        batch: &'a WriteBatch<R>,
    ) -> BoxFuture<'a, Result<WriteReport, SinkError>>;

    /// How many batches over disjoint partitions may be written at once.
    fn parallel_writes(&self) -> usize {
        1
    }

    /// The id types of its columns (the topology's `[ids]`).
    fn ids(&self) -> IdTypes {
        IdTypes::default()
    }

    /// Fail unless the table can be written: `NotMigrated` for good, `Retriable` while the
    /// database is unreachable.
    fn check_ready(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

/// PostgreSQL behind a connection pool.
pub struct PostgresTable<R = ReceiptUpdate> {
    pool: Pool,
    config: tokio_postgres::Config,
    tls: postgres_native_tls::MakeTlsConnector,
    /// `user@host:port/db`, for messages.
    target: String,
    table: String,
    /// The id types its columns have (the topology's `[ids]`).
    ids: IdTypes,
    upsert: String,
    _row: std::marker::PhantomData<fn() -> R>,
}

const CLAIM: &str =
    "INSERT INTO readstate_sink_offsets (consumer_group, topic, partition, next_offset)
    SELECT $1, $2, p, -1 FROM unnest($3::int4[]) AS p
    ON CONFLICT (consumer_group, topic, partition) DO NOTHING";

const LOAD: &str = "SELECT partition, next_offset FROM readstate_sink_offsets
    WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int4[])";

const ADVANCE: &str = "UPDATE readstate_sink_offsets AS o
    SET next_offset = t.next, records_applied = o.records_applied + t.records, updated_at = now()
    FROM unnest($3::int4[], $4::int8[], $5::int8[], $6::int8[]) AS t(p, expected, next, records)
    WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = t.p
      AND o.next_offset = t.expected";

/// The bound parameters of a row upsert.
fn params(cols: &super::row::Columns) -> Vec<&(dyn ToSql + Sync)> {
    cols.iter()
        .map(|c| c.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

fn db(e: tokio_postgres::Error) -> SinkError {
    SinkError::from_db(&e)
}

fn pool_error(e: deadpool_postgres::PoolError) -> SinkError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => SinkError::from_db(&e),
        other => SinkError::Retriable(format!("connection pool: {other}")),
    }
}

impl PostgresTable<ReceiptUpdate> {
    /// The receipts table (see [`PostgresTable::open`]).
    pub fn connect(
        url: &str,
        table: &str,
        pool_size: usize,
        statement_timeout: Duration,
    ) -> Result<Self, SinkError> {
        Self::open(url, table, pool_size, statement_timeout)
    }
}

impl<R: SinkRow> PostgresTable<R> {
    /// A pool of up to `pool_size` connections to `url` (libpq URL or key=value string;
    /// every libpq `sslmode` and `sslrootcert` honoured), each with `statement_timeout`.
    pub fn open(
        url: &str,
        table: &str,
        pool_size: usize,
        statement_timeout: Duration,
    ) -> Result<Self, SinkError> {
        let super::connect::Database {
            config: mut cfg,
            tls,
            target,
        } = super::connect::parse(url)?;
        cfg.options(format!(
            "-c statement_timeout={}",
            statement_timeout.as_millis().max(1)
        ));
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("readstate-sink");
        }
        let manager = Manager::from_config(
            cfg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| SinkError::Fatal(format!("connection pool: {e}")))?;
        Ok(Self {
            pool,
            config: cfg,
            tls,
            target,
            table: table.to_owned(),
            ids: IdTypes::default(),
            upsert: R::upsert_sql(table, &IdTypes::default()),
            _row: std::marker::PhantomData,
        })
    }

    /// The table for ids of `ids`' types (default: the default [`IdTypes`]).
    pub fn with_ids(mut self, ids: IdTypes) -> Self {
        self.upsert = R::upsert_sql(&self.table, &ids);
        self.ids = ids;
        self
    }

    pub fn ids(&self) -> IdTypes {
        self.ids
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, SinkError> {
        self.pool.get().await.map_err(|e| self.at(pool_error(e)))
    }

    /// Where this table's database is (`user@host:port/db`, no password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// An error naming the database it came from.
    fn at(&self, e: SinkError) -> SinkError {
        match e {
            SinkError::Retriable(m) => SinkError::Retriable(format!("{}: {m}", self.target)),
            SinkError::Fatal(m) => SinkError::Fatal(format!("{}: {m}", self.target)),
            other => other,
        }
    }

    /// A connection outside the pool, driven by the calling runtime and closed when
    /// dropped: for one-off work (migrations, checks) that may run on another runtime than
    /// the sink's, whose pooled connections must stay on the sink's.
    async fn direct(&self) -> Result<tokio_postgres::Client, SinkError> {
        let (client, conn) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.at(db(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "one-off database connection ended");
            }
        });
        Ok(client)
    }

    /// Fail unless the database is migrated for this table.
    pub async fn check_migrated(&self) -> Result<(), SinkError> {
        let client = self.direct().await?;
        super::migrate::check_id_columns(&client, &self.table, &R::id_columns(&self.ids))
            .await
            .map_err(|e| self.at(e))?;
        super::migrate::check_set(&client, &self.table, R::MIGRATIONS).await
    }

    /// Delete the stored offsets of `group` on `topic` (all partitions), so the sink
    /// starts again from the beginning (`readstate reset --sink-offsets`); with `dry_run`
    /// only count them. Rows are kept: their version guard makes the rewrite harmless.
    pub async fn delete_offsets(
        &self,
        group: &str,
        topic: &str,
        dry_run: bool,
    ) -> Result<u64, SinkError> {
        let client = self.direct().await?;
        let sql = match dry_run {
            true => "SELECT count(*) FROM readstate_sink_offsets WHERE consumer_group = $1 AND topic = $2",
            false => "WITH d AS (DELETE FROM readstate_sink_offsets WHERE consumer_group = $1 AND topic = $2 RETURNING 1) SELECT count(*) FROM d",
        };
        let row = client.query_one(sql, &[&group, &topic]).await.map_err(db)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Apply the migrations for this table; returns the versions applied now.
    pub async fn migrate(&self) -> Result<Vec<i32>, SinkError> {
        let mut client = self.direct().await?;
        let columns = R::id_columns(&self.ids);
        super::migrate::migrate(&mut client, &self.table, &self.ids, &columns, R::MIGRATIONS)
            .await
            .map_err(|e| self.at(e))
    }

    /// Apply the migrations of a table whose SQL reads `receipts_table` (conversation
    /// heads, members); returns the versions applied now.
    pub async fn migrate_beside(&self, receipts_table: &str) -> Result<Vec<i32>, SinkError> {
        let mut client = self.direct().await?;
        let columns = R::id_columns(&self.ids);
        super::migrate::migrate_beside(
            &mut client,
            &self.table,
            receipts_table,
            &self.ids,
            &columns,
            R::MIGRATIONS,
        )
        .await
        .map_err(|e| self.at(e))
    }

    async fn write_batch(
        &self,
        group: &str,
        topic: &str,
        batch: &WriteBatch<R>,
    ) -> Result<WriteReport, SinkError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let mut report = WriteReport::default();
        if !batch.rows.is_empty() {
            let stmt = tx.prepare_cached(&self.upsert).await.map_err(db)?;
            let cols = R::columns(&batch.rows, &self.ids);
            let started = std::time::Instant::now();
            let r = tx.execute(&stmt, &params(&cols)).await;
            metrics::histogram!("readstate_sink_statement_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            match r {
                Ok(n) => report.rows_changed = n,
                Err(e) if classify(&e) == ErrorClass::RowRejected => {
                    drop(tx);
                    let rejected = self.find_rejected(&mut client, &batch.rows).await?;
                    if rejected.is_empty() {
                        // Not reproducible row by row: treat like a transient failure.
                        return Err(SinkError::Retriable(db_error_text(&e)));
                    }
                    return Err(SinkError::Rejected(rejected));
                }
                Err(e) => return Err(SinkError::from_db(&e)),
            }
            report.statements = 1;
        }
        let parts: Vec<i32> = batch.ranges.iter().map(|r| r.partition).collect();
        let expected: Vec<i64> = batch.ranges.iter().map(|r| r.expected).collect();
        let next: Vec<i64> = batch.ranges.iter().map(|r| r.next).collect();
        let records: Vec<i64> = batch.ranges.iter().map(|r| r.records).collect();
        let advanced = tx
            .execute(
                ADVANCE,
                &[&group, &topic, &parts, &expected, &next, &records],
            )
            .await
            .map_err(db)?;
        if advanced as usize != batch.ranges.len() {
            tx.rollback().await.map_err(db)?;
            return Err(SinkError::Fenced(parts));
        }
        tx.commit().await.map_err(db)?;
        Ok(report)
    }

    /// Find the rows the database rejects, by bisection under savepoints in a transaction
    /// that is rolled back: O(rejected × log rows) statements, only after a failure.
    async fn find_rejected(
        &self,
        client: &mut deadpool_postgres::Object,
        rows: &[R],
    ) -> Result<Vec<(usize, String)>, SinkError> {
        let tx = client.transaction().await.map_err(db)?;
        let stmt = tx.prepare_cached(&self.upsert).await.map_err(db)?;
        let mut rejected = Vec::new();
        let mut stack = vec![(0usize, rows.len())];
        while let Some((lo, hi)) = stack.pop() {
            tx.batch_execute("SAVEPOINT probe").await.map_err(db)?;
            let cols = R::columns(&rows[lo..hi], &self.ids);
            match tx.execute(&stmt, &params(&cols)).await {
                Ok(_) => tx
                    .batch_execute("RELEASE SAVEPOINT probe")
                    .await
                    .map_err(db)?,
                Err(e) if classify(&e) == ErrorClass::RowRejected => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT probe")
                        .await
                        .map_err(db)?;
                    if hi - lo == 1 {
                        rejected.push((lo, db_error_text(&e)));
                    } else {
                        let mid = lo + (hi - lo) / 2;
                        stack.push((mid, hi));
                        stack.push((lo, mid));
                    }
                }
                Err(e) => return Err(SinkError::from_db(&e)),
            }
        }
        tx.rollback().await.map_err(db)?;
        rejected.sort_by_key(|(i, _)| *i);
        Ok(rejected)
    }

    async fn claim_partitions(
        &self,
        group: &str,
        topic: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, i64>, SinkError> {
        let client = self.client().await?;
        let parts: Vec<i32> = partitions.to_vec();
        client
            .execute(CLAIM, &[&group, &topic, &parts])
            .await
            .map_err(db)?;
        let rows = client
            .query(LOAD, &[&group, &topic, &parts])
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
            .collect())
    }
}

impl<R: SinkRow> ReceiptTable<R> for PostgresTable<R> {
    fn check_ready(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(self.check_migrated())
    }

    fn ids(&self) -> IdTypes {
        self.ids
    }

    fn claim<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partitions: &'a [i32],
    ) -> BoxFuture<'a, Result<HashMap<i32, i64>, SinkError>> {
        Box::pin(self.claim_partitions(group, topic, partitions))
    }

    fn parallel_writes(&self) -> usize {
        self.pool.status().max_size
    }

    fn write<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        batch: &'a WriteBatch<R>,
    ) -> BoxFuture<'a, Result<WriteReport, SinkError>> {
        Box::pin(self.write_batch(group, topic, batch))
    }
}

/// Decides which rows the [`MemoryTable`] rejects for good.
type RejectRule<R> = Box<dyn Fn(&R) -> bool + Send + Sync>;

/// The [`ReceiptTable`] contract in memory, with faults on demand.
pub struct MemoryTable<R: SinkRow = ReceiptUpdate> {
    state: Mutex<MemoryState<R>>,
    /// Fail this many more writes with a retriable error (a database that is down).
    fail_writes: AtomicU64,
    /// Rows this rule matches are rejected for good.
    reject: Mutex<Option<RejectRule<R>>>,
}

struct MemoryState<R: SinkRow> {
    rows: HashMap<R::Key, R>,
    offsets: HashMap<(String, String, i32), (i64, i64)>,
    statements: u64,
}

impl<R: SinkRow> Default for MemoryTable<R> {
    fn default() -> Self {
        Self {
            state: Mutex::new(MemoryState {
                rows: HashMap::new(),
                offsets: HashMap::new(),
                statements: 0,
            }),
            fail_writes: AtomicU64::new(0),
            reject: Mutex::new(None),
        }
    }
}

impl MemoryTable<ReceiptUpdate> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn reject_message_id(&self, id: &str) {
        let id = id.to_owned();
        *self.reject.lock().expect("lock") = Some(Box::new(move |u: &ReceiptUpdate| {
            u.message_id.as_deref() == Some(&id)
        }));
    }
}

impl<R: SinkRow> MemoryTable<R> {
    pub fn fail_next_writes(&self, n: u64) {
        self.fail_writes.store(n, Ordering::SeqCst);
    }

    pub fn rows(&self) -> HashMap<R::Key, R> {
        self.state.lock().expect("lock").rows.clone()
    }

    /// (next_offset, records_applied) per partition.
    pub fn offsets(&self, group: &str, topic: &str) -> HashMap<i32, (i64, i64)> {
        let s = self.state.lock().expect("lock");
        s.offsets
            .iter()
            .filter(|((g, t, _), _)| g == group && t == topic)
            .map(|((_, _, p), v)| (*p, *v))
            .collect()
    }

    pub fn statements(&self) -> u64 {
        self.state.lock().expect("lock").statements
    }

    fn apply(&self, group: &str, topic: &str, b: &WriteBatch<R>) -> Result<WriteReport, SinkError> {
        let left = self.fail_writes.load(Ordering::SeqCst);
        if left > 0 {
            self.fail_writes.store(left - 1, Ordering::SeqCst);
            return Err(SinkError::Retriable("injected outage".into()));
        }
        if let Some(bad) = self.reject.lock().expect("lock").as_ref() {
            let rejected: Vec<(usize, String)> = b
                .rows
                .iter()
                .enumerate()
                .filter(|(_, u)| bad(u))
                .map(|(i, _)| (i, "injected rejection".to_owned()))
                .collect();
            if !rejected.is_empty() {
                return Err(SinkError::Rejected(rejected));
            }
        }
        let mut s = self.state.lock().expect("lock");
        for r in &b.ranges {
            let stored = s
                .offsets
                .get(&(group.to_owned(), topic.to_owned(), r.partition))
                .map(|v| v.0);
            if stored != Some(r.expected) {
                return Err(SinkError::Fenced(vec![r.partition]));
            }
        }
        let mut report = WriteReport::default();
        for u in &b.rows {
            match s.rows.get(&u.key()) {
                Some(old) if old.version() >= u.version() => {}
                _ => {
                    s.rows.insert(u.key(), u.clone());
                    report.rows_changed += 1;
                }
            }
        }
        if !b.rows.is_empty() {
            report.statements = 1;
            s.statements += 1;
        }
        for r in &b.ranges {
            let e = s
                .offsets
                .get_mut(&(group.to_owned(), topic.to_owned(), r.partition))
                .expect("checked above");
            *e = (r.next, e.1 + r.records);
        }
        Ok(report)
    }
}

impl<R: SinkRow> ReceiptTable<R> for MemoryTable<R> {
    fn claim<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partitions: &'a [i32],
    ) -> BoxFuture<'a, Result<HashMap<i32, i64>, SinkError>> {
        let mut s = self.state.lock().expect("lock");
        let out = partitions
            .iter()
            .map(|p| {
                let e = s
                    .offsets
                    .entry((group.to_owned(), topic.to_owned(), *p))
                    .or_insert((-1, 0));
                (*p, e.0)
            })
            .collect();
        Box::pin(async move { Ok(out) })
    }

    fn write<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        batch: &'a WriteBatch<R>,
    ) -> BoxFuture<'a, Result<WriteReport, SinkError>> {
        let r = self.apply(group, topic, batch);
        Box::pin(async move { r })
    }
}
