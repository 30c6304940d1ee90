//! Schema migrations: the files in `migrations/`, compiled in, applied in order, once each.
//!
//! Each migration runs in its own transaction together with its row in
//! `readstate_migrations` (table name, version, name, checksum), under a transaction-level
//! advisory lock, so concurrent `migrate` calls are safe. `{{table}}` in a file is replaced
//! by the sink's table name; one database can hold the tables of several applications.

use tokio_postgres::Client;

use super::{db_error_text, SinkError};

/// A migration: version (from the file name), name, SQL.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every file in `migrations/`, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_read_receipts.sql",
        sql: include_str!("../../migrations/0001_read_receipts.sql"),
    },
    Migration {
        version: 2,
        name: "0002_sink_offsets.sql",
        sql: include_str!("../../migrations/0002_sink_offsets.sql"),
    },
];

/// The migrations of a conversation-heads table (`migrations/heads/`); `{{receipts_table}}`
/// stands for the receipts table its view reads.
pub const HEAD_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "heads/0001_conversation_heads.sql",
    sql: include_str!("../../migrations/heads/0001_conversation_heads.sql"),
}];

/// Advisory lock key serialising migrations ("readstat" in ASCII).
const LOCK_KEY: i64 = 0x7265_6164_7374_6174;

/// The history table (the notice that it exists already is silenced: every `migrate` after
/// the first would log it).
const HISTORY: &str = "SET LOCAL client_min_messages = warning;
CREATE TABLE IF NOT EXISTS readstate_migrations (
    table_name text NOT NULL,
    version    integer NOT NULL,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, version))";

/// FNV-1a of the templated SQL, hex: detects a migration edited after it was applied.
fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn render(m: &Migration, table: &str) -> String {
    m.sql.replace("{{table}}", table)
}

/// A set of migrations for one table, rendered.
struct Plan<'a> {
    table: &'a str,
    migrations: &'static [Migration],
    render: &'a dyn Fn(&Migration) -> String,
}

fn db(e: tokio_postgres::Error) -> SinkError {
    SinkError::from_db(&e)
}

/// Apply every migration not yet applied for the receipts table `table`; returns the
/// versions applied now.
pub async fn migrate(client: &mut Client, table: &str) -> Result<Vec<i32>, SinkError> {
    let render = |m: &Migration| render(m, table);
    apply(
        client,
        Plan {
            table,
            migrations: MIGRATIONS,
            render: &render,
        },
    )
    .await
}

/// Apply the migrations of the conversation-heads table `table`, whose view reads
/// `receipts_table`.
pub async fn migrate_heads(
    client: &mut Client,
    table: &str,
    receipts_table: &str,
) -> Result<Vec<i32>, SinkError> {
    let render = |m: &Migration| render(m, table).replace("{{receipts_table}}", receipts_table);
    apply(
        client,
        Plan {
            table,
            migrations: HEAD_MIGRATIONS,
            render: &render,
        },
    )
    .await
}

async fn apply(client: &mut Client, plan: Plan<'_>) -> Result<Vec<i32>, SinkError> {
    let table = plan.table;
    let mut applied_now = Vec::new();
    for m in plan.migrations {
        let sql = (plan.render)(m);
        let sum = checksum(&sql);
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(db)?;
        tx.batch_execute(HISTORY).await.map_err(db)?;
        let row = tx
            .query_opt(
                "SELECT checksum FROM readstate_migrations WHERE table_name = $1 AND version = $2",
                &[&table, &m.version],
            )
            .await
            .map_err(db)?;
        match row {
            Some(r) => {
                let stored: String = r.get(0);
                if stored != sum {
                    return Err(SinkError::Fatal(format!(
                        "migration {} for table {table} was applied with checksum {stored}, the file now has {sum}: migrations must not change once applied",
                        m.name
                    )));
                }
                tx.rollback().await.map_err(db)?;
            }
            None => {
                tx.batch_execute(&sql).await.map_err(|e| {
                    SinkError::Fatal(format!("migration {}: {}", m.name, db_error_text(&e)))
                })?;
                tx.execute(
                    "INSERT INTO readstate_migrations (table_name, version, name, checksum) VALUES ($1, $2, $3, $4)",
                    &[&table, &m.version, &m.name, &sum],
                )
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                applied_now.push(m.version);
            }
        }
    }
    Ok(applied_now)
}

/// Fail with [`SinkError::NotMigrated`] unless every migration is applied for `table`.
pub async fn check_migrated(client: &Client, table: &str) -> Result<(), SinkError> {
    check_set(client, table, MIGRATIONS).await
}

/// Fail with [`SinkError::NotMigrated`] unless every one of `migrations` is applied for
/// `table`.
pub async fn check_set(
    client: &Client,
    table: &str,
    migrations: &[Migration],
) -> Result<(), SinkError> {
    let not_migrated = |detail: String| SinkError::NotMigrated {
        table: table.to_owned(),
        detail,
    };
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('readstate_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    if !exists {
        return Err(not_migrated("no readstate_migrations table".into()));
    }
    let rows = client
        .query(
            "SELECT version FROM readstate_migrations WHERE table_name = $1",
            &[&table],
        )
        .await
        .map_err(db)?;
    let have: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&str> = migrations
        .iter()
        .filter(|m| !have.contains(&m.version))
        .map(|m| m.name)
        .collect();
    if !missing.is_empty() {
        return Err(not_migrated(format!("missing {}", missing.join(", "))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_migrations_is_compiled_in_and_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let known: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, known);
        let heads = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/heads");
        let mut files: Vec<String> = std::fs::read_dir(heads)
            .unwrap()
            .map(|e| format!("heads/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        files.sort();
        let known: Vec<&str> = HEAD_MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, known);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn checksums_depend_on_the_table() {
        let m = &MIGRATIONS[0];
        assert_ne!(
            checksum(&render(m, "read_receipts")),
            checksum(&render(m, "other"))
        );
        assert!(!render(m, "t").contains("{{"));
    }
}
