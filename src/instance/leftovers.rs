//! What the command left running when it exited.
//!
//! Invariant: the supervisor is the subreaper of the command's whole process tree, so it finds
//! everything the command left behind, also what called `setsid`; by default all of it is
//! stopped before anything looks at the worktree, so nothing writes there after the clean check.

use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::signals::Slot;
use crate::process::{self, ProcessIdentity};

/// "pid 12 (sh), pid 13 (sleep)".
pub(super) fn describe(left: &[ProcessIdentity]) -> String {
    left.iter()
        .map(|p| format!("pid {} ({})", p.pid, process::command_name(p.pid)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stops what the command left running: SIGTERM, then SIGKILL after the stop timeout (at once
/// on a second stop request), waiting until none is left. With `keep_running` they are left
/// alone; returns them described then.
pub(super) fn settle(slot: &Slot, keep_running: bool) -> Option<Vec<ProcessIdentity>> {
    process::reap_orphans();
    let left = process::descendants();
    if left.is_empty() {
        return None;
    }
    if keep_running {
        return Some(left);
    }
    tracing::debug!(left = %describe(&left), "stopping what the command left behind");
    for (signal, grace) in [
        (Signal::SIGTERM, slot.stop_timeout),
        (Signal::SIGKILL, Duration::from_secs(5)),
    ] {
        for process in process::descendants() {
            process.signal(signal);
        }
        if all_gone(slot, signal, grace) {
            return None;
        }
    }
    None
}

/// Waits up to `grace` (less when a second stop request comes during the SIGTERM round) for
/// no descendant to be left; whether none is.
fn all_gone(slot: &Slot, signal: Signal, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        process::reap_orphans();
        let left = process::descendants();
        if left.is_empty() {
            return true;
        }
        if Instant::now() >= deadline || (signal == Signal::SIGTERM && slot.forced()) {
            if signal == Signal::SIGKILL {
                tracing::warn!(left = %describe(&left), "processes the command left behind did not stop");
            }
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
