//! `app orchestrate --plan`: run a graph of agent tasks, each as its own instance, in
//! dependency order with a cap on parallelism; hand results down the graph; integrate; resume.
//!
//! Every attempt of a task is a child `app run --instance <hex>-<task>-<n> --branch <branch>`
//! in a process group of its own, so it is a registered instance like any other (worktree,
//! heartbeat, control socket) and its cleanup follows the same no-loss rules.
//!
//! Invariants:
//! - The plan is validated whole, and the branches it would create are checked, before anything
//!   is written; bad input changes nothing.
//! - A task starts only after every dependency succeeded, from the plan's base with the
//!   dependencies' branches merged in (in memory; a conflict fails the task naming the files).
//!   The orchestrator sets the task's branch to that start; a branch that holds commits the
//!   start does not is first saved under `refs/app/attempts/<run>/<task>/<n>`.
//! - Run and task state is written to the database at every change, so after a crash
//!   `--resume` reruns nothing that succeeded and restarts what was running, after taking back
//!   its dead attempts' worktrees through [`crate::reclaim::reclaim`] (work saved, never
//!   deleted). An attempt counts once its command started; instance ids are never reused.
//! - The integration branch is only moved forward, and never while checked out anywhere.

pub mod merge;
pub mod plan;

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use git2::{Oid, Repository};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use self::plan::{Plan, Task};
use crate::config::{Settings, Timing};
use crate::db::runs::{self, RunRow, RunStatus, TaskRow, TaskStatus};
use crate::db::{self, Blocking, DbSettings};
use crate::error::{Error, GitContext, IoContext, Result};
use crate::paths::AppPaths;
use crate::process::{self, Presence, ProcessIdentity};
use crate::registry::{Liveness, Registry, Timestamp};
use crate::worktree;

/// How long a task's `app run` waits for its command after SIGTERM before killing it.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How a run is driven.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Overrides the plan's `max_concurrent`.
    pub max_concurrent: Option<usize>,
    /// Stop everything at the first failure.
    pub fail_fast: bool,
    /// The database (`--db`), passed on to every task.
    pub db: Option<PathBuf>,
    /// The settings read at the start of the command.
    pub settings: Settings,
}

impl Options {
    /// Opens the run's database (`--db`, else the environment).
    fn database(&self) -> Result<Blocking> {
        Blocking::open_default(self.db.as_deref(), DbSettings::from(&self.settings))
    }
}

/// What happened, for the person watching.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// The run begins (or resumes with `done` tasks already succeeded).
    Began {
        /// Run id.
        run: String,
        /// Tasks in the plan.
        tasks: usize,
        /// Tasks that succeeded before (a resume).
        done: usize,
    },
    /// An attempt started.
    Started {
        /// Task id.
        task: String,
        /// Attempt number (from 1).
        attempt: i64,
        /// Its log.
        log: PathBuf,
    },
    /// A task ended for good, or an attempt failed and will be retried.
    Finished {
        /// Task id.
        task: String,
        /// How it ended: `succeeded`, `failed` or `cancelled`; `None` when it will be retried.
        status: Option<TaskStatus>,
        /// Exit code, when it ran.
        exit_code: Option<i64>,
        /// Time it took.
        elapsed: Duration,
        /// Why it failed.
        detail: Option<String>,
    },
    /// A resume took back what a dead attempt left (its worktree, its registration).
    Reclaimed {
        /// Task id.
        task: String,
        /// The dead attempt's instance.
        instance: String,
        /// What was done, saved work first.
        done: String,
    },
    /// A task will not run.
    Skipped {
        /// Task id.
        task: String,
        /// Why.
        because: String,
    },
    /// Two finished sibling tasks would conflict when merged.
    Conflict {
        /// One task.
        a: String,
        /// The other.
        b: String,
        /// The conflicting files.
        files: Vec<String>,
    },
    /// The integration branch was updated (or could not be).
    Integrated {
        /// The branch.
        branch: String,
        /// Tasks merged into it.
        merged: Vec<String>,
        /// Tasks left out, with why.
        left_out: Vec<(String, String)>,
    },
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The run's row.
    pub run: RunRow,
    /// Its tasks, in plan order.
    pub tasks: Vec<TaskRow>,
}

impl Summary {
    /// `app orchestrate`'s exit code: 0 when every task succeeded, 1 otherwise, 128+N when
    /// stopped by signal N.
    pub fn exit_code(&self, interrupted_by: Option<i32>) -> u8 {
        match interrupted_by {
            Some(signal) => 128u8.saturating_add(signal as u8),
            None if self.tasks.iter().all(|t| t.status == TaskStatus::Succeeded) => 0,
            None => 1,
        }
    }
}

/// Reads and validates `plan_file` for a new run, checking the branches it would create.
pub fn prepare(cwd: &Path, plan_file: &Path, options: &Options) -> Result<(AppPaths, Plan)> {
    let paths = AppPaths::discover(cwd)?;
    let repo = open(&paths)?;
    let text = std::fs::read_to_string(plan_file).map_err(|err| {
        Error::bad_input(format!(
            "cannot read the plan {}: {err}",
            plan_file.display()
        ))
    })?;
    // The run id is made from the plan's name; a file too broken to name one fails in parse.
    let format = plan::Format::of(plan_file);
    let name = plan::name_in(&text, format).unwrap_or_else(|| "plan".into());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let run = format!("{name}-{suffix}");
    let mut plan = Plan::parse(&text, format, &plan_file.display().to_string(), &run, &repo)?;
    if let Some(max) = options.max_concurrent {
        if max == 0 {
            return Err(Error::bad_input("--max-concurrent must be at least 1"));
        }
        plan.max_concurrent = max;
    }
    for task in &plan.tasks {
        if repo
            .find_branch(&task.branch, git2::BranchType::Local)
            .is_ok()
        {
            return Err(Error::bad_input(format!(
                "task {:?}: branch {} already exists; give the task another \"branch\" or delete that one",
                task.id, task.branch
            )));
        }
    }
    if let Some(branch) = &plan.integration
        && let Some(path) = worktree::checked_out_in(&repo, branch)?
    {
        return Err(Error::bad_input(format!(
            "the integration branch {branch} is checked out in {}; app never moves a checked-out branch: name another \"integration\"",
            path.display()
        )));
    }
    Ok((paths, plan))
}

/// Runs a prepared plan to the end.
pub fn start(
    paths: &AppPaths,
    plan: Plan,
    options: &Options,
    stop: &StopFlag,
    report: &mut dyn FnMut(Progress),
) -> Result<Summary> {
    // Task logs live in .app/: a state directory app cannot use stops the run before it is
    // recorded.
    paths.ensure_state_dir()?;
    let db = options.database()?;
    let me = ProcessIdentity::current();
    let run = RunRow {
        id: plan.run.clone(),
        name: plan.name.clone(),
        repo_root: paths.repo_root().display().to_string(),
        host: process::hostname().to_string(),
        plan: serde_json::to_value(&plan).expect("plans serialize"),
        status: RunStatus::Running,
        started_at: Timestamp::now().to_string(),
        finished_at: None,
        pid: Some(me.pid.into()),
        start_time: Some(me.start_time as i64),
        report: json!({}),
    };
    let rows: Vec<TaskRow> = plan
        .tasks
        .iter()
        .map(|task| TaskRow {
            run_id: plan.run.clone(),
            task_id: task.id.clone(),
            status: TaskStatus::Pending,
            attempts: 0,
            started_at: None,
            finished_at: None,
            exit_code: None,
            branch: task.branch.clone(),
            instance: None,
            log_path: None,
            detail: None,
        })
        .collect();
    db.run(async |db| runs::create(db, &run, &rows).await)?;
    let mut orchestrator = Orchestrator::new(paths, plan, options, run, rows, db)?;
    orchestrator.execute(stop, report)
}

/// Continues run `id` after its orchestrator died: what succeeded stays, the rest runs again.
pub fn resume(
    cwd: &Path,
    id: &str,
    options: &Options,
    stop: &StopFlag,
    report: &mut dyn FnMut(Progress),
) -> Result<Summary> {
    let paths = AppPaths::discover(cwd)?;
    paths.ensure_state_dir()?;
    let db = options.database()?;
    let Some(mut run) = db.run(async |db| runs::get(db, id).await)? else {
        return Err(Error::bad_input(format!(
            "no run {id:?} in the database; 'app runs list' shows the runs of this repository"
        )));
    };
    if run.repo_root != paths.repo_root().display().to_string() {
        return Err(Error::bad_input(format!(
            "run {id} belongs to the repository at {}; resume it from there",
            run.repo_root
        )));
    }
    if let (Some(pid), Some(start_time)) = (run.pid, run.start_time)
        && run.status == RunStatus::Running
        && run.host == process::hostname()
    {
        let owner = ProcessIdentity {
            pid: pid as u32,
            start_time: start_time as u64,
            boot_id: process::boot_id().to_string(),
        };
        if owner.presence() == Presence::Running && pid as u32 != std::process::id() {
            return Err(Error::Busy(format!(
                "run {id} is still being orchestrated by pid {pid}; wait for it or stop it first"
            )));
        }
    }
    let mut plan = Plan::of_run(&run)?;
    if let Some(max) = options.max_concurrent {
        plan.max_concurrent = max.max(1);
    }
    let timing = options.settings.timing;
    let mut rows = db.run(async |db| runs::tasks(db, id).await)?;
    // Everything is looked at before anything changes: an attempt whose command outlived its
    // supervisor refuses the resume with nothing touched.
    let mut leftovers = Vec::new();
    for row in &rows {
        if row.status == TaskStatus::Succeeded {
            continue;
        }
        if let Some(instance) = &row.instance {
            leftovers.push(survey(&paths, &db, row, instance, timing)?);
        }
    }
    // Starts and stops the dead attempts' `app run` left half-done are finished or undone
    // first, as every `app run` does before it starts.
    crate::reclaim::recover_journal(&paths)?;
    for leftover in &leftovers {
        if leftover.live {
            // An attempt the dead orchestrator left running is stopped before it is restarted.
            let writer = Registry::open_for_write(&paths)?;
            let _ = crate::instance::stop(&writer, &leftover.instance, TASK_STOP_TIMEOUT, timing);
        }
        if let Some(done) = reclaim_attempt(&paths, timing, &leftover.instance)? {
            report(Progress::Reclaimed {
                task: leftover.task.clone(),
                instance: leftover.instance.clone(),
                done,
            });
        }
    }
    for row in &mut rows {
        if row.status == TaskStatus::Succeeded {
            continue;
        }
        let never_started = leftovers
            .iter()
            .any(|l| l.task == row.task_id && !l.started);
        if row.status == TaskStatus::Running && never_started {
            // The launch the crash cut short never ran its command: it used no attempt.
            row.attempts = (row.attempts - 1).max(0);
        }
        row.status = TaskStatus::Pending;
        row.detail = None;
        db.run(async |db| runs::update_task(db, row).await)?;
    }
    let me = ProcessIdentity::current();
    run.status = RunStatus::Running;
    run.finished_at = None;
    run.pid = Some(me.pid.into());
    run.start_time = Some(me.start_time as i64);
    db.run(async |db| runs::update_run(db, &run).await)?;
    let mut orchestrator = Orchestrator::new(&paths, plan, options, run, rows, db)?;
    orchestrator.execute(stop, report)
}

/// A task's last attempt, as a resume finds it.
struct Leftover {
    task: String,
    instance: String,
    /// Its supervisor still runs (and heartbeats): it is stopped first.
    live: bool,
    /// It got as far as starting its command.
    started: bool,
}

/// Looks at the last attempt of `row`, instance `instance`: whether it still runs, and whether
/// it ever started its command. An attempt whose supervisor is dead but whose command still
/// runs is an error (exit 3): nothing may take its worktree from under it.
fn survey(
    paths: &AppPaths,
    db: &Blocking,
    row: &TaskRow,
    instance: &str,
    timing: Timing,
) -> Result<Leftover> {
    let snapshot = Registry::open_read_only(paths)?.snapshot()?;
    let record = snapshot.instance(instance).cloned();
    let live = record
        .as_ref()
        .is_some_and(|r| r.liveness(timing.stale_after) == Liveness::Live);
    if !live
        && let Some(record) = &record
        && let Some(why) = crate::inuse::instance_running(record)
    {
        return Err(Error::Busy(format!(
            "task {:?}: its attempt {instance} is dead but {why}; stop that process, then resume again",
            row.task_id
        )));
    }
    let started = match &record {
        // The registry is written before the command starts and after it has started.
        Some(record) => record.child_pid.is_some(),
        // Unregistered: it either never registered or ran to its end, and its mirror in the
        // database says which (a registration that never started its command stays `starting`).
        None => db
            .run(async |db| db::instances::history(db, paths.repo_root(), instance).await)?
            .iter()
            .any(|r| r.status != "starting"),
    };
    Ok(Leftover {
        task: row.task_id.clone(),
        instance: instance.to_string(),
        live,
        started,
    })
}

/// Reclaims what the dead attempt `instance` left (through [`crate::reclaim::reclaim`], the
/// path every reclaim takes: uncommitted work saved on `refs/app/rescue/<instance>`, the
/// worktree removed, the registration dropped, the task branch kept). `None` when it left
/// nothing, or when it is still alive (then its worktree is not touched).
fn reclaim_attempt(paths: &AppPaths, timing: Timing, instance: &str) -> Result<Option<String>> {
    let snapshot = Registry::open_read_only(paths)?.snapshot()?;
    if let Some(record) = snapshot.instance(instance) {
        if record.liveness(timing.stale_after) == Liveness::Live {
            return Err(Error::Busy(format!(
                "attempt {instance} still runs (pid {}) after being asked to stop; stop it with 'app instance stop {instance}', then resume again",
                record.pid
            )));
        }
        if let Some(why) = crate::inuse::instance_running(record) {
            return Err(Error::Busy(format!(
                "attempt {instance} is dead but {why}; stop that process, then resume again"
            )));
        }
        let done = crate::reclaim::reclaim(
            paths,
            crate::reclaim::Work::Save,
            instance,
            record.worktree.as_deref(),
            record.branch.as_deref(),
        )?;
        return Ok(Some(done));
    }
    // Unregistered, yet its worktree may remain: `app run` keeps a worktree holding
    // uncommitted work, and a crash can leave one behind.
    let path = paths.worktree(instance);
    if !path.exists() {
        return Ok(None);
    }
    let branch = Repository::open(&path).ok().and_then(|wt| {
        wt.head()
            .ok()
            .filter(|head| head.is_branch())
            .and_then(|head| head.shorthand().ok().map(str::to_string))
    });
    crate::reclaim::reclaim(
        paths,
        crate::reclaim::Work::Save,
        instance,
        Some(&path),
        branch.as_deref(),
    )
    .map(Some)
}

/// Signals received by the orchestrator: the first stops starting tasks and asks the running
/// ones to stop, the second kills them.
#[derive(Debug, Clone, Default)]
pub struct StopFlag {
    count: Arc<AtomicUsize>,
    signal: Arc<AtomicUsize>,
}

impl StopFlag {
    /// Records a signal.
    pub fn raise(&self, signal: i32) {
        self.signal.store(signal as usize, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// How many signals arrived.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The last signal, if any.
    pub fn signal(&self) -> Option<i32> {
        (self.count() > 0).then(|| self.signal.load(Ordering::SeqCst) as i32)
    }
}

/// How an attempt ended.
struct Outcome {
    task: String,
    exit_code: Option<i64>,
    timed_out: bool,
    error: Option<String>,
}

struct Running {
    /// The task's `app run`, leading a process group of its own, signalled only while it is
    /// unreaped.
    process: Arc<process::Child>,
    started: Instant,
}

struct Orchestrator {
    paths: AppPaths,
    repo: Repository,
    plan: Plan,
    options: Options,
    run: RunRow,
    rows: HashMap<String, TaskRow>,
    /// Attempts started by this orchestrator, for the retry budget.
    tries: HashMap<String, u32>,
    running: HashMap<String, Running>,
    conflicts: Vec<Value>,
    db: Blocking,
    exe: PathBuf,
}

impl Orchestrator {
    fn new(
        paths: &AppPaths,
        plan: Plan,
        options: &Options,
        run: RunRow,
        rows: Vec<TaskRow>,
        db: Blocking,
    ) -> Result<Self> {
        let exe = std::env::current_exe().io_context("finding", "the app executable")?;
        Ok(Orchestrator {
            paths: paths.clone(),
            repo: open(paths)?,
            plan,
            options: options.clone(),
            run,
            rows: rows.into_iter().map(|r| (r.task_id.clone(), r)).collect(),
            tries: HashMap::new(),
            running: HashMap::new(),
            conflicts: Vec::new(),
            db,
            exe,
        })
    }

    fn execute(&mut self, stop: &StopFlag, report: &mut dyn FnMut(Progress)) -> Result<Summary> {
        let done = self
            .rows
            .values()
            .filter(|r| r.status == TaskStatus::Succeeded)
            .count();
        report(Progress::Began {
            run: self.run.id.clone(),
            tasks: self.plan.tasks.len(),
            done,
        });
        let (outcomes, finished) = mpsc::channel::<Outcome>();
        let mut stopping = false;
        let mut signals_seen = 0;
        loop {
            if stop.count() > signals_seen {
                signals_seen = stop.count();
                stopping = true;
                let signal = if signals_seen > 1 {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                for running in self.running.values() {
                    running.process.signal(signal);
                }
            }
            if !stopping {
                self.skip_blocked(report)?;
                self.start_ready(&outcomes, report)?;
            }
            if self.running.is_empty() {
                break;
            }
            match finished.recv_timeout(Duration::from_millis(100)) {
                Ok(outcome) => {
                    let failed = self.finish(outcome, stopping, report)?;
                    if failed && self.options.fail_fast && !stopping {
                        stopping = true;
                        for running in self.running.values() {
                            running.process.signal(Signal::SIGTERM);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // What never ran is cancelled (a stop) or skipped (after a failure upstream).
        let now = Timestamp::now().to_string();
        for task in self.plan.tasks.clone() {
            let row = self.rows.get_mut(&task.id).expect("every task has a row");
            if row.status == TaskStatus::Pending {
                row.status = if stopping {
                    TaskStatus::Cancelled
                } else {
                    TaskStatus::Skipped
                };
                row.detail
                    .get_or_insert_with(|| "the run stopped before it started".into());
                row.finished_at = Some(now.clone());
                let row = row.clone();
                self.save_task(&row)?;
            }
        }
        let mut report_value = json!({ "conflicts": self.conflicts });
        if stop.count() == 0
            && let Some(branch) = self.plan.integration.clone()
        {
            report_value["integration"] = self.integrate(&branch, report)?;
        }
        let all_ok = self
            .rows
            .values()
            .all(|r| r.status == TaskStatus::Succeeded);
        self.run.status = if stop.count() > 0 {
            RunStatus::Interrupted
        } else if all_ok {
            RunStatus::Succeeded
        } else {
            RunStatus::Failed
        };
        self.run.finished_at = Some(Timestamp::now().to_string());
        self.run.pid = None;
        self.run.start_time = None;
        self.run.report = report_value;
        let run = &self.run;
        self.db.run(async |db| runs::update_run(db, run).await)?;
        Ok(Summary {
            run: self.run.clone(),
            tasks: self
                .plan
                .tasks
                .iter()
                .map(|t| self.rows[&t.id].clone())
                .collect(),
        })
    }

    fn save_task(&self, row: &TaskRow) -> Result<()> {
        self.db.run(async |db| runs::update_task(db, row).await)
    }

    /// Marks pending tasks whose dependencies can no longer succeed as skipped.
    fn skip_blocked(&mut self, report: &mut dyn FnMut(Progress)) -> Result<()> {
        loop {
            let mut changed = false;
            for task in self.plan.tasks.clone() {
                if self.rows[&task.id].status != TaskStatus::Pending {
                    continue;
                }
                let blocker = task
                    .depends_on
                    .iter()
                    .find(|dep| self.rows[dep.as_str()].status.did_not_succeed());
                if let Some(blocker) = blocker {
                    let because = format!("{blocker} did not succeed");
                    let row = self.rows.get_mut(&task.id).expect("every task has a row");
                    row.status = TaskStatus::Skipped;
                    row.detail = Some(because.clone());
                    row.finished_at = Some(Timestamp::now().to_string());
                    let row = row.clone();
                    self.save_task(&row)?;
                    report(Progress::Skipped {
                        task: task.id.clone(),
                        because,
                    });
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
        }
    }

    fn start_ready(
        &mut self,
        outcomes: &mpsc::Sender<Outcome>,
        report: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        for task in self.plan.tasks.clone() {
            if self.running.len() >= self.plan.max_concurrent {
                return Ok(());
            }
            let ready = self.rows[&task.id].status == TaskStatus::Pending
                && task
                    .depends_on
                    .iter()
                    .all(|dep| self.rows[dep.as_str()].status == TaskStatus::Succeeded);
            if ready {
                self.start_task(&task, outcomes, report)?;
            }
        }
        Ok(())
    }

    fn start_task(
        &mut self,
        task: &Task,
        outcomes: &mpsc::Sender<Outcome>,
        report: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let attempt = self.rows[&task.id].attempts + 1;
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
        let now = Timestamp::now().to_string();
        let log = self.paths.task_log(&self.run.id, &task.id);
        if let Err(detail) = self.set_start_point(task, launch - 1)? {
            // Its command never starts: no attempt is used.
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
            return Ok(());
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
        let instance = format!("{prefix}{launch}");
        let output = open_log(&log, attempt, &task.argv)?;
        let mut command = Command::new(&self.exe);
        if let Some(db) = &self.options.db {
            command.arg("--db").arg(db);
        }
        command
            .args(["run", "--instance", &instance, "--branch", &task.branch])
            .arg("--stop-timeout")
            .arg(format!("{}ms", TASK_STOP_TIMEOUT.as_millis()))
            .arg("--")
            .args(self.wrapped(task))
            .current_dir(self.paths.repo_root())
            .env("APP_RUN_ID", &self.run.id)
            .env("APP_TASK_ID", &task.id)
            .envs(&task.env)
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
            let _ = sender.send(supervise(&process, id, timeout));
        });
        Ok(())
    }

    /// The task's command, inside `app lock run` for each lock (sorted, so two tasks never
    /// wait for each other's) and after `app reserve` of its paths.
    fn wrapped(&self, task: &Task) -> Vec<String> {
        let exe = self.exe.display().to_string();
        let mut argv = task.argv.clone();
        if !task.reserve.is_empty() {
            let mut script = format!(
                "{} reserve --reason {} --",
                quote(&exe),
                quote(&format!("task {} of run {}", task.id, self.run.id))
            );
            for pattern in &task.reserve {
                script.push(' ');
                script.push_str(&quote(pattern));
            }
            script.push_str(" >/dev/null && exec \"$@\"");
            let mut wrapped = vec!["sh".into(), "-c".into(), script, "sh".into()];
            wrapped.extend(argv);
            argv = wrapped;
        }
        let mut locks = task.locks.clone();
        locks.sort();
        for name in locks.iter().rev() {
            let mut wrapped = vec![
                exe.clone(),
                "lock".into(),
                "run".into(),
                name.clone(),
                "--".into(),
            ];
            wrapped.extend(argv);
            argv = wrapped;
        }
        argv
    }

    /// Points the task's branch at its start: the base with its dependencies merged in; work
    /// of the launch before (number `previous`) is kept. `Ok(Err(why))` when that cannot be
    /// done (a conflict, a checked-out branch).
    fn set_start_point(
        &self,
        task: &Task,
        previous: i64,
    ) -> Result<std::result::Result<(), String>> {
        let base =
            Oid::from_str(&self.plan.base).git_context(|| "reading the plan's base".into())?;
        let mut start = base;
        for dep in &task.depends_on {
            let dep_branch = &self.plan.task(dep).expect("validated dependency").branch;
            let Some(tip) = self.branch_tip(dep_branch)? else {
                return Ok(Err(format!(
                    "the branch {dep_branch} of its dependency {dep} is gone; restore it (see 'git reflog') and resume"
                )));
            };
            let message = format!(
                "Merge {dep_branch} (task {dep}) for task {} of run {}",
                task.id, self.run.id
            );
            match merge::merge(&self.repo, start, tip, &message)? {
                Ok(merged) => start = merged,
                Err(conflict) => {
                    return Ok(Err(format!(
                        "its dependencies conflict: merging {dep} into {} conflicts in {}",
                        task.depends_on
                            .iter()
                            .take_while(|d| *d != dep)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        conflict.files.join(", ")
                    )));
                }
            }
        }
        if let Some(path) = worktree::checked_out_in(&self.repo, &task.branch)? {
            return Ok(Err(format!(
                "its branch {} is checked out in {}; remove that worktree ('app doctor --fix' for a dead instance's) and resume",
                task.branch,
                path.display()
            )));
        }
        if let Some(tip) = self.branch_tip(&task.branch)?
            && tip != start
            && !self.repo.graph_descendant_of(start, tip).unwrap_or(false)
        {
            // An earlier attempt's commits are kept, never dropped by the reset below.
            let keep = format!("refs/app/attempts/{}/{}/{previous}", self.run.id, task.id);
            self.repo
                .reference(
                    &keep,
                    tip,
                    true,
                    "app orchestrate: an earlier attempt's work",
                )
                .git_context(|| format!("saving {keep}"))?;
        }
        self.repo
            .reference(
                &format!("refs/heads/{}", task.branch),
                start,
                true,
                &format!(
                    "app orchestrate: start of task {} of run {}",
                    task.id, self.run.id
                ),
            )
            .git_context(|| format!("pointing {} at its start", task.branch))?;
        Ok(Ok(()))
    }

    fn branch_tip(&self, branch: &str) -> Result<Option<Oid>> {
        match self.repo.find_branch(branch, git2::BranchType::Local) {
            Ok(found) => Ok(found.get().target()),
            Err(err) if err.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(err) => Err(Error::git(format!("reading branch {branch}"), err)),
        }
    }

    /// Records an attempt's end; returns whether the task failed for good.
    fn finish(
        &mut self,
        outcome: Outcome,
        stopping: bool,
        report: &mut dyn FnMut(Progress),
    ) -> Result<bool> {
        let Some(running) = self.running.remove(&outcome.task) else {
            return Ok(false);
        };
        let task = self
            .plan
            .task(&outcome.task)
            .expect("running tasks are plan tasks")
            .clone();
        let elapsed = running.started.elapsed();
        let succeeded = outcome.exit_code == Some(0) && outcome.error.is_none();
        let retry = !succeeded
            && !stopping
            && self.tries.get(&task.id).copied().unwrap_or(0) <= task.retries;
        let detail = if succeeded {
            None
        } else if let Some(error) = outcome.error {
            Some(error)
        } else if outcome.timed_out {
            Some(format!(
                "timed out after {}",
                crate::config::format_age(task.timeout.unwrap_or_default())
            ))
        } else if stopping {
            Some("stopped by a signal to the orchestrator".into())
        } else {
            Some(format!("exited with {}", outcome.exit_code.unwrap_or(-1)))
        };
        let status = match (succeeded, retry, stopping) {
            (true, _, _) => TaskStatus::Succeeded,
            (false, true, _) => TaskStatus::Pending,
            (false, false, true) => TaskStatus::Cancelled,
            (false, false, false) => TaskStatus::Failed,
        };
        let row = self.rows.get_mut(&task.id).expect("every task has a row");
        row.status = status;
        row.exit_code = outcome.exit_code;
        row.detail = detail.clone();
        row.finished_at = Some(Timestamp::now().to_string());
        let row = row.clone();
        self.save_task(&row)?;
        report(Progress::Finished {
            task: task.id.clone(),
            status: if retry { None } else { Some(status) },
            exit_code: outcome.exit_code,
            elapsed,
            detail,
        });
        if succeeded {
            self.check_siblings(&task, report)?;
        }
        Ok(status == TaskStatus::Failed)
    }

    /// Reports every finished unrelated task whose branch would conflict with `task`'s.
    fn check_siblings(&mut self, task: &Task, report: &mut dyn FnMut(Progress)) -> Result<()> {
        let Some(tip) = self.branch_tip(&task.branch)? else {
            return Ok(());
        };
        for other in self.plan.tasks.clone() {
            if other.id == task.id
                || self.rows[&other.id].status != TaskStatus::Succeeded
                || self.depends(task, &other.id)
                || self.depends(&other, &task.id)
            {
                continue;
            }
            let Some(other_tip) = self.branch_tip(&other.branch)? else {
                continue;
            };
            if let Some(conflict) = merge::conflicts(&self.repo, tip, other_tip)? {
                self.conflicts.push(json!({
                    "a": other.id, "b": task.id, "files": conflict.files,
                }));
                report(Progress::Conflict {
                    a: other.id.clone(),
                    b: task.id.clone(),
                    files: conflict.files,
                });
            }
        }
        Ok(())
    }

    /// Whether `task` depends on `id`, directly or through others.
    fn depends(&self, task: &Task, id: &str) -> bool {
        let mut seen = HashSet::new();
        let mut stack: Vec<&str> = task.depends_on.iter().map(String::as_str).collect();
        while let Some(next) = stack.pop() {
            if next == id {
                return true;
            }
            if seen.insert(next)
                && let Some(dep) = self.plan.task(next)
            {
                stack.extend(dep.depends_on.iter().map(String::as_str));
            }
        }
        false
    }

    /// Merges every successful task's branch, in dependency order, into `branch`.
    fn integrate(&mut self, branch: &str, report: &mut dyn FnMut(Progress)) -> Result<Value> {
        if let Some(path) = worktree::checked_out_in(&self.repo, branch)? {
            let why = format!(
                "{branch} is checked out in {}; it was not touched",
                path.display()
            );
            report(Progress::Integrated {
                branch: branch.to_string(),
                merged: Vec::new(),
                left_out: vec![("*".into(), why.clone())],
            });
            return Ok(json!({ "branch": branch, "error": why }));
        }
        let base =
            Oid::from_str(&self.plan.base).git_context(|| "reading the plan's base".into())?;
        let mut current = self.branch_tip(branch)?.unwrap_or(base);
        let order: Vec<String> = self.plan.waves().into_iter().flatten().collect();
        let succeeded: Vec<&String> = order
            .iter()
            .filter(|id| self.rows[id.as_str()].status == TaskStatus::Succeeded)
            .collect();
        // A task's branch holds its dependencies' work, so merging the tasks nothing else
        // builds on (in dependency order) brings in everything, without a merge per task.
        let leaves: Vec<&String> = succeeded
            .iter()
            .filter(|id| {
                !succeeded.iter().any(|other| {
                    other != *id && self.depends(self.plan.task(other).expect("plan task"), id)
                })
            })
            .copied()
            .collect();
        let mut left_out = Vec::new();
        for id in leaves {
            let task_branch = self.plan.task(id).expect("plan task").branch.clone();
            let Some(tip) = self.branch_tip(&task_branch)? else {
                continue;
            };
            let message = format!("Merge {task_branch} (task {id} of run {})", self.run.id);
            match merge::merge(&self.repo, current, tip, &message)? {
                Ok(next) => current = next,
                Err(conflict) => left_out.push((
                    id.to_string(),
                    format!("conflicts in {}", conflict.files.join(", ")),
                )),
            }
        }
        let mut merged = Vec::new();
        for id in &order {
            let row = &self.rows[id];
            if row.status != TaskStatus::Succeeded {
                left_out.push((id.clone(), format!("it {}", row.status)));
            } else if let Some(tip) = self.branch_tip(&row.branch)?
                && (tip == current || self.repo.graph_descendant_of(current, tip).unwrap_or(false))
            {
                merged.push(id.clone());
            } else if !left_out.iter().any(|(t, _)| t == id) {
                left_out.push((id.clone(), "a task built on it was left out".into()));
            }
        }
        self.repo
            .reference(
                &format!("refs/heads/{branch}"),
                current,
                true,
                &format!("app orchestrate: integration of run {}", self.run.id),
            )
            .git_context(|| format!("updating {branch}"))?;
        report(Progress::Integrated {
            branch: branch.to_string(),
            merged: merged.clone(),
            left_out: left_out.clone(),
        });
        Ok(json!({
            "branch": branch,
            "commit": current.to_string(),
            "merged": merged,
            "left_out": left_out.iter().map(|(t, why)| json!({"task": t, "why": why})).collect::<Vec<_>>(),
        }))
    }
}

/// Waits for a task's `app run`, enforcing its timeout: SIGTERM to its group (a stop request
/// its `app run` escalates after TASK_STOP_TIMEOUT), then SIGKILL.
fn supervise(process: &process::Child, task: String, timeout: Option<Duration>) -> Outcome {
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

fn open(paths: &AppPaths) -> Result<Repository> {
    Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))
}

/// Quotes `text` for `sh`.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
