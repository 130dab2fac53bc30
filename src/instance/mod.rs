//! Instance lifecycle: `app run` (claim an id, make a worktree, register, supervise the command,
//! clean up), and `app instance stop`.
//!
//! Invariants:
//! - All validation happens before the first write: bad input changes nothing on disk.
//! - The id (and the branch) are claimed under the registry lock ([`claim`]); the worktree
//!   checkout runs outside the lock.
//! - The supervisor heartbeats while the command runs ([`heartbeat`]); signals sent to it are
//!   forwarded to the command or are stop requests ([`signals`]).
//! - Every way out of a registered instance goes through one `end` ([`supervisor`]): the API's
//!   final event, the control socket's commands stopped, what the command left behind stopped
//!   ([`leftovers`]), the worktree removed only when that loses nothing ([`cleanup`]).
//!
//! Files: `claim` (id, branch and ports), `supervisor` (register, spawn, wait, end), `holds`
//! (the locks and reservations of `--lock`, `--reserve`), `signals` (forwarding and stop
//! requests), `heartbeat`, `leftovers`, `cleanup` (worktree and registry at the end), `mirror`
//! (the database copy), `stop` (`app instance stop`), `owner` (whom a caller acts for).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use git2::Repository;

use crate::api::{self, ApiOptions, Bound};
use crate::config::Settings;
use crate::db::{DbSettings, Location};
use crate::error::{GitContext, InstanceError, Result};
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::ports;
use crate::process;
use crate::registry::Registry;
use crate::sign::Keys;
use crate::worktree::{self, Cleanup};

mod claim;
mod cleanup;
mod heartbeat;
mod holds;
mod leftovers;
mod mirror;
mod owner;
mod signals;
mod stop;
mod supervisor;

pub use holds::Holds;
pub use owner::{caller, caller_holder, owner_of};
pub use stop::{StopOutcome, StopRoute, stop};

/// What `app run` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// A name to use as the instance id instead of a random one (parsed where it was given).
    pub name: Option<InstanceId>,
    /// Where the instance works, and whether it runs a command.
    pub mode: Mode,
    /// Leave processes the command left behind running (the worktree then stays while they
    /// live); by default they are stopped with the instance.
    pub keep_running: bool,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// The shared database to mirror the instance into (`--db`, else the environment).
    pub db: Option<PathBuf>,
    /// How many TCP ports to lease (`--ports N`).
    pub ports: Option<usize>,
    /// Serve the HTTP API (`--with-api`).
    pub api: Option<ApiOptions>,
    /// How long a stop waits before SIGKILL (default [`DEFAULT_STOP_TIMEOUT`]).
    pub stop_timeout: Option<Duration>,
    /// Told what the person running `app` should see.
    pub notify: Option<fn(&Notice)>,
    /// Stop the command (a stop request) once it has run this long; `app` then exits 124.
    pub deadline: Option<Duration>,
    /// Named locks and path reservations held while the command runs (`--lock`, `--reserve`).
    pub holds: Holds,
}

/// Where an instance works, and whether it runs a command.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Run the command in a worktree of its own (`app run`, `app ci`).
    Worktree(WorktreeOptions),
    /// Run the command in the current directory, registered without a worktree or branch
    /// (`app run --no-worktree`, `app mcp`).
    InPlace,
    /// Run no command: register in the current directory and wait for a stop request (`app
    /// serve`; `command` is only recorded), or run a loop of `app`'s own in its place
    /// ([`host`]: `app worker`).
    Serve,
}

impl Default for Mode {
    fn default() -> Self {
        Mode::Worktree(WorktreeOptions::default())
    }
}

/// The worktree of a [`Mode::Worktree`] instance.
#[derive(Debug, Clone, Default)]
pub struct WorktreeOptions {
    /// Branch to check out (default `app/<id>`).
    pub branch: Option<String>,
    /// Ref the new branch starts from (default HEAD).
    pub base: Option<String>,
    /// How the worktree is used, and what becomes of it at the end.
    pub kind: WorktreeKind,
}

/// How a worktree is used, and what becomes of it at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WorktreeKind {
    /// The instance holds its branch; at the end the worktree is removed when that loses
    /// nothing, and a branch `app` created when it holds nothing new.
    #[default]
    Agent,
    /// Like `Agent`, but worktree and branch are kept at the end (`--keep`).
    Kept,
    /// `app ci`: a branch checked out elsewhere gets a detached worktree, and the worktree is
    /// always removed at the end (uncommitted work saved on `refs/app/rescue/<id>` first).
    Ci,
}

impl RunOptions {
    /// The worktree's kind, `None` without a worktree.
    fn worktree_kind(&self) -> Option<WorktreeKind> {
        match &self.mode {
            Mode::Worktree(worktree) => Some(worktree.kind),
            Mode::InPlace | Mode::Serve => None,
        }
    }

    /// Whether this is an `app ci` job.
    fn ci(&self) -> bool {
        self.worktree_kind() == Some(WorktreeKind::Ci)
    }
}

/// `app`'s exit code when the command outlived `--timeout`, as `timeout(1)` has it.
pub const EXIT_TIMED_OUT: u8 = 124;

/// How long a stop request waits for a command before killing it.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Something the person running the instance should know while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The API listens at `url`.
    ApiListening {
        /// The instance.
        id: InstanceId,
        /// Where.
        url: String,
    },
    /// Every port of the range was taken; the instance runs without an API.
    ApiUnavailable {
        /// The instance.
        id: InstanceId,
        /// The ports tried.
        range: std::ops::RangeInclusive<u16>,
    },
    /// The paths of `--reserve` are reserved.
    Reserved {
        /// The patterns, as stored.
        patterns: Vec<String>,
        /// Who holds them (the instance), as it prints.
        holder: String,
    },
}

/// How an instance ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The instance id.
    pub id: InstanceId,
    /// Exit code for `app`: the command's own, or 128+N when it died of signal N.
    pub exit_code: u8,
    /// The worktree, when the instance had one.
    pub worktree: Option<PathBuf>,
    /// The branch, when the instance had one.
    pub branch: Option<String>,
    /// What happened to worktree and branch (`None` with `--keep` or `--no-worktree`).
    pub cleanup: Option<Cleanup>,
}

/// A loop of `app`'s own that runs as a registered instance in place of a command ([`host`]):
/// it sees the instance's id and the stop requests sent to it (signals, `app instance stop`).
pub struct Hosted {
    id: InstanceId,
    slot: Arc<signals::Slot>,
}

impl Hosted {
    /// The instance's id.
    pub fn id(&self) -> &InstanceId {
        &self.id
    }

    /// How many stop requests came so far (the first asks to wind down, the next to hurry).
    pub fn stop_requests(&self) -> usize {
        self.slot.requests().0 as usize
    }

    /// The signal of the latest stop request (SIGTERM for `app instance stop`), if any came.
    pub fn last_signal(&self) -> Option<i32> {
        self.slot.requests().1
    }
}

/// The loop a hosted instance runs; its result is `app`'s exit code.
pub(crate) type HostedBody<'a> = Box<dyn FnOnce(&Hosted) -> Result<u8> + 'a>;

/// Runs `options.command` as a new instance and supervises it until it exits.
#[tracing::instrument(skip_all, fields(cwd = %cwd.display()))]
pub fn run(cwd: &Path, options: &RunOptions, settings: &Settings) -> Result<RunOutcome> {
    launch(cwd, options, settings, None)
}

/// Runs `body` as a registered in-place instance, the way `app serve` is one (`options.mode`
/// must be [`Mode::Serve`]; `command` is recorded as what it runs): the same registration,
/// heartbeat, database mirror, control socket and stop requests, and the same `end`. Signals
/// and `app instance stop` reach `body` as [`Hosted::stop_requests`]; its error ends the
/// instance and is returned.
pub fn host<'a>(
    cwd: &Path,
    options: &RunOptions,
    settings: &Settings,
    body: impl FnOnce(&Hosted) -> Result<u8> + 'a,
) -> Result<RunOutcome> {
    if !matches!(options.mode, Mode::Serve) {
        return Err(crate::Error::bad_input(
            "a hosted loop runs in place, as `app serve` does",
        ));
    }
    launch(cwd, options, settings, Some(Box::new(body)))
}

fn launch(
    cwd: &Path,
    options: &RunOptions,
    settings: &Settings,
    body: Option<HostedBody<'_>>,
) -> Result<RunOutcome> {
    validate(options)?;
    let name = options.name.clone();
    let database = (
        Location::resolve(options.db.as_deref())?,
        DbSettings::from(settings),
    );
    let paths = AppPaths::discover(cwd)?;
    let keys = Keys::from_settings(&paths, settings);
    let repo = Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))?;

    // Operations a crash interrupted are finished or undone first (one directory read when
    // there are none).
    if paths.journal_dir().is_dir() {
        crate::reclaim::recover_journal(&paths, &keys)?;
    }

    // Everything below until `open_for_write` only reads.
    let reader = Registry::open_read_only(&paths, &keys)?;
    let snapshot = reader.snapshot()?;
    let id = claim::choose_id((&repo, &paths), &snapshot, name, settings.timing)?;
    let plan = match &options.mode {
        Mode::Worktree(worktree) => Some(worktree::plan(
            &repo,
            &paths,
            &id,
            (worktree.branch.as_deref(), worktree.base.as_deref()),
            worktree.kind == WorktreeKind::Ci,
        )?),
        Mode::InPlace | Mode::Serve => None,
    };
    // The API's address is the last check: an explicit one that is taken stops the run here.
    let api = match &options.api {
        None => None,
        Some(api_options) => bind_api(api_options, settings, &id, options.notify)?,
    };

    // The command's whole process tree is the instance's: what it leaves behind comes to us.
    process::become_subreaper();
    // From here on, signals are ours: one arriving before the command starts cancels the run.
    let slot = signals::Slot::new(options.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT));
    let forwarder = signals::Forwarder::start(&slot)?;
    let result = supervisor::Supervisor::run(supervisor::Launch {
        paths: &paths,
        keys: &keys,
        repo: &repo,
        id,
        plan,
        options,
        settings,
        slot,
        database,
        api,
        body,
    });
    forwarder.close();
    result
}

/// The checks of `options` that need nothing on disk (the name and the lock names were
/// parsed where they were given).
fn validate(options: &RunOptions) -> Result<()> {
    if options.command.is_empty() && !matches!(options.mode, Mode::Serve) {
        return Err(InstanceError::NoCommand.into());
    }
    if let Some(count) = options.ports {
        ports::validate_count(count)?;
    }
    options.holds.validate()
}

/// Binds the API's address; when every port of the default range is taken the instance runs
/// without the API (and is told so).
fn bind_api(
    options: &ApiOptions,
    settings: &Settings,
    id: &InstanceId,
    notify: Option<fn(&Notice)>,
) -> Result<Option<api::Binding>> {
    match api::bind(options, settings)? {
        Bound::Listening(binding) => Ok(Some(binding)),
        Bound::AllTaken(range) => {
            match notify {
                Some(notify) => notify(&Notice::ApiUnavailable {
                    id: id.clone(),
                    range,
                }),
                None => {
                    tracing::warn!(instance = %id, "every API port of {}-{} is taken; running without the API", range.start(), range.end())
                }
            }
            Ok(None)
        }
    }
}
