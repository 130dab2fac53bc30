//! `app mcp`: the MCP server over stdio (docs/MCP.md).

use clap::Args;

use super::context::Context;
use super::output;
use crate::error::{Error, IoContext, Result};
use crate::ids::InstanceId;
use crate::instance::{self, RunOptions};

/// Arguments of `app mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// Print the snippet that adds app to an MCP client's configuration, and exit.
    #[arg(long)]
    print_config: bool,
    /// Outside any instance: the id to register this server's own instance under (default: a
    /// random one).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Set by the instance `app mcp` registers for itself: serve for APP_INSTANCE_ID only.
    #[arg(long, hide = true)]
    registered: bool,
}

pub(super) fn mcp(ctx: &Context, args: McpArgs) -> Result<u8> {
    let app = std::env::current_exe().io_context("finding", "the app binary")?;
    if args.print_config {
        output::json(&crate::mcp::client_config(&app));
        return Ok(0);
    }
    let repo = ctx.repo()?;
    let snapshot = repo.snapshot()?;
    let db = ctx.db.clone();
    if let Some(record) = repo.caller(&snapshot) {
        if let Some(name) = &args.name
            && *name != record.id
        {
            return Err(Error::bad_input(format!(
                "--name {name} is for a server started outside any instance, but this one runs in instance {}; drop --name",
                record.id
            )));
        }
        crate::mcp::serve(repo.paths, record.id, ctx.settings.clone(), db)?;
        return Ok(0);
    }
    if args.registered {
        return Err(Error::Failed(
            "the instance registered for this MCP server is gone from the registry".into(),
        ));
    }
    // Outside any instance: register one without a worktree, with this server as its command,
    // so the others can see and message it.
    let mut command = vec![
        app.display().to_string(),
        "mcp".into(),
        "--registered".into(),
    ];
    if let Some(db) = &db {
        command.extend(["--db".into(), db.display().to_string()]);
    }
    let options = RunOptions {
        name: args.name.as_deref().map(InstanceId::parse).transpose()?,
        mode: instance::Mode::InPlace,
        command,
        db,
        ..RunOptions::default()
    };
    Ok(instance::run(&repo.cwd, &options, &ctx.settings)?.exit_code)
}
