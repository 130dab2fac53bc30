//! The instance's copy in the shared database: its row and its lifecycle events, written in
//! the background (see [`crate::db::mirror`]) so the database never blocks the agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::db::events::NewEvent;
use crate::db::instances::{InstanceRow, MirrorStatus};
use crate::db::mirror::{Mirror, MirrorSender, Update};
use crate::db::{DbSettings, Location};
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::registry::InstanceRecord;
use crate::time::Timestamp;

/// Copies the instance's registry entry and lifecycle into the shared database, in the
/// background; see [`crate::db::mirror`].
pub(super) struct DbMirror {
    mirror: Mirror,
    repo_root: PathBuf,
    /// This machine's name in the fleet, which its rows carry.
    host: String,
    /// How long the way out waits for the last writes.
    final_wait: Duration,
}

impl DbMirror {
    pub(super) fn start(
        paths: &AppPaths,
        (location, settings): (Location, DbSettings),
        host: &str,
    ) -> Self {
        DbMirror {
            mirror: Mirror::start(location, settings),
            repo_root: paths.repo_root().to_path_buf(),
            host: host.to_string(),
            final_wait: settings.retry_deadline.min(Duration::from_secs(5)),
        }
    }

    /// A sender for other threads (the heartbeat, the control socket's events).
    pub(super) fn sender(&self) -> (MirrorSender, PathBuf) {
        (self.mirror.sender(), self.repo_root.clone())
    }

    /// The fleet host name the rows carry.
    pub(super) fn host(&self) -> &str {
        &self.host
    }

    pub(super) fn instance(&self, record: &InstanceRecord) {
        self.mirror.send(Update::Instance(InstanceRow::from_record(
            record,
            &self.repo_root,
            &self.host,
        )));
    }

    pub(super) fn event(&self, id: &InstanceId, kind: &str, payload: serde_json::Value) {
        self.mirror.send(event(&self.repo_root, id, kind, payload));
    }

    /// Records the end of the instance and waits (bounded) for the mirror to catch up.
    pub(super) fn stopped(
        self,
        record: &InstanceRecord,
        exit_code: Option<u8>,
        payload: serde_json::Value,
    ) {
        let mut row = InstanceRow::from_record(record, &self.repo_root, &self.host);
        let now = Timestamp::now().to_string();
        row.status = MirrorStatus::Stopped;
        row.last_heartbeat = now.clone();
        row.stopped_at = Some(now);
        row.exit_code = exit_code.map(i64::from);
        self.mirror.send(Update::Instance(row));
        self.event(&record.id, "instance.stopped", payload);
        if !self.mirror.close(self.final_wait) {
            tracing::warn!(instance = %record.id, "the database mirror did not catch up before exit; 'app doctor' reports the gap");
        }
    }
}

/// An event of instance `id` in the repository at `repo_root`.
pub(super) fn event(
    repo_root: &Path,
    id: &InstanceId,
    kind: &str,
    payload: serde_json::Value,
) -> Update {
    Update::Event(NewEvent {
        uid: crate::db::events::new_uid(),
        at: Timestamp::now(),
        repo_root: Some(repo_root.display().to_string()),
        instance: Some(id.to_string()),
        kind: kind.to_string(),
        payload,
    })
}
