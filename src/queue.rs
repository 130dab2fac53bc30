//! The coordination queue: signed JSON messages between instances, one file per message.
//!
//! Invariants:
//! - A message is written whole or not at all ([`state::create_atomic`]) into the inbox of each
//!   recipient (`inbox/<id>/<msg>.json`); a broadcast is one copy per instance live when it was
//!   sent, the sender excepted. Each copy is signed with its recipient, so a file moved into
//!   another inbox does not verify.
//! - Delivery is at least once: a receiver hands a message out, then acknowledges it by renaming
//!   it into `acked/<id>/`. That rename is the de-duplication record: a copy of an acked id is
//!   never handed out again.
//! - Nothing untrusted is delivered: an oversized, unparsable, unsigned or forged file is moved
//!   to `quarantine/` with a `.reason` file beside it. An unacked message past its TTL is moved
//!   to `dead/` wrapped with the reason.
//! - Payloads are bounded (`APP_MAX_MESSAGE_BYTES`, 1 KiB): `send` refuses more, and reading
//!   enforces the same limit.
//! - Callers reach the queue through [`MessageStore`] (from
//!   [`crate::coordination::Coordination`]); [`FileQueue`] is its implementation on this
//!   repository's files, one [`Inbox`] per recipient.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::error::QueueError;
use crate::error::{Error, InstanceError, Result};
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::registry::Roster;
use crate::sign::{self, Keys, SigningKey};
use crate::state;
use crate::time::{self, Timestamp};
use crate::watch::DirWatch;

/// Default time an unacked message waits before it goes to `dead/`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Room for the envelope (ids, type, signature) on top of the payload when reading a file.
pub(crate) const ENVELOPE_BYTES: usize = 4096;

/// One message as stored (without its signature).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id: 12 hex digits of milliseconds since the epoch, then 8 random ones, so ids
    /// sort in sending order.
    pub id: String,
    /// Sending instance.
    #[serde(deserialize_with = "InstanceId::deserialize_checked")]
    pub from: InstanceId,
    /// Addressed instance, or `None` for a broadcast.
    #[serde(default, deserialize_with = "InstanceId::deserialize_checked_option")]
    pub to: Option<InstanceId>,
    /// The inbox this copy was filed to.
    #[serde(deserialize_with = "InstanceId::deserialize_checked")]
    pub recipient: InstanceId,
    /// What kind of message: a lowercase word such as `text` or `join_request`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it was sent.
    pub timestamp: Timestamp,
    /// Milliseconds it may wait unacknowledged before going to `dead/` (`ttl` in the file).
    #[serde(rename = "ttl")]
    pub ttl_ms: u64,
    /// The content.
    pub payload: Value,
}

impl Message {
    /// Whether the TTL has run out.
    pub fn expired(&self) -> bool {
        self.timestamp.age() > Duration::from_millis(self.ttl_ms)
    }
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Sending instance.
    pub from: InstanceId,
    /// One instance, or `None` for every live instance.
    pub to: Option<InstanceId>,
    /// Message type.
    pub kind: String,
    /// Time to live.
    pub ttl: Duration,
    /// Content.
    pub payload: Value,
}

/// Checks a message type: a lowercase word, `[a-z][a-z0-9_]{0,63}`.
pub fn validate_kind(kind: &str) -> Result<()> {
    let ok = kind.len() <= 64
        && kind.starts_with(|c: char| c.is_ascii_lowercase())
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Err(QueueError::InvalidKind { kind: kind.into() }.into());
    }
    Ok(())
}

/// Checks that `payload` fits in `max` bytes of compact JSON.
pub fn check_payload(payload: &Value, max: usize) -> Result<()> {
    let len = serde_json::to_vec(payload)
        .expect("JSON values serialize")
        .len();
    if len > max {
        return Err(QueueError::TooLarge { len, max }.into());
    }
    Ok(())
}

impl Outgoing {
    /// The copy of message `id`, sent at `timestamp`, for `recipient`'s inbox.
    pub(crate) fn copy(&self, id: &str, timestamp: Timestamp, recipient: &InstanceId) -> Message {
        Message {
            id: id.to_string(),
            from: self.from.clone(),
            to: self.to.clone(),
            recipient: recipient.clone(),
            kind: self.kind.clone(),
            timestamp,
            ttl_ms: self.ttl.as_millis() as u64,
            payload: self.payload.clone(),
        }
    }
}

/// A new message id: it sorts in sending order.
pub(crate) fn new_id() -> String {
    let millis = time::unix_millis();
    let random = uuid::Uuid::new_v4().as_u128() as u32;
    format!("{millis:012x}{random:08x}")
}

/// Checks a message id as given to `app ack`.
pub fn validate_id(id: &str) -> Result<()> {
    if id.len() != 20
        || !id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        return Err(QueueError::InvalidId { id: id.into() }.into());
    }
    Ok(())
}

/// A message as a sender writes it, before validation.
#[derive(Debug, Clone)]
pub struct Post {
    /// Sending instance (a valid instance name).
    pub from: String,
    /// An instance id, or `all` for every live instance but the sender.
    pub to: String,
    /// Message type.
    pub kind: String,
    /// Time to live.
    pub ttl: Duration,
    /// Content.
    pub payload: Value,
    /// With `to: all`, also every live instance on the fleet's other hosts (needs a server
    /// database); an instance id is reached on whichever host it runs either way.
    pub fleet: bool,
}

/// A message that was filed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    /// Its id.
    pub id: String,
    /// The inboxes it was filed to.
    pub recipients: Vec<InstanceId>,
}

/// Validates `post` whole (type, payload size of at most `max_bytes`, sender, recipient known
/// to `roster`) and finds its recipients (for `all`: every live instance but the sender).
/// Writes nothing: bad input changes nothing. [`crate::coordination::Coordination::post`]
/// files what it returns.
pub fn route(
    roster: &dyn Roster,
    post: Post,
    max_bytes: usize,
) -> Result<(Outgoing, Vec<InstanceId>)> {
    let Addressed { from, to } = validate(&post, max_bytes)?;
    let (to, recipients) = match to {
        None => {
            let live: Vec<InstanceId> = roster
                .live_instances()
                .into_iter()
                .filter(|r| r.id != from)
                .map(|r| r.id.clone())
                .collect();
            (None, live)
        }
        Some(to) => {
            if roster.instance(&to).is_none() {
                return Err(InstanceError::Unknown { id: post.to }.into());
            }
            (Some(to.clone()), vec![to])
        }
    };
    Ok((outgoing(post, from, to), recipients))
}

/// The sender and recipient of a [`Post`], parsed.
#[derive(Debug, Clone)]
pub(crate) struct Addressed {
    /// The sending instance.
    pub from: InstanceId,
    /// The one instance addressed; `None` for `all`.
    pub to: Option<InstanceId>,
}

/// Checks what `post` says, without looking for its recipient: its type, its payload's size
/// (at most `max_bytes`), its sender and recipient names, which it returns parsed.
pub(crate) fn validate(post: &Post, max_bytes: usize) -> Result<Addressed> {
    validate_kind(&post.kind)?;
    check_payload(&post.payload, max_bytes)?;
    let from = InstanceId::parse(&post.from)?;
    let to = match post.to.as_str() {
        "all" => None,
        to => Some(InstanceId::parse(to)?),
    };
    Ok(Addressed { from, to })
}

/// The message `post` sends from `from`, addressed `to` one instance (`None`: a broadcast).
pub(crate) fn outgoing(post: Post, from: InstanceId, to: Option<InstanceId>) -> Outgoing {
    Outgoing {
        from,
        to,
        kind: post.kind,
        ttl: post.ttl,
        payload: post.payload,
    }
}

/// Files `message` into each of `recipients`' inboxes; returns the message id. Validation
/// (type, payload size, recipients) is the caller's and happens before anything is written.
#[tracing::instrument(skip_all)]
pub fn send(
    paths: &AppPaths,
    key: &SigningKey,
    outgoing: &Outgoing,
    recipients: &[InstanceId],
) -> Result<String> {
    let id = new_id();
    send_as(paths, key, outgoing, (&id, Timestamp::now()), recipients)?;
    Ok(id)
}

/// Files `outgoing` as message `id` sent at `timestamp` into each of `recipients`' inboxes.
pub(crate) fn send_as(
    paths: &AppPaths,
    key: &SigningKey,
    outgoing: &Outgoing,
    (id, timestamp): (&str, Timestamp),
    recipients: &[InstanceId],
) -> Result<()> {
    for recipient in recipients {
        let message = outgoing.copy(id, timestamp, recipient);
        let inbox = paths.inbox(recipient);
        state::create_private_dir_all(&inbox)?;
        let bytes = serde_json::to_vec(&key.seal(&message)).expect("messages serialize");
        state::create_atomic(&inbox.join(format!("{id}.json")), &bytes)?;
    }
    Ok(())
}

/// What a scan of an inbox found besides deliverable messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Files moved to `quarantine/`.
    pub quarantined: usize,
    /// Messages moved to `dead/`.
    pub expired: usize,
}

/// Waits for something new to arrive; set up before the first look, so what arrives between
/// that look and the wait still wakes the waiter.
pub trait Arrivals {
    /// Returns when something may have arrived, or after `limit` (or the poll interval),
    /// whichever comes first.
    fn wait(&self, limit: Duration);
}

impl Arrivals for DirWatch {
    fn wait(&self, limit: Duration) {
        DirWatch::wait(self, limit);
    }
}

/// The message queue of one repository, as callers use it: filing messages into inboxes,
/// reading, acknowledging and retiring the inbox of one `owner`.
///
/// Refusals are typed ([`QueueError`]), carried in the crate error beside the failures of the
/// store itself (files, database). Validation of what is sent is the caller's ([`route`]).
pub trait MessageStore: std::fmt::Debug + Send + Sync {
    /// Files `outgoing` into each of `recipients`' inboxes, each copy signed for its
    /// recipient; returns the message id.
    fn send(&self, outgoing: &Outgoing, recipients: &[InstanceId]) -> Result<String>;
    /// Deliverable messages of `owner`, oldest first. Moves aside what cannot be trusted and
    /// what expired.
    fn pending(&self, owner: &InstanceId) -> Result<(Vec<Message>, Swept)>;
    /// What [`MessageStore::pending`] would deliver and move aside, without moving anything.
    fn inspect(&self, owner: &InstanceId) -> Result<(Vec<Message>, Swept)>;
    /// Message `id` of `owner`, waiting or acknowledged, when it verifies.
    fn find(&self, owner: &InstanceId, id: &str) -> Option<Message>;
    /// Acknowledges message `id` of `owner`: it will not be handed out again. Returns false
    /// when it was acknowledged before; [`QueueError::NotWaiting`] when it is not `owner`'s.
    fn ack(&self, owner: &InstanceId, id: &str) -> Result<bool>;
    /// Acknowledges every message of `ids`, as [`MessageStore::ack`] each; a store shared by
    /// many hosts does it in one request.
    fn ack_all(&self, owner: &InstanceId, ids: &[String]) -> Result<Vec<bool>> {
        ids.iter().map(|id| self.ack(owner, id)).collect()
    }
    /// Moves every message of `owner`, an instance that is gone, aside (to the dead letters,
    /// untrusted ones to quarantine) and forgets its inbox. Returns how many it moved.
    fn retire(&self, owner: &InstanceId, reason: &str) -> Result<usize>;
    /// The instances that have an inbox, sorted; an inbox directory whose name is no instance
    /// id (no send makes one) is not among them ([`inbox_names`] lists it).
    fn owners(&self) -> Vec<InstanceId>;
    /// A waiter woken when a message may have arrived for `owner`: at the latest every `poll`;
    /// with `poll_only`, only then.
    fn arrivals(
        &self,
        owner: &InstanceId,
        poll: Duration,
        poll_only: bool,
    ) -> Result<Box<dyn Arrivals>>;
}

/// The queue of one repository in `.app/coordination_queue/`.
#[derive(Debug, Clone)]
pub struct FileQueue {
    paths: AppPaths,
    keys: Keys,
    key: Option<SigningKey>,
    max_bytes: usize,
}

impl FileQueue {
    /// The queue at `paths`, read with `key` (`None`: nothing verifies), signed with the key
    /// from `keys` (created by the first message), and payloads bounded by `max_bytes`.
    pub fn new(paths: &AppPaths, keys: &Keys, key: Option<SigningKey>, max_bytes: usize) -> Self {
        FileQueue {
            paths: paths.clone(),
            keys: keys.clone(),
            key,
            max_bytes,
        }
    }

    fn inbox(&self, owner: &InstanceId) -> Inbox {
        Inbox::new(&self.paths, owner, self.key.clone(), self.max_bytes)
    }
}

impl MessageStore for FileQueue {
    fn send(&self, outgoing: &Outgoing, recipients: &[InstanceId]) -> Result<String> {
        // Sending signs: the first message of a repository creates its key.
        self.paths.ensure_state_dir()?;
        let key = self.keys.load_or_create()?;
        send(&self.paths, &key, outgoing, recipients)
    }

    fn pending(&self, owner: &InstanceId) -> Result<(Vec<Message>, Swept)> {
        self.inbox(owner).pending()
    }

    fn inspect(&self, owner: &InstanceId) -> Result<(Vec<Message>, Swept)> {
        self.inbox(owner).inspect()
    }

    fn find(&self, owner: &InstanceId, id: &str) -> Option<Message> {
        self.inbox(owner).find(id)
    }

    fn ack(&self, owner: &InstanceId, id: &str) -> Result<bool> {
        self.inbox(owner).ack(id)
    }

    fn retire(&self, owner: &InstanceId, reason: &str) -> Result<usize> {
        self.inbox(owner).retire(reason)
    }

    fn owners(&self) -> Vec<InstanceId> {
        inbox_names(&self.paths)
            .into_iter()
            .filter_map(|name| match name {
                InboxName::Instance(id) => Some(id),
                InboxName::Stray(_) => None,
            })
            .collect()
    }

    fn arrivals(
        &self,
        owner: &InstanceId,
        poll: Duration,
        poll_only: bool,
    ) -> Result<Box<dyn Arrivals>> {
        Ok(Box::new(DirWatch::new(
            &self.paths.inbox(owner),
            poll,
            poll_only,
        )?))
    }
}

/// An inbox directory's name, as [`inbox_names`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InboxName {
    /// The inbox of an instance.
    Instance(InstanceId),
    /// A directory whose name is no instance id, which no send makes (a user's or another
    /// program's): read as [`Inbox::stray`], every file in it is untrusted.
    Stray(String),
}

impl InboxName {
    /// The directory's name.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            InboxName::Instance(id) => id.as_str(),
            InboxName::Stray(name) => name,
        }
    }
}

impl std::fmt::Display for InboxName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The directories in `.app/coordination_queue/inbox/`, sorted by name: each instance's
/// ([`MessageStore::owners`]) and the stray ones, which only `app doctor` looks at.
pub(crate) fn inbox_names(paths: &AppPaths) -> Vec<InboxName> {
    let mut names: Vec<String> = fs::read_dir(paths.inboxes_dir())
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|name| match InstanceId::parse(&name) {
            Ok(id) => InboxName::Instance(id),
            Err(_) => InboxName::Stray(name),
        })
        .collect()
}

/// One inbox directory: an instance's, or a stray one ([`Inbox::stray`]).
#[derive(Debug)]
pub struct Inbox {
    paths: AppPaths,
    /// The directory's name: the owning instance's id, or a stray directory's name (then no
    /// file in it can name it as recipient, so every one is untrusted).
    owner: String,
    key: Option<SigningKey>,
    max_bytes: usize,
}

impl Inbox {
    /// The inbox of instance `owner`.
    pub fn new(
        paths: &AppPaths,
        owner: &InstanceId,
        key: Option<SigningKey>,
        max_bytes: usize,
    ) -> Self {
        Self::stray(paths, owner, key, max_bytes)
    }

    /// The inbox directory `name` ([`InboxName::Stray`]), which is no instance id: read as an
    /// instance's inbox is, so each of its files is untrusted (no message names it as
    /// recipient) and [`Inbox::retire`] moves them to quarantine.
    pub(crate) fn stray(
        paths: &AppPaths,
        name: &str,
        key: Option<SigningKey>,
        max_bytes: usize,
    ) -> Self {
        Inbox {
            paths: paths.clone(),
            owner: name.to_string(),
            key,
            max_bytes,
        }
    }

    /// The directory new messages arrive in.
    pub fn dir(&self) -> PathBuf {
        self.paths.inbox(&self.owner)
    }

    /// Deliverable messages, oldest first. Moves aside what cannot be trusted and what expired.
    pub fn pending(&self) -> Result<(Vec<Message>, Swept)> {
        self.scan(true)
    }

    /// What [`Inbox::pending`] would deliver and move aside, without moving anything.
    pub fn inspect(&self) -> Result<(Vec<Message>, Swept)> {
        self.scan(false)
    }

    /// Moves every message of this inbox to `dead/` (untrusted files to `quarantine/`), for an
    /// instance that is gone, and forgets the inbox (its acknowledged copies and its directory,
    /// when empty). Returns how many files it moved.
    pub fn retire(&self, reason: &str) -> Result<usize> {
        let (messages, swept) = self.pending()?;
        for message in &messages {
            self.bury(
                &self.dir().join(format!("{}.json", message.id)),
                message,
                reason,
            )?;
        }
        let acked = self.paths.acked(&self.owner);
        if acked.exists() {
            fs::remove_dir_all(&acked).map_err(|err| Error::io("removing", &acked, err))?;
        }
        let _ = fs::remove_dir(self.dir());
        Ok(messages.len() + swept.expired + swept.quarantined)
    }

    fn scan(&self, move_aside: bool) -> Result<(Vec<Message>, Swept)> {
        let mut swept = Swept::default();
        let mut found = Vec::new();
        let dir = self.dir();
        for name in crate::state::visible_names(&dir)? {
            let path = dir.join(&name);
            match self.read(&path, &name) {
                Ok(Some(message)) if self.acked_path(&message.id).exists() => {
                    // A copy of an acknowledged message: already delivered.
                    if move_aside {
                        let _ = fs::remove_file(&path);
                    }
                }
                Ok(Some(message)) if message.expired() => {
                    if move_aside {
                        let reason =
                            format!("not acknowledged within its TTL of {} ms", message.ttl_ms);
                        self.bury(&path, &message, &reason)?;
                    }
                    swept.expired += 1;
                }
                Ok(Some(message)) => found.push(message),
                Ok(None) => {}
                Err(reason) => {
                    if move_aside {
                        self.quarantine(&path, &name, &reason)?;
                    }
                    swept.quarantined += 1;
                }
            }
        }
        Ok((found, swept))
    }

    /// Reads one file; `Ok(None)` when it vanished (acked or moved by another reader).
    fn read(&self, path: &Path, name: &str) -> std::result::Result<Option<Message>, String> {
        let len = match fs::metadata(path) {
            Ok(meta) => meta.len(),
            Err(_) => return Ok(None),
        };
        if len > (self.max_bytes + ENVELOPE_BYTES) as u64 {
            return Err(format!(
                "file of {len} bytes is over the message size limit"
            ));
        }
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(_) => return Ok(None),
        };
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|err| format!("not JSON: {err}"))?;
        let message: Message = sign::open(&value, self.key.as_ref())?;
        if message.recipient != self.owner || name != format!("{}.json", message.id) {
            return Err("filed under another inbox or name than its own".into());
        }
        check_payload(&message.payload, self.max_bytes).map_err(|err| err.to_string())?;
        Ok(Some(message))
    }

    /// Message `id` of this inbox, waiting or acknowledged, when it verifies.
    pub fn find(&self, id: &str) -> Option<Message> {
        let name = format!("{id}.json");
        [self.dir().join(&name), self.acked_path(id)]
            .iter()
            .find_map(|path| self.read(path, &name).ok().flatten())
    }

    fn acked_path(&self, id: &str) -> PathBuf {
        self.paths.acked(&self.owner).join(format!("{id}.json"))
    }

    /// Acknowledges message `id`: it will not be handed out again. Returns false when it was
    /// acknowledged before.
    pub fn ack(&self, id: &str) -> Result<bool> {
        validate_id(id)?;
        let from = self.dir().join(format!("{id}.json"));
        let to = self.acked_path(id);
        state::create_private_dir_all(&self.paths.acked(&self.owner))?;
        match fs::rename(&from, &to) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if to.exists() {
                    Ok(false)
                } else {
                    Err(QueueError::NotWaiting {
                        id: id.into(),
                        owner: self.owner.clone(),
                    }
                    .into())
                }
            }
            Err(err) => Err(Error::io("acknowledging", &from, err)),
        }
    }

    fn bury(&self, path: &Path, message: &Message, reason: &str) -> Result<()> {
        dead_letter(&self.paths, &self.owner, message, reason)?;
        state::remove_if_present(path)
    }

    fn quarantine(&self, path: &Path, name: &str, reason: &str) -> Result<()> {
        let dir = self.paths.quarantine();
        state::create_private_dir_all(&dir)?;
        let target = dir.join(format!("{}-{name}", self.owner));
        tracing::warn!(file = %path.display(), reason, "message quarantined");
        match fs::rename(path, &target) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(Error::io("quarantining", path, err)),
        }
        let mut reason_path = target.into_os_string();
        reason_path.push(".reason");
        state::write_atomic(Path::new(&reason_path), format!("{reason}\n").as_bytes())
    }
}

/// Writes `message` of `owner` to the dead letters with `reason` (again, the same file, when
/// it is there already).
pub(crate) fn dead_letter(
    paths: &AppPaths,
    owner: &str,
    message: &Message,
    reason: &str,
) -> Result<()> {
    let dead = paths.dead_letters();
    state::create_private_dir_all(&dead)?;
    let record = serde_json::json!({
        "reason": reason,
        "moved_at": Timestamp::now(),
        "message": message,
    });
    let target = dead.join(format!("{owner}-{}.json", message.id));
    state::write_atomic(
        &target,
        &serde_json::to_vec_pretty(&record).expect("serializes"),
    )
}

/// Keeps `bytes`, a copy for `owner` that cannot be trusted, in the quarantine as `name`, with
/// a `.reason` file beside it.
pub(crate) fn quarantine_copy(
    paths: &AppPaths,
    owner: &str,
    name: &str,
    bytes: &[u8],
    reason: &str,
) -> Result<()> {
    let dir = paths.quarantine();
    state::create_private_dir_all(&dir)?;
    let target = dir.join(format!("{owner}-{name}"));
    tracing::warn!(file = %target.display(), reason, "message quarantined");
    state::write_atomic(&target, bytes)?;
    let mut reason_path = target.into_os_string();
    reason_path.push(".reason");
    state::write_atomic(Path::new(&reason_path), format!("{reason}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_in_time_order_and_validate() {
        let first = new_id();
        std::thread::sleep(Duration::from_millis(2));
        let second = new_id();
        assert!(first < second);
        validate_id(&first).unwrap();
        assert!(validate_id("ABC").is_err());
        assert!(validate_id(&first.to_uppercase()).is_err());
    }

    #[test]
    fn kinds_and_payload_limits() {
        validate_kind("join_request").unwrap();
        for bad in ["", "Text", "1x", "a-b", &"a".repeat(65)] {
            assert!(validate_kind(bad).is_err(), "{bad:?}");
        }
        check_payload(&Value::String("x".repeat(1022)), 1024).unwrap();
        assert!(check_payload(&Value::String("x".repeat(1023)), 1024).is_err());
    }

    #[test]
    fn a_message_whose_ids_are_none_does_not_parse() {
        let id = |text| InstanceId::parse(text).unwrap();
        let message = Outgoing {
            from: id("a"),
            to: None,
            kind: "text".into(),
            ttl: DEFAULT_TTL,
            payload: Value::Null,
        }
        .copy(&new_id(), Timestamp::now(), &id("b"));
        let good = serde_json::to_value(&message).unwrap();
        assert_eq!(good["to"], Value::Null);
        assert_eq!(
            serde_json::from_value::<Message>(good.clone()).unwrap(),
            message
        );
        let mut without_to = good.clone();
        without_to.as_object_mut().unwrap().remove("to");
        assert_eq!(
            serde_json::from_value::<Message>(without_to).unwrap(),
            message
        );
        for field in ["from", "to", "recipient"] {
            let mut bad = good.clone();
            bad[field] = Value::from("../Not An Id");
            assert!(serde_json::from_value::<Message>(bad).is_err(), "{field}");
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::time::Timestamp;
    use proptest::prelude::*;

    /// Any JSON value, a few levels deep.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::from),
            "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z"
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("signature".to_string()),
                        Just("timestamp".to_string()),
                        Just("ttl".to_string()),
                        Just("payload".to_string()),
                        any::<String>(),
                    ],
                    inner,
                    0..6
                )
                .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// Any instance id (a message's ids are checked when it is read).
    fn instance_id() -> impl Strategy<Value = InstanceId> {
        "[a-z0-9][a-z0-9_-]{0,63}".prop_map(|id| InstanceId::parse(&id).expect("a valid id"))
    }

    fn message() -> impl Strategy<Value = Message> {
        (
            "[a-z0-9]{1,20}",
            instance_id(),
            proptest::option::of(instance_id()),
            instance_id(),
            "[a-z][a-z0-9_]{0,10}",
            0u64..253_402_300_799_999,
            any::<u64>(),
            json(),
        )
            .prop_map(
                |(id, from, to, recipient, kind, millis, ttl_ms, payload)| Message {
                    id,
                    from,
                    to,
                    recipient,
                    kind,
                    timestamp: Timestamp::from(
                        std::time::UNIX_EPOCH + Duration::from_millis(millis),
                    ),
                    ttl_ms,
                    payload,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn opening_any_json_never_panics(value in json()) {
            let key = SigningKey::from_bytes(b"k".to_vec());
            if let Ok(message) = sign::open::<Message>(&value, Some(&key)) {
                let _ = message.expired();
            }
            let _ = sign::open::<Message>(&value, None);
            let _ = check_payload(&value, 1024);
        }

        #[test]
        fn opening_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
                let key = SigningKey::from_bytes(b"k".to_vec());
                let _ = sign::open::<Message>(&value, Some(&key));
            }
        }

        #[test]
        fn a_sealed_message_opens_as_itself_and_any_change_is_refused(
            message in message(),
            field in prop_oneof![
                Just("id"), Just("from"), Just("to"), Just("recipient"), Just("type"),
                Just("timestamp"), Just("ttl"), Just("payload"), Just("signature"),
            ],
            replacement in json(),
        ) {
            let key = SigningKey::from_bytes(b"k".to_vec());
            let sealed = key.seal(&message);
            prop_assert_eq!(sign::open::<Message>(&sealed, Some(&key)).unwrap(), message.clone());
            let mut changed = sealed.clone();
            changed[field] = replacement;
            // Only a change that leaves the same message (say, the same value again) may
            // still verify.
            if let Ok(opened) = sign::open::<Message>(&changed, Some(&key)) {
                prop_assert_eq!(opened, message);
            }
        }
    }
}
