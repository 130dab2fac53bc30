//! The event log: what happened, in order (instance lifecycle now; messages, locks and runs as
//! they arrive).

use libsql::Value;
use serde::Serialize;

use super::{Db, integer, opt, opt_text, text};

/// A fresh unique id for a row.
pub fn new_uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
use crate::error::Result;
use crate::process;
use crate::time::Timestamp;

/// One stored event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Row id, increasing in insertion order.
    pub id: i64,
    /// When it happened (RFC 3339).
    pub at: String,
    /// Host it happened on.
    pub host: String,
    /// Repository it concerns.
    pub repo_root: Option<String>,
    /// Instance it concerns.
    pub instance: Option<String>,
    /// What happened, e.g. `instance.started`.
    pub kind: String,
    /// Details.
    pub payload: serde_json::Value,
}

/// An event to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Unique id chosen by the writer, so recording it twice stores it once.
    pub uid: String,
    /// When it happened.
    pub at: Timestamp,
    /// Repository it concerns.
    pub repo_root: Option<String>,
    /// Instance it concerns.
    pub instance: Option<String>,
    /// What happened.
    pub kind: String,
    /// Details.
    pub payload: serde_json::Value,
}

/// Appends an event.
pub async fn record(db: &Db, event: &NewEvent) -> Result<()> {
    let (sql, params) = record_statement(event);
    db.execute("recording an event", sql, params)
        .await
        .map(drop)
}

/// The statement of [`record`], for a batch that writes it with others in one request. It is
/// idempotent (keyed by the event's uid), as a batch sent again must be.
pub fn record_statement(event: &NewEvent) -> (&'static str, Vec<Value>) {
    (
        "INSERT INTO events (uid, at, host, repo_root, instance, kind, payload)
         VALUES (?7, ?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (uid) DO NOTHING",
        vec![
            Value::Text(event.at.to_string()),
            Value::Text(process::hostname().to_string()),
            opt(event.repo_root.clone()),
            opt(event.instance.clone()),
            Value::Text(event.kind.clone()),
            Value::Text(event.payload.to_string()),
            Value::Text(event.uid.clone()),
        ],
    )
}

/// The id of the newest event written at a time before `at` (RFC 3339, as events store it), or
/// 0 when there is none: where a feed that began at `at` starts, however long its database
/// took to open.
pub async fn latest_id_before(db: &Db, at: &str) -> Result<i64> {
    let rows = db
        .query_rows(
            "reading the newest event id",
            "SELECT COALESCE(MAX(id), 0) FROM events WHERE at < ?1",
            vec![Value::Text(at.to_string())],
        )
        .await?;
    Ok(rows.first().and_then(|row| integer(&row[0])).unwrap_or(0))
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only events at or after this time.
    pub since: Option<Timestamp>,
    /// Only events of this instance.
    pub instance: Option<String>,
    /// Only events of this repository.
    pub repo_root: Option<String>,
    /// Only events with a larger id (for following).
    pub after_id: i64,
}

/// Events matching `filter`, oldest first, at most `limit`.
pub async fn query(db: &Db, filter: &EventFilter, limit: u32) -> Result<Vec<Event>> {
    let rows = db
        .query_rows(
            "reading events",
            "SELECT id, at, host, repo_root, instance, kind, payload FROM events
             WHERE id > ?1
               AND (?2 IS NULL OR at >= ?2)
               AND (?3 IS NULL OR instance = ?3)
               AND (?4 IS NULL OR repo_root = ?4)
             ORDER BY id LIMIT ?5",
            vec![
                Value::Integer(filter.after_id),
                opt(filter.since.map(|t| t.to_string())),
                opt(filter.instance.clone()),
                opt(filter.repo_root.clone()),
                Value::Integer(limit.into()),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Event {
            id: integer(&row[0]).unwrap_or_default(),
            at: text(&row[1]),
            host: text(&row[2]),
            repo_root: opt_text(&row[3]),
            instance: opt_text(&row[4]),
            kind: text(&row[5]),
            payload: serde_json::from_str(&text(&row[6])).unwrap_or(serde_json::Value::Null),
        })
        .collect())
}
