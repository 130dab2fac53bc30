//! `app instance stop`: a stop request to a live instance, escalated to SIGKILL.
//!
//! Invariant: only a still-matching process identity is signalled (see
//! [`ProcessIdentity::signal`]), so a supervisor or command whose pid was reused is never hit.

use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::config::Timing;
use crate::control;
use crate::error::{InstanceError, Result};
use crate::ids::InstanceId;
use crate::process::{Presence, ProcessIdentity};
use crate::registry::{Liveness, Registry};

/// How `app instance stop` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The instance stopped after SIGTERM.
    Terminated,
    /// The command had to be killed with SIGKILL.
    Killed,
}

/// How `stop` asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRoute {
    /// Through the instance's control socket.
    Socket,
    /// With a signal to its supervisor (no control socket answered).
    Signal,
}

/// Stops a live instance: asks its supervisor through the control socket to SIGTERM the
/// command (or, when no socket answers, sends SIGTERM to the supervisor, which forwards it),
/// then after `timeout` SIGKILL to the command, and to the supervisor if it still does not exit.
pub fn stop(
    registry: &Registry,
    id: &InstanceId,
    timeout: Duration,
    timing: Timing,
) -> Result<(StopOutcome, StopRoute)> {
    let snapshot = registry.snapshot()?;
    let record = snapshot
        .instance(id)
        .ok_or_else(|| InstanceError::Unknown { id: id.to_string() })?
        .clone();
    if let Liveness::Stale(reason) = record.liveness(timing.stale_after) {
        return Err(InstanceError::NotRunning {
            id: id.to_string(),
            reason,
        }
        .into());
    }
    let supervisor = record.identity();
    let route = match control::request_stop(&registry.paths().control_socket(id)) {
        Ok(()) => StopRoute::Socket,
        Err(err) => {
            tracing::debug!(instance = %id, %err, "no control socket answered; signalling");
            supervisor.signal(Signal::SIGTERM);
            StopRoute::Signal
        }
    };
    if wait_gone(&supervisor, timeout) {
        return Ok((StopOutcome::Terminated, route));
    }
    // A second request forces the supervisor's own stop: it kills its command and what runs
    // through its socket at once instead of waiting out its --stop-timeout.
    let socket = registry.paths().control_socket(id);
    if control::request_stop(&socket).is_err() {
        supervisor.signal(Signal::SIGTERM);
    }
    if let (Some(pid), Some(start_time)) = (record.child_pid, record.child_start_time) {
        let child = ProcessIdentity {
            pid,
            start_time,
            boot_id: record.boot_id.clone(),
        };
        child.signal(Signal::SIGKILL);
    }
    // The supervisor cleans up once its command is gone; give it a moment before forcing.
    if !wait_gone(&supervisor, Duration::from_secs(5)) {
        supervisor.signal(Signal::SIGKILL);
        wait_gone(&supervisor, Duration::from_secs(2));
    }
    Ok((StopOutcome::Killed, route))
}

fn wait_gone(identity: &ProcessIdentity, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if identity.presence() != Presence::Running {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
