//! The `runs` and `run_tasks` tables: the state of orchestrated runs (`app orchestrate`).

use libsql::Value;
use serde::Serialize;

use super::status::{self, stored_status};
use super::{Db, integer, opt, opt_text, text};
use crate::error::Result;
use crate::ids::RunId;

stored_status! {
    /// Where a run is.
    RunStatus {
        /// The orchestrator is (or was, until it died) running it.
        Running = "running",
        /// Every task succeeded.
        Succeeded = "succeeded",
        /// A task did not succeed.
        Failed = "failed",
        /// Stopped by a signal; `--resume` goes on.
        Interrupted = "interrupted",
    }
}

stored_status! {
    /// Where a task of a run is.
    TaskStatus {
        /// Not started yet (or waiting for a retry).
        Pending = "pending",
        /// An attempt runs.
        Running = "running",
        /// Its last attempt exited 0.
        Succeeded = "succeeded",
        /// Its last attempt failed and no retry is left.
        Failed = "failed",
        /// Never ran: a dependency did not succeed.
        Skipped = "skipped",
        /// Never ran, or stopped: the run was stopped.
        Cancelled = "cancelled",
    }
}

impl TaskStatus {
    /// A task that will never succeed in this run.
    pub fn did_not_succeed(self) -> bool {
        matches!(
            self,
            TaskStatus::Failed | TaskStatus::Skipped | TaskStatus::Cancelled
        )
    }
}

/// One run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    /// Run id (`<plan name>-<6 hex>`).
    pub id: RunId,
    /// The plan's name.
    pub name: String,
    /// Repository it runs in.
    pub repo_root: String,
    /// Host of the orchestrator.
    pub host: String,
    /// The validated plan (JSON).
    pub plan: serde_json::Value,
    /// Where it is.
    pub status: RunStatus,
    /// When it started.
    pub started_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// The orchestrator running it.
    pub pid: Option<i64>,
    /// That process's start time.
    pub start_time: Option<i64>,
    /// Sibling conflicts and the integration result.
    pub report: serde_json::Value,
}

/// One task of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskRow {
    /// The run.
    pub run_id: RunId,
    /// The task.
    pub task_id: String,
    /// Where it is.
    pub status: TaskStatus,
    /// Attempts started.
    pub attempts: i64,
    /// When the last attempt started.
    pub started_at: Option<String>,
    /// When it ended.
    pub finished_at: Option<String>,
    /// Exit code of the last attempt.
    pub exit_code: Option<i64>,
    /// Its branch.
    pub branch: String,
    /// The instance of the last attempt.
    pub instance: Option<String>,
    /// Its log file.
    pub log_path: Option<String>,
    /// Why it failed or was skipped.
    pub detail: Option<String>,
}

/// Records a new run with all its tasks pending.
pub async fn create(db: &Db, run: &RunRow, tasks: &[TaskRow]) -> Result<()> {
    let (run, tasks) = (run.clone(), tasks.to_vec());
    db.transaction("recording a new run", async |conn| {
        conn.execute(
            "INSERT INTO runs (id, name, repo_root, host, plan, status, started_at, pid, start_time, report)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            vec![
                Value::Text(run.id.to_string()),
                Value::Text(run.name.clone()),
                Value::Text(run.repo_root.clone()),
                Value::Text(run.host.clone()),
                Value::Text(run.plan.to_string()),
                Value::Text(run.status.as_str().into()),
                Value::Text(run.started_at.clone()),
                run.pid.map_or(Value::Null, Value::Integer),
                run.start_time.map_or(Value::Null, Value::Integer),
                Value::Text(run.report.to_string()),
            ],
        )
        .await?;
        for task in &tasks {
            conn.execute(
                "INSERT INTO run_tasks (run_id, task_id, status, branch) VALUES (?1, ?2, ?3, ?4)",
                vec![
                    Value::Text(task.run_id.to_string()),
                    Value::Text(task.task_id.clone()),
                    Value::Text(task.status.as_str().into()),
                    Value::Text(task.branch.clone()),
                ],
            )
            .await?;
        }
        Ok(())
    })
    .await
}

/// Writes a task's state.
pub async fn update_task(db: &Db, task: &TaskRow) -> Result<()> {
    db.execute(
        "recording a task's state",
        "UPDATE run_tasks SET status = ?3, attempts = ?4, started_at = ?5, finished_at = ?6,
                exit_code = ?7, instance = ?8, log_path = ?9, detail = ?10
         WHERE run_id = ?1 AND task_id = ?2",
        vec![
            Value::Text(task.run_id.to_string()),
            Value::Text(task.task_id.clone()),
            Value::Text(task.status.as_str().into()),
            Value::Integer(task.attempts),
            opt(task.started_at.clone()),
            opt(task.finished_at.clone()),
            task.exit_code.map_or(Value::Null, Value::Integer),
            opt(task.instance.clone()),
            opt(task.log_path.clone()),
            opt(task.detail.clone()),
        ],
    )
    .await
    .map(drop)
}

/// Writes a run's status, owner and report.
pub async fn update_run(db: &Db, run: &RunRow) -> Result<()> {
    db.execute(
        "recording a run's state",
        "UPDATE runs SET status = ?2, finished_at = ?3, pid = ?4, start_time = ?5, report = ?6
         WHERE id = ?1",
        vec![
            Value::Text(run.id.to_string()),
            Value::Text(run.status.as_str().into()),
            opt(run.finished_at.clone()),
            run.pid.map_or(Value::Null, Value::Integer),
            run.start_time.map_or(Value::Null, Value::Integer),
            Value::Text(run.report.to_string()),
        ],
    )
    .await
    .map(drop)
}

const RUN_COLUMNS: &str =
    "id, name, repo_root, host, plan, status, started_at, finished_at, pid, start_time, report";

fn run_row(row: &[Value]) -> Result<RunRow> {
    let json = |value: &Value| serde_json::from_str(&text(value)).unwrap_or_default();
    Ok(RunRow {
        id: RunId::stored(text(&row[0])),
        name: text(&row[1]),
        repo_root: text(&row[2]),
        host: text(&row[3]),
        plan: json(&row[4]),
        status: status::parse(&row[5], "run status", RunStatus::parse)?,
        started_at: text(&row[6]),
        finished_at: opt_text(&row[7]),
        pid: integer(&row[8]),
        start_time: integer(&row[9]),
        report: json(&row[10]),
    })
}

/// The run with `id`.
pub async fn get(db: &Db, id: &RunId) -> Result<Option<RunRow>> {
    let rows = db
        .query_rows(
            "reading a run",
            &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
            vec![Value::Text(id.to_string())],
        )
        .await?;
    rows.first().map(|row| run_row(row)).transpose()
}

/// The runs of `repo_root`, newest first, at most `limit`.
pub async fn list(db: &Db, repo_root: &str, limit: u32) -> Result<Vec<RunRow>> {
    let rows = db
        .query_rows(
            "listing runs",
            &format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE repo_root = ?1 ORDER BY started_at DESC, id LIMIT ?2"
            ),
            vec![Value::Text(repo_root.to_string()), Value::Integer(limit.into())],
        )
        .await?;
    rows.iter().map(|row| run_row(row)).collect()
}

const TASK_COLUMNS: &str = "run_id, task_id, status, attempts, started_at, finished_at, exit_code, \
                            branch, instance, log_path, detail";

/// The statements of [`newest`]: the newest `limit` runs of `repo_root`, and every task of
/// those runs, for a caller that folds them into a read of its own.
pub fn newest_statements(repo_root: &str, limit: u32) -> [(String, Vec<Value>); 2] {
    let newest = "SELECT id FROM runs WHERE repo_root = ?1 ORDER BY started_at DESC, id LIMIT ?2";
    let params = vec![
        Value::Text(repo_root.to_string()),
        Value::Integer(limit.into()),
    ];
    [
        (
            format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE repo_root = ?1 \
                 ORDER BY started_at DESC, id LIMIT ?2"
            ),
            params.clone(),
        ),
        (
            format!("SELECT {TASK_COLUMNS} FROM run_tasks WHERE run_id IN ({newest})"),
            params,
        ),
    ]
}

/// How many running attempts [`running_attempts_statement`] reads at most.
pub const RUNNING_SHOWN: i64 = 500;

/// The statement reading the running attempts of every run of `repo_root` (not only the
/// newest): run, task and the instance that runs it; read them with [`running_attempts_from`].
pub fn running_attempts_statement(repo_root: &str) -> (String, Vec<Value>) {
    (
        "SELECT run_id, task_id, instance FROM run_tasks \
         WHERE status = ?2 AND instance IS NOT NULL \
         AND run_id IN (SELECT id FROM runs WHERE repo_root = ?1) \
         ORDER BY started_at DESC LIMIT ?3"
            .to_string(),
        vec![
            Value::Text(repo_root.to_string()),
            Value::Text(TaskStatus::Running.as_str().into()),
            Value::Integer(RUNNING_SHOWN),
        ],
    )
}

/// A running attempt as [`running_attempts_statement`] reads it: run, task, instance.
pub type RunningAttempt = (String, String, String);

/// The running attempts in the result set of [`running_attempts_statement`].
pub fn running_attempts_from(rows: &[Vec<Value>]) -> Vec<RunningAttempt> {
    rows.iter()
        .map(|row| (text(&row[0]), text(&row[1]), text(&row[2])))
        .collect()
}

/// The runs and tasks the two result sets of [`newest_statements`] hold: each run (newest
/// first) with its tasks, in no particular order.
pub fn newest_from(
    runs: &[Vec<Value>],
    tasks: &[Vec<Value>],
) -> Result<Vec<(RunRow, Vec<TaskRow>)>> {
    let mut out: Vec<(RunRow, Vec<TaskRow>)> = runs
        .iter()
        .map(|row| Ok((run_row(row)?, Vec::new())))
        .collect::<Result<_>>()?;
    for row in tasks {
        let task = task_row(row)?;
        if let Some((_, tasks)) = out.iter_mut().find(|(run, _)| run.id == task.run_id) {
            tasks.push(task);
        }
    }
    Ok(out)
}

/// The newest `limit` runs of `repo_root` with their tasks, in one read (one request against
/// a server).
pub async fn newest(db: &Db, repo_root: &str, limit: u32) -> Result<Vec<(RunRow, Vec<TaskRow>)>> {
    let [runs, tasks] = newest_statements(repo_root, limit);
    let results = db
        .read_all(
            "reading the newest runs",
            &[(runs.0.as_str(), runs.1), (tasks.0.as_str(), tasks.1)],
        )
        .await?;
    newest_from(&results[0], &results[1])
}

/// The tasks of run `id`, in no particular order.
pub async fn tasks(db: &Db, id: &RunId) -> Result<Vec<TaskRow>> {
    let rows = db
        .query_rows(
            "reading a run's tasks",
            &format!("SELECT {TASK_COLUMNS} FROM run_tasks WHERE run_id = ?1"),
            vec![Value::Text(id.to_string())],
        )
        .await?;
    rows.iter().map(|row| task_row(row)).collect()
}

/// The task whose last attempt ran as instance `instance`, if any.
pub async fn task_of_instance(db: &Db, instance: &str) -> Result<Option<TaskRow>> {
    let rows = db
        .query_rows(
            "finding an instance's task",
            &format!("SELECT {TASK_COLUMNS} FROM run_tasks WHERE instance = ?1 LIMIT 1"),
            vec![Value::Text(instance.to_string())],
        )
        .await?;
    rows.first().map(|row| task_row(row)).transpose()
}

/// The task in `row`, read with [`TASK_COLUMNS`].
fn task_row(row: &[Value]) -> Result<TaskRow> {
    Ok(TaskRow {
        run_id: RunId::stored(text(&row[0])),
        task_id: text(&row[1]),
        status: status::parse(&row[2], "task status", TaskStatus::parse)?,
        attempts: integer(&row[3]).unwrap_or(0),
        started_at: opt_text(&row[4]),
        finished_at: opt_text(&row[5]),
        exit_code: integer(&row[6]),
        branch: text(&row[7]),
        instance: opt_text(&row[8]),
        log_path: opt_text(&row[9]),
        detail: opt_text(&row[10]),
    })
}
