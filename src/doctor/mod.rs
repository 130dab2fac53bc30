//! `app doctor`: find every kind of stale state a crash can leave, and reclaim it without
//! losing anyone's work.
//!
//! Invariants:
//! - [`diagnose`] only reads: the state directory is byte-identical afterwards.
//! - [`fix`] never deletes work: a dirty worktree is first saved on `refs/app/rescue/<id>`
//!   ([`crate::worktree::changes::rescue`]), a branch with commits beyond its base is kept, and
//!   only `--force` discards either. Only worktrees under `.app/worktrees/` and git's records
//!   of them are touched; `git worktree prune` is never run repository-wide.
//! - Anything in use is left alone, and "in use" is asked of the operating system, not only of
//!   the registry (which `git clean -fdx` or a lost secret can take away): a worktree that a
//!   live process uses ([`crate::inuse`]) is never reclaimed, whatever the registry says; one
//!   whose supervisor lives is re-adopted (the supervisor registers it again). An intent
//!   whose writer still works and a temp file whose writer lives are left alone too.
//! - Every removal goes through [`crate::worktree::remove`] (by way of `reclaim`). A worktree
//!   only its user can decide about (locked, holding a nested repository) is reported, never
//!   retried, so a second `doctor --fix` finds nothing new. Two `doctor --fix` at once: one
//!   waits for the other.
//!
//! Files: `problem` (every kind of problem and its reported text), `diagnose` (the read-only
//! entry point: journal and instances), `git`, `coordination`, `files`, `database` and `fleet` (the
//! other read-only checks; `fleet` also holds the fleet's fixes), `fix` (the repair loop).

mod coordination;
mod database;
mod diagnose;
mod files;
mod fix;
mod fleet;
mod git;
mod problem;

use std::path::PathBuf;

use serde::Serialize;

use crate::config::Settings;
use crate::reclaim::Work;
use problem::Problem;

pub use diagnose::diagnose;
pub use fix::fix;

/// How `doctor` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The settings read at the start of the command (heartbeat limits, for liveness).
    pub settings: Settings,
    /// Discard instead of rescuing: dirty worktrees go without a rescue commit, branches with
    /// commits beyond their base are deleted.
    pub force: bool,
    /// `--db`, for the database checks.
    pub db: Option<PathBuf>,
}

impl Options {
    /// What a reclaim does with the work it finds.
    fn work(&self) -> Work {
        if self.force {
            Work::Discard
        } else {
            Work::Save
        }
    }
}

/// One finding, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Kind of problem (stable, for machines).
    pub kind: &'static str,
    /// What it is about: an instance id, a path, a branch.
    pub subject: String,
    /// What is wrong.
    pub problem: String,
    /// What `--fix` does about it, or why it cannot.
    pub fix: String,
    /// Whether `--fix` can reclaim it.
    pub fixable: bool,
}

/// What `--fix` did about a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fixed {
    /// The finding.
    pub finding: Finding,
    /// What was done (or the error that stopped it).
    pub outcome: std::result::Result<String, String>,
}

/// What [`diagnose`] found.
#[derive(Debug, Default)]
pub struct Diagnosis {
    problems: Vec<Problem>,
    /// Things worth knowing that need no fixing (dead letters, quarantined files).
    pub notices: Vec<String>,
}

impl Diagnosis {
    /// Every finding, in the order `--fix` handles them.
    pub fn findings(&self) -> Vec<Finding> {
        self.problems.iter().map(Problem::finding).collect()
    }

    /// Whether `--fix` could reclaim anything.
    fn any_fixable(&self) -> bool {
        self.problems.iter().any(Problem::fixable)
    }
}
