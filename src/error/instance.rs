//! What registering, finding and reaching instances (`instance`) refuses or fails at.

use super::{EXIT_BUSY, EXIT_FAILURE, EXIT_USAGE};

/// What an instance operation refused.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// No instance with that id is registered.
    #[error(
        "no instance {id} is registered in this repository; 'app instance list --all' shows every entry"
    )]
    Unknown {
        /// The id that was asked for.
        id: String,
    },
    /// `app run` without a command.
    #[error("no command given; write it after '--', e.g. app run -- bash")]
    NoCommand,
    /// Sixteen random ids were all taken.
    #[error("could not find an unused instance id")]
    NoFreeId,
    /// The name asked for is held by a live instance (seen before anything was made).
    #[error(
        "instance name {name:?} is held by a live instance (pid {pid}, started {started}); pick another --instance or stop it with 'app instance stop {name}'"
    )]
    NameHeld {
        /// The name.
        name: String,
        /// Its supervisor's pid.
        pid: u32,
        /// When it registered.
        started: String,
    },
    /// The name was taken by a live instance while this one was being prepared.
    #[error(
        "instance name {name:?} is held by a live instance (pid {pid}); pick another --instance"
    )]
    NameTaken {
        /// The name.
        name: String,
        /// Its supervisor's pid.
        pid: u32,
    },
    /// The registry's entry under that id does not verify.
    #[error(
        "the registry holds an entry for {id:?} that does not verify; run 'app doctor' to see it"
    )]
    Unverified {
        /// The id.
        id: String,
    },
    /// Another live instance holds the branch.
    #[error("branch {branch} is held by live instance {holder} (pid {pid}); pick another --branch")]
    BranchHeld {
        /// The branch.
        branch: String,
        /// The instance holding it.
        holder: String,
        /// Its supervisor's pid.
        pid: u32,
    },
    /// Not enough consecutive free ports to lease.
    #[error(
        "no {count} consecutive free ports in {low}-{high}; ask for fewer or set APP_PORT_RANGE"
    )]
    NoPorts {
        /// How many were asked for.
        count: usize,
        /// The range's first port.
        low: u16,
        /// The range's last port.
        high: u16,
    },
    /// A stop asked of an instance that is not running.
    #[error("instance {id} is not running ({reason}); 'app doctor --fix' reclaims what it left")]
    NotRunning {
        /// The instance.
        id: String,
        /// Why it counts as stale.
        reason: String,
    },
    /// An exec asked of an instance that is not running.
    #[error("instance {id} is not running ({reason}); 'app doctor' reclaims what it left")]
    NotRunningForExec {
        /// The instance.
        id: String,
        /// Why it counts as stale.
        reason: String,
    },
    /// An exec in every live instance, and none is live.
    #[error("no live instance to run it in; 'app instance list' shows them")]
    NoneLive,
    /// A database row or a signed file of app's own holds an instance id that is none.
    #[error("{what} holds {id:?}, which is no instance id; run 'app doctor' to see it")]
    BadStoredId {
        /// The id as stored.
        id: String,
        /// Where it was read, e.g. "the fleet's instances table".
        what: &'static str,
    },
    /// `app status` outside any instance, without `--instance`.
    #[error(
        "app status reports the state of the instance it runs in, and this is not inside one (no APP_INSTANCE_ID, not in an instance's worktree); run it from an instance's command or name one with --instance ID"
    )]
    StatusOutside,
    /// `app status` with a word that is not a state an agent reports.
    #[error("unknown state {word:?}; report one of working, idle, needs-input")]
    UnknownState {
        /// What was given.
        word: String,
    },
    /// `app status` for an instance another host runs (its supervisor derives its state there).
    #[error(
        "instance {id} runs on host {host}; its state is derived there, so report it from that host"
    )]
    StatusElsewhere {
        /// The instance.
        id: String,
        /// Its host.
        host: String,
    },
    /// `app status` for an instance that is not running.
    #[error("instance {id} is not running ({reason}); nothing was reported")]
    StatusNotRunning {
        /// The instance.
        id: String,
        /// Why it is not live.
        reason: String,
    },
}

impl InstanceError {
    /// The exit code: bad input, held by someone else, or a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            InstanceError::Unknown { .. }
            | InstanceError::NoCommand
            | InstanceError::StatusOutside
            | InstanceError::UnknownState { .. }
            | InstanceError::StatusElsewhere { .. } => EXIT_USAGE,
            InstanceError::NameHeld { .. }
            | InstanceError::NameTaken { .. }
            | InstanceError::BranchHeld { .. }
            | InstanceError::NoPorts { .. } => EXIT_BUSY,
            InstanceError::NoFreeId
            | InstanceError::Unverified { .. }
            | InstanceError::NotRunning { .. }
            | InstanceError::NotRunningForExec { .. }
            | InstanceError::NoneLive
            | InstanceError::BadStoredId { .. }
            | InstanceError::StatusNotRunning { .. } => EXIT_FAILURE,
        }
    }
}
