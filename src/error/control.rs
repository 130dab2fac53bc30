//! What talking to an instance over its control socket (`control`) fails at.

use std::path::PathBuf;
use std::time::Duration;

use super::EXIT_FAILURE;

/// What a client of an instance's control socket met.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The instance answered a stop request with something else than its acceptance.
    #[error("the instance did not take the stop request ({answer})")]
    StopNotTaken {
        /// The frame it answered with, debug-printed.
        answer: String,
    },
    /// Nothing answers on the socket.
    #[error(
        "cannot reach the instance's control socket {}: {source}; is it still running? ('app instance list')",
        socket.display()
    )]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The instance is still starting after the client's patience.
    #[error(
        "the instance is still starting after {}s and does not serve its control socket {} yet; try again, or see 'app instance info'",
        patience.as_secs(),
        socket.display()
    )]
    StillStarting {
        /// How long the client waited.
        patience: Duration,
        /// The socket.
        socket: PathBuf,
    },
    /// The instance refused the command, in its own words.
    #[error("{0}")]
    Refused(String),
    /// The connection closed before the command's end.
    #[error("the instance closed the connection before the command ended (it may have stopped)")]
    Closed,
}

impl ControlError {
    /// The exit code: always a failure.
    pub fn exit_code(&self) -> u8 {
        EXIT_FAILURE
    }
}
