//! What each agent is doing: its state (`working`, `idle`, `needs-input`, `stuck`, `exited`),
//! when it entered it and why, and how far its work has come (commits ahead/behind its base,
//! files and lines changed). The supervisor derives it each tick; `app status` reports it.
//!
//! (Contract for issue 17: the types the dashboard, the API, the MCP server and `app dash`
//! read. The derivation is being written.)

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

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
