//! What a command starts from, built once in [`super::run`]: the settings read from the
//! environment and `--db` ([`Context`]), and for a command that works in a repository, that
//! repository found from the current directory ([`RepoContext`]). Handlers take what they need
//! from here and hand it down; nothing below the CLI reads a setting from the environment.

use std::path::{Path, PathBuf};

use crate::config::Settings;
use crate::coordination::Coordination;
use crate::db::{Blocking, Db, DbSettings, Location};
use crate::error::{IoContext, Result};
use crate::fleet_holds::{BeatTarget, Fleet};
use crate::instance;
use crate::lock::Holder;
use crate::orchestrate::fleet::require_server_at;
use crate::paths::AppPaths;
use crate::registry::{InstanceRecord, Registry, Snapshot};
use crate::sign::Keys;

/// Every command's context.
#[derive(Debug)]
pub(super) struct Context {
    /// Every `APP_*` setting, read and validated once, before the command runs.
    pub settings: Settings,
    /// `--db`, when given.
    pub db: Option<PathBuf>,
}

impl Context {
    /// The repository around the current directory.
    pub fn repo(&self) -> Result<RepoContext<'_>> {
        let cwd = current_dir()?;
        self.repo_at(cwd)
    }

    /// The repository around `cwd`.
    pub fn repo_at(&self, cwd: PathBuf) -> Result<RepoContext<'_>> {
        let paths = AppPaths::discover(&cwd)?;
        Ok(RepoContext {
            cwd,
            keys: Keys::from_settings(&paths, &self.settings),
            paths,
            settings: &self.settings,
        })
    }

    /// `--db`, when given.
    pub fn db_flag(&self) -> Option<&Path> {
        self.db.as_deref()
    }

    /// The fleet of the server database `--db` or the environment names (`--fleet`); bad
    /// input (exit 2, nothing opened) when that is a local file.
    pub fn fleet(&self) -> Result<Fleet> {
        let location = Location::resolve(self.db_flag())?;
        require_server_at(&location)?;
        self.open_fleet(location)
    }

    /// The fleet when the database is a server, `None` (nothing opened) when it is a file.
    pub fn fleet_if_server(&self) -> Result<Option<Fleet>> {
        match Location::resolve(self.db_flag())? {
            Location::Local(_) => Ok(None),
            location => self.open_fleet(location).map(Some),
        }
    }

    fn open_fleet(&self, location: Location) -> Result<Fleet> {
        let db = Blocking::open(location, DbSettings::from(&self.settings))?;
        Ok(Fleet::new(std::sync::Arc::new(db), &self.settings))
    }

    /// What a long-lived fleet holder's host heartbeat writes to (`Fleet` checked the
    /// location already).
    pub fn beat_target(&self) -> Result<BeatTarget> {
        Ok(BeatTarget {
            location: Location::resolve(self.db_flag())?,
            settings: DbSettings::from(&self.settings),
            host: self.settings.fleet_host.clone(),
            lease_ttl: self.settings.lease_ttl,
            secret_check: String::new(),
        })
    }

    /// Opens the database named by `--db` or the environment and runs `body` with it.
    pub fn with_db<T>(&self, body: impl AsyncFnOnce(&Db) -> Result<T>) -> Result<T> {
        Blocking::open_default(self.db_flag(), DbSettings::from(&self.settings))?.run(body)
    }
}

/// A command's repository: where it was run from, its `.app/` layout, and the settings.
#[derive(Debug)]
pub(super) struct RepoContext<'a> {
    /// The current directory the repository was found from.
    pub cwd: PathBuf,
    /// The repository's `.app/` layout.
    pub paths: AppPaths,
    /// Where the repository's signing key comes from: `APP_SHARED_SECRET` as the settings
    /// hold it, else `.app/secret`.
    pub keys: Keys,
    /// The command's settings.
    pub settings: &'a Settings,
}

impl RepoContext<'_> {
    /// The registries, for reading only (creates nothing).
    pub fn registry(&self) -> Result<Registry> {
        Registry::open_read_only(&self.paths, &self.keys)
    }

    /// Both registries as they are now.
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.registry()?.snapshot()
    }

    /// The instance the caller acts for ([`instance::caller`]): the one it claims, else the
    /// one whose worktree it runs in.
    pub fn caller(&self, snapshot: &Snapshot) -> Option<InstanceRecord> {
        instance::caller(snapshot, &self.settings.caller, &self.cwd)
    }

    /// The holder of what the caller takes ([`instance::caller_holder`]).
    pub fn caller_holder(&self, snapshot: &Snapshot) -> Result<Holder> {
        instance::caller_holder(snapshot, &self.settings.caller, &self.cwd)
    }

    /// The repository's locks, reservations and messages.
    pub fn coordination(&self) -> Coordination {
        Coordination::new(&self.paths, self.settings)
    }

    /// The same, with the locks and reservations of `fleet` when given (`--fleet`).
    pub fn coordination_in(&self, fleet: Option<Fleet>) -> Coordination {
        match fleet {
            Some(fleet) => self.coordination().in_fleet(fleet),
            None => self.coordination(),
        }
    }
}

/// The current directory.
pub(super) fn current_dir() -> Result<PathBuf> {
    std::env::current_dir().io_context("reading", "the current directory")
}
