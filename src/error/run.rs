//! What orchestrated runs (`orchestrate`, `app runs`) refuse or fail at. Problems inside a
//! plan file stay text ([`super::Error::BadInput`]): each is a `file:line:column:` place and
//! a reason, which a type would only repeat.

use std::path::PathBuf;

use super::{EXIT_BUSY, EXIT_FAILURE, EXIT_USAGE};

/// What a run operation refused.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The plan file cannot be read.
    #[error("cannot read the plan {}: {source}", path.display())]
    PlanUnreadable {
        /// The plan file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--max-concurrent 0`.
    #[error("--max-concurrent must be at least 1")]
    NoConcurrency,
    /// A task's branch exists already.
    #[error(
        "task {task:?}: branch {branch} already exists; give the task another \"branch\" or delete that one"
    )]
    TaskBranchExists {
        /// The task id.
        task: String,
        /// Its branch.
        branch: String,
    },
    /// The integration branch is checked out somewhere.
    #[error(
        "the integration branch {branch} is checked out in {}; app never moves a checked-out branch: name another \"integration\"",
        path.display()
    )]
    IntegrationCheckedOut {
        /// The branch.
        branch: String,
        /// The worktree that has it.
        path: PathBuf,
    },
    /// `--resume` of a run the database does not know.
    #[error("no run {id:?} in the database; 'app runs list' shows the runs of this repository")]
    NotInDatabase {
        /// The run id.
        id: String,
    },
    /// `app runs show/logs` of a run the database does not know.
    #[error("no run {id:?}; 'app runs list' shows this repository's runs")]
    Unknown {
        /// The run id.
        id: String,
    },
    /// A task's run is gone from the database.
    #[error("run {id} is not in the database")]
    Missing {
        /// The run id.
        id: String,
    },
    /// `--resume` from another repository.
    #[error("run {id} belongs to the repository at {repo_root}; resume it from there")]
    OtherRepository {
        /// The run id.
        id: String,
        /// Its repository.
        repo_root: String,
    },
    /// `--resume` of a run a live orchestrator still runs.
    #[error("run {id} is still being orchestrated by pid {pid}; wait for it or stop it first")]
    StillOrchestrated {
        /// The run id.
        id: String,
        /// The orchestrator's pid.
        pid: i64,
    },
    /// A fleet run's orchestrator on another host still heartbeats.
    #[error(
        "run {id} is still being orchestrated on host {host} (its heartbeat is {age_ms} ms old); wait for it or stop it first"
    )]
    StillOrchestratedOnFleet {
        /// The run id.
        id: String,
        /// The orchestrator's host.
        host: String,
        /// How old its heartbeat is, by the server's clock.
        age_ms: i64,
    },
    /// A task's dead attempt still has a process in its worktree.
    #[error(
        "task {task:?}: its attempt {instance} is dead but {why}; stop that process, then resume again"
    )]
    TaskAttemptInUse {
        /// The task id.
        task: String,
        /// The attempt's instance.
        instance: String,
        /// What still runs there.
        why: String,
    },
    /// An attempt asked to stop still runs.
    #[error(
        "attempt {instance} still runs (pid {pid}) after being asked to stop; stop it with 'app instance stop {instance}', then resume again"
    )]
    AttemptStillRuns {
        /// The attempt's instance.
        instance: String,
        /// Its supervisor's pid.
        pid: u32,
    },
    /// A dead attempt still has a process in its worktree.
    #[error("attempt {instance} is dead but {why}; stop that process, then resume again")]
    AttemptInUse {
        /// The attempt's instance.
        instance: String,
        /// What still runs there.
        why: String,
    },
    /// The plan a run recorded does not deserialize.
    #[error("run {id} holds a plan this app cannot read: {source}")]
    PlanOfRun {
        /// The run id.
        id: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// `app runs logs` of a task the run does not have.
    #[error("run {run} has no task {task:?}; 'app runs show {run}' lists them")]
    NoTask {
        /// The run id.
        run: String,
        /// The task asked for.
        task: String,
    },
    /// `app runs logs` of a task that has not started.
    #[error("no log at {} yet: the task has not started", path.display())]
    NoLog {
        /// Where its log would be.
        path: PathBuf,
    },
}

impl RunError {
    /// The exit code: bad input, still running somewhere, or a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::PlanUnreadable { .. }
            | RunError::NoConcurrency
            | RunError::TaskBranchExists { .. }
            | RunError::IntegrationCheckedOut { .. }
            | RunError::NotInDatabase { .. }
            | RunError::Unknown { .. }
            | RunError::OtherRepository { .. }
            | RunError::NoTask { .. }
            | RunError::NoLog { .. } => EXIT_USAGE,
            RunError::StillOrchestrated { .. }
            | RunError::StillOrchestratedOnFleet { .. }
            | RunError::TaskAttemptInUse { .. }
            | RunError::AttemptStillRuns { .. }
            | RunError::AttemptInUse { .. } => EXIT_BUSY,
            RunError::Missing { .. } | RunError::PlanOfRun { .. } => EXIT_FAILURE,
        }
    }
}
