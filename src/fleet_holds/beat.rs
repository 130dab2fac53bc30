//! The host heartbeat: one `fleet_members` row per fleet host, written by one process of that
//! host at a time, the holder of `fleet/<host>.heartbeat.lock` in the data directory. The
//! others try the flock at every beat and take over when its holder exits.

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use crate::db::holds::{self, Member};
use crate::db::{Blocking, DbSettings, Location};
use crate::error::Result;
use crate::process::ProcessIdentity;
use crate::state::{self, FileLock};
use crate::stop::Stopper;

/// The right to write this host's heartbeat: a flock on a file of the data directory, taken
/// without waiting.
#[derive(Debug)]
pub(crate) struct HostFlock {
    path: PathBuf,
    held: Option<FileLock>,
}

impl HostFlock {
    /// The flock of fleet host `host` (not taken yet).
    pub(crate) fn new(host: &str) -> Result<HostFlock> {
        let path = crate::config::data_dir()?
            .join("fleet")
            .join(format!("{host}.heartbeat.lock"));
        Ok(HostFlock { path, held: None })
    }

    /// Whether this process writes the host's heartbeat: takes the flock when it is free.
    pub(crate) fn hold(&mut self) -> bool {
        if self.held.is_none() {
            let taken = self
                .path
                .parent()
                .map_or(Ok(()), state::create_private_dir_all)
                .and_then(|()| state::try_lock_exclusive(&self.path));
            match taken {
                Ok(held) => self.held = held,
                Err(err) => tracing::warn!(%err, "cannot take the host heartbeat's flock"),
            }
        }
        self.held.is_some()
    }
}

/// A thread that writes this host's heartbeat every third of the lease TTL while this process
/// holds the host's [`HostFlock`]; it opens the database only once it does.
pub(crate) struct HostBeat {
    stopper: Stopper,
    handle: thread::JoinHandle<()>,
}

/// Where and as whom a [`HostBeat`] writes.
#[derive(Debug, Clone)]
pub(crate) struct BeatTarget {
    /// The server database.
    pub location: Location,
    /// Its connection settings.
    pub settings: DbSettings,
    /// This host's fleet name.
    pub host: String,
    /// The lease TTL: the heartbeat is renewed every third of it.
    pub lease_ttl: Duration,
    /// The secret check the row publishes (empty for none).
    pub secret_check: String,
}

impl HostBeat {
    /// Starts the thread.
    pub(crate) fn start(target: BeatTarget) -> Result<HostBeat> {
        let mut flock = HostFlock::new(&target.host)?;
        let stopper = Stopper::new();
        let stop = stopper.token();
        let handle = thread::spawn(move || {
            let me = ProcessIdentity::current();
            let member = Member {
                host: &target.host,
                pid: me.pid.into(),
                start_time: me.start_time as i64,
                secret_check: &target.secret_check,
            };
            let mut db: Option<Blocking> = None;
            // Every fleet write renews the heartbeat too, so the first beat can wait.
            while !stop.wait_timeout(target.lease_ttl / 3) {
                if !flock.hold() {
                    continue;
                }
                if db.is_none() {
                    db = Blocking::open(target.location.clone(), target.settings)
                        .inspect_err(
                            |err| tracing::warn!(%err, "fleet heartbeat: cannot open the database"),
                        )
                        .ok();
                }
                if let Some(open) = &db
                    && let Err(err) = open.run(async |db| holds::beat(db, &member).await)
                {
                    tracing::warn!(%err, "fleet heartbeat failed");
                }
            }
        });
        Ok(HostBeat { stopper, handle })
    }

    /// Ends the thread (and the flock with it) and waits for it.
    pub(crate) fn stop(self) {
        self.stopper.stop();
        let _ = self.handle.join();
    }
}
