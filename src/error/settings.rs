//! What reading the settings from the environment (`config`) refuses: each names its variable.

use super::EXIT_USAGE;

/// A setting that is set but cannot be used; nothing was changed (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The value is not valid UTF-8.
    #[error("{var} is not valid UTF-8")]
    NotUtf8 {
        /// The variable.
        var: &'static str,
    },
    /// The value is no duration (or too long a one).
    #[error("{var}: {reason}")]
    Duration {
        /// The variable.
        var: &'static str,
        /// What is wrong with it, as [`crate::time`] says.
        reason: String,
    },
    /// A duration that must not be zero is.
    #[error("{var} must be greater than zero")]
    Zero {
        /// The variable.
        var: &'static str,
    },
    /// The fleet's lease is shorter than a second.
    #[error("{var} must be at least 1s (hosts renew their leases every third of it)")]
    LeaseTooShort {
        /// The variable.
        var: &'static str,
    },
    /// A duration below its least useful value.
    #[error("{var} must be at least {min}")]
    TooShort {
        /// The variable.
        var: &'static str,
        /// The least value, as written.
        min: &'static str,
    },
    /// The value is no number of bytes above zero.
    #[error("{var}={value:?} is not a positive number of bytes")]
    NotPositive {
        /// The variable.
        var: &'static str,
        /// The value as set.
        value: String,
    },
    /// The value is no `LOW-HIGH` port range.
    #[error(
        "{var}={value:?} is not a port range; write it as LOW-HIGH, e.g. {}-{}",
        example.0,
        example.1
    )]
    PortRange {
        /// The variable.
        var: &'static str,
        /// The value as set.
        value: String,
        /// The default range, shown as the example.
        example: (u16, u16),
    },
    /// The value is no host name.
    #[error("{var}: {reason}")]
    HostName {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No `APP_HOME` and no home directory: nowhere for the default database.
    #[error(
        "cannot find a home directory for the default database; set APP_HOME, APP_DB_PATH or --db"
    )]
    NoHome,
}

impl SettingsError {
    /// The exit code: always bad input.
    pub fn exit_code(&self) -> u8 {
        EXIT_USAGE
    }
}
