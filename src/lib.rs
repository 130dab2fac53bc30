//! `app`: coordinate many agents working on one git repository at once.
//!
//! Every agent instance gets its own git worktree under `.app/worktrees/<id>` on its own branch,
//! an entry in signed, lock-protected registries with a heartbeat, and a cleanup that never
//! loses work. The binary (`src/main.rs`) only parses arguments and maps errors to exit codes;
//! everything else lives here. See docs/ARCHITECTURE.md for the module map.

pub mod activity;
pub(crate) mod api;
pub mod cli;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod coordination;
pub mod db;
pub(crate) mod doctor;
pub mod error;
pub mod fault;
pub(crate) mod fleet_holds;
pub(crate) mod fleet_queue;
pub(crate) mod glob;
pub mod ids;
pub(crate) mod instance;
pub mod inuse;
pub mod journal;
pub mod lock;
pub mod mcp;
pub(crate) mod orchestrate;
pub mod overview;
pub mod paths;
pub(crate) mod ports;
pub mod process;
pub mod queue;
pub(crate) mod reclaim;
pub mod registry;
pub(crate) mod remote;
pub(crate) mod reserve;
pub mod sign;
pub mod state;
pub(crate) mod stop;
pub mod time;
pub(crate) mod watch;
pub(crate) mod worker;
pub(crate) mod worktree;

pub use error::{Error, Result};
