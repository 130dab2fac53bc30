//! Signals and stop requests while an instance runs.
//!
//! Invariants:
//! - From the moment [`Forwarder::start`] returns, signals are the instance's: one arriving
//!   before the command starts cancels the run.
//! - SIGINT, SIGTERM and SIGHUP sent to the supervisor are forwarded to the command, except
//!   those the terminal already delivered to the whole foreground process group (forwarding
//!   them would deliver a Ctrl-C twice).
//! - A signal sent to the supervisor itself is a stop request: the command gets it, and is
//!   SIGKILLed when it outlives the stop timeout; a second request kills it at once. `app
//!   serve` has no command: any signal stops it.
//! - The command is a [`process::Child`]: once reaped, nothing signals its pid.

use std::io;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use nix::sys::signal::Signal;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::{Handle, SignalsInfo};
use signal_hook::low_level::siginfo::Cause;

use crate::error::{IoContext, Result};
use crate::process;
use crate::stop::Stopper;

/// The command as the signal thread sees it, and the stop requests so far.
#[derive(Debug, Default)]
struct ChildSlot {
    /// Signalled only until it is reaped, so a recycled pid is never signalled.
    child: Option<Arc<process::Child>>,
    /// A signal that arrived before the child existed: the run is cancelled.
    pending: Option<i32>,
    /// Stop requests: signals sent to the supervisor itself, or any signal to `app serve`.
    stops: u32,
    /// The signal of the latest stop request (SIGTERM for one from inside `app`).
    last_request: Option<i32>,
}

/// The slot shared by the supervisor, the signal thread and the control socket.
#[derive(Debug)]
pub(super) struct Slot {
    state: Mutex<ChildSlot>,
    /// Stopped by the first stop request (what `app serve` waits for).
    requested: Stopper,
    /// How long a stop request waits for a command before killing it.
    pub(super) stop_timeout: Duration,
}

/// How starting the command under the slot went.
pub(super) enum Spawned {
    /// It runs.
    Running(Arc<process::Child>),
    /// It could not be started.
    Failed(io::Error),
    /// A signal arrived before it could start: the run is cancelled.
    Cancelled(i32),
}

impl Slot {
    pub(super) fn new(stop_timeout: Duration) -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(ChildSlot::default()),
            requested: Stopper::new(),
            stop_timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ChildSlot> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Starts `command`, unless a signal already cancelled the run: under the slot's lock, so
    /// every signal either cancels the run or reaches the command.
    pub(super) fn spawn(&self, command: &mut Command) -> Spawned {
        let mut state = self.lock();
        if let Some(signal) = state.pending {
            return Spawned::Cancelled(signal);
        }
        match process::Child::spawn(command) {
            Ok(child) => {
                let child = Arc::new(child);
                state.child = Some(Arc::clone(&child));
                Spawned::Running(child)
            }
            Err(err) => Spawned::Failed(err),
        }
    }

    /// The signal that cancelled the run before its command started, if one did.
    pub(super) fn cancelled(&self) -> Option<i32> {
        self.lock().pending
    }

    /// Whether a second stop request asked to stop at once.
    pub(super) fn forced(&self) -> bool {
        self.lock().stops >= 2
    }

    /// How many stop requests came, and the signal of the latest (a hosted loop's view).
    pub(super) fn requests(&self) -> (u32, Option<i32>) {
        let state = self.lock();
        (state.stops, state.last_request)
    }

    /// Blocks until the first stop request (`app serve`).
    pub(super) fn wait_for_stop(&self) {
        self.requested.token().wait();
    }

    /// A stop request from inside `app` (the control socket's `stop`, `--timeout`): as a
    /// SIGTERM sent to the supervisor.
    pub(super) fn request_stop(self: &Arc<Slot>) {
        deliver(self, SIGTERM, false);
    }

    /// After `limit`, a stop request when `child` still runs; the returned flag says whether
    /// that happened.
    pub(super) fn arm_deadline(
        self: &Arc<Slot>,
        child: &Arc<process::Child>,
        limit: Duration,
    ) -> Arc<AtomicBool> {
        let timed_out = Arc::new(AtomicBool::new(false));
        let (slot, flag, child) = (Arc::clone(self), Arc::clone(&timed_out), Arc::clone(child));
        thread::spawn(move || {
            thread::sleep(limit);
            if !child.reaped() {
                tracing::debug!(
                    pid = child.id(),
                    "the command outlived its --timeout; stopping it"
                );
                flag.store(true, Ordering::SeqCst);
                slot.request_stop();
            }
        });
        timed_out
    }
}

/// The thread that receives SIGINT, SIGTERM and SIGHUP for the instance.
pub(super) struct Forwarder {
    handle: Handle,
    thread: thread::JoinHandle<()>,
}

impl Forwarder {
    /// Installs the handlers: from here on a signal reaches the command, or cancels the run.
    pub(super) fn start(slot: &Arc<Slot>) -> Result<Forwarder> {
        let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP])
            .io_context("installing signal handlers for", "app run")?;
        let handle = signals.handle();
        let slot = Arc::clone(slot);
        let thread = thread::spawn(move || {
            for origin in signals.forever() {
                // A terminal's Ctrl-C or hangup reaches the whole foreground process group, the
                // command included: forwarding it would deliver it twice.
                deliver(&slot, origin.signal, matches!(origin.cause, Cause::Kernel));
            }
        });
        Ok(Forwarder { handle, thread })
    }

    /// Uninstalls the handlers and ends the thread.
    pub(super) fn close(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

/// Sends `signal` to the command, or cancels the run when there is no command yet. A signal
/// that `reached_group` already is only recorded. A signal meant for the supervisor itself is a
/// stop request: the first arms a SIGKILL after the stop timeout, a second one kills at once.
fn deliver(slot: &Arc<Slot>, signal: i32, reached_group: bool) {
    let mut state = slot.lock();
    let request = !reached_group || state.child.is_none();
    if request {
        state.stops += 1;
        state.last_request = Some(signal);
        slot.requested.stop();
    }
    match &state.child {
        None => {
            state.pending.get_or_insert(signal);
        }
        Some(child) if !reached_group => {
            let signal = if state.stops >= 2 {
                Signal::SIGKILL
            } else {
                match Signal::try_from(signal) {
                    Ok(signal) => signal,
                    Err(_) => return,
                }
            };
            if child.signal(signal) && state.stops == 1 {
                kill_after(Arc::clone(child), slot.stop_timeout);
            }
        }
        Some(_) => {}
    }
}

/// SIGKILLs `child` when it still runs after `timeout`.
fn kill_after(child: Arc<process::Child>, timeout: Duration) {
    thread::spawn(move || {
        thread::sleep(timeout);
        if !child.reaped() {
            tracing::warn!(
                pid = child.id(),
                "the command outlived the stop timeout; killing it"
            );
            child.signal(Signal::SIGKILL);
        }
    });
}
