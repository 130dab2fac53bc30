//! What the shared database (`db`) refuses or fails at, beyond a failed statement
//! ([`super::Error::Database`]), and what its notes refuse.

use super::{EXIT_BUSY, EXIT_FAILURE, EXIT_USAGE};

/// What opening, migrating or writing the database met.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `APP_DB_URL` is not a server URL.
    #[error(
        "APP_DB_URL={url:?} is not a libSQL server URL; use http://, https:// or libsql://, or APP_DB_PATH for a file"
    )]
    NotAServerUrl {
        /// What was given.
        url: String,
    },
    /// Another writer held the database past the retry deadline.
    #[error(
        "the database {location} stayed locked by another writer for {waited} ({attempts} attempts) while {what}: {source}; {}retry later, or raise APP_DB_RETRY_DEADLINE",
        if *local {
            "nothing was written; "
        } else {
            // The server queues a request behind the lock; giving up cannot recall it.
            "the server may still apply a write it already received once the lock frees; "
        }
    )]
    Locked {
        /// The database, as its location prints.
        location: String,
        /// How long it was retried, as `time::format_age` prints it.
        waited: String,
        /// How many attempts were made.
        attempts: u32,
        /// What `app` was doing.
        what: String,
        /// Whether it is a file on this machine (nothing was written) or a server.
        local: bool,
        /// The last busy error.
        #[source]
        source: libsql::Error,
    },
    /// The server could not be reached until the retry deadline.
    #[error(
        "the database server {location} could not be reached for {waited} ({attempts} attempts) while {what}: {last}; start it (scripts/start-sqld.sh), check APP_DB_URL, or raise APP_DB_RETRY_DEADLINE"
    )]
    Unreachable {
        /// The server's URL.
        location: String,
        /// How long it was retried, as `time::format_age` prints it.
        waited: String,
        /// How many attempts were made.
        attempts: u32,
        /// What `app` was doing.
        what: String,
        /// The last connection error, in words.
        last: String,
    },
    /// The database was migrated by a newer `app`.
    #[error(
        "the database {location} has schema version {current}, newer than this app's {latest}; upgrade app"
    )]
    NewerSchema {
        /// The database, as its location prints.
        location: String,
        /// Its schema version.
        current: i64,
        /// The newest this `app` knows.
        latest: i64,
    },
    /// A status column holds a word this `app` does not know.
    #[error(
        "the database holds an unknown {column} '{text}'; was it written by a newer app? upgrade app"
    )]
    UnknownStatus {
        /// The column, e.g. "run status".
        column: String,
        /// What it holds.
        text: String,
    },
}

impl DbError {
    /// The exit code: bad input, busy past the deadline, or a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            DbError::NotAServerUrl { .. } => EXIT_USAGE,
            DbError::Locked { .. } | DbError::Unreachable { .. } => EXIT_BUSY,
            DbError::NewerSchema { .. } | DbError::UnknownStatus { .. } => EXIT_FAILURE,
        }
    }
}

/// What notes (`db::notes`) refuse; all of it is bad input.
#[derive(Debug, thiserror::Error)]
pub enum NoteError {
    /// A NUL character in the content.
    #[error("the note contains a NUL character")]
    Nul,
    /// Blank content.
    #[error("the note is empty; give its text")]
    Empty,
    /// Content over the limit.
    #[error("the note is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A `--limit` out of range.
    #[error("--limit must be between 1 and {max}, got {limit}")]
    Limit {
        /// What was given.
        limit: u32,
        /// The largest allowed.
        max: u32,
    },
    /// A search without a word.
    #[error("the search query is empty; give a word to look for")]
    EmptyQuery,
}

impl NoteError {
    /// The exit code: always bad input.
    pub fn exit_code(&self) -> u8 {
        EXIT_USAGE
    }
}
