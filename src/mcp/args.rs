//! The tools' arguments (their JSON schemas are what the model sees) and the limits on them.

use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{McpError, Result};

/// The longest a call may wait (`wait_seconds`).
pub(super) const MAX_WAIT_SECONDS: f64 = 600.0;
/// The longest `ttl_seconds` (30 days).
pub(super) const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// The most patterns, paths or ids one call may carry.
pub(super) const MAX_ITEMS: usize = 256;
/// The longest `reason` of a reservation.
pub(super) const MAX_REASON_BYTES: usize = 1024;
/// The most messages one `receive_messages` returns.
pub(super) const MAX_RECEIVE: usize = 100;

/// The arguments of a tool that takes none: an empty object (or none at all).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoArgs {}

/// Arguments of `list_locks` and `list_reservations`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListArgs {
    /// List the fleet's, in its shared database (needs a server database; default false:
    /// this repository's own).
    #[serde(default)]
    pub fleet: bool,
}

/// Arguments of `list_instances`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListInstancesArgs {
    /// Also list instances whose process is gone or whose heartbeat is stale (default false).
    #[serde(default)]
    pub include_stale: bool,
}

/// Arguments of `status`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatusArgs {
    /// Your state: "working", "idle" or "needs-input" (you wait for your human).
    pub state: String,
    /// Why, in one line (e.g. "waiting for review of the schema change").
    #[serde(default)]
    pub message: Option<String>,
}

/// Arguments of `send_message`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendArgs {
    /// Recipient: an instance id as list_instances shows it, or "all" for every other live
    /// instance.
    pub to: String,
    /// The content: a string for plain text, or any JSON value. At most APP_MAX_MESSAGE_BYTES
    /// (default 1024) bytes as JSON.
    pub payload: Value,
    /// Message type: a lowercase word such as "text", "question", "handoff" (default "text").
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// How long the message may wait unacknowledged before it expires (default 3600).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// With to "all", also every live instance on the fleet's other hosts (needs a server
    /// database and APP_SHARED_SECRET; default false). An instance id reaches its host either
    /// way.
    #[serde(default)]
    pub fleet: bool,
}

/// Arguments of `receive_messages`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReceiveArgs {
    /// Wait up to this many seconds (0-600) for a message when none is pending (default 0:
    /// return at once).
    #[serde(default)]
    pub wait_seconds: Option<f64>,
    /// Acknowledge the returned messages at once, so they are not returned again (default
    /// false: call ack_message after handling them).
    #[serde(default)]
    pub ack: bool,
    /// The most messages to return, oldest first (1-100, default 20).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Arguments of `ack_message`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AckArgs {
    /// Ids of messages receive_messages returned.
    pub ids: Vec<String>,
}

/// Arguments of `acquire_lock`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcquireArgs {
    /// Lock name: letters, digits, '_', '.', '-' (e.g. "db-schema", "Cargo.lock").
    pub name: String,
    /// Wait up to this many seconds (0-600) while another instance holds it (default 0: fail
    /// at once, naming the holder).
    #[serde(default)]
    pub wait_seconds: Option<f64>,
    /// Let the hold run out by itself after this many seconds (default: held until released
    /// or this instance ends).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Keep it in the fleet's shared database, across every host (needs a server database;
    /// default false: this repository's own).
    #[serde(default)]
    pub fleet: bool,
}

/// Arguments of `release_lock`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseLockArgs {
    /// Lock name, as acquired.
    pub name: String,
    /// Keep it in the fleet's shared database, across every host (needs a server database;
    /// default false: this repository's own).
    #[serde(default)]
    pub fleet: bool,
}

/// Arguments of `reserve_paths`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReserveArgs {
    /// Paths or globs relative to the repository root: "src/db/**", "Cargo.lock", "docs/".
    pub patterns: Vec<String>,
    /// Shared: other shared reservations may overlap it; exclusive ones may not (default
    /// false: exclusive).
    #[serde(default)]
    pub shared: bool,
    /// Let the reservation run out by itself after this many seconds (default: until
    /// released or this instance ends).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Why, for the other agents (at most 1024 bytes).
    #[serde(default)]
    pub reason: Option<String>,
    /// Keep it in the fleet's shared database, across every host (needs a server database;
    /// default false: this repository's own).
    #[serde(default)]
    pub fleet: bool,
}

/// Arguments of `release_paths`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleasePathsArgs {
    /// The patterns to release, exactly as reserved (default: every reservation of this
    /// instance).
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Keep it in the fleet's shared database, across every host (needs a server database;
    /// default false: this repository's own).
    #[serde(default)]
    pub fleet: bool,
}

/// Arguments of `check_paths`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckPathsArgs {
    /// Files relative to the repository root (or absolute inside this instance's worktree).
    pub paths: Vec<String>,
}

/// Arguments of `remember`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RememberArgs {
    /// Namespace: letters, digits and '_ . : / @ -', e.g. "project:myapp" or "global".
    pub namespace: String,
    /// The note (at most 64 KiB).
    pub content: String,
}

/// Arguments of `recall`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecallArgs {
    /// Namespace to search.
    pub namespace: String,
    /// Words that must all occur in a note.
    pub query: String,
    /// The most notes to return, best first (default 10).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// `wait_seconds` as a duration: 0 to [`MAX_WAIT_SECONDS`].
pub(super) fn wait(seconds: Option<f64>) -> Result<Duration> {
    let seconds = seconds.unwrap_or(0.0);
    if !(0.0..=MAX_WAIT_SECONDS).contains(&seconds) {
        return Err(McpError::Wait {
            seconds,
            max: MAX_WAIT_SECONDS,
        }
        .into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `ttl_seconds` as a duration: 1 to [`MAX_TTL_SECONDS`].
pub(super) fn ttl(seconds: Option<u64>) -> Result<Option<Duration>> {
    match seconds {
        None => Ok(None),
        Some(s) if (1..=MAX_TTL_SECONDS).contains(&s) => Ok(Some(Duration::from_secs(s))),
        Some(seconds) => Err(McpError::Ttl {
            seconds,
            max: MAX_TTL_SECONDS,
        }
        .into()),
    }
}

pub(super) fn check_count(what: &str, count: usize) -> Result<()> {
    if count > MAX_ITEMS {
        return Err(McpError::TooMany {
            count,
            what: what.to_string(),
            max: MAX_ITEMS,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_and_ttls_are_bounded() {
        assert_eq!(wait(None).unwrap(), Duration::ZERO);
        assert_eq!(wait(Some(1.5)).unwrap(), Duration::from_millis(1500));
        assert!(wait(Some(-1.0)).is_err());
        assert!(wait(Some(601.0)).is_err());
        assert!(wait(Some(f64::NAN)).is_err());
        assert_eq!(ttl(None).unwrap(), None);
        assert!(ttl(Some(0)).is_err());
        assert!(ttl(Some(MAX_TTL_SECONDS + 1)).is_err());
        assert!(check_count("paths", MAX_ITEMS).is_ok());
        assert!(check_count("paths", MAX_ITEMS + 1).is_err());
    }
}
