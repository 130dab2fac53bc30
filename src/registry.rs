//! The branch and process registries: which instances exist, which branches they own.
//!
//! Invariants:
//! - Both files are replaced atomically ([`state::replace_all`]); every read-modify-write holds
//!   the exclusive registry lock and reloads both files inside it ([`Registry::update`]), so N
//!   processes registering at once all end up registered. The directory is synced after the
//!   lock is released, before `update` returns.
//! - Every entry carries an HMAC-SHA256 over its fields. An entry that does not verify (or does
//!   not parse) is *forged*: ignored by every command, kept on disk for `doctor` to report, shown
//!   by `instance list --all`.
//! - An instance is *live* only when its pid runs with the recorded start time in this boot and
//!   its heartbeat is younger than the stale limit. Everything else is *stale*.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, RegistryError, Result};
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::process::{self, Presence, ProcessIdentity};
use crate::sign::{self, Keys, SigningKey};
use crate::state;
use crate::time::Timestamp;

const FORMAT_VERSION: u32 = 1;

/// Lifecycle stage of an instance, as its supervisor last recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Registered, command not started yet.
    Starting,
    /// The command is running.
    Running,
    /// The command is being stopped or has exited; cleanup is under way.
    Stopping,
}

impl std::fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InstanceStatus::Starting => "starting",
            InstanceStatus::Running => "running",
            InstanceStatus::Stopping => "stopping",
        })
    }
}

/// One entry of the process registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Instance id (8 hex characters, or a user-given name).
    pub id: InstanceId,
    /// Pid of the supervising `app` process.
    pub pid: u32,
    /// Start time of that process, in clock ticks since boot.
    pub start_time: u64,
    /// Boot the start time belongs to.
    pub boot_id: String,
    /// Host the instance runs on.
    pub host: String,
    /// When the instance registered.
    pub started_at: Timestamp,
    /// When the supervisor last proved it was alive.
    pub heartbeat_at: Timestamp,
    /// The instance's own worktree, or `None` with `--no-worktree`.
    pub worktree: Option<PathBuf>,
    /// Directory the command runs in (the worktree, or where `app run` was started).
    pub cwd: PathBuf,
    /// The instance's branch, when it has a worktree.
    pub branch: Option<String>,
    /// Commit the branch started from.
    pub base: Option<String>,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Pid of the command, once spawned.
    pub child_pid: Option<u32>,
    /// Start time of the command's process, so a stop never signals a reused pid.
    pub child_start_time: Option<u64>,
    /// Lifecycle stage.
    pub status: InstanceStatus,
    /// TCP ports leased to the instance (`app run --ports N`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Where the instance's HTTP API listens (`--with-api`), e.g. `http://127.0.0.1:3000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
}

impl InstanceRecord {
    /// The supervisor's process identity.
    pub fn identity(&self) -> ProcessIdentity {
        ProcessIdentity {
            pid: self.pid,
            start_time: self.start_time,
            boot_id: self.boot_id.clone(),
        }
    }

    /// The record as JSON, with `liveness` (`live` or `stale`) and the `reason` it is stale.
    pub fn to_json(&self, liveness: &Liveness) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("records serialize");
        let (state, reason) = match liveness {
            Liveness::Live => ("live", serde_json::Value::Null),
            Liveness::Stale(reason) => ("stale", serde_json::Value::String(reason.clone())),
        };
        value["liveness"] = serde_json::json!(state);
        value["reason"] = reason;
        value
    }

    /// Judges whether this instance is alive now.
    pub fn liveness(&self, stale_after: Duration) -> Liveness {
        if self.host != process::hostname() {
            // Another machine's pids mean nothing here; only the heartbeat speaks.
            return self.heartbeat_liveness(stale_after);
        }
        match self.identity().presence() {
            Presence::Gone => Liveness::Stale(format!("pid {} is gone", self.pid)),
            Presence::Reused => Liveness::Stale(format!(
                "pid {} now belongs to another process (start time differs)",
                self.pid
            )),
            Presence::Running => self.heartbeat_liveness(stale_after),
        }
    }

    fn heartbeat_liveness(&self, stale_after: Duration) -> Liveness {
        let age = self.heartbeat_at.age();
        if age > stale_after {
            Liveness::Stale(format!(
                "last heartbeat {} ago (stale after {})",
                crate::time::format_age(age),
                crate::time::format_age(stale_after)
            ))
        } else {
            Liveness::Live
        }
    }
}

/// Whether an instance is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Pid, start time and heartbeat all check out.
    Live,
    /// Something does not; the text says what.
    Stale(String),
}

/// One entry of the branch registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    /// Branch name without `refs/heads/`.
    pub branch: String,
    /// Owning instance.
    pub instance: InstanceId,
    /// Worktree the branch is checked out in.
    pub worktree: PathBuf,
    /// Commit the branch started from.
    pub base: String,
    /// When the branch was claimed.
    pub created_at: Timestamp,
    /// Whether `app` created the branch (and may delete it when it holds no work).
    pub created_branch: bool,
}

/// An entry as read from disk: verified, or not to be trusted.
#[derive(Debug, Clone)]
pub enum Entry<T> {
    /// The signature verifies.
    Valid(T),
    /// The entry does not parse or its signature does not verify.
    Forged {
        /// The entry's key in the registry.
        key: String,
        /// Why it is not trusted.
        reason: String,
    },
}

/// The JSON document of one registry file: a version and signed entries by key.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryDoc {
    version: u32,
    #[serde(default)]
    entries: BTreeMap<String, Value>,
}

/// Both registries, loaded under the lock, for one read-modify-write.
#[derive(Debug)]
pub struct Tables {
    key: SigningKey,
    processes: RegistryDoc,
    branches: RegistryDoc,
    processes_changed: bool,
    branches_changed: bool,
}

impl Tables {
    /// Every process entry, verified or forged, in key order.
    pub fn instances(&self) -> Vec<Entry<InstanceRecord>> {
        entries(&self.processes, Some(&self.key))
    }

    /// The verified record of instance `id`.
    pub fn instance(&self, id: &str) -> Option<InstanceRecord> {
        verified(&self.processes, id, Some(&self.key))
    }

    /// Whether any entry, even a forged one, uses `id`.
    pub fn has_instance_key(&self, id: &str) -> bool {
        self.processes.entries.contains_key(id)
    }

    /// Signs and stores `record` under its id.
    pub fn put_instance(&mut self, record: &InstanceRecord) {
        let value = self.key.seal(record);
        self.processes.entries.insert(record.id.to_string(), value);
        self.processes_changed = true;
    }

    /// Removes instance `id`; returns whether it was there.
    pub fn remove_instance(&mut self, id: &str) -> bool {
        let removed = self.processes.entries.remove(id).is_some();
        self.processes_changed |= removed;
        removed
    }

    /// Every branch entry, verified or forged.
    pub fn branches(&self) -> Vec<Entry<BranchRecord>> {
        entries(&self.branches, Some(&self.key))
    }

    /// The verified record of `branch`.
    pub fn branch(&self, branch: &str) -> Option<BranchRecord> {
        verified(&self.branches, branch, Some(&self.key))
    }

    /// Signs and stores `record` under its branch name.
    pub fn put_branch(&mut self, record: &BranchRecord) {
        let value = self.key.seal(record);
        self.branches.entries.insert(record.branch.clone(), value);
        self.branches_changed = true;
    }

    /// Removes `branch`; returns whether it was there.
    pub fn remove_branch(&mut self, branch: &str) -> bool {
        let removed = self.branches.entries.remove(branch).is_some();
        self.branches_changed |= removed;
        removed
    }
}

/// A consistent read of both registries, taken without changing anything.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every process entry.
    pub instances: Vec<Entry<InstanceRecord>>,
    /// Every branch entry.
    pub branches: Vec<Entry<BranchRecord>>,
}

impl Snapshot {
    /// The verified record of instance `id`.
    pub fn instance(&self, id: &str) -> Option<&InstanceRecord> {
        self.instances.iter().find_map(|entry| match entry {
            Entry::Valid(record) if record.id == id => Some(record),
            _ => None,
        })
    }

    /// Verified instance records, oldest first.
    pub fn valid_instances(&self) -> Vec<&InstanceRecord> {
        let mut records: Vec<_> = self
            .instances
            .iter()
            .filter_map(|entry| match entry {
                Entry::Valid(record) => Some(record),
                Entry::Forged { .. } => None,
            })
            .collect();
        records.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        records
    }
}

/// Who is alive, as the coordination state asks it: the instances a message can be addressed
/// to, and whether the holder of a lock or a reservation still lives. One consistent read,
/// taken when the roster was made.
///
/// [`LocalRoster`] answers from this repository's registry and `/proc`; a roster shared by
/// many hosts answers for holders elsewhere from their hosts' heartbeats instead.
pub trait Roster {
    /// The verified record of instance `id`, alive or not.
    fn instance(&self, id: &str) -> Option<&InstanceRecord>;
    /// Every verified instance alive now, oldest first.
    fn live_instances(&self) -> Vec<&InstanceRecord>;
    /// Whether instance `record` is alive now.
    fn liveness(&self, record: &InstanceRecord) -> Liveness;
    /// Whether the process `identity` (on `host`), which holds something outside any instance,
    /// still runs.
    fn process_alive(&self, identity: &ProcessIdentity, host: &str) -> bool;
}

/// The roster of one machine: a registry snapshot judged with `stale_after`.
#[derive(Debug, Clone, Copy)]
pub struct LocalRoster<'a> {
    snapshot: &'a Snapshot,
    stale_after: Duration,
}

impl<'a> LocalRoster<'a> {
    /// Judges the instances of `snapshot` stale after `stale_after` without a heartbeat.
    pub fn new(snapshot: &'a Snapshot, stale_after: Duration) -> Self {
        LocalRoster {
            snapshot,
            stale_after,
        }
    }
}

impl Roster for LocalRoster<'_> {
    fn instance(&self, id: &str) -> Option<&InstanceRecord> {
        self.snapshot.instance(id)
    }

    fn live_instances(&self) -> Vec<&InstanceRecord> {
        self.snapshot
            .valid_instances()
            .into_iter()
            .filter(|record| record.liveness(self.stale_after) == Liveness::Live)
            .collect()
    }

    fn liveness(&self, record: &InstanceRecord) -> Liveness {
        record.liveness(self.stale_after)
    }

    fn process_alive(&self, identity: &ProcessIdentity, _host: &str) -> bool {
        // As before the roster existed: only this machine's processes hold locks here.
        identity.presence() == Presence::Running
    }
}

/// Access to one repository's registries.
#[derive(Debug, Clone)]
pub struct Registry {
    paths: AppPaths,
    key: Option<SigningKey>,
}

impl Registry {
    /// Opens the registries for writing, signed with `keys`: creates `.app/` and the secret
    /// when missing.
    pub fn open_for_write(paths: &AppPaths, keys: &Keys) -> Result<Self> {
        paths.ensure_state_dir()?;
        let key = keys.load_or_create()?;
        Ok(Registry {
            paths: paths.clone(),
            key: Some(key),
        })
    }

    /// Opens the registries for reading only: creates nothing. A `.app` that is not a
    /// directory of the current user's is refused ([`AppPaths::check_state_dir`]). Entries
    /// are verified with `keys`.
    pub fn open_read_only(paths: &AppPaths, keys: &Keys) -> Result<Self> {
        paths.check_state_dir()?;
        let key = if paths.state_dir().is_dir() {
            keys.load()?
        } else {
            None
        };
        Ok(Registry {
            paths: paths.clone(),
            key,
        })
    }

    /// The repository paths this registry belongs to.
    pub fn paths(&self) -> &AppPaths {
        &self.paths
    }

    /// Reads both registries consistently (under a shared lock when `.app/` exists).
    pub fn snapshot(&self) -> Result<Snapshot> {
        if !self.paths.state_dir().is_dir() {
            return Ok(Snapshot {
                instances: Vec::new(),
                branches: Vec::new(),
            });
        }
        let _guard = state::lock_shared(&self.paths.registry_lock())?;
        let processes = load_doc(&self.paths.process_registry())?;
        let branches = load_doc(&self.paths.branch_registry())?;
        Ok(Snapshot {
            instances: entries(&processes, self.key.as_ref()),
            branches: entries(&branches, self.key.as_ref()),
        })
    }

    /// Runs `change` on both registries under the exclusive lock, reloading them first and
    /// saving whichever changed. Nothing is saved when `change` fails.
    pub fn update<T>(&self, change: impl FnOnce(&mut Tables) -> Result<T>) -> Result<T> {
        let key = self.key.clone().ok_or(RegistryError::ReadOnly)?;
        let guard = state::lock_exclusive(&self.paths.registry_lock())?;
        let mut tables = Tables {
            key,
            processes: load_doc(&self.paths.process_registry())?,
            branches: load_doc(&self.paths.branch_registry())?,
            processes_changed: false,
            branches_changed: false,
        };
        let result = change(&mut tables)?;
        let mut saves = Vec::new();
        if tables.processes_changed {
            saves.push((self.paths.process_registry(), doc_bytes(&tables.processes)));
        }
        if tables.branches_changed {
            saves.push((self.paths.branch_registry(), doc_bytes(&tables.branches)));
        }
        state::replace_all(&saves)?;
        drop(guard);
        // Durable before returning, but outside the lock: the next writer need not wait for
        // this journal commit (on a busy disk one costs tens of milliseconds).
        if let Some((path, _)) = saves.first() {
            state::sync_parent(path)?;
        }
        Ok(result)
    }
}

fn load_doc(path: &Path) -> Result<RegistryDoc> {
    let Some(bytes) = state::read_optional(path)? else {
        return Ok(RegistryDoc {
            version: FORMAT_VERSION,
            entries: BTreeMap::new(),
        });
    };
    let doc: RegistryDoc = serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    if doc.version > FORMAT_VERSION {
        return Err(RegistryError::NewerFormat {
            path: path.to_path_buf(),
            version: doc.version,
            understood: FORMAT_VERSION,
        }
        .into());
    }
    Ok(doc)
}

fn doc_bytes(doc: &RegistryDoc) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(doc).expect("registry documents always serialize");
    bytes.push(b'\n');
    bytes
}

fn entries<T: Serialize + DeserializeOwned + Keyed>(
    doc: &RegistryDoc,
    key: Option<&SigningKey>,
) -> Vec<Entry<T>> {
    doc.entries
        .iter()
        .map(|(name, value)| match sign::open::<T>(value, key) {
            Ok(record) if record.key() == name => Entry::Valid(record),
            Ok(_) => Entry::Forged {
                key: name.clone(),
                reason: "entry is filed under another key than its own".into(),
            },
            Err(reason) => Entry::Forged {
                key: name.clone(),
                reason,
            },
        })
        .collect()
}

fn verified<T: Serialize + DeserializeOwned + Keyed>(
    doc: &RegistryDoc,
    name: &str,
    key: Option<&SigningKey>,
) -> Option<T> {
    let value = doc.entries.get(name)?;
    sign::open::<T>(value, key)
        .ok()
        .filter(|record| record.key() == name)
}

/// A record that knows the key it is filed under.
trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for InstanceRecord {
    fn key(&self) -> &str {
        &self.id
    }
}

impl Keyed for BranchRecord {
    fn key(&self) -> &str {
        &self.branch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> InstanceRecord {
        let me = ProcessIdentity::current();
        InstanceRecord {
            id: InstanceId::parse(id).unwrap(),
            pid: me.pid,
            start_time: me.start_time,
            boot_id: me.boot_id,
            host: process::hostname().into(),
            started_at: Timestamp::now(),
            heartbeat_at: Timestamp::now(),
            worktree: None,
            cwd: "/tmp".into(),
            branch: None,
            base: None,
            command: vec!["true".into()],
            child_pid: None,
            child_start_time: None,
            status: InstanceStatus::Running,
            ports: Vec::new(),
            api_url: None,
        }
    }

    #[test]
    fn signed_entries_verify_and_tampering_is_detected() {
        let key = SigningKey::from_bytes(b"secret".to_vec());
        let rec = record("abcd1234");
        let value = key.seal(&rec);
        assert_eq!(
            sign::open::<InstanceRecord>(&value, Some(&key)).unwrap(),
            rec
        );

        let mut tampered = value.clone();
        tampered["pid"] = Value::from(1);
        assert!(sign::open::<InstanceRecord>(&tampered, Some(&key)).is_err());

        let other = SigningKey::from_bytes(b"other".to_vec());
        assert!(sign::open::<InstanceRecord>(&value, Some(&other)).is_err());
    }

    #[test]
    fn live_record_of_this_process_and_stale_heartbeat() {
        let rec = record("abcd1234");
        assert_eq!(rec.liveness(Duration::from_secs(30)), Liveness::Live);
        let old = InstanceRecord {
            heartbeat_at: Timestamp::from(std::time::SystemTime::now() - Duration::from_secs(60)),
            ..rec
        };
        assert!(matches!(
            old.liveness(Duration::from_secs(30)),
            Liveness::Stale(_)
        ));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn timestamp() -> impl Strategy<Value = Timestamp> {
        // 1970 to the end of 9999, to the millisecond as it is stored.
        (0u64..253_402_300_799_999).prop_map(|millis| {
            Timestamp::from(std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
        })
    }

    fn record() -> impl Strategy<Value = InstanceRecord> {
        (
            (
                "[a-z0-9][a-z0-9_-]{0,20}",
                any::<u32>(),
                any::<u64>(),
                any::<String>(),
                any::<String>(),
            ),
            (timestamp(), timestamp()),
            (
                proptest::option::of(any::<String>()),
                any::<String>(),
                proptest::option::of(any::<String>()),
                proptest::option::of(any::<String>()),
            ),
            (
                proptest::collection::vec(any::<String>(), 0..4),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u64>()),
                prop_oneof![
                    Just(InstanceStatus::Starting),
                    Just(InstanceStatus::Running),
                    Just(InstanceStatus::Stopping),
                ],
                proptest::collection::vec(any::<u16>(), 0..3),
                proptest::option::of(any::<String>()),
            ),
        )
            .prop_map(
                |(
                    (id, pid, start_time, boot_id, host),
                    (started_at, heartbeat_at),
                    (worktree, cwd, branch, base),
                    (command, child_pid, child_start_time, status, ports, api_url),
                )| InstanceRecord {
                    id: InstanceId::parse(&id).expect("the strategy makes valid ids"),
                    pid,
                    start_time,
                    boot_id,
                    host,
                    started_at,
                    heartbeat_at,
                    worktree: worktree.map(PathBuf::from),
                    cwd: PathBuf::from(cwd),
                    branch,
                    base,
                    command,
                    child_pid,
                    child_start_time,
                    status,
                    ports,
                    api_url,
                },
            )
    }

    /// A temp file holding `bytes`, loaded as a registry document.
    fn load(bytes: &[u8]) -> Result<RegistryDoc> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("process_registry.json");
        std::fs::write(&path, bytes).expect("write the document");
        load_doc(&path)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn loading_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let key = SigningKey::from_bytes(b"k".to_vec());
            if let Ok(doc) = load(&bytes) {
                let _ = entries::<InstanceRecord>(&doc, Some(&key));
                let _ = entries::<BranchRecord>(&doc, None);
            }
        }

        #[test]
        fn loading_json_shaped_text_never_panics(
            text in "\\{\"version\": ?[0-9]{1,3}, ?\"entries\": ?\\{(\"[a-z]{1,3}\": ?\\{(\"[a-z_]{1,12}\": ?(\"[^\"\\\\]{0,30}\"|[0-9]{1,12}|null|\\[\\]),? ?){0,6}\\},? ?){0,3}\\}\\}",
        ) {
            let key = SigningKey::from_bytes(b"k".to_vec());
            if let Ok(doc) = load(text.as_bytes()) {
                for entry in entries::<InstanceRecord>(&doc, Some(&key)) {
                    if let Entry::Valid(record) = entry {
                        let _ = record.liveness(Duration::from_secs(30));
                        let _ = record.to_json(&Liveness::Live);
                    }
                }
            }
        }

        #[test]
        fn a_document_round_trips(records in proptest::collection::vec(record(), 0..5)) {
            let key = SigningKey::from_bytes(b"k".to_vec());
            let mut doc = RegistryDoc { version: FORMAT_VERSION, entries: BTreeMap::new() };
            let mut want = BTreeMap::new();
            for record in records {
                doc.entries.insert(record.id.to_string(), key.seal(&record));
                want.insert(record.id.to_string(), record);
            }
            let loaded = load(&doc_bytes(&doc)).unwrap();
            let got: BTreeMap<String, InstanceRecord> = entries::<InstanceRecord>(&loaded, Some(&key))
                .into_iter()
                .map(|entry| match entry {
                    Entry::Valid(record) => Ok((record.id.to_string(), record)),
                    Entry::Forged { key, reason } => Err(format!("{key}: {reason}")),
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(TestCaseError::fail)?;
            prop_assert_eq!(got, want);
        }
    }
}
