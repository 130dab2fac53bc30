//! What finding the repository and its `.app/` directory (`paths`) refuses or fails at.

use std::path::PathBuf;

use super::{EXIT_FAILURE, EXIT_USAGE};

/// What the repository's layout refused.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    /// A repository without a working tree.
    #[error(
        "{} is a bare repository; app needs a repository with a working tree",
        common.display()
    )]
    Bare {
        /// Its git directory.
        common: PathBuf,
    },
    /// `.app` went away while it was being made.
    #[error("{} vanished as it was made", dir.display())]
    Vanished {
        /// The state directory.
        dir: PathBuf,
    },
    /// `.app` is a symlink to nothing.
    #[error(
        "{named} names nothing; app keeps its state in .app/: point the symlink at a directory of yours, or remove it"
    )]
    Dangling {
        /// `.app`, and where its symlink points.
        named: String,
    },
    /// `.app` is not a directory.
    #[error(
        "{named} is not a directory; app keeps its state in a directory .app/ at the repository root: move that file away (e.g. 'mv .app .app.orig') and run again"
    )]
    NotADirectory {
        /// `.app`, and where its symlink points if it is one.
        named: String,
    },
    /// `.app` belongs to another user.
    #[error(
        "{named} is owned by uid {owner}{owner_name}, not by you (uid {me}{my_name}); app keeps private state there (its key, the registries) and uses only a directory of your own: run app as that user, or have the directory removed (by its owner or root) so app makes a new one"
    )]
    NotYours {
        /// `.app`, and where its symlink points if it is one.
        named: String,
        /// Its owner's uid.
        owner: u32,
        /// " (name)" of its owner, or empty.
        owner_name: String,
        /// The caller's uid.
        me: u32,
        /// " (name)" of the caller, or empty.
        my_name: String,
    },
    /// A path given outside the worktree.
    #[error("{file} is outside the worktree {}; give paths inside it", root.display())]
    OutsideWorktree {
        /// The path as given.
        file: String,
        /// The worktree's root.
        root: PathBuf,
    },
}

impl PathsError {
    /// The exit code: bad input, except `.app` vanishing under us.
    pub fn exit_code(&self) -> u8 {
        match self {
            PathsError::Vanished { .. } => EXIT_FAILURE,
            PathsError::Bare { .. }
            | PathsError::Dangling { .. }
            | PathsError::NotADirectory { .. }
            | PathsError::NotYours { .. }
            | PathsError::OutsideWorktree { .. } => EXIT_USAGE,
        }
    }
}
