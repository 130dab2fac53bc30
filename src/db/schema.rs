//! Schema migrations: the numbered files of `schema/`, embedded, applied in order.
//!
//! Applied versions are recorded in a `schema_migrations` table rather than `PRAGMA
//! user_version`, so one mechanism serves a local file and a libSQL server alike. Each pending
//! migration runs with its bookkeeping row in one `BEGIN IMMEDIATE` transaction that first
//! re-reads the applied versions: two processes opening an empty database at once serialize on
//! the write lock, and the second finds the work done.

use libsql::Value;

use super::{Db, integer};
use crate::error::{DbError, Result};
use crate::time::Timestamp;

/// A schema change: its number, name and SQL.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Append only: a released file never changes.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../schema/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "runs",
        sql: include_str!("../../schema/0002_runs.sql"),
    },
    Migration {
        version: 3,
        name: "fleet",
        sql: include_str!("../../schema/0003_fleet.sql"),
    },
    Migration {
        version: 4,
        name: "fleet_holds",
        sql: include_str!("../../schema/0004_fleet_holds.sql"),
    },
    Migration {
        version: 5,
        name: "messages",
        sql: include_str!("../../schema/0005_messages.sql"),
    },
    Migration {
        version: 6,
        name: "instance_agent",
        sql: include_str!("../../schema/0006_instance_agent.sql"),
    },
];

/// The version of every migration this binary applies, in order.
pub fn versions() -> Vec<i64> {
    MIGRATIONS.iter().map(|m| m.version).collect()
}

/// The schema version this binary writes.
pub const LATEST: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL
)";

/// The highest applied migration, 0 for an empty database.
pub async fn version(db: &Db) -> Result<i64> {
    let rows = db
        .query_rows(
            "reading the schema version",
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            vec![],
        )
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let rows = db
        .query_rows(
            "reading the schema version",
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            vec![],
        )
        .await?;
    Ok(rows
        .first()
        .and_then(|row| row.first())
        .and_then(integer)
        .unwrap_or(0))
}

/// Brings the database to [`LATEST`]; returns the number of migrations this call applied.
pub async fn migrate(db: &Db) -> Result<usize> {
    let current = version(db).await?;
    if current > LATEST {
        return Err(DbError::NewerSchema {
            location: db.location().to_string(),
            current,
            latest: LATEST,
        }
        .into());
    }
    if current == LATEST {
        return Ok(0);
    }
    db.transaction("migrating the schema", async |conn| {
        conn.execute(CREATE_TABLE, ()).await?;
        let mut rows = conn
            .query(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                (),
            )
            .await?;
        let applied = match rows.next().await? {
            Some(row) => row.get::<i64>(0)?,
            None => 0,
        };
        drop(rows);
        let mut count = 0;
        for migration in MIGRATIONS.iter().filter(|m| m.version > applied) {
            tracing::info!(
                version = migration.version,
                name = migration.name,
                "applying migration"
            );
            conn.execute_batch(migration.sql).await?;
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                vec![
                    Value::Integer(migration.version),
                    Value::Text(migration.name.to_string()),
                    Value::Text(Timestamp::now().to_string()),
                ],
            )
            .await?;
            count += 1;
        }
        Ok(count)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i as i64 + 1, "{}", migration.name);
        }
    }
}
