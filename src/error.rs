//! The crate's error type and the stable exit codes it maps to.
//!
//! Every error says what happened, to what, and what to do. The exit code is part of the
//! contract (docs/CLI.md): 0 ok, 1 failure, 2 bad usage or bad input (nothing was changed),
//! 3 busy or held (a retry may succeed). A command that `app` runs passes its own code through.

use std::io;
use std::path::{Path, PathBuf};

mod api;
mod control;
mod dash;
mod db;
mod ids;
mod instance;
mod mcp;
mod paths;
mod registry;
mod run;
mod settings;
mod sign;
mod worktree;

pub use api::ApiStartError;
pub use control::ControlError;
pub use dash::DashError;
pub use db::{DbError, NoteError};
pub use ids::IdError;
pub use instance::InstanceError;
pub use mcp::McpError;
pub use paths::PathsError;
pub use registry::RegistryError;
pub use run::RunError;
pub use settings::SettingsError;
pub use sign::SignError;
pub use worktree::WorktreeError;

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

    /// A database operation failed (busy past the deadline is [`DbError::Locked`] instead).
    #[error("{message}: {source}")]
    Database {
        /// What `app` was doing, naming the database.
        message: String,
        /// The libsql error.
        #[source]
        source: libsql::Error,
    },

    /// The repository's layout (its `.app/` directory, a path given) refused.
    #[error(transparent)]
    Paths(#[from] PathsError),

    /// A named lock refused.
    #[error(transparent)]
    Lock(#[from] LockError),

    /// The message queue refused.
    #[error(transparent)]
    Queue(#[from] QueueError),

    /// A path reservation refused.
    #[error(transparent)]
    Reserve(#[from] ReserveError),

    /// An instance worktree was refused or could not be made or removed.
    #[error(transparent)]
    Worktree(#[from] WorktreeError),

    /// An instance could not be registered, found or reached.
    #[error(transparent)]
    Instance(#[from] InstanceError),

    /// A setting in the environment cannot be used.
    #[error(transparent)]
    Settings(#[from] SettingsError),

    /// A user-given name or label is not one.
    #[error(transparent)]
    Id(#[from] IdError),

    /// The signing key was refused or could not be made.
    #[error(transparent)]
    Sign(#[from] SignError),

    /// A signed registry file cannot be read.
    #[error(transparent)]
    Registry(#[from] RegistryError),

    /// An orchestrated run was refused.
    #[error(transparent)]
    Run(#[from] RunError),

    /// An instance's control socket failed its client.
    #[error(transparent)]
    Control(#[from] ControlError),

    /// The HTTP API could not be bound or started.
    #[error(transparent)]
    ApiStart(#[from] ApiStartError),

    /// An MCP tool refused its arguments, or the MCP server failed.
    #[error(transparent)]
    Mcp(#[from] McpError),

    /// The database was refused or is out of reach.
    #[error(transparent)]
    Db(#[from] DbError),

    /// A note was refused.
    #[error(transparent)]
    Note(#[from] NoteError),

    /// `app dash` was refused or could not reach its source.
    #[error(transparent)]
    Dash(#[from] DashError),

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
            Error::NotARepository { .. } | Error::BadInput(_) => EXIT_USAGE,
            Error::Busy(_) => EXIT_BUSY,
            Error::Paths(err) => err.exit_code(),
            Error::Lock(err) => err.exit_code(),
            Error::Queue(err) => err.exit_code(),
            Error::Reserve(err) => err.exit_code(),
            Error::Worktree(err) => err.exit_code(),
            Error::Instance(err) => err.exit_code(),
            Error::Settings(err) => err.exit_code(),
            Error::Id(err) => err.exit_code(),
            Error::Sign(err) => err.exit_code(),
            Error::Registry(err) => err.exit_code(),
            Error::Run(err) => err.exit_code(),
            Error::Control(err) => err.exit_code(),
            Error::ApiStart(err) => err.exit_code(),
            Error::Mcp(err) => err.exit_code(),
            Error::Db(err) => err.exit_code(),
            Error::Note(err) => err.exit_code(),
            Error::Dash(err) => err.exit_code(),
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

/// What a named lock (`lock`) refused. It lives here, not in `lock`, so that the crate error
/// can gather it without the two modules importing each other.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Not a lock name.
    #[error(
        "invalid lock name {name:?}: use 1-128 characters from letters, digits and '_.-', starting with a letter or digit (e.g. db-schema or Cargo.lock)"
    )]
    InvalidName {
        /// What was given.
        name: String,
    },
    /// The lock's state file does not parse or verify.
    #[error("the state of lock {name:?} ({}) cannot be trusted: {reason}; 'app doctor' reports it", path.display())]
    Untrusted {
        /// The lock.
        name: String,
        /// Its state file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Someone else held it until the timeout.
    #[error(
        "lock {name:?} is held by {holder} since {since}; wait longer (--timeout, or wait_seconds over MCP), or run 'app doctor --fix' if that process is gone"
    )]
    Held {
        /// The lock.
        name: String,
        /// Its holder, as `Holder` prints it.
        holder: String,
        /// When they took it.
        since: String,
    },
    /// A release by someone who does not hold it.
    #[error(
        "lock {name:?} is held by {holder}, not by you; only its holder releases it (or use --force)"
    )]
    NotYours {
        /// The lock.
        name: String,
        /// Its holder, as `Holder` prints it.
        holder: String,
    },
}

impl LockError {
    /// The exit code: bad input, a broken state file, or held by someone else.
    pub fn exit_code(&self) -> u8 {
        match self {
            LockError::InvalidName { .. } => EXIT_USAGE,
            LockError::Untrusted { .. } => EXIT_FAILURE,
            LockError::Held { .. } | LockError::NotYours { .. } => EXIT_BUSY,
        }
    }
}

/// What the message queue (`queue`) refused; all of it is bad input.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Not a message type.
    #[error("invalid message type {kind:?}: use a lowercase word such as text or join_request")]
    InvalidKind {
        /// What was given.
        kind: String,
    },
    /// A payload over the limit.
    #[error("the payload is {len} bytes; the limit is {max} (APP_MAX_MESSAGE_BYTES)")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a message id.
    #[error(
        "invalid message id {id:?}: ids are 20 lowercase hex characters, as 'app recv' prints them"
    )]
    InvalidId {
        /// What was given.
        id: String,
    },
    /// An acknowledgement of a message that does not wait for this instance.
    #[error("no message {id} waits for instance {owner}; 'app recv --no-ack' lists them")]
    NotWaiting {
        /// The message id.
        id: String,
        /// The instance whose inbox it is not in.
        owner: String,
    },
}

impl QueueError {
    /// The exit code: always bad input.
    pub fn exit_code(&self) -> u8 {
        EXIT_USAGE
    }
}

/// What path reservations (`reserve`) refused.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// A reservation of nothing.
    #[error("give at least one path pattern to reserve")]
    NoPatterns,
    /// The reservations file holds entries that do not verify.
    #[error("{} holds entries that do not verify; 'app doctor' reports them", path.display())]
    Untrusted {
        /// The reservations file.
        path: PathBuf,
    },
    /// An exclusive claim overlaps another live holder's.
    #[error(
        "{} overlaps {}, reserved{} by {} since {}{}; wait for its release or reserve other paths",
        .0.mine,
        .0.theirs,
        if .0.shared { " (shared)" } else { "" },
        .0.holder,
        .0.since,
        .0.reason.as_ref().map_or_else(String::new, |r| format!(" ({r})"))
    )]
    Overlap(Box<Overlap>),
}

/// The reservation that refused a claim ([`ReserveError::Overlap`]).
#[derive(Debug)]
pub struct Overlap {
    /// The pattern asked for.
    pub mine: String,
    /// The pattern it overlaps.
    pub theirs: String,
    /// Whether theirs is a shared reservation.
    pub shared: bool,
    /// Their holder, as `Holder` prints it.
    pub holder: String,
    /// When they reserved it.
    pub since: String,
    /// Their reason, if they gave one.
    pub reason: Option<String>,
}

impl ReserveError {
    /// The exit code: bad input, a broken file, or held by someone else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ReserveError::NoPatterns => EXIT_USAGE,
            ReserveError::Untrusted { .. } => EXIT_FAILURE,
            ReserveError::Overlap { .. } => EXIT_BUSY,
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
