//! `app lock acquire | release | list | run`.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::Cause;

use super::context::Context;
use super::output::{self, outln};
use crate::error::{Error, IoContext, Result};
use crate::fleet_holds::{BeatTarget, HostBeat};
use crate::ids::LockName;
use crate::lock::{self, Holder, LockStore, Released, Request};
use crate::process::{self, ProcessIdentity};

/// "Forever" for an acquire without --timeout (about 30 years).
const FOREVER: Duration = Duration::from_secs(1 << 30);

/// Subcommands of `app lock`.
#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Take a named lock for the calling instance (or, outside one, the calling shell); prints
    /// the fencing token.
    Acquire {
        /// Lock name, e.g. db-schema or Cargo.lock.
        name: String,
        /// Give up after DUR (exit 3); default: wait as long as it takes.
        #[arg(long, value_name = "DUR", value_parser = super::instance::parse_duration)]
        timeout: Option<Duration>,
        /// Let the hold run out by itself after DUR (at most 365d).
        #[arg(long, value_name = "DUR", value_parser = super::instance::parse_ttl)]
        ttl: Option<Duration>,
        /// Keep it in the fleet's database, one holder across every host (needs APP_DB_URL).
        #[arg(long)]
        fleet: bool,
    },
    /// Release a lock the caller holds.
    Release {
        /// Lock name.
        name: String,
        /// Release it even when someone else holds it.
        #[arg(long)]
        force: bool,
        /// Keep it in the fleet's database, one holder across every host (needs APP_DB_URL).
        #[arg(long)]
        fleet: bool,
    },
    /// Every lock with its holder and last fencing token.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Keep it in the fleet's database, one holder across every host (needs APP_DB_URL).
        #[arg(long)]
        fleet: bool,
    },
    /// Hold a lock while CMD runs (like flock(1)); exits with CMD's code.
    Run {
        /// Lock name.
        name: String,
        /// Give up after DUR (exit 3); default: wait as long as it takes.
        #[arg(long, value_name = "DUR", value_parser = super::instance::parse_duration)]
        timeout: Option<Duration>,
        /// Keep it in the fleet's database, one holder across every host (needs APP_DB_URL).
        #[arg(long)]
        fleet: bool,
        /// The command, after '--'.
        #[arg(value_name = "CMD", required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
}

pub(super) fn run(ctx: &Context, command: LockCommand) -> Result<u8> {
    let cwd = super::current_dir()?;
    // Parsed before anything else, so a bad name is the first error wherever the command runs.
    let lock = match &command {
        LockCommand::Acquire { name, .. }
        | LockCommand::Release { name, .. }
        | LockCommand::Run { name, .. } => Some(LockName::parse(name)?),
        LockCommand::List { .. } => None,
    };
    let lock = || {
        lock.clone()
            .expect("parsed above for every command naming a lock")
    };
    let repo = ctx.repo_at(cwd)?;
    let fleet = match &command {
        LockCommand::Acquire { fleet, .. }
        | LockCommand::Release { fleet, .. }
        | LockCommand::List { fleet, .. }
        | LockCommand::Run { fleet, .. } => *fleet,
    };
    let coordination = repo.coordination_in(fleet.then(|| ctx.fleet()).transpose()?);
    let locks = || coordination.locks();
    // A fleet holder is named by this host's fleet name.
    let caller = || -> Result<Holder> {
        let mut holder = repo.caller_holder(&repo.snapshot()?)?;
        if fleet {
            holder.host = ctx.settings.fleet_host.clone();
        }
        Ok(holder)
    };
    match command {
        LockCommand::Acquire {
            name, timeout, ttl, ..
        } => {
            let holder = caller()?;
            let token = locks()?.acquire(&Request {
                name: lock(),
                holder: holder.clone(),
                ttl,
                timeout: timeout.unwrap_or(FOREVER),
            })?;
            outln!("{token}");
            eprintln!("app: lock {name:?} held by {holder} (token {token})");
            Ok(0)
        }
        LockCommand::Release { name, force, .. } => {
            match locks()?.release(&lock(), &caller()?, force)? {
                Released::Released => eprintln!("app: lock {name:?} released"),
                Released::NotHeld => eprintln!("app: lock {name:?} was not held"),
            }
            Ok(0)
        }
        LockCommand::List { json, .. } => {
            // Listing creates nothing: where no lock was ever taken there is nothing to list.
            let (all, waiters) = match coordination.existing_locks()? {
                Some(locks) => (locks.list()?, locks.waiters()?),
                None => (Vec::new(), Vec::new()),
            };
            list(all, &waiters, json)
        }
        LockCommand::Run {
            timeout, command, ..
        } => {
            // A fleet hold lives while this host's heartbeat does: this process renews it
            // (when no other process of the host does) for as long as it holds the lock.
            let beat = fleet.then(|| ctx.beat_target()).transpose()?;
            run_locked(locks()?, lock(), timeout.unwrap_or(FOREVER), &command, beat)
        }
    }
}

fn list(
    all: Vec<(lock::LockState, Option<String>)>,
    waiters: &[lock::Waiter],
    json: bool,
) -> Result<u8> {
    let waiting = |name: &LockName| -> Vec<&lock::Waiter> {
        waiters.iter().filter(|w| &w.name == name).collect()
    };
    if json {
        let values: Vec<serde_json::Value> = all
            .iter()
            .map(|(state, lapsed)| {
                let mut value = serde_json::to_value(state).expect("lock states serialize");
                value["lapsed"] = serde_json::json!(lapsed);
                value["waiters"] = serde_json::json!(waiting(&state.name));
                value
            })
            .collect();
        output::json(&values);
        return Ok(0);
    }
    for (state, lapsed) in all {
        let name = state.name.clone();
        match (&state.holder, lapsed) {
            (None, _) => outln!("{} free (last token {})", state.name, state.token),
            (Some(holder), None) => outln!(
                "{} held by {holder} since {} (token {}){}",
                state.name,
                state
                    .acquired_at
                    .map_or_else(String::new, |t| t.to_string()),
                state.token,
                state
                    .expires_at
                    .map_or_else(String::new, |t| format!(", expires {t}"))
            ),
            (Some(holder), Some(reason)) => outln!(
                "{} lapsed: was held by {holder} (token {}); {reason}",
                state.name,
                state.token
            ),
        }
        for waiter in waiting(&name) {
            outln!("  waiting: {} since {}", waiter.holder, waiter.since);
        }
    }
    Ok(0)
}

/// `app lock run`: this process holds the lock while its child runs.
fn run_locked(
    locks: Box<dyn LockStore>,
    name: LockName,
    timeout: Duration,
    command: &[String],
    beat: Option<BeatTarget>,
) -> Result<u8> {
    let guard = lock::hold(
        locks,
        &Request {
            name: name.clone(),
            holder: Holder::process(ProcessIdentity::current()),
            ttl: None,
            timeout,
        },
    )?;
    let beat = beat.map(HostBeat::start).transpose()?;
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP])
        .io_context("installing signal handlers for", "app lock run")?;
    let child = process::Child::spawn(
        Command::new(&command[0])
            .args(&command[1..])
            .env("APP_LOCK_NAME", &name)
            .env("APP_LOCK_TOKEN", guard.token().to_string()),
    )
    .map_err(|source| Error::Spawn {
        command: command[0].clone(),
        source,
    })?;
    let child = Arc::new(child);
    let handle = signals.handle();
    let forwarder = {
        let child = Arc::clone(&child);
        std::thread::spawn(move || {
            for origin in signals.forever() {
                // A terminal's signal already reached the whole foreground group, the child too.
                if matches!(origin.cause, Cause::Kernel) {
                    continue;
                }
                if let Ok(signal) = Signal::try_from(origin.signal) {
                    child.signal(signal);
                }
            }
        })
    };
    let status = child.wait().io_context("waiting for", &command[0]);
    handle.close();
    let _ = forwarder.join();
    drop(guard);
    if let Some(beat) = beat {
        beat.stop();
    }
    Ok(process::exit_code(status?))
}
