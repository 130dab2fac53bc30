//! What binding and starting the HTTP API (`api`) refuses or fails at.

use std::net::SocketAddr;

use super::{EXIT_BUSY, EXIT_FAILURE, EXIT_USAGE};

/// What `api::bind` and `api::start` met.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// `--api-capacity` out of range.
    #[error(
        "--api-capacity {capacity}: give the number of events buffered per subscriber, 1 to {max} (default {default})"
    )]
    Capacity {
        /// What was given.
        capacity: usize,
        /// The largest allowed.
        max: usize,
        /// The default.
        default: usize,
    },
    /// The address does not parse.
    #[error("API address {text:?} is not IP:PORT; write e.g. 127.0.0.1:3000")]
    NotAnAddress {
        /// What was given.
        text: String,
    },
    /// A non-loopback address without a token.
    #[error(
        "the API on {addr} would be reachable from other machines; set APP_API_TOKEN to a secret bearer token, or bind 127.0.0.1"
    )]
    Reachable {
        /// The address.
        addr: SocketAddr,
    },
    /// Someone else listens on the address.
    #[error(
        "API address {addr} is taken; pick another --api-addr, or leave it out to take the first free port of the range (APP_API_PORT_RANGE, default {low}-{high})"
    )]
    Taken {
        /// The address.
        addr: SocketAddr,
        /// The default range's first port.
        low: u16,
        /// The default range's last port.
        high: u16,
    },
    /// Listening failed for another reason.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A runtime, socket option or thread of the server could not be set up.
    #[error("cannot {what}: {source}")]
    Setup {
        /// What, e.g. "start the API thread".
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ApiStartError {
    /// The exit code: bad input, the address taken, or a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ApiStartError::Capacity { .. }
            | ApiStartError::NotAnAddress { .. }
            | ApiStartError::Reachable { .. } => EXIT_USAGE,
            ApiStartError::Taken { .. } => EXIT_BUSY,
            ApiStartError::Listen { .. } | ApiStartError::Setup { .. } => EXIT_FAILURE,
        }
    }
}
