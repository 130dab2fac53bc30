//! What loading or making the signing key (`sign`) refuses or fails at.

use std::path::PathBuf;

use super::{EXIT_FAILURE, EXIT_USAGE};

/// What the signing key refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// `APP_SHARED_SECRET` is set to nothing.
    #[error("APP_SHARED_SECRET is set but empty; unset it or give it a value")]
    EmptySecret,
    /// The fleet runs without a configured shared secret.
    #[error(
        "the fleet needs APP_SHARED_SECRET, the same on every host (e.g. 'export APP_SHARED_SECRET=$(openssl rand -hex 32)' once, then the same value everywhere)"
    )]
    NoFleetSecret,
    /// `.app/secret` went away right after it was made.
    #[error("{} vanished after creation", path.display())]
    Vanished {
        /// The secret's file.
        path: PathBuf,
    },
}

impl SignError {
    /// The exit code: bad input, except the secret vanishing under us.
    pub fn exit_code(&self) -> u8 {
        match self {
            SignError::Vanished { .. } => EXIT_FAILURE,
            SignError::EmptySecret | SignError::NoFleetSecret => EXIT_USAGE,
        }
    }
}
