//! `app db status`.

use std::path::Path;

use clap::Subcommand;
use serde::Serialize;

use super::context::Context;
use super::output::{self, Fields};
use crate::db::{Db, Location, schema};
use crate::error::Result;

/// Subcommands of `app db`.
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Where the database is, its schema version, size and a quick integrity check.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct Status {
    location: String,
    kind: &'static str,
    schema_version: i64,
    latest_schema_version: i64,
    size_bytes: Option<u64>,
    wal_bytes: Option<u64>,
    quick_check: String,
}

pub(super) fn run(ctx: &Context, command: DbCommand) -> Result<u8> {
    let DbCommand::Status { json } = command;
    let status = ctx.with_db(async |db| status(db).await)?;
    if json {
        output::json(&status);
    } else {
        let size = |bytes: Option<u64>| bytes.map_or_else(|| "-".into(), |b| format!("{b} bytes"));
        Fields::new(1)
            .field("location", format!("{} ({})", status.location, status.kind))
            .field(
                "schema version",
                format!(
                    "{} (this app: {})",
                    status.schema_version, status.latest_schema_version
                ),
            )
            .field("size", size(status.size_bytes))
            .field("wal", size(status.wal_bytes))
            .field("quick_check", &status.quick_check)
            .print();
    }
    Ok(if status.quick_check == "ok" { 0 } else { 1 })
}

async fn status(db: &Db) -> Result<Status> {
    let (kind, size_bytes, wal_bytes) = match db.location() {
        Location::Local(path) => {
            let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            (
                "local file",
                len(path),
                Some(len(Path::new(&wal)).unwrap_or(0)),
            )
        }
        Location::Remote { .. } => ("libSQL server", None, None),
    };
    Ok(Status {
        location: db.location().to_string(),
        kind,
        schema_version: schema::version(db).await?,
        latest_schema_version: schema::LATEST,
        size_bytes,
        wal_bytes,
        quick_check: db.check(false).await?,
    })
}
