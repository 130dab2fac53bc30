//! What fleet hosts hold across each other: the host heartbeats (`fleet_members`), fleet locks
//! and fleet reservations (docs/FLEET.md).
//!
//! Invariants:
//! - Every time is the server's clock ([`NOW_MS`]); a host's heartbeat counts while it is
//!   younger than the lease TTL the caller passes.
//! - Every write is one atomic request and may be sent twice (an unanswered request is
//!   resent): taking a lock the caller already holds gives the same token, a reservation
//!   change applies only under the change tag it read and is keyed by ids chosen beforehand.
//! - Every fleet write also renews the writing host's heartbeat (the writer is alive).

use libsql::Value;

use super::fleet::NOW_MS;
use super::{Db, integer, opt, opt_text, text};
use crate::error::Result;

/// Who holds a fleet lock or reservation, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRow {
    /// The instance, when an instance holds it.
    pub instance: Option<String>,
    /// The process whose life bounds the hold.
    pub pid: i64,
    /// That process's start time.
    pub start_time: i64,
    /// The boot that start time belongs to.
    pub boot_id: String,
    /// The fleet host it runs on.
    pub host: String,
}

impl HolderRow {
    fn params(&self) -> [Value; 5] {
        [
            opt(self.instance.clone()),
            Value::Integer(self.pid),
            Value::Integer(self.start_time),
            Value::Text(self.boot_id.clone()),
            Value::Text(self.host.clone()),
        ]
    }

    /// The holder in columns `at..at + 5` of `row` (instance, pid, start time, boot, host),
    /// `None` where the pid is NULL (a free lock).
    fn from_row(row: &[Value], at: usize) -> Option<HolderRow> {
        Some(HolderRow {
            instance: opt_text(&row[at]),
            pid: integer(&row[at + 1])?,
            start_time: integer(&row[at + 2]).unwrap_or(0),
            boot_id: text(&row[at + 3]),
            host: text(&row[at + 4]),
        })
    }
}

/// A host's heartbeat writer.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    /// The fleet host (`APP_FLEET_HOST`).
    pub host: &'a str,
    /// The writing process.
    pub pid: i64,
    /// Its start time.
    pub start_time: i64,
    /// Its secret check (empty without `APP_SHARED_SECRET`).
    pub secret_check: &'a str,
}

/// The statement of one heartbeat of `member`'s host, for a caller that folds it into a
/// batch of its own (`app worker`'s heartbeat).
pub fn beat_statement(member: &Member<'_>) -> (String, Vec<Value>) {
    (
        format!(
            "INSERT INTO fleet_members (host, heartbeat_ms, pid, start_time, secret_check)
             VALUES (?1, {NOW_MS}, ?2, ?3, ?4)
             ON CONFLICT (host) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms,
                pid = excluded.pid, start_time = excluded.start_time,
                secret_check = excluded.secret_check"
        ),
        vec![
            Value::Text(member.host.into()),
            Value::Integer(member.pid),
            Value::Integer(member.start_time),
            Value::Text(member.secret_check.into()),
        ],
    )
}

/// One heartbeat of `member`'s host: one request.
pub async fn beat(db: &Db, member: &Member<'_>) -> Result<()> {
    let (sql, params) = beat_statement(member);
    db.execute("renewing this host's fleet heartbeat", &sql, params)
        .await
        .map(drop)
}

/// The statement a fleet write starts with: the writer's host is alive now. Creates the row
/// (naming the writer) where the host has none, else only renews its heartbeat.
fn touch_statement(member: &Member<'_>) -> (String, Vec<Value>) {
    (
        format!(
            "INSERT INTO fleet_members (host, heartbeat_ms, pid, start_time, secret_check)
             VALUES (?1, {NOW_MS}, ?2, ?3, ?4)
             ON CONFLICT (host) DO UPDATE SET
                heartbeat_ms = max(fleet_members.heartbeat_ms, excluded.heartbeat_ms)"
        ),
        beat_statement(member).1,
    )
}

/// A fleet lock as stored, with the ages that judge it by the server's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRow {
    /// The lock's name.
    pub name: String,
    /// The last token granted.
    pub token: i64,
    /// The holder, `None` while free.
    pub holder: Option<HolderRow>,
    /// When the holder took it (the holder's clock, for people).
    pub acquired_at: Option<String>,
    /// Milliseconds until its `--ttl` runs out (zero or less: it ran out).
    pub expires_in_ms: Option<i64>,
    /// Milliseconds since the holder's host's last heartbeat; `None` for a host with none.
    pub host_age_ms: Option<i64>,
}

const LOCK_COLUMNS: &str = "l.name, l.token, l.instance, l.pid, l.start_time, l.boot_id, l.host,
    l.acquired_at, l.expires_ms - {now}, {now} - m.heartbeat_ms
    FROM fleet_locks AS l LEFT JOIN fleet_members AS m ON m.host = l.host";

fn lock_columns() -> String {
    LOCK_COLUMNS.replace("{now}", NOW_MS)
}

fn lock_row(row: &[Value]) -> LockRow {
    LockRow {
        name: text(&row[0]),
        token: integer(&row[1]).unwrap_or(0),
        holder: HolderRow::from_row(row, 2),
        acquired_at: opt_text(&row[7]),
        expires_in_ms: integer(&row[8]),
        host_age_ms: integer(&row[9]),
    }
}

/// What one attempt to take a fleet lock asks.
#[derive(Debug, Clone)]
pub struct LockAsk<'a> {
    /// The lock.
    pub name: &'a str,
    /// Who takes it.
    pub holder: &'a HolderRow,
    /// `--ttl` in milliseconds.
    pub ttl_ms: Option<i64>,
    /// How long a host's heartbeat counts, in milliseconds.
    pub lease_ttl_ms: i64,
    /// A holder on the caller's host that `/proc` says is dead: (pid, start time).
    pub dead: Option<(i64, i64)>,
    /// Now, by the caller's clock, for people.
    pub acquired_at: &'a str,
    /// The caller's host, renewed by the attempt.
    pub member: &'a Member<'a>,
}

/// The caller holds the row (`?2..?6`: instance, pid, start time, boot, host).
const OURS: &str = "coalesce(host = ?6 AND pid = ?3 AND instance IS ?2
    AND (?2 IS NOT NULL OR (start_time = ?4 AND boot_id = ?5)), 0)";
/// The row's hold no longer counts: its ttl ran out, its host's heartbeat is stale (`?8`
/// the lease TTL), or it is the dead holder `?9`/`?10` on the caller's host `?6`.
const LAPSED: &str = "coalesce((expires_ms IS NOT NULL AND expires_ms <= {now})
    OR NOT EXISTS (SELECT 1 FROM fleet_members AS m
                   WHERE m.host = fleet_locks.host AND m.heartbeat_ms >= {now} - ?8)
    OR (host = ?6 AND pid = ?9 AND start_time = ?10), 0)";

fn lock_params(ask: &LockAsk<'_>) -> Vec<Value> {
    let mut params = vec![Value::Text(ask.name.into())];
    params.extend(ask.holder.params());
    params.extend([
        ask.ttl_ms.map_or(Value::Null, Value::Integer),
        Value::Integer(ask.lease_ttl_ms),
        ask.dead.map_or(Value::Null, |(pid, _)| Value::Integer(pid)),
        ask.dead
            .map_or(Value::Null, |(_, start)| Value::Integer(start)),
        Value::Text(ask.acquired_at.into()),
    ]);
    params
}

/// One attempt to take a fleet lock, in one request: granted (a new token) when it is free or
/// its hold lapsed, renewed (same token, a `--ttl` from now) when the caller holds it, else
/// unchanged. Returns the row afterwards: the caller holds the lock when it names it.
pub async fn take_lock(db: &Db, ask: &LockAsk<'_>) -> Result<LockRow> {
    let params = lock_params(ask);
    let kept = format!("({OURS} AND NOT {LAPSED})").replace("{now}", NOW_MS);
    let take = format!(
        "UPDATE fleet_locks SET
            token = CASE WHEN {kept} THEN token ELSE token + 1 END,
            acquired_at = CASE WHEN {kept} THEN acquired_at ELSE ?11 END,
            expires_ms = CASE WHEN ?7 IS NOT NULL THEN {NOW_MS} + ?7
                              WHEN {kept} THEN expires_ms ELSE NULL END,
            instance = ?2, pid = ?3, start_time = ?4, boot_id = ?5, host = ?6
         WHERE name = ?1 AND (pid IS NULL OR {OURS} OR {})",
        LAPSED.replace("{now}", NOW_MS)
    );
    let (touch, touch_params) = touch_statement(ask.member);
    let results = db
        .batch(
            "taking a fleet lock",
            &[
                (touch.as_str(), touch_params),
                (
                    "INSERT INTO fleet_locks (name, token) VALUES (?1, 0)
                     ON CONFLICT (name) DO NOTHING",
                    params.clone(),
                ),
                (take.as_str(), params.clone()),
                (
                    &format!("SELECT {} WHERE l.name = ?1", lock_columns()),
                    params,
                ),
            ],
        )
        .await?;
    let row = results
        .last()
        .and_then(|rows| rows.first())
        .expect("the lock row exists after its insert");
    Ok(lock_row(row))
}

/// How a release of a fleet lock ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockReleased {
    /// The caller (or, forced, anyone) held it; now it is free.
    Released,
    /// Nobody held it, or the hold had lapsed (it is free now).
    NotHeld,
    /// Someone else holds it; nothing changed.
    NotYours(HolderRow),
}

/// Frees the lock `ask.name` if `ask.holder` holds it, its hold lapsed, or `force`: one
/// request. Sent twice, the second finds it free ([`LockReleased::NotHeld`]).
pub async fn release_lock(db: &Db, ask: &LockAsk<'_>, force: bool) -> Result<LockReleased> {
    let mut params = lock_params(ask);
    params.push(Value::Integer(force.into()));
    let before = format!(
        "SELECT pid IS NOT NULL, {OURS}, {LAPSED}, instance, pid, start_time, boot_id, host
         FROM fleet_locks WHERE name = ?1"
    )
    .replace("{now}", NOW_MS);
    let free = format!(
        "UPDATE fleet_locks SET instance = NULL, pid = NULL, start_time = NULL, boot_id = NULL,
            host = NULL, acquired_at = NULL, expires_ms = NULL
         WHERE name = ?1 AND pid IS NOT NULL AND (?12 OR {OURS} OR {LAPSED})"
    )
    .replace("{now}", NOW_MS);
    let results = db
        .batch(
            "releasing a fleet lock",
            &[(before.as_str(), params.clone()), (free.as_str(), params)],
        )
        .await?;
    let Some(row) = results.first().and_then(|rows| rows.first()) else {
        return Ok(LockReleased::NotHeld);
    };
    let flag = |at: usize| integer(&row[at]).unwrap_or(0) != 0;
    Ok(match (flag(0), flag(1), flag(2)) {
        (false, _, _) | (true, _, true) => LockReleased::NotHeld,
        (true, true, false) => LockReleased::Released,
        (true, false, false) if force => LockReleased::Released,
        (true, false, false) => LockReleased::NotYours(
            HolderRow::from_row(row, 3).expect("a held lock names its holder"),
        ),
    })
}

/// The statement of [`locks`], for a caller that folds it into a read of its own.
pub fn locks_statement() -> String {
    format!("SELECT {} ORDER BY l.name", lock_columns())
}

/// The locks the result set of [`locks_statement`] holds.
pub fn locks_from(rows: &[Vec<Value>]) -> Vec<LockRow> {
    rows.iter().map(|row| lock_row(row)).collect()
}

/// Every fleet lock ever granted, by name (one read).
pub async fn locks(db: &Db) -> Result<Vec<LockRow>> {
    let rows = db
        .query_rows("listing the fleet locks", &locks_statement(), vec![])
        .await?;
    Ok(locks_from(&rows))
}

/// The fleet lock `name`, if it was ever granted (one read).
pub async fn lock(db: &Db, name: &str) -> Result<Option<LockRow>> {
    let rows = db
        .query_rows(
            "reading a fleet lock",
            &format!("SELECT {} WHERE l.name = ?1", lock_columns()),
            vec![Value::Text(name.into())],
        )
        .await?;
    Ok(rows.first().map(|row| lock_row(row)))
}

/// A fleet reservation as stored, with the ages that judge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRow {
    /// Its id.
    pub id: String,
    /// Who reserved.
    pub holder: HolderRow,
    /// Its globs.
    pub patterns: Vec<String>,
    /// Shared or exclusive.
    pub shared: bool,
    /// Why.
    pub reason: Option<String>,
    /// When it was made (the holder's clock).
    pub created_at: String,
    /// Milliseconds until its `--ttl` runs out.
    pub expires_in_ms: Option<i64>,
    /// Milliseconds since the holder's host's last heartbeat; `None` for a host with none.
    pub host_age_ms: Option<i64>,
}

/// Every fleet reservation, read at one change tag.
#[derive(Debug, Clone, Default)]
pub struct ReservationsRead {
    /// The change tag: a change applies only while it is still this.
    pub tag: i64,
    /// The reservations.
    pub rows: Vec<ReservationRow>,
}

/// The statement of [`reservations`], for a caller that folds it into a read of its own.
pub fn reservations_statement() -> String {
    format!(
        "SELECT c.value, r.id, r.instance, r.pid, r.start_time, r.boot_id, r.host,
            r.patterns, r.shared, r.reason, r.created_at, r.expires_ms - {NOW_MS},
            {NOW_MS} - m.heartbeat_ms
         FROM fleet_counters AS c
         LEFT JOIN fleet_reservations AS r ON 1
         LEFT JOIN fleet_members AS m ON m.host = r.host
         WHERE c.name = 'reservations' ORDER BY r.created_at, r.id"
    )
}

/// The reservations and change tag the result set of [`reservations_statement`] holds.
pub fn reservations_from(rows: &[Vec<Value>]) -> ReservationsRead {
    let tag = rows.first().and_then(|row| integer(&row[0])).unwrap_or(0);
    let rows = rows
        .iter()
        .filter(|row| !matches!(row[1], Value::Null))
        .filter_map(|row| {
            Some(ReservationRow {
                id: text(&row[1]),
                holder: HolderRow::from_row(row, 2)?,
                patterns: serde_json::from_str(&text(&row[7])).unwrap_or_default(),
                shared: integer(&row[8]).unwrap_or(0) != 0,
                reason: opt_text(&row[9]),
                created_at: text(&row[10]),
                expires_in_ms: integer(&row[11]),
                host_age_ms: integer(&row[12]),
            })
        })
        .collect();
    ReservationsRead { tag, rows }
}

/// Every fleet reservation and the change tag, in one read.
pub async fn reservations(db: &Db) -> Result<ReservationsRead> {
    let rows = db
        .query_rows(
            "reading the fleet reservations",
            &reservations_statement(),
            vec![],
        )
        .await?;
    Ok(reservations_from(&rows))
}

/// A change of the fleet reservations: rows to drop and rows to write (by id).
#[derive(Debug, Clone, Default)]
pub struct ReservationChange {
    /// Ids to delete.
    pub delete: Vec<String>,
    /// Rows to insert or replace; `expires_in_ms` is from now.
    pub put: Vec<ReservationRow>,
}

/// Applies `change` if the change tag is still `seen`, setting it to `new` (a value of the
/// caller's, unique to this change), in one request. Returns whether it applied; sent twice,
/// the second finds the tag `new` and applies the same rows again.
pub async fn change_reservations(
    db: &Db,
    member: &Member<'_>,
    (seen, new): (i64, i64),
    change: &ReservationChange,
) -> Result<bool> {
    let tag = vec![Value::Integer(seen), Value::Integer(new)];
    let ours = "(SELECT value FROM fleet_counters WHERE name = 'reservations') = ?2";
    let (touch, touch_params) = touch_statement(member);
    let mut statements: Vec<(String, Vec<Value>)> = vec![
        (touch, touch_params),
        (
            "UPDATE fleet_counters SET value = ?2 WHERE name = 'reservations' AND value = ?1"
                .into(),
            tag.clone(),
        ),
    ];
    for id in &change.delete {
        let mut params = tag.clone();
        params.push(Value::Text(id.clone()));
        statements.push((
            format!("DELETE FROM fleet_reservations WHERE id = ?3 AND {ours}"),
            params,
        ));
    }
    for row in &change.put {
        let mut params = tag.clone();
        params.push(Value::Text(row.id.clone()));
        params.extend(row.holder.params());
        params.extend([
            Value::Text(serde_json::to_string(&row.patterns).expect("patterns serialize")),
            Value::Integer(row.shared.into()),
            opt(row.reason.clone()),
            Value::Text(row.created_at.clone()),
            row.expires_in_ms.map_or(Value::Null, Value::Integer),
        ]);
        statements.push((
            format!(
                "INSERT INTO fleet_reservations (id, instance, pid, start_time, boot_id, host,
                    patterns, shared, reason, created_at, expires_ms)
                 SELECT ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, {NOW_MS} + ?13 WHERE {ours}
                 ON CONFLICT (id) DO UPDATE SET patterns = excluded.patterns"
            ),
            params,
        ));
    }
    statements.push((
        "SELECT value FROM fleet_counters WHERE name = 'reservations'".into(),
        vec![],
    ));
    let statements: Vec<(&str, Vec<Value>)> = statements
        .iter()
        .map(|(sql, params)| (sql.as_str(), params.clone()))
        .collect();
    let results = db
        .batch("changing the fleet reservations", &statements)
        .await?;
    Ok(results
        .last()
        .and_then(|rows| rows.first())
        .and_then(|row| integer(&row[0]))
        == Some(new))
}

/// How freeing a dead holder's fleet lock or reservation (`app doctor --fix`) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadFreed {
    /// It was still the dead holder's: freed.
    Freed,
    /// Its holder is alive again (its host's heartbeat is fresh): left alone.
    Alive,
    /// It is no longer that holder's (released, or taken over meanwhile): nothing to do.
    Moved,
}

/// Still the holder `?3..?5` (pid, start time, host) and still dead: its host's heartbeat is
/// older than `?6` ms, or `?7` (the caller's `/proc` found it gone on its own host).
const STILL_DEAD: &str = "{t}.pid = ?3 AND {t}.start_time = ?4 AND {t}.host = ?5
    AND (?7 OR NOT EXISTS (SELECT 1 FROM fleet_members AS m
                           WHERE m.host = {t}.host AND m.heartbeat_ms >= {now} - ?6))";

fn still_dead(table: &str) -> String {
    STILL_DEAD.replace("{t}", table).replace("{now}", NOW_MS)
}

fn dead_params(
    first: Value,
    second: Value,
    holder: &HolderRow,
    lease_ttl_ms: i64,
    dead_here: bool,
) -> Vec<Value> {
    vec![
        first,
        second,
        Value::Integer(holder.pid),
        Value::Integer(holder.start_time),
        Value::Text(holder.host.clone()),
        Value::Integer(lease_ttl_ms),
        Value::Integer(dead_here.into()),
    ]
}

/// Frees the fleet lock `name` while it is still held under `token` by the dead `holder`
/// (judged by the server's clock with `lease_ttl_ms`, or `dead_here`), in one request that
/// renews no heartbeat: a lock a live holder holds, or one taken over meanwhile, is never
/// touched. Sent twice, the second finds it free under the same token ([`DeadFreed::Freed`]).
pub async fn free_dead_lock(
    db: &Db,
    (name, token): (&str, i64),
    holder: &HolderRow,
    (lease_ttl_ms, dead_here): (i64, bool),
) -> Result<DeadFreed> {
    let params = dead_params(
        Value::Text(name.into()),
        Value::Integer(token),
        holder,
        lease_ttl_ms,
        dead_here,
    );
    let free = format!(
        "UPDATE fleet_locks SET instance = NULL, pid = NULL, start_time = NULL, boot_id = NULL,
            host = NULL, acquired_at = NULL, expires_ms = NULL
         WHERE name = ?1 AND token = ?2 AND {}",
        still_dead("fleet_locks")
    );
    let results = db
        .batch(
            "freeing a dead holder's fleet lock",
            &[
                (free.as_str(), params.clone()),
                (
                    "SELECT token, pid, start_time, host FROM fleet_locks WHERE name = ?1",
                    params,
                ),
            ],
        )
        .await?;
    let row = results.last().and_then(|rows| rows.first());
    Ok(match row {
        Some(row) if integer(&row[0]) == Some(token) => match integer(&row[1]) {
            None => DeadFreed::Freed,
            Some(pid) if pid == holder.pid && text(&row[3]) == holder.host => DeadFreed::Alive,
            Some(_) => DeadFreed::Moved,
        },
        _ => DeadFreed::Moved,
    })
}

/// Deletes the fleet reservation `id` while the dead `holder` still holds it (judged as
/// [`free_dead_lock`] judges), setting the change tag to `new` (a value of the caller's) so
/// that a change read before it is made again; one request that renews no heartbeat. Sent
/// twice, the second finds the tag `new`.
pub async fn drop_dead_reservation(
    db: &Db,
    (id, new): (&str, i64),
    holder: &HolderRow,
    (lease_ttl_ms, dead_here): (i64, bool),
) -> Result<DeadFreed> {
    let params = dead_params(
        Value::Text(id.into()),
        Value::Integer(new),
        holder,
        lease_ttl_ms,
        dead_here,
    );
    let tag = format!(
        "UPDATE fleet_counters SET value = ?2 WHERE name = 'reservations' AND EXISTS
            (SELECT 1 FROM fleet_reservations AS r WHERE r.id = ?1 AND {})",
        still_dead("r")
    );
    let results = db
        .batch(
            "dropping a dead holder's fleet reservation",
            &[
                (tag.as_str(), params.clone()),
                (
                    "DELETE FROM fleet_reservations WHERE id = ?1
                     AND (SELECT value FROM fleet_counters WHERE name = 'reservations') = ?2",
                    params.clone(),
                ),
                (
                    "SELECT (SELECT value FROM fleet_counters WHERE name = 'reservations') = ?2,
                        EXISTS (SELECT 1 FROM fleet_reservations WHERE id = ?1)",
                    params,
                ),
            ],
        )
        .await?;
    let row = results.last().and_then(|rows| rows.first());
    let flag = |at: usize| row.and_then(|row| integer(&row[at])).unwrap_or(0) != 0;
    Ok(match (flag(0), flag(1)) {
        (true, _) => DeadFreed::Freed,
        (false, true) => DeadFreed::Alive,
        (false, false) => DeadFreed::Moved,
    })
}
