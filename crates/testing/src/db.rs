//! A PostgreSQL database of its own per test, on the server `scripts/test` starts
//! (`READSTATE_TEST_DATABASE_URL`), dropped at the end; outages on demand.

use std::collections::HashMap;
use std::time::Duration;

use readstate::model::{ReceiptUpdate, StateKey};
use readstate::sink::PostgresTable;

use crate::fixtures::key;
use crate::kafka::suffix;
use crate::wait::wait_until;

/// A database of its own on the test server, dropped at the end.
pub struct Db {
    admin_url: String,
    name: String,
    pub url: String,
    pub rt: tokio::runtime::Runtime,
}

/// A row as stored, every column as text (so a rewrite would show in `updated_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub seq: i64,
    pub version: i64,
    pub events_total: i64,
    pub stale_total: i64,
    pub device: Option<String>,
    pub read_at: Option<String>,
    pub updated_at: String,
}

impl Db {
    pub fn create() -> Self {
        let admin_url = std::env::var("READSTATE_TEST_DATABASE_URL").expect(
            "READSTATE_TEST_DATABASE_URL is not set: run scripts/test, which starts a private PostgreSQL",
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let name = format!("rs_{}", suffix());
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let url = format!("{base}/{name}");
        let db = Db {
            admin_url,
            name,
            url,
            rt,
        };
        db.admin(&format!("CREATE DATABASE {}", db.name));
        db
    }

    pub fn connect(&self, url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        })
    }

    pub fn admin(&self, sql: &str) {
        let c = self.connect(&self.admin_url).unwrap();
        self.rt.block_on(c.batch_execute(sql)).unwrap();
    }

    pub fn table(&self) -> PostgresTable {
        self.table_with_timeout(Duration::from_secs(30))
    }

    pub fn table_with_timeout(&self, statement_timeout: Duration) -> PostgresTable {
        PostgresTable::connect(&self.url, "read_receipts", 2, statement_timeout).unwrap()
    }

    pub fn migrate(&self) {
        self.rt.block_on(self.table().migrate()).unwrap();
    }

    /// Migrate the receipts table for ids of `ids`' types.
    pub fn migrate_with(
        &self,
        ids: readstate::ids::IdTypes,
    ) -> Result<(), readstate::sink::SinkError> {
        self.rt
            .block_on(self.table().with_ids(ids).migrate())
            .map(|_| ())
    }

    /// Every row, or `None` while the database cannot be reached.
    pub fn rows(&self) -> Option<HashMap<StateKey, Row>> {
        let c = self.connect(&self.url).ok()?;
        let rows = self
            .rt
            .block_on(c.query(
                "SELECT conversation_id, reader_id, last_read_seq, version, events_total,
                        stale_total, device_id, read_at::text, updated_at::text
                 FROM read_receipts",
                &[],
            ))
            .ok()?;
        Some(
            rows.iter()
                .map(|r| {
                    (
                        key(r.get(0), r.get(1)),
                        Row {
                            seq: r.get(2),
                            version: r.get(3),
                            events_total: r.get(4),
                            stale_total: r.get(5),
                            device: r.get(6),
                            read_at: r.get(7),
                            updated_at: r.get(8),
                        },
                    )
                })
                .collect(),
        )
    }

    /// (next_offset, records_applied) per partition of the sink's group.
    pub fn offsets(&self, group: &str) -> Option<HashMap<i32, (i64, i64)>> {
        let c = self.connect(&self.url).ok()?;
        let rows = self
            .rt
            .block_on(c.query(
                "SELECT partition, next_offset, records_applied FROM readstate_sink_offsets
                 WHERE consumer_group = $1",
                &[&group],
            ))
            .ok()?;
        Some(
            rows.iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect(),
        )
    }

    /// An outage: no new connections to this database, and the existing ones killed.
    pub fn block(&self) {
        self.admin(&format!(
            "ALTER DATABASE {0} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}'",
            self.name
        ));
    }

    pub fn unblock(&self) {
        self.admin(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.name
        ));
    }

    /// Wait until the table equals `want` (pointer, version, counters) for every key.
    pub fn wait_rows(&self, want: &HashMap<StateKey, ReceiptUpdate>) -> HashMap<StateKey, Row> {
        wait_until(
            "the table's rows to match the oracle",
            Duration::from_secs(120),
            || {
                self.rows().filter(|rows| {
                    rows.len() == want.len() && want.iter().all(|(k, u)| matches(rows.get(k), u))
                })
            },
        )
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Ok(c) = self.connect(&self.admin_url) {
            let _ = self.rt.block_on(c.batch_execute(&format!(
                "ALTER DATABASE {0} ALLOW_CONNECTIONS true;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}';
                 DROP DATABASE IF EXISTS {0}",
                self.name
            )));
        }
    }
}

pub fn matches(row: Option<&Row>, u: &ReceiptUpdate) -> bool {
    row.is_some_and(|r| {
        r.seq == u.last_read_seq
            && r.version == u.version
            && r.events_total == u.events_total
            && r.stale_total == u.stale_total
            && r.device == u.device_id
    })
}
