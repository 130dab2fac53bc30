//! What reading or updating a signed registry file (`registry`) fails at.

use std::path::PathBuf;

use super::EXIT_FAILURE;

/// A registry file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Written by a newer `app`.
    #[error(
        "{} has format version {version}, newer than this app understands ({understood}); upgrade app",
        path.display()
    )]
    NewerFormat {
        /// The registry file.
        path: PathBuf,
        /// Its format version.
        version: u32,
        /// The newest version this app reads.
        understood: u32,
    },
    /// An update through a registry opened without its key (a bug in app).
    #[error("the registry was opened read-only; this is a bug in app")]
    ReadOnly,
}

impl RegistryError {
    /// The exit code: always a failure.
    pub fn exit_code(&self) -> u8 {
        EXIT_FAILURE
    }
}
