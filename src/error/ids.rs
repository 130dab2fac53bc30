//! What checking a user-given name (`ids`) refuses; nothing was changed (exit 2).

use super::EXIT_USAGE;

/// A name or label that is not one.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    /// Not an instance name.
    #[error(
        "invalid instance name {name:?}: use 1-64 characters from a-z, 0-9, '_' and '-', starting with a letter or digit"
    )]
    InstanceName {
        /// What was given.
        name: String,
    },
    /// Not a notes namespace.
    #[error(
        "invalid namespace {name:?}: use 1-128 characters from letters, digits and '_.:/@-', starting with a letter or digit (e.g. project:myapp or global)"
    )]
    Namespace {
        /// What was given.
        name: String,
    },
    /// An item of `--labels` without `=`.
    #[error("--labels: {item:?} is not key=value; write e.g. --labels gpu=1,os=linux")]
    LabelNotPair {
        /// The item as given.
        item: String,
    },
    /// A `--labels` key or value that is no label word.
    #[error("--labels: {reason}")]
    Label {
        /// What is wrong with it, as [`crate::ids::validate_label`] says.
        reason: String,
    },
    /// Not a fleet host name.
    #[error(
        "invalid host name {name:?}: use 1-64 of letters, digits and '_.-', starting with a letter or digit"
    )]
    HostName {
        /// What was given.
        name: String,
    },
}

impl IdError {
    /// The exit code: always bad input.
    pub fn exit_code(&self) -> u8 {
        EXIT_USAGE
    }
}
