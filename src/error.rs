//! The crate's error type and the stable exit codes it maps to.
//!
//! Every error says what happened, to what, and what to do. The exit code is part of the
//! contract (docs/CLI.md): 0 ok, 1 failure, 2 bad usage or bad input (nothing was changed),
//! 3 busy or held (a retry may succeed). A command that `app` runs passes its own code through.

use std::io;
use std::path::{Path, PathBuf};

/// Exit code for a failure that is neither bad input nor contention.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage or bad input; nothing was changed.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a resource held by someone else; retrying may succeed.
pub const EXIT_BUSY: u8 = 3;

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `app`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The current directory is not inside a git repository.
    #[error(
        "{} is not inside a git repository; run app from a repository or one of its worktrees",
        path.display()
    )]
    NotARepository {
        /// Where the search started.
        path: PathBuf,
    },

    /// The user gave input that cannot be used; nothing was changed.
    #[error("{0}")]
    BadInput(String),

    /// Something the user asked for is held by someone else.
    #[error("{0}")]
    Busy(String),

    /// No instance with that id is registered.
    #[error(
        "no instance {id} is registered in this repository; 'app instance list --all' shows every entry"
    )]
    UnknownInstance {
        /// The id that was asked for.
        id: String,
    },

    /// An operation failed for a reason that is neither bad input nor contention.
    #[error("{0}")]
    Failed(String),

    /// The command given to `app run` could not be started.
    #[error("cannot run {command:?}: {source}")]
    Spawn {
        /// The program name.
        command: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },

    /// A git operation failed.
    #[error("git: {message}: {}", source.message())]
    Git {
        /// What `app` was doing.
        message: String,
        /// The libgit2 error.
        #[source]
        source: git2::Error,
    },

    /// A file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What `app` was doing, e.g. "writing".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A database operation failed (busy past the deadline is [`Error::Busy`] instead).
    #[error("{message}: {source}")]
    Database {
        /// What `app` was doing, naming the database.
        message: String,
        /// The libsql error.
        #[source]
        source: libsql::Error,
    },

    /// A state file could not be parsed.
    #[error("{} is not valid JSON ({source}); run 'app doctor --fix' to move it aside (kept for you to read; running instances register again)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The process exit code this error maps to.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NotARepository { .. } | Error::BadInput(_) | Error::UnknownInstance { .. } => {
                EXIT_USAGE
            }
            Error::Busy(_) => EXIT_BUSY,
            Error::Spawn { source, .. } => crate::process::spawn_failure_code(source),
            Error::Failed(_)
            | Error::Git { .. }
            | Error::Io { .. }
            | Error::Database { .. }
            | Error::Corrupt { .. } => EXIT_FAILURE,
        }
    }

    /// Builds a [`Error::BadInput`] from anything printable.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Error::BadInput(message.into())
    }

    /// Wraps a git error with what `app` was doing.
    pub fn git(message: impl Into<String>, source: git2::Error) -> Self {
        Error::Git {
            message: message.into(),
            source,
        }
    }

    /// Wraps an I/O error with the action and path.
    pub fn io(action: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// Adds path context to `std::io` results.
pub trait IoContext<T> {
    /// Maps an I/O error to [`Error::Io`] naming `action` and `path`.
    fn io_context(self, action: &'static str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn io_context(self, action: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|source| Error::io(action, path, source))
    }
}

/// Adds a description to `git2` results.
pub trait GitContext<T> {
    /// Maps a git error to [`Error::Git`] with `message`.
    fn git_context(self, message: impl FnOnce() -> String) -> Result<T>;
}

impl<T> GitContext<T> for std::result::Result<T, git2::Error> {
    fn git_context(self, message: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::git(message(), source))
    }
}
