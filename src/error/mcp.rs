//! What the MCP server (`mcp`) refuses or fails at: its tools' argument limits and the
//! protocol's own failures.

use super::{EXIT_FAILURE, EXIT_USAGE};

/// What an MCP tool refused, or what stopped the server.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// `wait_seconds` out of range.
    #[error("wait_seconds {seconds} is out of range; give 0 to {max}")]
    Wait {
        /// What was given.
        seconds: f64,
        /// The largest allowed.
        max: f64,
    },
    /// `ttl_seconds` out of range.
    #[error("ttl_seconds {seconds} is out of range; give 1 to {max}")]
    Ttl {
        /// What was given.
        seconds: u64,
        /// The largest allowed.
        max: u64,
    },
    /// Too many items in one call.
    #[error("{count} {what} in one call; give at most {max}")]
    TooMany {
        /// How many were given.
        count: usize,
        /// Of what, e.g. "patterns".
        what: String,
        /// The most allowed.
        max: usize,
    },
    /// `limit` out of range.
    #[error("limit {limit} is out of range; give 1 to {max}")]
    Limit {
        /// What was given.
        limit: usize,
        /// The largest allowed.
        max: usize,
    },
    /// Acknowledgements of messages that do not wait for this instance.
    #[error(
        "no message {ids} waits for instance {owner} (none was acknowledged); receive_messages lists them"
    )]
    NotWaiting {
        /// The unknown ids, comma-separated.
        ids: String,
        /// This server's instance.
        owner: String,
    },
    /// A reservation reason over the limit.
    #[error("the reason is longer than {max} bytes; shorten it")]
    ReasonTooLong {
        /// The limit.
        max: usize,
    },
    /// The client's initialize failed.
    #[error("MCP: the client's initialize failed: {0}")]
    Initialize(String),
    /// The server stopped with an error.
    #[error("MCP: the server stopped: {0}")]
    Stopped(String),
    /// A tool's work panicked or was cancelled.
    #[error("the tool failed: {0}")]
    ToolFailed(String),
}

impl McpError {
    /// The exit code: bad input, or a failure of the protocol.
    pub fn exit_code(&self) -> u8 {
        match self {
            McpError::Initialize(_) | McpError::Stopped(_) | McpError::ToolFailed(_) => {
                EXIT_FAILURE
            }
            _ => EXIT_USAGE,
        }
    }
}
