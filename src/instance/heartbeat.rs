//! The heartbeat thread of a running instance.
//!
//! Invariant: the registry is taken as lost, not as a verdict: an entry that is missing or does
//! not verify (`git clean -fdx`, a registry moved aside, a new secret) is written again, and a
//! deleted secret is restored from the key in memory, so a live instance is never left
//! unregistered. A heartbeat that cannot be written never kills the agent.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::activity;
use crate::config::Timing;
use crate::db::instances::InstanceRow;
use crate::db::mirror::{MirrorSender, Update};
use crate::paths::AppPaths;
use crate::registry::{InstanceRecord, Registry};
use crate::sign::{Keys, SigningKey};
use crate::stop::Stopper;
use crate::time::Timestamp;

/// How early a beat may mirror: the wait between beats is never shorter than asked, so
/// without this a mirror due every beat would be skipped every other one.
const MARGIN: Duration = Duration::from_millis(50);

/// The running heartbeat thread; [`Heartbeat::stop`] ends it.
pub(super) struct Heartbeat {
    stopper: Stopper,
    handle: thread::JoinHandle<()>,
}

impl Heartbeat {
    /// Every `heartbeat_interval`, refreshes the heartbeat of `record`'s instance (writing the
    /// entry again from `record` when it was lost), and sends the row to the mirror when
    /// `mirror_every` passed since it last did.
    pub(super) fn start(
        (paths, keys, key): (AppPaths, Keys, SigningKey),
        record: InstanceRecord,
        (timing, mirror_every): (Timing, Duration),
        (mirror, repo_root, host): (MirrorSender, PathBuf, String),
    ) -> Heartbeat {
        let stopper = Stopper::new();
        let stop = stopper.token();
        let handle = thread::spawn(move || {
            let mut mirrored = Instant::now();
            while !stop.wait_timeout(timing.heartbeat_interval) {
                match beat(&paths, &keys, &key, &record) {
                    Ok(current) if mirrored.elapsed() + MARGIN >= mirror_every => {
                        mirrored = Instant::now();
                        let mut row = InstanceRow::from_record(&current, &repo_root, &host);
                        // What its agent does, for the other hosts' dashboards.
                        row.agent = activity::read(&paths, record.id.as_str())
                            .and_then(|a| serde_json::to_value(a.agent).ok());
                        mirror.send(Update::Instance(row));
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!(instance = %record.id, %err, "heartbeat failed"),
                }
            }
        });
        Heartbeat { stopper, handle }
    }

    /// Ends the thread and waits for it.
    pub(super) fn stop(self) {
        self.stopper.stop();
        let _ = self.handle.join();
    }
}

/// One heartbeat: the entry as written.
fn beat(
    paths: &AppPaths,
    keys: &Keys,
    key: &SigningKey,
    record: &InstanceRecord,
) -> crate::error::Result<InstanceRecord> {
    keys.restore(key)?;
    Registry::open_for_write(paths, keys)?.update(|tables| {
        let mut current = tables.instance(&record.id).unwrap_or_else(|| {
            tracing::warn!(instance = %record.id, "the registry lost this instance's entry; registering it again");
            record.clone()
        });
        current.heartbeat_at = Timestamp::now();
        tables.put_instance(&current);
        Ok(current)
    })
}
