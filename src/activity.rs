//! What each agent is doing: its state (`working`, `idle`, `needs-input`, `stuck`, `exited`),
//! when it entered it and why, and how far its work has come (commits ahead/behind its base,
//! files and lines changed). The supervisor derives it each tick; `app status` reports it.
//!
//! Submodules: `derive` (the state machine, pure), `progress` (ahead/behind and diff stats,
//! kept up to date from a watch of the worktree), `tracker` (the supervisor's thread and the
//! [`Probe`] it ticks). Here: the files they share (docs/AGENT-STATE.md).
//!
//! Invariants:
//! - `.app/activity/<id>.json` is written only by instance `id`'s supervisor, atomically, and
//!   removed when it ends (a killed supervisor's by `app doctor --fix`, once nothing of the
//!   instance runs); `.app/activity/<id>.said.json` only by `app status` (and the MCP
//!   tool) acting for `id`, atomically. Readers never lock.
//! - Only instances of this host have these files: for others [`read`] has nothing.

mod derive;
mod progress;
mod tracker;

use serde::{Deserialize, Serialize};

use crate::error::{InstanceError, Result};
use crate::paths::AppPaths;
use crate::registry::{InstanceRecord, Liveness};
use crate::state;
use crate::time::Timestamp;

pub use crate::config::ActivityTiming;
pub(crate) use derive::Report;
pub use tracker::{ExitedFn, HoldsFn, Probe, Tracker, Watched};

/// What a supervisor last derived for its instance (`.app/activity/<id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// The agent's state.
    pub agent: StateReport,
    /// Its progress, when it has a worktree.
    pub progress: Option<Progress>,
    /// When this was written (at least every few ticks while the instance lives).
    pub updated_at: Timestamp,
}

/// What instance `id`'s supervisor last derived, if it runs on this host and wrote it.
pub(crate) fn read(paths: &AppPaths, id: &str) -> Option<Activity> {
    let text = std::fs::read(paths.activity(id)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// What the supervisor of `record` last derived, when it is live (a stale instance's file says
/// nothing true, and one of another host has none here).
pub(crate) fn live(
    paths: &AppPaths,
    record: &InstanceRecord,
    liveness: &Liveness,
) -> Option<Activity> {
    if *liveness != Liveness::Live {
        return None;
    }
    read(paths, record.id.as_str())
}

fn save(paths: &AppPaths, id: &str, activity: &Activity) -> Result<()> {
    state::create_private_dir_all(&paths.activity_dir())?;
    let bytes = serde_json::to_vec(activity).expect("an activity serializes");
    state::write_atomic(&paths.activity(id), &bytes)
}

/// Removes instance `id`'s activity files (its end).
fn remove(paths: &AppPaths, id: &str) {
    let _ = std::fs::remove_file(paths.activity(id));
    let _ = std::fs::remove_file(paths.activity_report(id));
}

/// The last report of instance `id`.
fn load_report(paths: &AppPaths, id: &str) -> Option<Report> {
    let text = std::fs::read(paths.activity_report(id)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The longest report message kept, in characters (longer ones are cut).
pub(crate) const MAX_MESSAGE_CHARS: usize = 200;

/// Records a report of instance `record` after checking that it runs, on this host: what
/// `app status` and the MCP tool `status` do.
pub(crate) fn report(
    paths: &AppPaths,
    record: &crate::registry::InstanceRecord,
    stale_after: std::time::Duration,
    (state, message): (AgentState, Option<&str>),
) -> Result<Report> {
    let id = record.id.to_string();
    if record.host != crate::process::hostname() {
        return Err(InstanceError::StatusElsewhere {
            id,
            host: record.host.clone(),
        }
        .into());
    }
    if let crate::registry::Liveness::Stale(reason) = record.liveness(stale_after) {
        return Err(InstanceError::StatusNotRunning { id, reason }.into());
    }
    say(paths, &id, state, message)
}

/// Records that instance `id` reports `state` (`working`, `idle` or `needs-input`), with an
/// optional one-line message; its supervisor takes it at its next tick.
fn say(paths: &AppPaths, id: &str, state: AgentState, message: Option<&str>) -> Result<Report> {
    if !matches!(
        state,
        AgentState::Working | AgentState::Idle | AgentState::NeedsInput
    ) {
        return Err(InstanceError::UnknownState {
            word: state.as_str().to_string(),
        }
        .into());
    }
    let message = message
        .map(|m| m.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|m| !m.is_empty())
        .map(|m| m.chars().take(MAX_MESSAGE_CHARS).collect());
    let report = Report {
        state,
        message,
        at: Timestamp::now(),
    };
    state::create_private_dir_all(&paths.activity_dir())?;
    let bytes = serde_json::to_vec(&report).expect("a report serializes");
    state::write_atomic(&paths.activity_report(id), &bytes)?;
    Ok(report)
}

/// What an agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    /// Its process tree uses CPU or its worktree changes, or it said so.
    Working,
    /// Neither, for a while.
    Idle,
    /// It said it waits for its human (`app status needs-input`).
    NeedsInput,
    /// Idle while it holds a lock or a task, past `APP_STUCK_AFTER`.
    Stuck,
    /// Its command has ended.
    Exited,
}

impl AgentState {
    /// Its name, as JSON and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Working => "working",
            AgentState::Idle => "idle",
            AgentState::NeedsInput => "needs-input",
            AgentState::Stuck => "stuck",
            AgentState::Exited => "exited",
        }
    }

    /// A state an agent may report itself (`app status WORD`): bad input names the choices.
    pub fn parse_reported(word: &str) -> Result<AgentState> {
        match word {
            "working" => Ok(AgentState::Working),
            "idle" => Ok(AgentState::Idle),
            "needs-input" => Ok(AgentState::NeedsInput),
            _ => Err(InstanceError::UnknownState {
                word: word.to_string(),
            }
            .into()),
        }
    }
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Progress {
    /// Compactly: `+3/-1 ↑2 ↓1` (lines committed and uncommitted together; ahead, behind).
    pub fn compact(&self) -> String {
        let mut text = format!(
            "+{}/-{}",
            self.committed.insertions + self.uncommitted.insertions,
            self.committed.deletions + self.uncommitted.deletions
        );
        if self.ahead > 0 {
            text.push_str(&format!(" ↑{}", self.ahead));
        }
        if self.behind > 0 {
            text.push_str(&format!(" ↓{}", self.behind));
        }
        text
    }
}

impl std::fmt::Display for DiffStat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} file(s), +{}/-{}",
            self.files, self.insertions, self.deletions
        )
    }
}

/// An agent's state, since when, and why (one line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReport {
    /// The state.
    pub state: AgentState,
    /// When it entered it.
    pub since: Timestamp,
    /// Why, in one line: "cpu 43% over 2s", "said: waiting for review", "holds lock db".
    pub reason: String,
}

/// Files and lines changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffStat {
    /// Files changed.
    pub files: u64,
    /// Lines added.
    pub insertions: u64,
    /// Lines removed.
    pub deletions: u64,
}

/// How far an instance's work has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Commits on its branch that its base does not have.
    pub ahead: u64,
    /// Commits on its base branch since it started.
    pub behind: u64,
    /// Committed on its branch since its base.
    pub committed: DiffStat,
    /// In its worktree, not committed.
    pub uncommitted: DiffStat,
}
