//! The only module that knows the layout of `.app/`.
//!
//! Layout, under the main worktree's root (the *repo root*):
//!
//! ```text
//! .app/                      0700, listed in .git/info/exclude
//!   worktrees/<id>/          git worktree of instance <id>
//!   branch_registry.json     branch -> owning instance
//!   process_registry.json    instance id -> process record
//!   registry.lock            flock taken around every registry read-modify-write
//!   doctor.lock              flock held by 'app doctor --fix' (one at a time)
//!   secret                   HMAC key when APP_SHARED_SECRET is not set (0600)
//!   coordination_queue/
//!     inbox/<id>/<msg>.json    messages waiting for instance <id> (a broadcast: one copy each)
//!     acked/<id>/<msg>.json    messages <id> acknowledged (the de-duplication record)
//!     dead/<id>-<msg>.json     unacknowledged messages past their TTL, with the reason
//!     quarantine/<file>        forged, oversized or unparsable files, with the reason
//!   run/<id>.sock            control socket of live instance <id> (0600)
//!   activity/<id>.json       agent state and progress of live instance <id> (its supervisor's)
//!   activity/<id>.said.json  the last state instance <id> reported (`app status`)
//!   journal/<id>.<nonce>.json  intent of a multi-step operation on instance <id> under way
//!   locks/
//!     named/<name>.json        named lock: holder, fencing token, expiry (kept when free)
//!     waiting/<pid>-<start>.json  a process waiting for a named lock (signed; removed when
//!                              its wait ends, a killed waiter's by the next waiter or doctor)
//!     reservations.json        path reservations
//!     .mutex                   flock taken around every lock and reservation change
//! ```
//!
//! `.app` (or the directory a `.app` symlink names) is only used when it is a directory the
//! current user owns, and is kept at 0700 ([`AppPaths::ensure_state_dir`]).
//!
//! The repo root is found through git's *common* directory, so every path is the same whether
//! `app` runs in the main worktree, in a subdirectory, or inside an instance's worktree.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, GitContext, IoContext, PathsError, Result};
use crate::state;

/// Name of the state directory under the repo root.
pub const STATE_DIR: &str = ".app";

/// Resolved locations of one repository's `app` state.
#[derive(Debug, Clone)]
pub struct AppPaths {
    repo_root: PathBuf,
    git_common_dir: PathBuf,
    state_dir: PathBuf,
}

impl AppPaths {
    /// Finds the repository containing `start` and resolves its main worktree root.
    ///
    /// Works from any directory of the main worktree and from inside any linked worktree.
    pub fn discover(start: &Path) -> Result<Self> {
        let repo = git2::Repository::discover(start).map_err(|err| {
            if err.code() == git2::ErrorCode::NotFound {
                Error::NotARepository {
                    path: start.to_path_buf(),
                }
            } else {
                Error::git(
                    format!("opening the repository at {}", start.display()),
                    err,
                )
            }
        })?;
        let common = repo.commondir().to_path_buf();
        // Open the common dir itself: its work directory is the main worktree, even when the
        // repository was discovered from a linked worktree.
        let main = git2::Repository::open(&common)
            .git_context(|| format!("opening the repository at {}", common.display()))?;
        let root = main.workdir().ok_or_else(|| PathsError::Bare {
            common: common.clone(),
        })?;
        let repo_root = fs::canonicalize(root).io_context("resolving", root)?;
        let git_common_dir = fs::canonicalize(&common).io_context("resolving", &common)?;
        Ok(Self::from_parts(repo_root, git_common_dir))
    }

    /// Builds the paths for a repo root whose git common dir is already known.
    pub fn from_parts(repo_root: PathBuf, git_common_dir: PathBuf) -> Self {
        let state_dir = repo_root.join(STATE_DIR);
        AppPaths {
            repo_root,
            git_common_dir,
            state_dir,
        }
    }

    /// The main worktree's root directory.
    pub fn repo_root(&self) -> &Path {
        &self.repo_root
    }

    /// Git's common directory (`.git` of the main worktree).
    pub fn git_common_dir(&self) -> &Path {
        &self.git_common_dir
    }

    /// `.app/` itself.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Parent directory of every instance worktree.
    pub fn worktrees_dir(&self) -> PathBuf {
        self.state_dir.join("worktrees")
    }

    /// The worktree directory of instance `id`.
    pub fn worktree(&self, id: &str) -> PathBuf {
        self.worktrees_dir().join(id)
    }

    /// Git's administrative directory for the linked worktree named `id`.
    pub fn git_worktree_admin(&self, id: &str) -> PathBuf {
        self.git_common_dir.join("worktrees").join(id)
    }

    /// The process registry file.
    pub fn process_registry(&self) -> PathBuf {
        self.state_dir.join("process_registry.json")
    }

    /// The branch registry file.
    pub fn branch_registry(&self) -> PathBuf {
        self.state_dir.join("branch_registry.json")
    }

    /// The lock file serializing registry updates.
    pub fn registry_lock(&self) -> PathBuf {
        self.state_dir.join("registry.lock")
    }

    /// The flock `app doctor --fix` holds, so two never fix at once.
    pub fn doctor_lock(&self) -> PathBuf {
        self.state_dir.join("doctor.lock")
    }

    /// The generated HMAC key.
    pub fn secret(&self) -> PathBuf {
        self.state_dir.join("secret")
    }

    /// `.app/coordination_queue/`.
    pub fn queue_dir(&self) -> PathBuf {
        self.state_dir.join("coordination_queue")
    }

    /// The inboxes, one directory per recipient.
    pub fn inboxes_dir(&self) -> PathBuf {
        self.queue_dir().join("inbox")
    }

    /// Messages waiting for instance `id`.
    pub fn inbox(&self, id: &str) -> PathBuf {
        self.inboxes_dir().join(id)
    }

    /// Messages instance `id` acknowledged.
    pub fn acked(&self, id: &str) -> PathBuf {
        self.queue_dir().join("acked").join(id)
    }

    /// Messages that expired unacknowledged.
    pub fn dead_letters(&self) -> PathBuf {
        self.queue_dir().join("dead")
    }

    /// Message files that could not be trusted or read.
    pub fn quarantine(&self) -> PathBuf {
        self.queue_dir().join("quarantine")
    }

    /// `.app/locks/`.
    pub fn locks_dir(&self) -> PathBuf {
        self.state_dir.join("locks")
    }

    /// The state files of named locks.
    pub fn named_locks_dir(&self) -> PathBuf {
        self.locks_dir().join("named")
    }

    /// The state file of lock `name`.
    pub fn lock_state(&self, name: &str) -> PathBuf {
        self.named_locks_dir().join(format!("{name}.json"))
    }

    /// Who waits for a named lock: one signed file per waiting process.
    pub fn lock_waiters_dir(&self) -> PathBuf {
        self.locks_dir().join("waiting")
    }

    /// The file of the process `pid` (started at `start_time`) while it waits for a lock.
    pub fn lock_waiter(&self, pid: u32, start_time: u64) -> PathBuf {
        self.lock_waiters_dir()
            .join(format!("{pid}-{start_time}.json"))
    }

    /// The path reservations.
    pub fn reservations(&self) -> PathBuf {
        self.locks_dir().join("reservations.json")
    }

    /// The flock around every lock and reservation change.
    pub fn locks_mutex(&self) -> PathBuf {
        self.locks_dir().join(".mutex")
    }

    /// `.app/run/`: control sockets of live instances.
    pub fn run_dir(&self) -> PathBuf {
        self.state_dir.join("run")
    }

    /// The control socket of instance `id`.
    pub fn control_socket(&self, id: &str) -> PathBuf {
        self.run_dir().join(format!("{id}.sock"))
    }

    /// `.app/activity/`: what each live instance is doing.
    pub fn activity_dir(&self) -> PathBuf {
        self.state_dir.join("activity")
    }

    /// The agent state and progress of instance `id`, as its supervisor derived them.
    pub fn activity(&self, id: &str) -> PathBuf {
        self.activity_dir().join(format!("{id}.json"))
    }

    /// The last state instance `id` reported itself (`app status`).
    pub fn activity_report(&self, id: &str) -> PathBuf {
        self.activity_dir().join(format!("{id}.said.json"))
    }

    /// The output of task `task` of orchestrated run `run`: `.app/logs/runs/<run>/<task>.log`.
    pub fn task_log(&self, run: &str, task: &str) -> PathBuf {
        self.state_dir
            .join("logs/runs")
            .join(run)
            .join(format!("{task}.log"))
    }

    /// `.app/fleet/leases/`: a file per fleet lease this host's worker holds, until what its
    /// attempt made was pushed (`<token>.json`).
    pub fn fleet_leases_dir(&self) -> PathBuf {
        self.state_dir.join("fleet/leases")
    }

    /// `.app/journal/`: intents of operations under way.
    pub fn journal_dir(&self) -> PathBuf {
        self.state_dir.join("journal")
    }

    /// The intent file of the operation with `nonce` on instance `id` (`<id>.json` for an
    /// intent of an older version, which has no nonce).
    pub fn intent(&self, id: &str, nonce: &str) -> PathBuf {
        if nonce.is_empty() {
            self.journal_dir().join(format!("{id}.json"))
        } else {
            self.journal_dir().join(format!("{id}.{nonce}.json"))
        }
    }

    /// Creates `.app/` (0700) and `worktrees/`, and lists `.app/` in `.git/info/exclude`.
    ///
    /// An existing `.app/` (or the directory a `.app` symlink names) must pass
    /// [`AppPaths::check_state_dir`]; looser than 0700, it is tightened to 0700. Safe to call
    /// from many processes at once.
    pub fn ensure_state_dir(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta = match self.check_state_dir()? {
            Some(meta) => meta,
            None => {
                // Creating worktrees/ creates .app/ with it, both 0700. Another process may
                // make .app at the same moment: check what is there now either way.
                state::create_private_dir_all(&self.worktrees_dir())?;
                self.check_state_dir()?
                    .ok_or_else(|| PathsError::Vanished {
                        dir: self.state_dir.clone(),
                    })?
            }
        };
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&self.state_dir, fs::Permissions::from_mode(0o700))
                .io_context("making private", &self.state_dir)?;
        }
        state::create_private_dir_all(&self.worktrees_dir())?;
        self.ensure_excluded()
    }

    /// Checks that `.app`, when it exists, is a directory (itself, or where its symlink points)
    /// that the current user owns: anything else (a file, a dangling symlink, someone else's
    /// directory) is bad input. Returns the directory's metadata, `None` when there is no
    /// `.app`. Changes nothing.
    pub fn check_state_dir(&self) -> Result<Option<fs::Metadata>> {
        use std::os::unix::fs::MetadataExt;
        let dir = &self.state_dir;
        let link = match fs::symlink_metadata(dir) {
            Ok(link) => link,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(Error::io("reading", dir, err)),
        };
        let named = if link.file_type().is_symlink() {
            let target = fs::read_link(dir).io_context("reading the symlink", dir)?;
            format!("{} (a symlink to {})", dir.display(), target.display())
        } else {
            dir.display().to_string()
        };
        let meta = match fs::metadata(dir) {
            Ok(meta) => meta,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(PathsError::Dangling { named }.into());
            }
            Err(err) => return Err(Error::io("reading", dir, err)),
        };
        if !meta.is_dir() {
            return Err(PathsError::NotADirectory { named }.into());
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(PathsError::NotYours {
                named,
                owner: meta.uid(),
                owner_name: user_name(meta.uid()),
                me,
                my_name: user_name(me),
            }
            .into());
        }
        Ok(Some(meta))
    }

    /// Adds `/.app/` to `.git/info/exclude` unless a line already names it.
    ///
    /// The user's `.gitignore` is never edited. Appends happen under the registry lock so two
    /// first starts do not both add the line.
    fn ensure_excluded(&self) -> Result<()> {
        let info = self.git_common_dir.join("info");
        let exclude = info.join("exclude");
        let listed = |text: &str| {
            text.lines()
                .map(str::trim)
                .any(|line| matches!(line, ".app" | ".app/" | "/.app" | "/.app/"))
        };
        let current = fs::read_to_string(&exclude).unwrap_or_default();
        if listed(&current) {
            return Ok(());
        }
        let _guard = state::lock_exclusive(&self.registry_lock())?;
        let current = fs::read_to_string(&exclude).unwrap_or_default();
        if listed(&current) {
            return Ok(());
        }
        fs::create_dir_all(&info).io_context("creating", &info)?;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&exclude)
            .io_context("opening", &exclude)?;
        let separator = if current.is_empty() || current.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        write!(
            file,
            "{separator}# app: per-repository agent state\n/.app/\n"
        )
        .io_context("writing", &exclude)?;
        Ok(())
    }
}
/// " (name)" of user `uid`, or nothing when it has no name here.
fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| format!(" ({})", user.name))
        .unwrap_or_default()
}

/// `file` (absolute, or relative to `cwd`) as a `/`-separated path relative to `root`.
pub fn relative_to(root: &Path, cwd: &Path, file: &str) -> Result<String> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let cwd = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_path_buf());
    let joined = cwd.join(file);
    let mut normal = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    let inside = normal
        .strip_prefix(&root)
        .map_err(|_| PathsError::OutsideWorktree {
            file: file.to_string(),
            root: root.clone(),
        })?;
    Ok(inside
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/"))
}
