//! One attempt of a task: its `app run` child in a process group of its own, its log, and the
//! thread that waits for it and enforces the task's timeout.
//!
//! Invariants:
//! - An attempt is counted (and its row says `running`) once its `app run` was started; a
//!   task whose start point cannot be made fails without using an attempt.
//! - Instance ids are `<run suffix>-<task>-<n>`, and `n` never repeats within a run, also
//!   after a resume gave back a launch that never started its command.
//! - The child is signalled only until it is reaped (see [`process::Child`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::Progress;
use super::plan::Task;
use super::scheduler::Orchestrator;
use crate::db::runs::TaskStatus;
use crate::error::{Error, IoContext, Result};
use crate::process;
use crate::registry::Timestamp;

/// How long a task's `app run` waits for its command after SIGTERM before killing it.
pub(super) const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How an attempt ended.
pub(super) struct Outcome {
    pub(super) task: String,
    pub(super) exit_code: Option<i64>,
    pub(super) timed_out: bool,
    pub(super) error: Option<String>,
}

/// An attempt in flight.
pub(super) struct Running {
    /// The task's `app run`, leading a process group of its own, signalled only while it is
    /// unreaped.
    pub(super) process: Arc<process::Child>,
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
        let log = self.paths.task_log(&self.run.id, &task.id);
        if let Err(detail) = self.set_start_point(task, launch - 1)? {
            return self.fail_unstarted(task, detail, now, report);
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
        let mut command = self.command(task, &instance);
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
                process: Arc::clone(&process),
                started: Instant::now(),
            },
        );
        let (sender, id, timeout) = (outcomes.clone(), task.id.clone(), task.timeout);
        thread::spawn(move || {
            let _ = sender.send(await_attempt(&process, id, timeout));
        });
        Ok(())
    }

    /// The instance id of attempt `attempt` of `task`, and its launch number.
    fn next_instance(&self, task: &Task, attempt: i64) -> (String, i64) {
        // Instance ids are never used twice, also after a resume took back a launch that never
        // started its command (and so is not counted as an attempt).
        let suffix = self.run.id.rsplit('-').next().unwrap_or("run").to_string();
        let prefix = format!("{suffix}-{}-", task.id);
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
    fn fail_unstarted(
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

    /// The `app run` of an attempt of `task` as instance `instance`, in the repository's root.
    /// Its `app run` takes the task's locks (in name order, waiting as long as it takes) and
    /// reserves its paths before the command starts, and gives them back when it ends.
    fn command(&self, task: &Task, instance: &str) -> Command {
        let mut command = Command::new(&self.exe);
        if let Some(db) = &self.options.db {
            command.arg("--db").arg(db);
        }
        command
            .args(["run", "--instance", instance, "--branch", &task.branch])
            .arg("--stop-timeout")
            .arg(format!("{}ms", TASK_STOP_TIMEOUT.as_millis()));
        for name in &task.locks {
            command.arg(format!("--lock={name}"));
        }
        for pattern in &task.reserve {
            command.arg(format!("--reserve={pattern}"));
        }
        if !task.reserve.is_empty() {
            let reason = format!("task {} of run {}", task.id, self.run.id);
            command.arg(format!("--reserve-reason={reason}"));
        }
        command
            .arg("--")
            .args(&task.argv)
            .current_dir(self.paths.repo_root())
            .env("APP_RUN_ID", &self.run.id)
            .env("APP_TASK_ID", &task.id)
            .envs(&task.env);
        command
    }
}

/// Waits for a task's `app run`, enforcing its timeout: SIGTERM to its group (a stop request
/// its `app run` escalates after TASK_STOP_TIMEOUT), then SIGKILL.
fn await_attempt(process: &process::Child, task: String, timeout: Option<Duration>) -> Outcome {
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
fn open_log(path: &Path, attempt: i64, argv: &[String]) -> Result<std::fs::File> {
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
