//! `app send`, `app recv`, `app ack`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

use super::context::{Context, RepoContext};
use super::output::{self, outln};
use crate::coordination::Coordination;
use crate::db::{DbSettings, Location};
use crate::error::{EXIT_FAILURE, Error, InstanceError, Result};
use crate::ids::InstanceId;
use crate::queue::{self, Message};
use crate::registry::Snapshot;
use crate::time;

/// Arguments of `app send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Recipient: an instance id or name, or `all` for every live instance.
    #[arg(long, value_name = "ID|NAME|all")]
    to: String,
    /// Message type: a lowercase word such as text or join_request.
    #[arg(long = "type", value_name = "TYPE", default_value = "text")]
    kind: String,
    /// How long the message may wait unacknowledged (default 1h, at most 365d).
    #[arg(long, value_name = "DUR", value_parser = super::instance::parse_ttl)]
    ttl: Option<Duration>,
    /// Sender, when not run inside an instance.
    #[arg(long, value_name = "ID")]
    from: Option<String>,
    /// The payload is JSON (default: text).
    #[arg(long)]
    json: bool,
    /// With --to all, also every live instance on the fleet's other hosts (needs APP_DB_URL
    /// and APP_SHARED_SECRET). An instance id reaches its host with or without it.
    #[arg(long)]
    fleet: bool,
    /// The payload.
    #[arg(value_name = "PAYLOAD")]
    payload: String,
}

/// Arguments of `app recv`.
#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Wait for a message (for DUR, or until one arrives).
    #[arg(long, value_name = "DUR", num_args = 0..=1, default_missing_value = "forever")]
    wait: Option<String>,
    /// Keep receiving until interrupted.
    #[arg(long)]
    follow: bool,
    /// Print without acknowledging ('app ack ID' later).
    #[arg(long)]
    no_ack: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Do not use file-system events; poll every APP_POLL_INTERVAL.
    #[arg(long)]
    poll: bool,
    /// Receive for this instance, when not run inside one.
    #[arg(long = "instance", value_name = "ID")]
    instance: Option<String>,
}

/// Arguments of `app ack`.
#[derive(Debug, Args)]
pub struct AckArgs {
    /// Message ids, as 'app recv' prints them.
    #[arg(value_name = "ID", required = true)]
    ids: Vec<String>,
    /// Acknowledge for this instance, when not run inside one.
    #[arg(long = "instance", value_name = "ID")]
    instance: Option<String>,
}

fn setup(ctx: &Context) -> Result<(RepoContext<'_>, Coordination, Snapshot)> {
    let repo = ctx.repo()?;
    let snapshot = repo.snapshot()?;
    // With a server database, messages also cross to the fleet's other hosts.
    let location = Location::resolve(ctx.db_flag())?;
    let coordination = repo
        .coordination()
        .with_database(&location, DbSettings::from(&ctx.settings));
    Ok((repo, coordination, snapshot))
}

/// The instance acting: `flag`, else the calling instance; it must be registered.
fn acting(
    repo: &RepoContext<'_>,
    snapshot: &Snapshot,
    flag: Option<String>,
    what: &str,
) -> Result<InstanceId> {
    let id = match flag {
        Some(id) => id,
        None => repo
            .caller(snapshot)
            .map(|record| record.id.into_string())
            .ok_or_else(|| {
                Error::bad_input(format!(
                    "not inside an instance; run this from one (app run) or give {what}"
                ))
            })?,
    };
    let id = InstanceId::parse(&id)?;
    if snapshot.instance(&id).is_none() {
        return Err(InstanceError::Unknown { id: id.into() }.into());
    }
    Ok(id)
}

pub(super) fn send(ctx: &Context, args: SendArgs) -> Result<u8> {
    let (repo, coordination, snapshot) = setup(ctx)?;
    let payload = if args.json {
        serde_json::from_str(&args.payload).map_err(|err| {
            Error::bad_input(format!(
                "the payload is not JSON ({err}); drop --json to send text"
            ))
        })?
    } else {
        Value::String(args.payload)
    };
    let from = match args.from {
        Some(from) => from,
        None => acting(&repo, &snapshot, None, "--from")?.into(),
    };
    let broadcast = args.to == "all";
    let posted = coordination.post(
        &*coordination.roster(&snapshot),
        queue::Post {
            from,
            to: args.to,
            kind: args.kind,
            ttl: args.ttl.unwrap_or(queue::DEFAULT_TTL),
            payload,
            fleet: args.fleet,
        },
    )?;
    outln!("{}", posted.id);
    if broadcast && args.fleet {
        let here = posted
            .recipients
            .iter()
            .filter(|id| snapshot.instance(id).is_some())
            .count();
        eprintln!(
            "app: broadcast to {} live instance(s), {} of them on other hosts",
            posted.recipients.len(),
            posted.recipients.len() - here
        );
    } else if broadcast {
        eprintln!(
            "app: broadcast to {} live instance(s)",
            posted.recipients.len()
        );
    }
    Ok(0)
}

pub(super) fn recv(ctx: &Context, args: RecvArgs) -> Result<u8> {
    // The flag first: a bad one is refused before anything is looked up.
    let deadline = match args.wait.as_deref() {
        None => None,
        Some("forever") => Some(None),
        // Past what an Instant can hold is as good as forever.
        Some(text) => Some(Instant::now().checked_add(time::parse_duration(text)?)),
    };
    let (repo, coordination, snapshot) = setup(ctx)?;
    let me = acting(&repo, &snapshot, args.instance, "--instance")?;
    let poll = ctx.settings.poll_interval;
    let messages = coordination.messages()?;
    // Watch before the first scan, so nothing arriving in between is missed.
    let arrivals = if deadline.is_some() || args.follow {
        Some(messages.arrivals(&me, poll, args.poll)?)
    } else {
        None
    };
    let mut shown = HashSet::new();
    loop {
        let (pending, swept) = messages.pending(&me)?;
        if swept.quarantined + swept.expired > 0 {
            eprintln!(
                "app: moved aside {} untrusted and {} expired message(s); 'app doctor' lists them",
                swept.quarantined, swept.expired
            );
        }
        let mut printed = Vec::new();
        for message in pending {
            if !shown.insert(message.id.clone()) {
                continue;
            }
            print_message(&message, args.json);
            printed.push(message.id);
        }
        // Printed first, acknowledged second: a crash in between delivers them again.
        if !args.no_ack && !printed.is_empty() {
            messages.ack_all(&me, &printed)?;
        }
        let Some(arrivals) = &arrivals else { break };
        if !args.follow && !shown.is_empty() {
            break;
        }
        let limit = match deadline {
            Some(Some(until)) if !args.follow => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                left
            }
            _ => poll,
        };
        arrivals.wait(limit);
    }
    Ok(if shown.is_empty() { EXIT_FAILURE } else { 0 })
}

pub(super) fn ack(ctx: &Context, args: AckArgs) -> Result<u8> {
    let (repo, coordination, snapshot) = setup(ctx)?;
    let me = acting(&repo, &snapshot, args.instance, "--instance")?;
    for id in &args.ids {
        queue::validate_id(id)?;
    }
    let messages = coordination.messages()?;
    for id in &args.ids {
        if !messages.ack(&me, id)? {
            eprintln!("app: message {id} was acknowledged before");
        }
    }
    Ok(0)
}

fn print_message(message: &Message, json: bool) {
    if json {
        output::json_line(message);
        return;
    }
    let payload = match &message.payload {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    outln!("{} {} {} {payload}", message.id, message.from, message.kind);
}
