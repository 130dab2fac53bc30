//! One attempt of a task: its `app run` child in a process group of its own, its log, and the
//! thread that waits for it and enforces the task's timeout.
//!
//! Invariants:
//! - An attempt is counted (and its row says `running`) once its `app run` was started; a
//!   task whose start point cannot be made fails without using an attempt.
//! - Instance ids are `<run suffix>-<task>-<n>`, and `n` never repeats within a run, also
//!   after a resume gave back a launch that never started its command.
//! - The child is signalled only until it is reaped (see [`process::Child`]).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::Progress;
use super::plan::Task;
use super::scheduler::Orchestrator;
use crate::db::runs::TaskStatus;
use crate::error::{Error, IoContext, Result};
use crate::ids::RunId;
use crate::process;
use crate::time::Timestamp;

/// How long a task's `app run` waits for its command after SIGTERM before killing it.
pub(super) const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How an attempt ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The task.
    pub task: String,
    /// Its exit code, when it ran to an end.
    pub exit_code: Option<i64>,
    /// Whether it was stopped for running past its timeout.
    pub timed_out: bool,
    /// Why it could not run or be waited for.
    pub error: Option<String>,
}

impl Outcome {
    /// Marks the attempt failed for `why`, whatever its command's exit code.
    pub(super) fn fail(&mut self, why: String) {
        self.exit_code = None;
        self.error = Some(why);
    }
}

/// An attempt in flight.
pub(super) struct Running {
    /// The task's `app run`, leading a process group of its own, signalled only while it is
    /// unreaped; `None` for an attempt a fleet host runs.
    pub(super) process: Option<Arc<process::Child>>,
    pub(super) started: Instant,
}

impl Orchestrator {
    /// Starts the next attempt of `task`: its branch pointed at its start, its `app run`
    /// launched and waited for on a thread of its own, which sends the outcome to `outcomes`.
    pub(super) fn start_task(
        &mut self,
        task: &Task,
        outcomes: &mpsc::Sender<Outcome>,
        report: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let attempt = self.rows[&task.id].attempts + 1;
        let (instance, launch) = self.next_instance(task, attempt);
        let now = Timestamp::now().to_string();
        let log = self.paths.task_log(self.run.id.as_str(), &task.id);
        if let Err(detail) = self.set_start_point(task, launch - 1)? {
            return self.fail_unstarted(task, detail, now, report);
        }
        if self.fleet.is_some() {
            return self.start_on_fleet(task, now);
        }
        {
            let row = self.rows.get_mut(&task.id).expect("every task has a row");
            row.attempts = attempt;
            row.started_at = Some(now.clone());
            row.finished_at = None;
            row.exit_code = None;
            row.detail = None;
            row.log_path = Some(log.display().to_string());
        }
        *self.tries.entry(task.id.clone()).or_default() += 1;
        let output = open_log(&log, attempt, &task.argv)?;
        let spec = self.spec(task, None);
        let mut command = spec.command(
            &self.exe,
            self.options.db.as_deref(),
            &instance,
            self.paths.repo_root(),
        );
        command
            .stdin(Stdio::null())
            .stdout(output.try_clone().io_context("opening", &log)?)
            .stderr(output);
        let process = process::Child::spawn_group(&mut command).map_err(|err| Error::Spawn {
            command: self.exe.display().to_string(),
            source: err,
        })?;
        let process = Arc::new(process);
        {
            let row = self.rows.get_mut(&task.id).expect("every task has a row");
            row.status = TaskStatus::Running;
            row.instance = Some(instance);
            let row = row.clone();
            self.save_task(&row)?;
        }
        report(Progress::Started {
            task: task.id.clone(),
            attempt,
            log,
        });
        self.running.insert(
            task.id.clone(),
            Running {
                process: Some(Arc::clone(&process)),
                started: Instant::now(),
            },
        );
        let (sender, id, timeout) = (outcomes.clone(), task.id.clone(), task.timeout);
        thread::spawn(move || {
            let _ = sender.send(await_attempt(&process, id, timeout));
        });
        Ok(())
    }

    /// Queues the offer of the attempt of `task`, whose branch is at its start, to the fleet
    /// (sent with the pass's others by `send_offers`); a host that leases it counts it.
    fn start_on_fleet(&mut self, task: &Task, now: String) -> Result<()> {
        let start = self
            .branch_tip(&task.branch)?
            .expect("the branch was just pointed at its start");
        self.queue_offer(task, start);
        *self.tries.entry(task.id.clone()).or_default() += 1;
        let row = self.rows.get_mut(&task.id).expect("every task has a row");
        row.status = TaskStatus::Running;
        row.started_at = Some(now);
        row.finished_at = None;
        row.exit_code = None;
        row.detail = None;
        let row = row.clone();
        self.save_task(&row)?;
        self.running.insert(
            task.id.clone(),
            Running {
                process: None,
                started: Instant::now(),
            },
        );
        Ok(())
    }

    /// The instance id of attempt `attempt` of `task`, and its launch number.
    fn next_instance(&self, task: &Task, attempt: i64) -> (String, i64) {
        // Instance ids are never used twice, also after a resume took back a launch that never
        // started its command (and so is not counted as an attempt).
        let prefix = self.spec(task, None).instance_prefix;
        let launched = self.rows[&task.id]
            .instance
            .as_deref()
            .and_then(|last| last.strip_prefix(&prefix))
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(0);
        let launch = attempt.max(launched + 1);
        (format!("{prefix}{launch}"), launch)
    }

    /// Fails `task` whose start point could not be made: its command never starts, so no
    /// attempt is used.
    pub(super) fn fail_unstarted(
        &mut self,
        task: &Task,
        detail: String,
        now: String,
        report: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let row = self.rows.get_mut(&task.id).expect("every task has a row");
        row.status = TaskStatus::Failed;
        row.exit_code = None;
        row.detail = Some(detail.clone());
        row.finished_at = Some(now);
        let row = row.clone();
        self.save_task(&row)?;
        report(Progress::Finished {
            task: task.id.clone(),
            status: Some(TaskStatus::Failed),
            exit_code: None,
            elapsed: Duration::ZERO,
            detail: Some(detail),
        });
        Ok(())
    }

    /// What an attempt of `task` runs (for the fleet, with the commit its branch starts at).
    pub(super) fn spec(&self, task: &Task, start: Option<String>) -> AttemptSpec {
        AttemptSpec {
            run: self.run.id.clone(),
            task: task.id.clone(),
            instance_prefix: instance_prefix(&self.run.id, &task.id),
            branch: task.branch.clone(),
            start,
            argv: task.argv.clone(),
            env: task.env.clone(),
            locks: task.locks.clone(),
            reserve: task.reserve.clone(),
            timeout_ms: task.timeout.map(|t| t.as_millis() as u64),
        }
    }
}

/// The instance ids of `task`'s attempts in `run` are this followed by the attempt's number.
pub(super) fn instance_prefix(run: &RunId, task: &str) -> String {
    format!("{}-{task}-", run.suffix())
}

/// What one attempt runs: everything its `app run` needs, so a host that never saw the plan (a
/// fleet worker) runs it exactly as the orchestrator's own host would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptSpec {
    /// The run.
    pub run: RunId,
    /// The task.
    pub task: String,
    /// Instance ids of its attempts are this followed by the attempt's number.
    pub instance_prefix: String,
    /// Its branch.
    pub branch: String,
    /// The commit the branch starts at, pushed to the remote's branch (fleet only: locally the
    /// orchestrator sets the branch itself).
    pub start: Option<String>,
    /// The command.
    pub argv: Vec<String>,
    /// The plan's environment for it.
    pub env: BTreeMap<String, String>,
    /// Named locks held while it runs.
    pub locks: Vec<String>,
    /// Path globs reserved while it runs.
    pub reserve: Vec<String>,
    /// Its time limit.
    pub timeout_ms: Option<u64>,
}

impl AttemptSpec {
    /// Its time limit.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }

    /// The `app run` (the executable `exe`, with `--db` when given) of this attempt as instance
    /// `instance`, in the repository root `root`. Its `app run` takes the task's locks (in name
    /// order, waiting as long as it takes) and reserves its paths before the command starts,
    /// and gives them back when it ends.
    pub fn command(&self, exe: &Path, db: Option<&Path>, instance: &str, root: &Path) -> Command {
        let mut command = Command::new(exe);
        if let Some(db) = db {
            command.arg("--db").arg(db);
        }
        command
            .args(["run", "--instance", instance, "--branch", &self.branch])
            .arg("--stop-timeout")
            .arg(format!("{}ms", TASK_STOP_TIMEOUT.as_millis()));
        for name in &self.locks {
            command.arg(format!("--lock={name}"));
        }
        for pattern in &self.reserve {
            command.arg(format!("--reserve={pattern}"));
        }
        if !self.reserve.is_empty() {
            let reason = format!("task {} of run {}", self.task, self.run);
            command.arg(format!("--reserve-reason={reason}"));
        }
        command
            .arg("--")
            .args(&self.argv)
            .current_dir(root)
            .env("APP_RUN_ID", self.run.as_str())
            .env("APP_TASK_ID", &self.task)
            .envs(&self.env);
        command
    }
}

/// Waits for a task's `app run`, enforcing its timeout: SIGTERM to its group (a stop request
/// its `app run` escalates after TASK_STOP_TIMEOUT), then SIGKILL.
pub fn await_attempt(process: &process::Child, task: String, timeout: Option<Duration>) -> Outcome {
    let started = Instant::now();
    let mut timed_out = false;
    let mut killed = false;
    // Once reaped its group id may be reused: `process` then signals nothing any more.
    let status = loop {
        if let Some(status) = process.try_wait().transpose() {
            break status;
        }
        if let Some(limit) = timeout {
            let over = started.elapsed().saturating_sub(limit);
            if over > Duration::ZERO && !timed_out {
                timed_out = true;
                process.signal(Signal::SIGTERM);
            }
            if over > TASK_STOP_TIMEOUT + Duration::from_secs(5) && !killed {
                killed = true;
                process.signal(Signal::SIGKILL);
            }
        }
        thread::sleep(Duration::from_millis(20));
    };
    let (exit_code, error) = match status {
        Ok(status) => (Some(i64::from(process::exit_code(status))), None),
        Err(err) => (None, Some(format!("waiting for the task failed: {err}"))),
    };
    Outcome {
        task,
        exit_code,
        timed_out,
        error,
    }
}

/// Opens a task's log for appending and writes the attempt's header.
pub fn open_log(path: &Path, attempt: i64, argv: &[String]) -> Result<std::fs::File> {
    let dir = path.parent().expect("logs live in a directory");
    crate::state::create_private_dir_all(dir)?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .io_context("opening", path)?;
    writeln!(
        file,
        "== app orchestrate: attempt {attempt} at {}: {} ==",
        Timestamp::now(),
        argv.join(" ")
    )
    .io_context("writing", path)?;
    Ok(file)
}
