//! `app status needs-input|working|idle [MESSAGE]`: an agent reports its state
//! (docs/AGENT-STATE.md), for hooks to call.

use clap::Args;

use super::context::Context;
use super::output::outln;
use crate::activity::{self, AgentState};
use crate::error::{InstanceError, Result};
use crate::ids::InstanceId;

/// Arguments of `app status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The state: working, idle or needs-input.
    #[arg(value_name = "STATE")]
    state: String,
    /// Why, in one line (words are joined with spaces).
    #[arg(value_name = "MESSAGE", trailing_var_arg = true)]
    message: Vec<String>,
    /// The instance (default: the one this runs in, by APP_INSTANCE_ID or the worktree).
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
}

pub(super) fn status(ctx: &Context, args: StatusArgs) -> Result<u8> {
    // Bad input is refused before anything is looked at.
    let state = AgentState::parse_reported(&args.state)?;
    if let Some(id) = &args.instance {
        InstanceId::parse(id)?;
    }
    let repo = ctx.repo()?;
    let snapshot = repo.snapshot()?;
    let record = match &args.instance {
        Some(id) => snapshot
            .instance(id)
            .cloned()
            .ok_or_else(|| InstanceError::Unknown { id: id.clone() })?,
        None => repo.caller(&snapshot).ok_or(InstanceError::StatusOutside)?,
    };
    let message = args.message.join(" ");
    let message = (!message.trim().is_empty()).then_some(message.as_str());
    let stale_after = ctx.settings.timing.stale_after;
    let report = activity::report(&repo.paths, &record, stale_after, (state, message))?;
    outln!("{} {}", record.id, report.state);
    Ok(0)
}
