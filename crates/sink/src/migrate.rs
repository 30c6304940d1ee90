//! Schema migrations: the files in `migrations/`, compiled in, applied in order, once each.
//!
//! Each migration runs in its own transaction together with its row in
//! `readstate_migrations` (table name, version, name, checksum), under a transaction-level
//! advisory lock, so concurrent `migrate` calls are safe. `{{table}}` in a file is replaced
//! by the sink's table name; one database can hold the tables of several applications.
//! `{{conversation_id}}`, `{{user_id}}` and `{{message_id}}` are replaced by the column types
//! of the topology's id types (`bigint`, `text`, `uuid`; for the default types the rendered
//! SQL, and so its checksum, is what every earlier version applied). A table that exists
//! with other id column types is refused before anything runs ([`check_id_columns`]).

use tokio_postgres::Client;

use super::{db_error_text, SinkError};
use crate::ids::{IdType, IdTypes};

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
        sql: include_str!("../../../migrations/0001_read_receipts.sql"),
    },
    Migration {
        version: 2,
        name: "0002_sink_offsets.sql",
        sql: include_str!("../../../migrations/0002_sink_offsets.sql"),
    },
];

/// The migrations of a conversation-heads table (`migrations/heads/`); `{{receipts_table}}`
/// stands for the receipts table its view reads.
pub const HEAD_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "heads/0001_conversation_heads.sql",
    sql: include_str!("../../../migrations/heads/0001_conversation_heads.sql"),
}];

/// The migrations of a sender-receipts table (`migrations/sender_receipts/`).
pub const SENDER_RECEIPT_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "sender_receipts/0001_sender_receipts.sql",
    sql: include_str!("../../../migrations/sender_receipts/0001_sender_receipts.sql"),
}];

/// The migrations of a members table (`migrations/members/`); `{{receipts_table}}` stands
/// for the receipts table its read-by function reads.
pub const MEMBER_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "members/0001_conversation_members.sql",
    sql: include_str!("../../../migrations/members/0001_conversation_members.sql"),
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

fn render(m: &Migration, table: &str, ids: &IdTypes) -> String {
    m.sql
        .replace("{{table}}", table)
        .replace("{{conversation_id}}", ids.conversation.sql())
        .replace("{{user_id}}", ids.user.sql())
        .replace("{{message_id}}", ids.message.sql())
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

/// Apply every migration of `migrations` not yet applied for the table `table` with ids
/// of `ids`' types; returns the versions applied now.
pub async fn migrate(
    client: &mut Client,
    table: &str,
    ids: &IdTypes,
    columns: &[(&str, IdType)],
    migrations: &'static [Migration],
) -> Result<Vec<i32>, SinkError> {
    check_id_columns(client, table, columns).await?;
    let render = |m: &Migration| render(m, table, ids);
    apply(
        client,
        Plan {
            table,
            migrations,
            render: &render,
        },
    )
    .await
}

/// Apply `migrations` to the table `table` whose SQL reads `receipts_table` (a
/// conversation-heads or members table).
pub async fn migrate_beside(
    client: &mut Client,
    table: &str,
    receipts_table: &str,
    ids: &IdTypes,
    columns: &[(&str, IdType)],
    migrations: &'static [Migration],
) -> Result<Vec<i32>, SinkError> {
    check_id_columns(client, table, columns).await?;
    let render =
        |m: &Migration| render(m, table, ids).replace("{{receipts_table}}", receipts_table);
    apply(
        client,
        Plan {
            table,
            migrations,
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

/// Refuse a table that exists with id columns of other types than `columns` declares
/// (a topology's id types changed under an existing table): one error naming every
/// difference. A table that does not exist yet passes.
pub async fn check_id_columns(
    client: &Client,
    table: &str,
    columns: &[(&str, IdType)],
) -> Result<(), SinkError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table],
        )
        .await
        .map_err(db)?;
    let differences: Vec<String> = columns
        .iter()
        .filter_map(|(name, ty)| {
            let have: String = rows.iter().find(|r| r.get::<_, String>(0) == *name)?.get(1);
            (have != ty.sql()).then(|| {
                format!(
                    "{name} is {have}, the topology's {ty} ids need {}",
                    ty.sql()
                )
            })
        })
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    Err(SinkError::Fatal(format!(
        "table {table} does not match the topology's [ids]: {}; give the sink a new table or migrate this one by hand",
        differences.join("; ")
    )))
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

    /// FNV-1a checksums of the rendered migrations as released before `[ids]` existed.
    const RECEIPTS_V1: &str = "6c1b62faccd7bb93";
    const HEADS_V1: &str = "80bebb460ff110e2";

    #[test]
    fn every_file_in_migrations_is_compiled_in_and_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let known: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, known);
        for (dir, set) in [
            ("heads", HEAD_MIGRATIONS),
            ("sender_receipts", SENDER_RECEIPT_MIGRATIONS),
            ("members", MEMBER_MIGRATIONS),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../migrations")
                .join(dir);
            let mut files: Vec<String> = std::fs::read_dir(path)
                .unwrap()
                .map(|e| format!("{dir}/{}", e.unwrap().file_name().to_string_lossy()))
                .collect();
            files.sort();
            let known: Vec<&str> = set.iter().map(|m| m.name).collect();
            assert_eq!(files, known);
        }
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn checksums_depend_on_the_table() {
        let m = &MIGRATIONS[0];
        let ids = IdTypes::default();
        assert_ne!(
            checksum(&render(m, "read_receipts", &ids)),
            checksum(&render(m, "other", &ids))
        );
        assert!(!render(m, "t", &ids).contains("{{"));
    }

    #[test]
    fn default_id_types_render_what_earlier_versions_applied() {
        // The checksums recorded by every version before id types existed: a deployed
        // table keeps migrating cleanly.
        let ids = IdTypes::default();
        assert_eq!(
            checksum(&render(&MIGRATIONS[0], "read_receipts", &ids)),
            RECEIPTS_V1
        );
        let heads = render(&HEAD_MIGRATIONS[0], "conversation_heads", &ids)
            .replace("{{receipts_table}}", "read_receipts");
        assert_eq!(checksum(&heads), HEADS_V1);
        let text = IdTypes {
            conversation: IdType::String,
            user: IdType::Uuid,
            message: IdType::Uuid,
        };
        let sql = render(&MIGRATIONS[0], "t", &text);
        assert!(sql.contains("conversation_id text ") && sql.contains("reader_id       uuid "));
        assert!(sql.contains("message_id      uuid,"));
    }
}
