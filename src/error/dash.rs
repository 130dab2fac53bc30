//! What `app dash` refuses or cannot reach.

use super::{EXIT_BUSY, EXIT_FAILURE, EXIT_USAGE};

/// What `app dash` met.
#[derive(Debug, thiserror::Error)]
pub enum DashError {
    /// Standard output is not a terminal (a pipe, a file).
    #[error(
        "app dash draws on a terminal, and standard output is not one; run it in a terminal (for a script, read 'app instance list --json' or GET /overview)"
    )]
    NotATerminal,
    /// `--api` is not a plain-HTTP URL.
    #[error("--api {url:?} is not a usable API URL ({why}); give e.g. http://127.0.0.1:3000")]
    BadUrl {
        /// What was given.
        url: String,
        /// Why not.
        why: String,
    },
    /// The API refused the token (or its absence).
    #[error(
        "the API at {url} refused the request ({status}); give its token with --token or APP_API_TOKEN"
    )]
    Refused {
        /// The API's base URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The API could not be reached or answered nonsense.
    #[error(
        "cannot read the dashboard from {url}: {why}; is 'app serve --with-api' running there?"
    )]
    Unreachable {
        /// The URL asked.
        url: String,
        /// Why.
        why: String,
    },
    /// The terminal could not be set up or drawn on.
    #[error("cannot draw on the terminal: {source}")]
    Terminal {
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl DashError {
    /// The exit code: bad input, out of reach (a retry may succeed), or a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            DashError::NotATerminal | DashError::BadUrl { .. } | DashError::Refused { .. } => {
                EXIT_USAGE
            }
            DashError::Unreachable { .. } => EXIT_BUSY,
            DashError::Terminal { .. } => EXIT_FAILURE,
        }
    }
}
