//! The fleet's tables: worker hosts, and the tasks of fleet runs offered to them under leases
//! with fencing tokens (docs/FLEET.md).
//!
//! Invariants:
//! - Every lease time is the server's clock ([`NOW_MS`]), never a host's.
//! - A claim is one atomic batch that leases only offered tasks (or tasks whose lease expired)
//!   the host's labels allow, under a token taken once from the server's counter; sent twice
//!   (a retried request) it is applied once (`fleet_claims`).
//! - Every report names its token and changes the row only while that token is the row's, so a
//!   host that lost its lease (it slept, it was presumed dead) changes nothing.
//! - Each call is one request to the server: the fleet must be frugal with a single-writer
//!   database.

use std::collections::BTreeMap;

use libsql::Value;
use serde::Serialize;

use super::{Db, integer, opt, opt_text, text};
use crate::error::Result;
use crate::ids::RunId;

/// Now, in milliseconds since the epoch, by the database's clock.
pub const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

/// Labels of a host, or the labels a task needs.
pub type Labels = BTreeMap<String, String>;

/// A worker host as the fleet sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRow {
    /// Its name (`app worker --name`, default the host name).
    pub name: String,
    /// The repository it serves.
    pub repo: String,
    /// How many tasks it runs at once.
    pub capacity: i64,
    /// Its labels.
    pub labels: Labels,
    /// The `app` version it runs.
    pub version: String,
    /// The worker's pid.
    pub pid: i64,
    /// That process's start time.
    pub start_time: i64,
    /// When it started.
    pub started_at: String,
    /// Milliseconds since its last heartbeat, by the server's clock.
    pub heartbeat_age_ms: i64,
    /// `running`, `draining` or `stopped`.
    pub state: String,
    /// Tasks it runs now.
    pub running: i64,
    /// Its one-minute load average.
    pub load: Option<f64>,
    /// Its secret check (see [`crate::fleet`]).
    pub secret_check: String,
    /// Why it takes nothing, when it says so.
    pub note: Option<String>,
}

const HOST_COLUMNS: &str = "name, repo, capacity, labels, version, pid, start_time, started_at, \
                            heartbeat_ms, state, running, load, secret_check, note";

fn labels(value: &Value) -> Labels {
    serde_json::from_str(&text(value)).unwrap_or_default()
}

fn host_row(row: &[Value], now_ms: i64) -> HostRow {
    HostRow {
        name: text(&row[0]),
        repo: text(&row[1]),
        capacity: integer(&row[2]).unwrap_or(0),
        labels: labels(&row[3]),
        version: text(&row[4]),
        pid: integer(&row[5]).unwrap_or(0),
        start_time: integer(&row[6]).unwrap_or(0),
        started_at: text(&row[7]),
        heartbeat_age_ms: now_ms - integer(&row[8]).unwrap_or(0),
        state: text(&row[9]),
        running: integer(&row[10]).unwrap_or(0),
        load: match &row[11] {
            Value::Real(x) => Some(*x),
            Value::Integer(n) => Some(*n as f64),
            _ => None,
        },
        secret_check: text(&row[12]),
        note: opt_text(&row[13]),
    }
}

/// Registers `host`, unless a live worker (a heartbeat younger than `ttl_ms`) already holds its
/// name. Returns the row that holds the name afterwards: `host` itself, or the live one.
pub async fn register_host(db: &Db, host: &HostRow, ttl_ms: i64) -> Result<HostRow> {
    let labels = serde_json::to_string(&host.labels).expect("labels serialize");
    let results = db
        .batch(
            "registering this worker host",
            &[
                (
                    &format!(
                        "INSERT INTO fleet_hosts ({HOST_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, {NOW_MS}, 'running', 0, ?9, ?10, NULL)
                         ON CONFLICT (name) DO UPDATE SET
                            repo = excluded.repo, capacity = excluded.capacity,
                            labels = excluded.labels, version = excluded.version,
                            pid = excluded.pid, start_time = excluded.start_time,
                            started_at = excluded.started_at, heartbeat_ms = excluded.heartbeat_ms,
                            state = 'running', running = 0, load = excluded.load,
                            secret_check = excluded.secret_check, note = NULL
                         WHERE fleet_hosts.state = 'stopped'
                            OR fleet_hosts.heartbeat_ms < {NOW_MS} - ?11
                            OR (fleet_hosts.pid = ?6 AND fleet_hosts.start_time = ?7)"
                    ),
                    vec![
                        Value::Text(host.name.clone()),
                        Value::Text(host.repo.clone()),
                        Value::Integer(host.capacity),
                        Value::Text(labels),
                        Value::Text(host.version.clone()),
                        Value::Integer(host.pid),
                        Value::Integer(host.start_time),
                        Value::Text(host.started_at.clone()),
                        host.load.map_or(Value::Null, Value::Real),
                        Value::Text(host.secret_check.clone()),
                        Value::Integer(ttl_ms),
                    ],
                ),
                (
                    &format!("SELECT {HOST_COLUMNS}, {NOW_MS} FROM fleet_hosts WHERE name = ?1"),
                    vec![Value::Text(host.name.clone())],
                ),
            ],
        )
        .await?;
    let row = results
        .last()
        .and_then(|rows| rows.first())
        .expect("the host row exists after its upsert");
    Ok(host_row(row, integer(&row[14]).unwrap_or(0)))
}

/// What one heartbeat of a worker host says.
#[derive(Debug, Clone)]
pub struct Beat<'a> {
    /// The host.
    pub host: &'a str,
    /// Its worker process (the row is renewed only while it is this one's).
    pub pid: i64,
    /// That process's start time.
    pub start_time: i64,
    /// `running` or `draining`.
    pub state: &'a str,
    /// Tasks it runs now.
    pub running: i64,
    /// Its load average.
    pub load: Option<f64>,
    /// The leases it holds, with the last lines of each task's log.
    pub leases: &'a [(LeaseKey, Option<String>)],
    /// How long a lease lasts from now, in milliseconds.
    pub ttl_ms: i64,
    /// This host's fleet heartbeat, when this process writes it ([`super::holds`]).
    pub member: Option<super::holds::Member<'a>>,
}

/// One heartbeat: the host's row and every lease it holds renewed, in one request. Returns the
/// leases still held: a lease missing from the answer was lost (it expired and another host
/// took the task, or the run withdrew it).
pub async fn heartbeat(db: &Db, beat: &Beat<'_>) -> Result<Vec<LeaseKey>> {
    let mut statements: Vec<(String, Vec<Value>)> = beat
        .member
        .iter()
        .map(super::holds::beat_statement)
        .collect();
    statements.push((
        format!(
            "UPDATE fleet_hosts SET heartbeat_ms = {NOW_MS}, state = ?2, running = ?3, load = ?4
             WHERE name = ?1 AND pid = ?5 AND start_time = ?6"
        ),
        vec![
            Value::Text(beat.host.into()),
            Value::Text(beat.state.into()),
            Value::Integer(beat.running),
            beat.load.map_or(Value::Null, Value::Real),
            Value::Integer(beat.pid),
            Value::Integer(beat.start_time),
        ],
    ));
    for (lease, output) in beat.leases {
        statements.push((
            format!(
                "UPDATE fleet_tasks SET lease_expires = {NOW_MS} + ?3, output = coalesce(?4, output)
                 WHERE host = ?1 AND token = ?2 AND run_id = ?5 AND task_id = ?6
                   AND state IN ('leased', 'started')"
            ),
            vec![
                Value::Text(beat.host.into()),
                Value::Integer(lease.token),
                Value::Integer(beat.ttl_ms),
                opt(output.clone()),
                Value::Text(lease.run_id.to_string()),
                Value::Text(lease.task_id.clone()),
            ],
        ));
    }
    statements.push((
        "SELECT run_id, task_id, token FROM fleet_tasks
         WHERE host = ?1 AND state IN ('leased', 'started')"
            .into(),
        vec![Value::Text(beat.host.into())],
    ));
    let statements: Vec<(&str, Vec<Value>)> = statements
        .iter()
        .map(|(sql, params)| (sql.as_str(), params.clone()))
        .collect();
    let results = db.batch("renewing this host's leases", &statements).await?;
    let held: Vec<LeaseKey> = results
        .last()
        .map(|rows| rows.iter().map(|row| lease_key(row)).collect())
        .unwrap_or_default();
    Ok(beat
        .leases
        .iter()
        .map(|(lease, _)| lease.clone())
        .filter(|lease| held.contains(lease))
        .collect())
}

/// One lease: a task of a run under a token. A claim gives every task it leases the same
/// token, so a lease is named by all three.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    /// The run.
    pub run_id: RunId,
    /// The task.
    pub task_id: String,
    /// The claim's fencing token.
    pub token: i64,
}

fn lease_key(row: &[Value]) -> LeaseKey {
    LeaseKey {
        run_id: RunId::stored(text(&row[0])),
        task_id: text(&row[1]),
        token: integer(&row[2]).unwrap_or(0),
    }
}

/// Marks the host stopped (its worker exits).
pub async fn stop_host(db: &Db, host: &str, pid: i64, start_time: i64) -> Result<()> {
    db.execute(
        "recording that this worker stopped",
        "UPDATE fleet_hosts SET state = 'stopped', running = 0
         WHERE name = ?1 AND pid = ?2 AND start_time = ?3",
        vec![
            Value::Text(host.into()),
            Value::Integer(pid),
            Value::Integer(start_time),
        ],
    )
    .await
    .map(drop)
}

/// The state of a fleet task's current attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Waiting for a host.
    Offered,
    /// A host took it and prepares it.
    Leased,
    /// Its command runs on the host.
    Started,
    /// The host reported its end.
    Finished,
    /// The run took the offer back.
    Withdrawn,
}

impl LeaseState {
    /// The text stored.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Offered => "offered",
            LeaseState::Leased => "leased",
            LeaseState::Started => "started",
            LeaseState::Finished => "finished",
            LeaseState::Withdrawn => "withdrawn",
        }
    }

    fn parse(text: &str) -> LeaseState {
        match text {
            "leased" => LeaseState::Leased,
            "started" => LeaseState::Started,
            "finished" => LeaseState::Finished,
            "withdrawn" => LeaseState::Withdrawn,
            _ => LeaseState::Offered,
        }
    }
}

/// A task of a fleet run, as its row says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetTask {
    /// The run.
    pub run_id: RunId,
    /// The task.
    pub task_id: String,
    /// Leases taken so far (the attempt a host runs now).
    pub attempt: i64,
    /// Where it is.
    pub state: LeaseState,
    /// The host holding it.
    pub host: Option<String>,
    /// The lease's fencing token.
    pub token: Option<i64>,
    /// Whether the lease has expired (by the server's clock).
    pub expired: bool,
    /// What its host reported of the current attempt.
    #[serde(flatten)]
    pub report: Report,
    /// Labels a host needs for it.
    pub needs: Labels,
    /// Milliseconds until its lease runs out (zero or less: it ran out), by the server's
    /// clock; `None` without a lease.
    pub lease_expires_in_ms: Option<i64>,
}

const TASK_COLUMNS: &str = "run_id, task_id, attempt, state, host, token, \
     coalesce(lease_expires < {now}, 0), started_at, finished_at, exit_code, tip, detail, output, needs, \
     lease_expires - {now}";

fn task_row(row: &[Value]) -> FleetTask {
    FleetTask {
        run_id: RunId::stored(text(&row[0])),
        task_id: text(&row[1]),
        attempt: integer(&row[2]).unwrap_or(0),
        state: LeaseState::parse(&text(&row[3])),
        host: opt_text(&row[4]),
        token: integer(&row[5]),
        expired: integer(&row[6]).unwrap_or(0) != 0,
        report: Report {
            started_at: opt_text(&row[7]),
            finished_at: opt_text(&row[8]),
            exit_code: integer(&row[9]),
            tip: opt_text(&row[10]),
            detail: opt_text(&row[11]),
            output: opt_text(&row[12]),
        },
        needs: labels(&row[13]),
        lease_expires_in_ms: integer(&row[14]),
    }
}

fn task_columns() -> String {
    TASK_COLUMNS.replace("{now}", NOW_MS)
}

/// The fleet tasks of run `run_id`.
pub async fn run_tasks(db: &Db, run_id: &RunId) -> Result<Vec<FleetTask>> {
    let rows = db
        .query_rows(
            "reading a fleet run's tasks",
            &format!(
                "SELECT {} FROM fleet_tasks WHERE run_id = ?1",
                task_columns()
            ),
            vec![Value::Text(run_id.to_string())],
        )
        .await?;
    Ok(rows.iter().map(|row| task_row(row)).collect())
}

/// What `app fleet` shows, in one request.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    /// Every host, by name, with its heartbeat's age by the server's clock.
    pub hosts: Vec<HostRow>,
    /// The tasks leased or started on a host.
    pub running: Vec<FleetTask>,
    /// The tasks waiting for a host (offered, or their lease expired), with the labels they
    /// need.
    pub waiting: Vec<FleetTask>,
}

/// The statements of [`overview`] (hosts, running tasks, waiting tasks), for a caller that
/// folds them into a read of its own.
pub fn overview_statements() -> [String; 3] {
    let columns = task_columns();
    [
        format!("SELECT {HOST_COLUMNS}, {NOW_MS} FROM fleet_hosts ORDER BY name"),
        format!(
            "SELECT {columns} FROM fleet_tasks WHERE host IS NOT NULL AND state IN ('leased', 'started')
             ORDER BY host, run_id, task_id"
        ),
        format!(
            "SELECT {columns} FROM fleet_tasks WHERE state = 'offered'
                OR (state IN ('leased', 'started') AND lease_expires < {NOW_MS})
             ORDER BY run_id, task_id"
        ),
    ]
}

/// The overview the three result sets of [`overview_statements`] hold.
pub fn overview_from(results: &[Vec<Vec<Value>>]) -> Overview {
    let tasks = |rows: Option<&Vec<Vec<Value>>>| {
        rows.map(|rows| rows.iter().map(|row| task_row(row)).collect())
            .unwrap_or_default()
    };
    Overview {
        hosts: results
            .first()
            .map(|rows| {
                rows.iter()
                    .map(|row| host_row(row, integer(&row[14]).unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default(),
        running: tasks(results.get(1)),
        waiting: tasks(results.get(2)),
    }
}

/// The fleet's hosts, running and waiting tasks, read in one request.
pub async fn overview(db: &Db) -> Result<Overview> {
    let [hosts, running, waiting] = overview_statements();
    let results = db
        .batch(
            "reading the fleet",
            &[
                (hosts.as_str(), vec![]),
                (running.as_str(), vec![]),
                (waiting.as_str(), vec![]),
            ],
        )
        .await?;
    Ok(overview_from(&results))
}

/// An offer of one attempt of a task.
#[derive(Debug, Clone)]
pub struct Offer<'a> {
    /// The run.
    pub run_id: &'a RunId,
    /// The task.
    pub task_id: &'a str,
    /// The repository (see [`HostRow::repo`]).
    pub repo: &'a str,
    /// What to run (JSON).
    pub spec: &'a str,
    /// Its signature.
    pub sig: &'a str,
    /// The orchestrator's secret check.
    pub secret_check: &'a str,
    /// Labels a host must have.
    pub needs: &'a Labels,
}

/// Offers (or offers again, after a failed attempt) tasks to the fleet, in one request.
pub async fn offer(db: &Db, offers: &[Offer<'_>]) -> Result<()> {
    let statements: Vec<(&str, Vec<Value>)> = offers
        .iter()
        .map(|offer| {
            (
                "INSERT INTO fleet_tasks (run_id, task_id, repo, attempt, spec, needs, secret_check, sig, state)
                 VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, 'offered')
                 ON CONFLICT (run_id, task_id) DO UPDATE SET
                    repo = excluded.repo, spec = excluded.spec, needs = excluded.needs,
                    secret_check = excluded.secret_check, sig = excluded.sig, state = 'offered',
                    host = NULL, token = NULL, claim = NULL, lease_expires = NULL, started_at = NULL,
                    finished_at = NULL, exit_code = NULL, tip = NULL, detail = NULL, output = NULL",
                vec![
                    Value::Text(offer.run_id.to_string()),
                    Value::Text(offer.task_id.into()),
                    Value::Text(offer.repo.into()),
                    Value::Text(offer.spec.into()),
                    Value::Text(serde_json::to_string(offer.needs).expect("labels serialize")),
                    Value::Text(offer.secret_check.into()),
                    Value::Text(offer.sig.into()),
                ],
            )
        })
        .collect();
    db.batch("offering tasks to the fleet", &statements)
        .await
        .map(drop)
}

/// Takes back every offer of run `run_id` no host took yet.
pub async fn withdraw(db: &Db, run_id: &RunId) -> Result<()> {
    db.execute(
        "taking back a run's offers",
        "UPDATE fleet_tasks SET state = 'withdrawn' WHERE run_id = ?1 AND state = 'offered'",
        vec![Value::Text(run_id.to_string())],
    )
    .await
    .map(drop)
}

/// A task a host leased.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The run.
    pub run_id: RunId,
    /// The task.
    pub task_id: String,
    /// The attempt it runs.
    pub attempt: i64,
    /// What to run (JSON).
    pub spec: String,
    /// Its signature.
    pub sig: String,
    /// The lease's fencing token.
    pub token: i64,
}

/// What a host may take.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    /// The host.
    pub host: &'a str,
    /// Its repository.
    pub repo: &'a str,
    /// Its labels.
    pub labels: &'a Labels,
    /// Its secret check: only tasks offered under the same secret are taken.
    pub secret_check: &'a str,
    /// How many it takes at most.
    pub limit: i64,
    /// How long the leases last, in milliseconds.
    pub ttl_ms: i64,
}

/// The condition a task row must meet for `ask`'s host: its repository, its secret, offered or
/// with an expired lease, and every label it needs held by the host (?2 repo, ?3 labels, ?4
/// secret check).
const ELIGIBLE: &str = "repo = ?2 AND secret_check = ?4
    AND (state = 'offered' OR (state IN ('leased', 'started') AND lease_expires < {now}))
    AND NOT EXISTS (SELECT 1 FROM json_each(needs) AS need
                    WHERE json_extract(?3, '$.\"' || need.key || '\"') IS NOT need.value)";

fn eligible() -> String {
    ELIGIBLE.replace("{now}", NOW_MS)
}

/// The rowids of the task rows `ask`'s host may lease now: [`ELIGIBLE`] ones, and of each run
/// no more than its `max_concurrent` (in its row's `report`, `$.fleet.max_concurrent`) minus
/// the tasks it has leased or started under a live lease; by run, then task. The orchestrator
/// offers every ready task at once and this keeps the run's cap, so a host whose task ended
/// takes the next one without waiting for the orchestrator.
fn takeable() -> String {
    format!(
        "SELECT rid FROM (
            SELECT rowid AS rid, run_id, task_id,
                row_number() OVER (PARTITION BY run_id ORDER BY task_id) AS n
            FROM fleet_tasks WHERE {eligible}) AS e
         WHERE e.n <= coalesce(
                (SELECT json_extract(report, '$.fleet.max_concurrent') FROM runs WHERE id = e.run_id),
                1000000000)
            - (SELECT count(*) FROM fleet_tasks AS r WHERE r.run_id = e.run_id
                AND r.state IN ('leased', 'started') AND r.lease_expires >= {NOW_MS})
         ORDER BY run_id, task_id",
        eligible = eligible()
    )
}

/// Whether any task is waiting that `ask`'s host may take now (within its run's cap): a read,
/// so an idle host does not take the server's write lock.
pub async fn any_for(db: &Db, ask: &Ask<'_>) -> Result<bool> {
    let rows = db
        .query_rows(
            "looking for fleet tasks",
            &format!("SELECT 1 FROM ({}) WHERE ?1 = ?1 LIMIT 1", takeable()),
            ask_params(ask, "")[..4].to_vec(),
        )
        .await?;
    Ok(!rows.is_empty())
}

fn ask_params(ask: &Ask<'_>, uid: &str) -> Vec<Value> {
    vec![
        Value::Text(uid.into()),
        Value::Text(ask.repo.into()),
        Value::Text(serde_json::to_string(ask.labels).expect("labels serialize")),
        Value::Text(ask.secret_check.into()),
        Value::Text(ask.host.into()),
        Value::Integer(ask.limit),
        Value::Integer(ask.ttl_ms),
    ]
}

/// Leases up to `ask.limit` tasks to `ask.host` under one new fencing token, in one atomic
/// request; `uid` names the claim, so a retried request is applied once.
pub async fn claim(db: &Db, ask: &Ask<'_>, uid: &str) -> Result<Vec<Claimed>> {
    let params = ask_params(ask, uid);
    let token = "(SELECT token FROM fleet_claims WHERE uid = ?1)";
    let statements = [
        format!("DELETE FROM fleet_claims WHERE at_ms < {NOW_MS} - 3600000"),
        format!(
            "INSERT INTO fleet_claims (uid, token, at_ms)
             SELECT ?1, value + 1, {NOW_MS} FROM fleet_counters WHERE name = 'lease'
             ON CONFLICT (uid) DO NOTHING"
        ),
        format!(
            "UPDATE fleet_counters SET value = {token} WHERE name = 'lease' AND value < {token}"
        ),
        format!(
            "UPDATE fleet_tasks SET state = 'leased', host = ?5, token = {token}, claim = ?1,
                lease_expires = {NOW_MS} + ?7, attempt = attempt + 1, started_at = NULL,
                finished_at = NULL, exit_code = NULL, tip = NULL, detail = NULL, output = NULL
             WHERE rowid IN ({} LIMIT ?6)
               AND (SELECT done FROM fleet_claims WHERE uid = ?1) = 0",
            takeable()
        ),
        "UPDATE fleet_claims SET done = 1 WHERE uid = ?1".to_string(),
        format!(
            "SELECT run_id, task_id, attempt, spec, sig, token FROM fleet_tasks
             WHERE claim = ?1 AND token = {token} AND host = ?5 ORDER BY run_id, task_id"
        ),
    ];
    let statements: Vec<(&str, Vec<Value>)> = statements
        .iter()
        .map(|sql| (sql.as_str(), params.clone()))
        .collect();
    let results = db.batch("claiming fleet tasks", &statements).await?;
    Ok(results
        .last()
        .map(|rows| {
            rows.iter()
                .map(|row| Claimed {
                    run_id: RunId::stored(text(&row[0])),
                    task_id: text(&row[1]),
                    attempt: integer(&row[2]).unwrap_or(0),
                    spec: text(&row[3]),
                    sig: text(&row[4]),
                    token: integer(&row[5]).unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A host's report on a leased task, as sent and as the row keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Its command started (at this time), or
    pub started_at: Option<String>,
    /// it ended (at this time), with
    pub finished_at: Option<String>,
    /// its exit code,
    pub exit_code: Option<i64>,
    /// the commit it ended on,
    pub tip: Option<String>,
    /// why it failed,
    pub detail: Option<String>,
    /// and the last lines of its log.
    pub output: Option<String>,
}

/// Applies `report` to task `task_id` of `run_id` if `token` still holds its lease; returns
/// whether it was applied (a stale token changes nothing).
pub async fn report(
    db: &Db,
    run_id: &RunId,
    task_id: &str,
    token: i64,
    report: &Report,
) -> Result<bool> {
    let (state, from) = if report.finished_at.is_some() {
        ("finished", "('leased', 'started')")
    } else {
        ("started", "('leased')")
    };
    let key = vec![
        Value::Text(run_id.to_string()),
        Value::Text(task_id.into()),
        Value::Integer(token),
    ];
    let mut params = key.clone();
    params.extend([
        opt(report.started_at.clone()),
        opt(report.finished_at.clone()),
        report.exit_code.map_or(Value::Null, Value::Integer),
        opt(report.tip.clone()),
        opt(report.detail.clone()),
        opt(report.output.clone()),
    ]);
    let update = format!(
        "UPDATE fleet_tasks SET state = '{state}', started_at = coalesce(?4, started_at),
            finished_at = ?5, exit_code = ?6, tip = ?7, detail = ?8,
            output = coalesce(?9, output)
         WHERE run_id = ?1 AND task_id = ?2 AND token = ?3 AND state IN {from}"
    );
    let results = db
        .batch(
            "reporting on a fleet task",
            &[
                (update.as_str(), params),
                (
                    "SELECT state FROM fleet_tasks WHERE run_id = ?1 AND task_id = ?2 AND token = ?3",
                    key,
                ),
            ],
        )
        .await?;
    Ok(results
        .last()
        .and_then(|rows| rows.first())
        .is_some_and(|row| text(&row[0]) == state))
}

/// Gives `leases` held by `host` back to the fleet (a worker stopped before their
/// tasks ended): another host takes them as a new attempt.
pub async fn release(db: &Db, host: &str, leases: &[LeaseKey]) -> Result<()> {
    let statements: Vec<(&str, Vec<Value>)> = leases
        .iter()
        .map(|lease| {
            (
                "UPDATE fleet_tasks SET state = 'offered', host = NULL, token = NULL, claim = NULL,
                    lease_expires = NULL
                 WHERE host = ?1 AND token = ?2 AND run_id = ?3 AND task_id = ?4
                   AND state IN ('leased', 'started')",
                vec![
                    Value::Text(host.into()),
                    Value::Integer(lease.token),
                    Value::Text(lease.run_id.to_string()),
                    Value::Text(lease.task_id.clone()),
                ],
            )
        })
        .collect();
    db.batch("giving leases back to the fleet", &statements)
        .await
        .map(drop)
}

/// Records that the orchestrator of fleet run `run_id` is alive (by the server's clock).
pub async fn run_heartbeat(db: &Db, run_id: &RunId) -> Result<()> {
    db.execute(
        "recording that this run's orchestrator is alive",
        &format!("UPDATE runs SET heartbeat_ms = {NOW_MS} WHERE id = ?1"),
        vec![Value::Text(run_id.to_string())],
    )
    .await
    .map(drop)
}

/// How old the heartbeat of fleet run `run_id`'s orchestrator is, in milliseconds by the
/// server's clock; `None` when it never beat (a local run).
pub async fn run_heartbeat_age(db: &Db, run_id: &RunId) -> Result<Option<i64>> {
    let rows = db
        .query_rows(
            "reading a run's heartbeat",
            &format!("SELECT {NOW_MS} - heartbeat_ms FROM runs WHERE id = ?1"),
            vec![Value::Text(run_id.to_string())],
        )
        .await?;
    Ok(rows.first().and_then(|row| integer(&row[0])))
}

/// A lease held on a task, as `app doctor` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    /// The run.
    pub run_id: String,
    /// The task.
    pub task_id: String,
    /// The attempt the lease is for.
    pub attempt: i64,
    /// The host holding it.
    pub host: String,
    /// The lease's fencing token.
    pub token: i64,
    /// How long ago the lease expired, in milliseconds by the server's clock (`None`: it runs).
    pub expired_ms: Option<i64>,
    /// Whether its host is alive (not stopped, a heartbeat within the TTL).
    pub host_alive: bool,
}

/// What the fleet left that `app doctor` judges: one read.
#[derive(Debug, Clone, Default)]
pub(crate) struct Leftovers {
    /// Hosts of the repository not stopped whose heartbeat is older than the TTL.
    pub dead_hosts: Vec<HostRow>,
    /// Every lease held on a task of the repository.
    pub held: Vec<Held>,
    /// Waiting message copies past their TTL, per inbox: (host, repo root, recipient, count).
    pub expired_messages: Vec<(String, String, String, i64)>,
    /// The status of each run of `run_ids` the `runs` table knows.
    pub runs: BTreeMap<String, String>,
    /// The branch of each task of those runs, by (run, task).
    pub branches: BTreeMap<(String, String), String>,
    /// Every fleet lock (of every repository of the server).
    pub locks: Vec<super::holds::LockRow>,
    /// Every fleet reservation.
    pub reservations: Vec<super::holds::ReservationRow>,
}

/// A host is alive while it is not stopped and its heartbeat is within ?2 ms (by the server's
/// clock); `{host}` names the host row.
const HOST_ALIVE: &str = "{host}.state != 'stopped' AND {host}.heartbeat_ms >= {now} - ?2";

/// A host is dead while it is not stopped and its heartbeat is older than ?2 ms.
const HOST_DEAD: &str = "{host}.state != 'stopped' AND {host}.heartbeat_ms < {now} - ?2";

fn host_alive(host: &str) -> String {
    HOST_ALIVE.replace("{host}", host).replace("{now}", NOW_MS)
}

fn host_dead(host: &str) -> String {
    HOST_DEAD.replace("{host}", host).replace("{now}", NOW_MS)
}

/// Reads, in one request, what the fleet of repository `repo` (when this repository has a
/// remote: its hosts and leases) and every host (its expired messages) left for `app doctor`,
/// judged with a lease TTL of `ttl_ms`; and the status of the runs `run_ids`.
pub(crate) async fn leftovers(
    db: &Db,
    repo: Option<&str>,
    ttl_ms: i64,
    run_ids: &[String],
) -> Result<Leftovers> {
    let params = vec![
        repo.map_or(Value::Null, |repo| Value::Text(repo.into())),
        Value::Integer(ttl_ms),
    ];
    let statements = leftover_statements(run_ids);
    let statements: Vec<(&str, Vec<Value>)> = statements
        .iter()
        .map(|sql| (sql.as_str(), params.clone()))
        .collect();
    let results = db
        .batch("reading what the fleet left behind", &statements)
        .await?;
    Ok(Leftovers::from_results(&results))
}

/// The statements of [`leftovers`], in the order [`Leftovers::from_results`] reads their rows:
/// dead hosts, held leases, expired messages, run statuses, task branches, fleet locks, fleet
/// reservations.
fn leftover_statements(run_ids: &[String]) -> [String; 7] {
    let runs: Vec<String> = run_ids
        .iter()
        .map(|id| super::literal(&Value::Text(id.clone())))
        .collect();
    let runs = match runs.is_empty() {
        true => "NULL".to_string(),
        false => runs.join(", "),
    };
    [
        format!(
            "SELECT {HOST_COLUMNS}, {NOW_MS} FROM fleet_hosts AS h
             WHERE h.repo = ?1 AND {} ORDER BY h.name",
            host_dead("h")
        ),
        format!(
            "SELECT t.run_id, t.task_id, t.attempt, t.host, t.token,
                    CASE WHEN t.lease_expires < {NOW_MS} THEN {NOW_MS} - t.lease_expires END,
                    EXISTS (SELECT 1 FROM fleet_hosts AS h WHERE h.name = t.host AND {})
             FROM fleet_tasks AS t
             WHERE t.repo = ?1 AND t.state IN ('leased', 'started')
             ORDER BY t.run_id, t.task_id",
            host_alive("h")
        ),
        format!(
            "SELECT host, repo_root, recipient, count(*) FROM messages
             WHERE state = 'waiting' AND expires_ms < {NOW_MS}
             GROUP BY host, repo_root, recipient ORDER BY host, repo_root, recipient"
        ),
        format!("SELECT id, status FROM runs WHERE id IN ({runs})"),
        format!("SELECT run_id, task_id, branch FROM run_tasks WHERE run_id IN ({runs})"),
        super::holds::locks_statement(),
        super::holds::reservations_statement(),
    ]
}

impl Leftovers {
    /// Reads the rows of the [`leftover_statements`], in their order.
    fn from_results(results: &[Vec<Vec<Value>>]) -> Leftovers {
        let rows = |i: usize| results.get(i).map(Vec::as_slice).unwrap_or_default();
        Leftovers {
            dead_hosts: rows(0)
                .iter()
                .map(|row| host_row(row, integer(&row[14]).unwrap_or(0)))
                .collect(),
            held: rows(1)
                .iter()
                .map(|row| Held {
                    run_id: text(&row[0]),
                    task_id: text(&row[1]),
                    attempt: integer(&row[2]).unwrap_or(0),
                    host: text(&row[3]),
                    token: integer(&row[4]).unwrap_or(0),
                    expired_ms: integer(&row[5]),
                    host_alive: integer(&row[6]).unwrap_or(0) != 0,
                })
                .collect(),
            expired_messages: rows(2)
                .iter()
                .map(|row| {
                    (
                        text(&row[0]),
                        text(&row[1]),
                        text(&row[2]),
                        integer(&row[3]).unwrap_or(0),
                    )
                })
                .collect(),
            runs: rows(3)
                .iter()
                .map(|row| (text(&row[0]), text(&row[1])))
                .collect(),
            branches: rows(4)
                .iter()
                .map(|row| ((text(&row[0]), text(&row[1])), text(&row[2])))
                .collect(),
            locks: super::holds::locks_from(rows(5)),
            reservations: super::holds::reservations_from(rows(6)).rows,
        }
    }
}

/// Marks the dead host `name` stopped, only while it is the worker `pid`/`start_time` and its
/// heartbeat is still older than `ttl_ms`: its row is kept, and a heartbeat of that worker
/// makes it live again. Returns whether it is stopped afterwards (`false`: it came back).
pub(crate) async fn stop_dead_host(
    db: &Db,
    name: &str,
    (pid, start_time): (i64, i64),
    ttl_ms: i64,
) -> Result<bool> {
    let params = vec![
        Value::Text(name.into()),
        Value::Integer(ttl_ms),
        Value::Integer(pid),
        Value::Integer(start_time),
    ];
    let results = db
        .batch(
            "marking a dead host stopped",
            &[
                (
                    &format!(
                        "UPDATE fleet_hosts SET state = 'stopped', running = 0
                         WHERE name = ?1 AND pid = ?3 AND start_time = ?4 AND {}",
                        host_dead("fleet_hosts")
                    ),
                    params.clone(),
                ),
                (
                    "SELECT state = 'stopped' FROM fleet_hosts WHERE name = ?1",
                    params,
                ),
            ],
        )
        .await?;
    Ok(results
        .last()
        .and_then(|rows| rows.first())
        .is_some_and(|row| integer(&row[0]).unwrap_or(0) != 0))
}

/// What became of an expired lease doctor handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandedBack {
    /// The task is offered again: the next host takes it as a new attempt.
    Offered,
    /// The lease is no longer this one (another host took the task, or it ended).
    Moved,
    /// Its host is alive again, or renewed the lease: left alone.
    Kept,
}

/// Gives the expired lease `token` on task `task_id` of `run_id` back to the fleet (as
/// [`release`] does) only while it is still that lease, still expired, and no live host (its
/// heartbeat within `ttl_ms`) holds it. One request; sent twice it is applied once (the token
/// guards it).
pub(crate) async fn hand_back(
    db: &Db,
    run_id: &str,
    task_id: &str,
    token: i64,
    ttl_ms: i64,
) -> Result<HandedBack> {
    let params = vec![
        Value::Text(run_id.to_string()),
        Value::Integer(ttl_ms),
        Value::Text(task_id.into()),
        Value::Integer(token),
    ];
    let results = db
        .batch(
            "handing an expired lease back to the fleet",
            &[
                (
                    &format!(
                        "UPDATE fleet_tasks SET state = 'offered', host = NULL, token = NULL,
                            claim = NULL, lease_expires = NULL
                         WHERE run_id = ?1 AND task_id = ?3 AND token = ?4
                           AND state IN ('leased', 'started') AND lease_expires < {NOW_MS}
                           AND NOT EXISTS (SELECT 1 FROM fleet_hosts AS h
                                           WHERE h.name = fleet_tasks.host AND {})",
                        host_alive("h")
                    ),
                    params.clone(),
                ),
                (
                    "SELECT state, token FROM fleet_tasks WHERE run_id = ?1 AND task_id = ?3",
                    params,
                ),
            ],
        )
        .await?;
    let row = results.last().and_then(|rows| rows.first());
    Ok(match row.map(|row| (text(&row[0]), integer(&row[1]))) {
        Some((_, Some(now))) if now == token => HandedBack::Kept,
        Some((state, None)) if state == "offered" => HandedBack::Offered,
        _ => HandedBack::Moved,
    })
}
