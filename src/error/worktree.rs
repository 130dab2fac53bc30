//! What instance worktrees (`worktree`) refuse or fail at.

use std::path::PathBuf;

use super::{EXIT_BUSY, EXIT_FAILURE, EXIT_USAGE};

/// What planning, creating or removing an instance worktree refused.
#[derive(Debug, thiserror::Error)]
pub enum WorktreeError {
    /// Not a name git accepts for a branch.
    #[error("{name:?} is not a valid branch name (see 'git check-ref-format --branch')")]
    InvalidBranch {
        /// What was given.
        name: String,
    },
    /// `--base` given for a branch that exists already.
    #[error(
        "branch {branch} already exists; --base applies only to a new branch (drop --base to check {branch} out as it is)"
    )]
    BaseForExistingBranch {
        /// The branch.
        branch: String,
    },
    /// The branch is checked out in another worktree.
    #[error("branch {branch} is already checked out in {}; pick another --branch", holder.display())]
    CheckedOut {
        /// The branch.
        branch: String,
        /// The worktree that has it.
        holder: PathBuf,
    },
    /// Something sits where the instance's worktree goes and is no worktree of ours.
    #[error(
        "{} already exists but is not a worktree app can reuse; move it aside or run 'app doctor'",
        path.display()
    )]
    NotReusable {
        /// Where the worktree would go.
        path: PathBuf,
    },
    /// A kept worktree is in use by some process.
    #[error("{} is in use by {users}; pick another --instance or stop what runs there", path.display())]
    InUse {
        /// The worktree.
        path: PathBuf,
        /// Who uses it, as `inuse::describe` says.
        users: String,
    },
    /// A kept worktree has no branch checked out.
    #[error("{} has a detached HEAD; check a branch out there first", path.display())]
    DetachedHead {
        /// The worktree.
        path: PathBuf,
    },
    /// A kept worktree is on another branch than asked, or a base was given for it.
    #[error(
        "{} already exists on branch {current} (kept from an earlier run); run without --branch/--base to reuse it",
        path.display()
    )]
    KeptOnBranch {
        /// The worktree.
        path: PathBuf,
        /// Its branch.
        current: String,
    },
    /// The repository has no commit to start from.
    #[error("the repository has no commit yet; make a first commit, then run app again")]
    NoCommit,
    /// `--base` names nothing.
    #[error("unknown ref {spec:?}: {reason}; give --base a branch, tag or commit")]
    UnknownRef {
        /// What was given.
        spec: String,
        /// git's message.
        reason: String,
    },
    /// `--base` names something that is not a commit.
    #[error("{spec:?} does not name a commit")]
    NotACommit {
        /// What was given.
        spec: String,
    },
    /// Someone else created the branch between the plan and its creation.
    #[error("branch {branch} was created by someone else a moment ago; pick another --branch")]
    BranchRaced {
        /// The branch.
        branch: String,
    },
    /// git has a worktree of that name already.
    #[error(
        "git already has a worktree named {id} ({}); run 'app doctor' or pick another --instance",
        admin.display()
    )]
    AdminTaken {
        /// The instance id.
        id: String,
        /// git's admin directory of that worktree.
        admin: PathBuf,
    },
    /// A branch to delete is checked out somewhere.
    #[error("branch {branch} is checked out in {}; not deleting it", holder.display())]
    CheckedOutNotDeleting {
        /// The branch.
        branch: String,
        /// The worktree that has it.
        holder: PathBuf,
    },
    /// The rescue commit's objects kept vanishing.
    #[error(
        "the rescue of {} kept losing its objects (is 'git gc --prune=now' running in a loop?); nothing was removed",
        path.display()
    )]
    RescueLost {
        /// The worktree being rescued.
        path: PathBuf,
    },
}

impl WorktreeError {
    /// The exit code: bad input, in use, or a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            WorktreeError::InvalidBranch { .. }
            | WorktreeError::BaseForExistingBranch { .. }
            | WorktreeError::CheckedOut { .. }
            | WorktreeError::KeptOnBranch { .. }
            | WorktreeError::NoCommit
            | WorktreeError::UnknownRef { .. }
            | WorktreeError::NotACommit { .. }
            | WorktreeError::BranchRaced { .. } => EXIT_USAGE,
            WorktreeError::InUse { .. } => EXIT_BUSY,
            WorktreeError::NotReusable { .. }
            | WorktreeError::DetachedHead { .. }
            | WorktreeError::AdminTaken { .. }
            | WorktreeError::CheckedOutNotDeleting { .. }
            | WorktreeError::RescueLost { .. } => EXIT_FAILURE,
        }
    }
}
