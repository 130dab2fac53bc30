//! One read of everything a dashboard shows: instances with their agent state and progress,
//! runs with their task graphs, locks, reservations, messages, doctor's findings, host health,
//! and the attention strip that puts what needs a human first. The web dashboard reads it as
//! `GET /overview`, `app dash` reads it locally or through `--api URL`.
//!
//! (Contract for issue 17: these types and their JSON are what the page and the TUI are built
//! against; `gather` is being written.)

use serde::{Deserialize, Serialize};

use crate::activity::{Progress, StateReport};
use crate::lock::LockState;
use crate::queue::Message;
use crate::registry::InstanceRecord;
use crate::reserve::Reservation;
use crate::time::Timestamp;

/// Everything one screen shows, read at `generated_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// When it was read.
    pub generated_at: Timestamp,
    /// The repository's main root.
    pub repo_root: String,
    /// The host that read it.
    pub host: HostHealth,
    /// What needs a human, most urgent first.
    pub attention: Vec<Attention>,
    /// Every verified registry entry, live and stale.
    pub instances: Vec<InstanceView>,
    /// The most recent runs (newest first), each with its tasks.
    pub runs: Vec<RunView>,
    /// Every named lock with a holder or waiters.
    pub locks: Vec<LockView>,
    /// Every reservation.
    pub reservations: Vec<ReservationView>,
    /// Pending and dead-lettered messages.
    pub messages: Vec<MessageView>,
    /// Doctor's findings (read only, never fixed from here).
    pub findings: Vec<FindingView>,
}

/// The reading host's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostHealth {
    /// Host name.
    pub name: String,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Memory, total and available, in bytes.
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// The file system of `.app/`, total and free, in bytes.
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// The database: `file` or `server`, and how long one trivial read took.
    pub db_kind: String,
    pub db_latency_ms: Option<f64>,
}

/// One item of the attention strip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    /// `needs-input`, `stuck`, `failed-task`, `dead-instance` or `finding`.
    pub kind: String,
    /// What it is about: an instance id, `run/task`, a finding's subject.
    pub subject: String,
    /// One line for a human.
    pub text: String,
    /// Since when, where known.
    pub since: Option<Timestamp>,
}

/// An instance as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// The registry entry, fields at the top level as in `app instance list --json`.
    #[serde(flatten)]
    pub record: InstanceRecord,
    /// `live` or `stale`.
    pub liveness: String,
    /// Why it is stale.
    pub reason: Option<String>,
    /// What the agent is doing (live instances).
    pub agent: Option<StateReport>,
    /// How far its work has come (instances with a worktree).
    pub progress: Option<Progress>,
    /// The run and task it is an attempt of.
    pub run: Option<String>,
    pub task: Option<String>,
}

/// A run and its task graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub name: String,
    /// Host of the orchestrator.
    pub host: String,
    /// `running`, `succeeded`, `failed`, `interrupted`, ... as `app runs show` prints it.
    pub status: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Every task, in plan order.
    pub tasks: Vec<TaskView>,
}

/// One task of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    /// The tasks it waits for (the graph's edges).
    pub depends_on: Vec<String>,
    /// `pending`, `running`, `succeeded`, `failed`, `skipped`, ... as `app runs show` prints it.
    pub status: String,
    pub attempts: i64,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i64>,
    pub branch: String,
    /// The instance of the last attempt.
    pub instance: Option<String>,
    /// Why it failed or was skipped.
    pub detail: Option<String>,
}

/// A named lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockView {
    /// The stored state (name, last token, holder, acquired, expiry).
    #[serde(flatten)]
    pub lock: LockState,
    /// Why the hold no longer counts, if it does not.
    pub lapsed: Option<String>,
    /// Who waits for it (instance ids, or `pid N on HOST`).
    pub waiters: Vec<String>,
    /// `local` or `fleet`.
    pub scope: String,
}

/// A reservation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReservationView {
    #[serde(flatten)]
    pub reservation: Reservation,
    /// Why it no longer counts, if it does not.
    pub lapsed: Option<String>,
    /// `local` or `fleet`.
    pub scope: String,
}

/// A message waiting in an inbox, or dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    #[serde(flatten)]
    pub message: Message,
    /// `pending` or `dead`.
    pub state: String,
}

/// One of doctor's findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingView {
    pub kind: String,
    pub subject: String,
    pub problem: String,
    pub fix: String,
    pub fixable: bool,
}
