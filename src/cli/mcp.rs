//! `app mcp`: the MCP server over stdio (docs/MCP.md).

use std::path::PathBuf;

use clap::Args;

use crate::config::Timing;
use crate::error::{Error, IoContext, Result};
use crate::instance::{self, RunOptions};
use crate::paths::AppPaths;
use crate::registry::Registry;

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

pub(super) fn mcp(args: McpArgs, db: Option<PathBuf>) -> Result<u8> {
    let app = std::env::current_exe().io_context("finding", "the app binary")?;
    if args.print_config {
        super::print_json(&crate::mcp::client_config(&app));
        return Ok(0);
    }
    let timing = Timing::from_env()?;
    let cwd = super::current_dir()?;
    let paths = AppPaths::discover(&cwd)?;
    let snapshot = Registry::open_read_only(&paths)?.snapshot()?;
    if let Some(record) = instance::caller(&snapshot, &cwd) {
        if let Some(name) = &args.name
            && *name != record.id
        {
            return Err(Error::bad_input(format!(
                "--name {name} is for a server started outside any instance, but this one runs in instance {}; drop --name",
                record.id
            )));
        }
        crate::mcp::serve(paths, record.id, timing, db)?;
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
        name: args.name,
        mode: instance::Mode::InPlace,
        command,
        db,
        ..RunOptions::default()
    };
    Ok(instance::run(&cwd, &options, timing)?.exit_code)
}
