//! The `messages` table: the copies of messages for instances on other hosts of a fleet
//! (`crate::fleet_queue` reads and writes it; the file queue stays the path within a host).
//!
//! Invariants:
//! - Each call is one request to the server. A send files all its copies in one batch; a poll
//!   is one read, and polling writes nothing; a write happens only when a copy is filed,
//!   acknowledged or moved aside.
//! - A copy's key (message id, host, repository, recipient) is the sender's choice, so a batch
//!   sent twice (an unanswered request is resent) files each copy once.
//! - Expiry is judged by the server's clock ([`NOW_MS`]), so hosts with skewed clocks agree.

use libsql::Value;

use super::fleet::NOW_MS;
use super::{Db, integer, text};
use crate::error::Result;
use crate::ids::InstanceId;

/// How long an acknowledged (or moved aside) copy is kept, in milliseconds: far longer than a
/// sender retries a request, so a resent copy finds its record and is not filed again.
const KEEP_DONE_MS: i64 = 24 * 3600 * 1000;

/// The most copies one poll reads.
const POLL_LIMIT: i64 = 200;

/// One instance's inbox in the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Address<'a> {
    /// The fleet host it runs on (`APP_FLEET_HOST`).
    pub host: &'a str,
    /// Its repository's root on that host.
    pub repo_root: &'a str,
    /// The instance.
    pub recipient: &'a InstanceId,
}

/// A copy to file: message `id`, signed for its recipient (`body`).
#[derive(Debug, Clone)]
pub(crate) struct Copy<'a> {
    /// The message id.
    pub id: &'a str,
    /// The sending instance and its host.
    pub sender: (&'a str, &'a str),
    /// The signed copy, as a file of the queue holds it.
    pub body: String,
    /// How long it may wait unacknowledged.
    pub ttl_ms: i64,
}

/// A copy waiting in an inbox.
#[derive(Debug, Clone)]
pub(crate) struct Waiting {
    /// The message id.
    pub id: String,
    /// The signed copy.
    pub body: String,
    /// Whether its TTL ran out (by the server's clock).
    pub expired: bool,
}

const PRUNE: &str = "DELETE FROM messages WHERE state IN ('acked', 'dead', 'quarantined')
                     AND done_ms < {now} - ?1";

fn prune() -> (String, Vec<Value>) {
    (
        PRUNE.replace("{now}", NOW_MS),
        vec![Value::Integer(KEEP_DONE_MS)],
    )
}

fn as_refs(statements: &[(String, Vec<Value>)]) -> Vec<(&str, Vec<Value>)> {
    statements
        .iter()
        .map(|(sql, params)| (sql.as_str(), params.clone()))
        .collect()
}

/// Files `copy` for instance `recipient` where it runs on another host than the sender's: the
/// registration of the `instances` mirror not stopped and with a heartbeat at or after
/// `live_since` (the latest such, when several). Returns the host it was filed for, `None`
/// when no such instance runs (nothing was filed). One request.
pub(crate) async fn file_for(
    db: &Db,
    copy: &Copy<'_>,
    recipient: &InstanceId,
    live_since: &str,
) -> Result<Option<String>> {
    let (sender, sender_host) = copy.sender;
    let statements = [
        prune(),
        (
            format!(
                "INSERT INTO messages (id, host, repo_root, recipient, sender, sender_host, body,
                                       sent_ms, expires_ms)
                 SELECT ?1, host, repo_root, ?2, ?3, ?4, ?5, {NOW_MS}, {NOW_MS} + ?6
                 FROM instances
                 WHERE id = ?2 AND host != ?4 AND status != 'stopped' AND last_heartbeat >= ?7
                 ORDER BY last_heartbeat DESC LIMIT 1
                 ON CONFLICT DO NOTHING"
            ),
            vec![
                Value::Text(copy.id.into()),
                Value::Text(recipient.to_string()),
                Value::Text(sender.into()),
                Value::Text(sender_host.into()),
                Value::Text(copy.body.clone()),
                Value::Integer(copy.ttl_ms),
                Value::Text(live_since.into()),
            ],
        ),
        (
            "SELECT host FROM messages WHERE id = ?1 AND recipient = ?2 AND host != ?3".into(),
            vec![
                Value::Text(copy.id.into()),
                Value::Text(recipient.to_string()),
                Value::Text(sender_host.into()),
            ],
        ),
    ];
    let results = db
        .batch("sending a message to another host", &as_refs(&statements))
        .await?;
    Ok(results
        .last()
        .and_then(|rows| rows.first())
        .map(|row| text(&row[0])))
}

/// Files every copy of `copies`, each for its address, in one request.
pub(crate) async fn file(db: &Db, copies: &[(Address<'_>, Copy<'_>)]) -> Result<()> {
    let mut statements = vec![prune()];
    for (to, copy) in copies {
        let (sender, sender_host) = copy.sender;
        statements.push((
            format!(
                "INSERT INTO messages (id, host, repo_root, recipient, sender, sender_host, body,
                                       sent_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, {NOW_MS}, {NOW_MS} + ?8)
                 ON CONFLICT DO NOTHING"
            ),
            vec![
                Value::Text(copy.id.into()),
                Value::Text(to.host.into()),
                Value::Text(to.repo_root.into()),
                Value::Text(to.recipient.to_string()),
                Value::Text(sender.into()),
                Value::Text(sender_host.into()),
                Value::Text(copy.body.clone()),
                Value::Integer(copy.ttl_ms),
            ],
        ));
    }
    db.batch("sending a message to other hosts", &as_refs(&statements))
        .await
        .map(drop)
}

fn address_params(at: Address<'_>) -> Vec<Value> {
    vec![
        Value::Text(at.host.into()),
        Value::Text(at.repo_root.into()),
        Value::Text(at.recipient.to_string()),
    ]
}

/// The copies waiting at `at`, oldest first: one read.
pub(crate) async fn waiting(db: &Db, at: Address<'_>) -> Result<Vec<Waiting>> {
    let sql = format!(
        "SELECT id, body, expires_ms < {NOW_MS} FROM messages
         WHERE host = ?1 AND repo_root = ?2 AND recipient = ?3 AND state = 'waiting'
         ORDER BY id LIMIT {POLL_LIMIT}"
    );
    let results = db
        .batch(
            "reading this instance's messages",
            &[(&sql, address_params(at))],
        )
        .await?;
    Ok(results
        .first()
        .map(|rows| {
            rows.iter()
                .map(|row| Waiting {
                    id: text(&row[0]),
                    body: text(&row[1]),
                    expired: integer(&row[2]).unwrap_or(0) != 0,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// What becomes of a waiting copy that is not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aside {
    /// Its TTL ran out.
    Dead,
    /// It does not verify.
    Quarantined,
}

/// Moves the waiting copies `moves` of `at` aside, each with its reason, in one request.
pub(crate) async fn set_aside(
    db: &Db,
    at: Address<'_>,
    moves: &[(String, Aside, String)],
) -> Result<()> {
    let statements: Vec<(String, Vec<Value>)> = moves
        .iter()
        .map(|(id, aside, reason)| {
            let mut params = address_params(at);
            params.push(Value::Text(id.clone()));
            params.push(Value::Text(
                match aside {
                    Aside::Dead => "dead",
                    Aside::Quarantined => "quarantined",
                }
                .into(),
            ));
            params.push(Value::Text(reason.clone()));
            (
                format!(
                    "UPDATE messages SET state = ?5, reason = ?6, done_ms = {NOW_MS}
                     WHERE host = ?1 AND repo_root = ?2 AND recipient = ?3 AND id = ?4
                       AND state = 'waiting'"
                ),
                params,
            )
        })
        .collect();
    db.batch("moving messages aside", &as_refs(&statements))
        .await
        .map(drop)
}

/// Acknowledges the copies `ids` of `at` in one request. Returns, for each, whether this call
/// acknowledged it (`false`: it was acknowledged before, or it is not one of `at`'s).
pub(crate) async fn ack(db: &Db, at: Address<'_>, ids: &[String]) -> Result<Vec<bool>> {
    let statements: Vec<(String, Vec<Value>)> = ids
        .iter()
        .map(|id| {
            let mut params = address_params(at);
            params.push(Value::Text(id.clone()));
            (
                format!(
                    "UPDATE messages SET state = 'acked', done_ms = {NOW_MS}
                     WHERE host = ?1 AND repo_root = ?2 AND recipient = ?3 AND id = ?4
                       AND state = 'waiting'
                     RETURNING id"
                ),
                params,
            )
        })
        .collect();
    let results = db
        .batch("acknowledging messages", &as_refs(&statements))
        .await?;
    Ok((0..ids.len())
        .map(|i| results.get(i).is_some_and(|rows| !rows.is_empty()))
        .collect())
}

/// The copy `id` of `at`, waiting or acknowledged: its body and whether it waits.
pub(crate) async fn find(db: &Db, at: Address<'_>, id: &str) -> Result<Option<(String, bool)>> {
    let mut params = address_params(at);
    params.push(Value::Text(id.into()));
    let sql = "SELECT body, state = 'waiting' FROM messages
               WHERE host = ?1 AND repo_root = ?2 AND recipient = ?3 AND id = ?4
                 AND state IN ('waiting', 'acked')";
    let results = db.batch("reading a message", &[(sql, params)]).await?;
    Ok(results
        .first()
        .and_then(|rows| rows.first())
        .map(|row| (text(&row[0]), integer(&row[1]).unwrap_or(0) != 0)))
}
