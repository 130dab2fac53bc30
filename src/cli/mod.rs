//! The command line: argument definitions (`clap` derive) and everything printed to the
//! terminal. The only module that prints; the rest of the library returns values. What goes to
//! standard output goes through [`output`] (`println!` is denied here).

#![deny(clippy::print_stdout)]

mod context;
mod dash;
mod db;
mod doctor;
mod events;
mod fleet;
mod instance;
mod lock;
mod mcp;
mod notes;
mod orchestrate;
mod output;
mod queue;
mod reserve;
mod run;
mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use self::context::{Context, current_dir};
use crate::config::Settings;
use crate::error::Result;

/// Coordinate many agents working on one git repository at once.
#[derive(Debug, Parser)]
#[command(name = "app", version, about, long_about = None)]
pub struct Cli {
    /// The shared database file (default: APP_DB_URL, APP_DB_PATH, DATABASE_URL, else app.db
    /// in the user's data directory).
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command as a new instance in its own worktree and branch.
    Run(run::RunArgs),
    /// Run a long-lived instance (no command, no worktree), with the HTTP API when --with-api.
    Serve(run::ServeCommandArgs),
    /// List, inspect and stop instances.
    #[command(subcommand)]
    Instance(instance::InstanceCommand),
    /// Run a command in every live instance (or --instances), output under each id.
    Broadcast(instance::BroadcastArgs),
    /// Print the id of the instance whose worktree contains the current directory.
    Whoami,
    /// Report this instance's state (working, idle, needs-input) for dashboards; for agent
    /// hooks (docs/AGENT-STATE.md).
    Status(status::StatusArgs),
    /// Shared notes by namespace: add, search, list.
    #[command(subcommand)]
    Notes(notes::NotesCommand),
    /// Add a note (same as 'notes add').
    Remember(notes::RememberArgs),
    /// Search notes (same as 'notes search').
    Recall(notes::SearchArgs),
    /// Show the event log.
    Events(events::EventsArgs),
    /// The shared database itself.
    #[command(subcommand)]
    Db(db::DbCommand),
    /// Send a message to an instance, or to every live one.
    Send(queue::SendArgs),
    /// Receive this instance's messages.
    Recv(queue::RecvArgs),
    /// Acknowledge messages received with --no-ack.
    Ack(queue::AckArgs),
    /// Named locks with fencing tokens.
    #[command(subcommand)]
    Lock(lock::LockCommand),
    /// Reserve paths you are editing, so other instances know.
    Reserve(reserve::ReserveArgs),
    /// List path reservations.
    Reservations {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The fleet's reservations, in its database (needs APP_DB_URL).
        #[arg(long)]
        fleet: bool,
    },
    /// Release your path reservations (all of them without GLOBs).
    Release {
        /// The patterns to release, as reserved.
        #[arg(value_name = "GLOB")]
        patterns: Vec<String>,
        /// Release fleet reservations, in the fleet's database (needs APP_DB_URL).
        #[arg(long)]
        fleet: bool,
    },
    /// Exit 1 when a file is reserved exclusively by another live instance (also in the
    /// fleet, when the database is a server).
    CheckPaths {
        /// Files, relative to the current directory.
        #[arg(value_name = "FILE")]
        files: Vec<String>,
    },
    /// Run a plan: a graph of tasks, each in its own instance (docs/ORCHESTRATE.md).
    Orchestrate(orchestrate::OrchestrateArgs),
    /// Run a CI command in a fresh worktree of a branch, always cleaned up (docs/CI.md).
    Ci(run::CiArgs),
    /// Take tasks of fleet runs and run them on this host (docs/FLEET.md).
    Worker(fleet::WorkerArgs),
    /// The fleet: hosts, capacity, load, running and waiting tasks.
    Fleet(fleet::FleetArgs),
    /// Orchestrated runs: list, show, logs.
    #[command(subcommand)]
    Runs(orchestrate::RunsCommand),
    /// Serve the coordination tools to an agent over MCP (stdio); docs/MCP.md.
    Mcp(mcp::McpArgs),
    /// The fleet on one terminal screen, from .app/ or an instance's API (--api URL).
    Dash(dash::DashArgs),
    /// Find stale state left by crashes; --fix reclaims it without losing work.
    Doctor(doctor::DoctorArgs),
    /// Git hooks that use app.
    #[command(subcommand)]
    Hooks(reserve::HooksCommand),
}

/// Runs the parsed command line; returns the process exit code. The settings are read here,
/// once, after parsing (so `--help` and `--version` work whatever the environment holds): a
/// malformed `APP_*` variable fails every command with exit 2, naming the variable.
pub fn run(cli: Cli) -> Result<u8> {
    let ctx = Context {
        settings: Settings::from_env()?,
        db: cli.db,
    };
    let ctx = &ctx;
    match cli.command {
        Command::Run(args) => run::run(ctx, args),
        Command::Serve(args) => run::serve(ctx, args),
        Command::Instance(command) => instance::run(ctx, command),
        Command::Whoami => instance::whoami(ctx),
        Command::Status(args) => status::status(ctx, args),
        Command::Broadcast(args) => instance::broadcast(ctx, args),
        Command::Notes(command) => notes::run(ctx, command),
        Command::Remember(args) => notes::remember(ctx, args),
        Command::Recall(args) => notes::search(ctx, args),
        Command::Events(args) => events::run(ctx, args),
        Command::Db(command) => db::run(ctx, command),
        Command::Send(args) => queue::send(ctx, args),
        Command::Recv(args) => queue::recv(ctx, args),
        Command::Ack(args) => queue::ack(ctx, args),
        Command::Lock(command) => lock::run(ctx, command),
        Command::Reserve(args) => reserve::reserve(ctx, args),
        Command::Reservations { json, fleet } => reserve::list(ctx, json, fleet),
        Command::Release { patterns, fleet } => reserve::release(ctx, patterns, fleet),
        Command::CheckPaths { files } => reserve::check_paths(ctx, files),
        Command::Hooks(command) => reserve::hooks(ctx, command),
        Command::Mcp(args) => mcp::mcp(ctx, args),
        Command::Dash(args) => dash::run(ctx, args),
        Command::Doctor(args) => doctor::run(ctx, args),
        Command::Orchestrate(args) => orchestrate::orchestrate(ctx, args),
        Command::Ci(args) => run::ci(ctx, args),
        Command::Runs(command) => orchestrate::runs(ctx, command),
        Command::Worker(args) => fleet::worker(ctx, args),
        Command::Fleet(args) => fleet::fleet(ctx, args),
    }
}
