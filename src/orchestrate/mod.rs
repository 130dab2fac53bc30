//! `app orchestrate --plan`: run a graph of agent tasks, each as its own instance, in
//! dependency order with a cap on parallelism; hand results down the graph; integrate; resume.
//!
//! Every attempt of a task is a child `app run --instance <hex>-<task>-<n> --branch <branch>`
//! in a process group of its own, so it is a registered instance like any other (worktree,
//! heartbeat, control socket) and its cleanup follows the same no-loss rules. The task's
//! `locks` and `reserve` are that `app run`'s `--lock` and `--reserve`: it takes them before
//! the command starts and gives them back when it ends (no shell script in between).
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
//!
//! Files: this one (what callers use: options, progress, summary, the entry points),
//! `scheduler` (the run loop: readiness, the cap, skips, cancels, retries, the rows),
//! `attempt` (one attempt's `app run` child, its log, its timeout), `refs` (the task branches'
//! start points, sibling conflicts, the integration branch), `resume` (what a dead run left),
//! `merge` (merges in memory), `plan` (the plan file).

pub mod merge;
pub mod plan;

pub(crate) mod attempt;
pub(crate) mod fleet;
mod refs;
mod resume;
mod scheduler;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use self::fleet::FleetRun;
use self::plan::Plan;
use self::scheduler::Orchestrator;
use crate::config::Settings;
use crate::db::runs::{self, RunRow, RunStatus, TaskRow, TaskStatus};
use crate::db::{Blocking, DbSettings};
use crate::error::{Error, Result, RunError};
use crate::ids::RunId;
use crate::paths::AppPaths;
use crate::process::{self, ProcessIdentity};
use crate::sign::Keys;
use crate::time::Timestamp;
use crate::worktree;

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
    /// Run the attempts on the fleet, through this git remote (`--fleet`, `--remote`).
    pub fleet: Option<String>,
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
        run: RunId,
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
    /// A fleet attempt's host stopped renewing its lease: another host takes the task.
    Moved {
        /// Task id.
        task: String,
        /// What happened.
        because: String,
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
#[tracing::instrument(skip_all, fields(plan = %plan_file.display()))]
pub fn prepare(cwd: &Path, plan_file: &Path, options: &Options) -> Result<(AppPaths, Plan)> {
    let paths = AppPaths::discover(cwd)?;
    let repo = refs::open(&paths)?;
    let text = std::fs::read_to_string(plan_file).map_err(|source| RunError::PlanUnreadable {
        path: plan_file.to_path_buf(),
        source,
    })?;
    // The run id is made from the plan's name; a file too broken to name one fails in parse.
    let format = plan::Format::of(plan_file);
    let name = plan::name_in(&text, format).unwrap_or_else(|| "plan".into());
    let run = RunId::for_plan(&name);
    let mut plan = Plan::parse(&text, format, &plan_file.display().to_string(), &run, &repo)?;
    if let Some(max) = options.max_concurrent {
        if max == 0 {
            return Err(RunError::NoConcurrency.into());
        }
        plan.max_concurrent = max;
    }
    for task in &plan.tasks {
        if repo
            .find_branch(&task.branch, git2::BranchType::Local)
            .is_ok()
        {
            return Err(RunError::TaskBranchExists {
                task: task.id.clone(),
                branch: task.branch.clone(),
            }
            .into());
        }
    }
    if let Some(branch) = &plan.integration
        && let Some(path) = worktree::checked_out_in(&repo, branch)?
    {
        return Err(RunError::IntegrationCheckedOut {
            branch: branch.clone(),
            path,
        }
        .into());
    }
    Ok((paths, plan))
}

/// Runs a prepared plan to the end.
#[tracing::instrument(skip_all, fields(run = %plan.run))]
pub fn start(
    paths: &AppPaths,
    plan: Plan,
    options: &Options,
    stop: &StopFlag,
    report: &mut dyn FnMut(Progress),
) -> Result<Summary> {
    if let Some(remote) = &options.fleet {
        // Bad fleet settings change nothing: checked before .app/ or a database is made.
        FleetRun::preflight(paths, remote, options)?;
    }
    // Task logs live in .app/: a state directory app cannot use stops the run before it is
    // recorded.
    paths.ensure_state_dir()?;
    let db = options.database()?;
    let fleet = match &options.fleet {
        Some(remote) => Some(FleetRun::open(paths, remote, &options.settings, &db)?),
        None => None,
    };
    if let Some(fleet) = &fleet
        && let Some(task) = plan.tasks.iter().find(|t| fleet.has_branch(&t.branch))
    {
        return Err(Error::bad_input(format!(
            "task {:?}: the remote {} already has a branch {}; give the task another \"branch\" or delete that one",
            task.id,
            fleet.remote.name(),
            task.branch
        )));
    }
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
        report: match &fleet {
            Some(fleet) => json!({ "fleet": fleet.describe(plan.max_concurrent) }),
            None => json!({}),
        },
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
    let mut orchestrator = Orchestrator::new(paths, plan, options, run, rows, db, fleet)?;
    orchestrator.execute(stop, report)
}

/// Continues run `id` after its orchestrator died: what succeeded stays, the rest runs again.
#[tracing::instrument(skip_all, fields(run = %id))]
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
    let mut run = resume::require_resumable(&paths, &db, id, options.settings.lease_ttl)?;
    let mut plan = Plan::of_run(&run)?;
    if let Some(max) = options.max_concurrent {
        plan.max_concurrent = max.max(1);
    }
    let fleet = match run.report.get("fleet") {
        Some(described) => Some(FleetRun::reopen(&paths, described, options, &db)?),
        None => None,
    };
    let rows = match fleet {
        Some(_) => db.run(async |db| runs::tasks(db, &run.id).await)?,
        None => {
            let keys = Keys::from_settings(&paths, &options.settings);
            resume::take_back(&paths, &keys, &db, &run.id, options.settings.timing, report)?
        }
    };
    if fleet.is_some() {
        // The server keeps the run's cap (`db::fleet::claim`): `--max-concurrent` applies to it.
        run.report["fleet"]["max_concurrent"] = json!(plan.max_concurrent);
    }
    let me = ProcessIdentity::current();
    run.status = RunStatus::Running;
    run.finished_at = None;
    run.pid = Some(me.pid.into());
    run.start_time = Some(me.start_time as i64);
    db.run(async |db| runs::update_run(db, &run).await)?;
    let adopt = fleet.is_some();
    let mut orchestrator = Orchestrator::new(&paths, plan, options, run, rows, db, fleet)?;
    if adopt {
        orchestrator.adopt()?;
    }
    orchestrator.execute(stop, report)
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
