//! The `instances` table: a mirror of every process registry, across repositories and hosts,
//! kept after the process is gone.

use std::path::Path;
use std::time::{Duration, SystemTime};

use libsql::Value;
use serde::Serialize;

use super::status::{self, stored_status};
use super::{Db, integer, opt, opt_text, text};
use crate::error::Result;
use crate::registry::{InstanceRecord, InstanceStatus};
use crate::time::Timestamp;

stored_status! {
    /// Where a mirrored instance is: its registry status, or stopped once it ended.
    MirrorStatus {
        /// Registered, command not started yet.
        Starting = "starting",
        /// The command is running.
        Running = "running",
        /// The command is being stopped or has exited; cleanup is under way.
        Stopping = "stopping",
        /// The instance ended and left the registry.
        Stopped = "stopped",
    }
}

impl From<InstanceStatus> for MirrorStatus {
    fn from(status: InstanceStatus) -> Self {
        match status {
            InstanceStatus::Starting => MirrorStatus::Starting,
            InstanceStatus::Running => MirrorStatus::Running,
            InstanceStatus::Stopping => MirrorStatus::Stopping,
        }
    }
}

/// One registration as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceRow {
    /// Instance id.
    pub id: String,
    /// Main worktree root of its repository.
    pub repo_root: String,
    /// Host it ran on.
    pub host: String,
    /// Supervisor pid.
    pub pid: i64,
    /// Supervisor start time (clock ticks since boot).
    pub start_time: i64,
    /// Its worktree, if any.
    pub worktree: Option<String>,
    /// Its branch, if any.
    pub branch: Option<String>,
    /// The commit its branch started from.
    pub base: Option<String>,
    /// The command it ran.
    pub command: Vec<String>,
    /// Where it is.
    pub status: MirrorStatus,
    /// When it registered.
    pub started_at: String,
    /// Its last heartbeat.
    pub last_heartbeat: String,
    /// When it stopped.
    pub stopped_at: Option<String>,
    /// The command's exit code (128+N for signal N), once stopped.
    pub exit_code: Option<i64>,
    /// What its agent was doing at its last heartbeat row, when known: an
    /// `activity::StateReport` as JSON (the database keeps it; the layers above read it).
    pub agent: Option<serde_json::Value>,
}

impl InstanceRow {
    /// The row mirroring a registry record of the repository at `repo_root` on `host`, this
    /// machine's name in the fleet (`APP_FLEET_HOST`; the record keeps the machine's own host
    /// name, by which liveness is judged).
    pub fn from_record(record: &InstanceRecord, repo_root: &Path, host: &str) -> Self {
        InstanceRow {
            id: record.id.to_string(),
            repo_root: repo_root.display().to_string(),
            host: host.to_string(),
            pid: record.pid.into(),
            start_time: record.start_time as i64,
            worktree: record.worktree.as_ref().map(|p| p.display().to_string()),
            branch: record.branch.clone(),
            base: record.base.clone(),
            command: record.command.clone(),
            status: record.status.into(),
            started_at: record.started_at.to_string(),
            last_heartbeat: record.heartbeat_at.to_string(),
            stopped_at: None,
            exit_code: None,
            agent: None,
        }
    }
}

/// Inserts the row, or updates the registration it mirrors.
pub async fn upsert(db: &Db, row: &InstanceRow) -> Result<()> {
    let (sql, params) = upsert_statement(row);
    db.execute("mirroring an instance", sql, params)
        .await
        .map(drop)
}

/// The statement of [`upsert`], for a batch that writes it with others in one request. It is
/// idempotent (an upsert of the whole row), as a batch sent again must be.
pub fn upsert_statement(row: &InstanceRow) -> (&'static str, Vec<Value>) {
    (
        "INSERT INTO instances (id, repo_root, host, pid, start_time, worktree, branch, base,
                                command, status, started_at, last_heartbeat, stopped_at, exit_code,
                                agent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
         ON CONFLICT (host, repo_root, id, started_at) DO UPDATE SET
             pid = excluded.pid, start_time = excluded.start_time, worktree = excluded.worktree,
             branch = excluded.branch, base = excluded.base, command = excluded.command,
             status = excluded.status, last_heartbeat = excluded.last_heartbeat,
             stopped_at = excluded.stopped_at, exit_code = excluded.exit_code,
             agent = COALESCE(excluded.agent, instances.agent)",
        vec![
            Value::Text(row.id.clone()),
            Value::Text(row.repo_root.clone()),
            Value::Text(row.host.clone()),
            Value::Integer(row.pid),
            Value::Integer(row.start_time),
            opt(row.worktree.clone()),
            opt(row.branch.clone()),
            opt(row.base.clone()),
            Value::Text(serde_json::to_string(&row.command).expect("strings serialize")),
            Value::Text(row.status.as_str().into()),
            Value::Text(row.started_at.clone()),
            Value::Text(row.last_heartbeat.clone()),
            opt(row.stopped_at.clone()),
            row.exit_code.map_or(Value::Null, Value::Integer),
            opt(row.agent.as_ref().map(serde_json::Value::to_string)),
        ],
    )
}

/// Instances on any host and in any repository whose last heartbeat is younger than
/// `stale_after` and that have not stopped, oldest first.
pub async fn live_everywhere(db: &Db, stale_after: Duration) -> Result<Vec<InstanceRow>> {
    let cutoff = live_since(stale_after);
    select(
        db,
        "WHERE status != ?2 AND last_heartbeat >= ?1 ORDER BY started_at",
        vec![
            Value::Text(cutoff),
            Value::Text(MirrorStatus::Stopped.as_str().into()),
        ],
    )
    .await
}

/// The oldest `last_heartbeat` of a live registration, judged with `stale_after`.
pub(crate) fn live_since(stale_after: Duration) -> String {
    // A limit reaching back before 1970 counts every heartbeat ever written.
    let cutoff = SystemTime::now()
        .checked_sub(stale_after)
        .filter(|time| *time >= SystemTime::UNIX_EPOCH)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Timestamp::from(cutoff).to_string()
}

/// Every registration of instance `id` in the repository at `repo_root`, oldest first.
pub async fn history(db: &Db, repo_root: &Path, id: &str) -> Result<Vec<InstanceRow>> {
    select(
        db,
        "WHERE repo_root = ?1 AND id = ?2 ORDER BY started_at",
        vec![
            Value::Text(repo_root.display().to_string()),
            Value::Text(id.to_string()),
        ],
    )
    .await
}

/// How many registrations of other hosts [`elsewhere_statement`] reads at most.
pub const ELSEWHERE_SHOWN: i64 = 200;

/// The statement reading the registrations of hosts other than `host` that have not stopped,
/// the most recent heartbeat first (at most [`ELSEWHERE_SHOWN`]); read them with
/// [`rows_from`].
pub fn elsewhere_statement(host: &str) -> (String, Vec<Value>) {
    (
        format!(
            "{SELECT} WHERE host != ?1 AND status != ?2 ORDER BY last_heartbeat DESC, id LIMIT ?3"
        ),
        vec![
            Value::Text(host.to_string()),
            Value::Text(MirrorStatus::Stopped.as_str().into()),
            Value::Integer(ELSEWHERE_SHOWN),
        ],
    )
}

const SELECT: &str = "SELECT id, repo_root, host, pid, start_time, worktree, branch, base, command,
                        status, started_at, last_heartbeat, stopped_at, exit_code, agent
                 FROM instances";

async fn select(db: &Db, clause: &str, params: Vec<Value>) -> Result<Vec<InstanceRow>> {
    let rows = db
        .query_rows("reading instances", &format!("{SELECT} {clause}"), params)
        .await?;
    rows_from(&rows)
}

/// The registrations in `rows`, read with the columns of [`elsewhere_statement`].
pub fn rows_from(rows: &[Vec<Value>]) -> Result<Vec<InstanceRow>> {
    rows.iter()
        .map(|row| {
            Ok(InstanceRow {
                id: text(&row[0]),
                repo_root: text(&row[1]),
                host: text(&row[2]),
                pid: integer(&row[3]).unwrap_or_default(),
                start_time: integer(&row[4]).unwrap_or_default(),
                worktree: opt_text(&row[5]),
                branch: opt_text(&row[6]),
                base: opt_text(&row[7]),
                command: serde_json::from_str(&text(&row[8])).unwrap_or_default(),
                status: status::parse(&row[9], "instance status", MirrorStatus::parse)?,
                started_at: text(&row[10]),
                last_heartbeat: text(&row[11]),
                stopped_at: opt_text(&row[12]),
                exit_code: integer(&row[13]),
                // Unknown (or written by a newer binary in a shape this one cannot read).
                agent: opt_text(&row[14]).and_then(|json| serde_json::from_str(&json).ok()),
            })
        })
        .collect()
}
