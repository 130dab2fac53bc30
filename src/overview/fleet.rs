//! The fleet part of the overview, read when the database is a server: the worker hosts, the
//! leases of fleet runs, the fleet locks and reservations, and the instances the `instances`
//! mirror holds for the fleet's other hosts.
//!
//! Invariants:
//! - Its statements go into the same read as the runs' ([`statements`]): one batch request
//!   against the server for all of them.
//! - Every age is the server's clock (the hosts' heartbeats, the leases, the holds), except
//!   the other hosts' instances, whose heartbeats are the times they wrote.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use libsql::Value;
use serde::{Deserialize, Serialize};

use super::{Attention, InstanceView, LockView, ReservationView};
use crate::config::Settings;
use crate::db::Blocking;
use crate::db::fleet::{self as db_fleet, FleetTask, HostRow};
use crate::db::holds;
use crate::db::instances::{self, InstanceRow, MirrorStatus};
use crate::error::Result;
use crate::fleet_holds::{Fleet, FleetLocks, FleetReservations};
use crate::ids::InstanceId;
use crate::registry::{InstanceRecord, InstanceStatus};
use crate::time::{self, Timestamp};

/// The fleet as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetView {
    /// This host's name in the fleet (`APP_FLEET_HOST`).
    pub host: String,
    /// How long a heartbeat or a lease counts (`APP_LEASE_TTL`), in milliseconds.
    pub lease_ttl_ms: i64,
    /// Every worker host, by name.
    pub hosts: Vec<FleetHostView>,
    /// The leases of fleet runs' tasks held by a host (expired ones too).
    pub leases: Vec<LeaseView>,
}

/// A worker host (`app worker`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetHostView {
    pub name: String,
    /// Tasks it runs at once, and runs now.
    pub capacity: i64,
    pub running: i64,
    pub labels: BTreeMap<String, String>,
    /// Its one-minute load average.
    pub load: Option<f64>,
    /// `running`, `draining`, `stopped`, or `dead` (no heartbeat for longer than the lease
    /// TTL), as `app fleet` judges it.
    pub state: String,
    /// Milliseconds since its last heartbeat, by the server's clock.
    pub heartbeat_age_ms: i64,
    /// The `app` version it runs.
    pub version: String,
    /// Why it takes nothing, when it says so.
    pub note: Option<String>,
}

/// The lease of a fleet run's task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseView {
    pub run: String,
    pub task: String,
    pub attempt: i64,
    /// `leased` or `started`.
    pub state: String,
    pub host: Option<String>,
    /// Its fencing token.
    pub token: Option<i64>,
    /// Milliseconds until it runs out (zero or less: it ran out), by the server's clock.
    pub expires_in_ms: Option<i64>,
    pub expired: bool,
}

/// What the fleet's statements read, judged.
#[derive(Debug)]
pub(super) struct FleetRead {
    pub(super) view: FleetView,
    pub(super) locks: Vec<LockView>,
    pub(super) reservations: Vec<ReservationView>,
    pub(super) instances: Vec<InstanceView>,
}

/// How many statements [`statements`] gives.
pub(super) const STATEMENTS: usize = 6;

/// The fleet's statements, seen from fleet host `host`: hosts, running and waiting tasks,
/// locks, reservations, the other hosts' instances.
pub(super) fn statements(host: &str) -> [(String, Vec<Value>); STATEMENTS] {
    let [hosts, running, waiting] = db_fleet::overview_statements();
    [
        (hosts, vec![]),
        (running, vec![]),
        (waiting, vec![]),
        (holds::locks_statement(), vec![]),
        (holds::reservations_statement(), vec![]),
        instances::elsewhere_statement(host),
    ]
}

/// Judges the result sets of [`statements`] (in their order), with the holds judged as
/// `fleet_holds` judges them for this host.
pub(super) fn read(
    results: &[Vec<Vec<Value>>],
    db: &Arc<Blocking>,
    settings: &Settings,
) -> Result<FleetRead> {
    let overview = db_fleet::overview_from(&results[..3]);
    let ttl_ms = settings.lease_ttl.as_millis() as i64;
    let fleet = Fleet::new(Arc::clone(db), settings);
    let locks = FleetLocks::new(fleet.clone());
    let locks = holds::locks_from(&results[3])
        .iter()
        .map(|row| {
            let (lock, lapsed) = locks.state(row);
            LockView {
                lock,
                lapsed,
                // A fleet waiter polls; it leaves no record to show.
                waiters: Vec::new(),
                scope: "fleet".into(),
            }
        })
        .collect();
    let reservations = FleetReservations::new(fleet);
    let reservations = holds::reservations_from(&results[4])
        .rows
        .iter()
        .map(|row| {
            let (reservation, lapsed) = reservations.judge(row);
            ReservationView {
                reservation,
                lapsed,
                scope: "fleet".into(),
            }
        })
        .collect();
    let stale_after = settings.timing.stale_after;
    let instances = instances::rows_from(&results[5])?
        .into_iter()
        .filter_map(|row| elsewhere(row, stale_after))
        .collect();
    Ok(FleetRead {
        view: FleetView {
            host: settings.fleet_host.clone(),
            lease_ttl_ms: ttl_ms,
            hosts: overview
                .hosts
                .iter()
                .map(|h| host_view(h, ttl_ms))
                .collect(),
            leases: overview.running.iter().map(lease_view).collect(),
        },
        locks,
        reservations,
        instances,
    })
}

fn host_view(host: &HostRow, ttl_ms: i64) -> FleetHostView {
    let alive = host.state != "stopped" && host.heartbeat_age_ms <= ttl_ms;
    let state = match (alive, host.state.as_str()) {
        (false, "stopped") => "stopped",
        (false, _) => "dead",
        (true, "draining") => "draining",
        (true, _) => "running",
    };
    FleetHostView {
        name: host.name.clone(),
        capacity: host.capacity,
        running: host.running,
        labels: host.labels.clone(),
        load: host.load,
        state: state.into(),
        heartbeat_age_ms: host.heartbeat_age_ms,
        version: host.version.clone(),
        note: host.note.clone(),
    }
}

fn lease_view(task: &FleetTask) -> LeaseView {
    LeaseView {
        run: task.run_id.to_string(),
        task: task.task_id.clone(),
        attempt: task.attempt,
        state: task.state.as_str().into(),
        host: task.host.clone(),
        token: task.token,
        expires_in_ms: task.lease_expires_in_ms,
        expired: task.expired,
    }
}

/// An instance of another fleet host as its mirror row tells it: live while its last
/// heartbeat is younger than `stale_after` (its host's `/proc` cannot be seen from here).
fn elsewhere(row: InstanceRow, stale_after: Duration) -> Option<InstanceView> {
    let id = match InstanceId::from_trusted(row.id, "the fleet's instances table") {
        Ok(id) => id,
        Err(err) => {
            tracing::warn!(%err, host = %row.host, "skipped a row of the instances table");
            return None;
        }
    };
    let heartbeat_at: Timestamp = row.last_heartbeat.parse().ok()?;
    let status = match row.status {
        MirrorStatus::Starting => InstanceStatus::Starting,
        MirrorStatus::Running => InstanceStatus::Running,
        MirrorStatus::Stopping | MirrorStatus::Stopped => InstanceStatus::Stopping,
    };
    let age = heartbeat_at.age();
    let (liveness, reason) = if age <= stale_after {
        ("live", None)
    } else {
        (
            "stale",
            Some(format!(
                "no heartbeat for {} (on fleet host {})",
                time::format_age(age),
                row.host
            )),
        )
    };
    let record = InstanceRecord {
        id,
        pid: u32::try_from(row.pid).unwrap_or(0),
        start_time: u64::try_from(row.start_time).unwrap_or(0),
        boot_id: String::new(),
        host: row.host.clone(),
        started_at: row.started_at.parse().unwrap_or(heartbeat_at),
        heartbeat_at,
        worktree: row.worktree.map(Into::into),
        cwd: row.repo_root.into(),
        branch: row.branch,
        base: row.base,
        command: row.command,
        child_pid: None,
        child_start_time: None,
        status,
        ports: Vec::new(),
        api_url: None,
    };
    Some(InstanceView {
        record,
        liveness: liveness.into(),
        reason,
        // As its host's heartbeat row last told it, while that is fresh (unknown when written
        // by a binary whose state report this one cannot read).
        agent: row
            .agent
            .filter(|_| liveness == "live")
            .and_then(|agent| serde_json::from_value(agent).ok()),
        progress: None,
        run: None,
        task: None,
        fleet_host: Some(row.host),
        elsewhere: true,
    })
}

/// The fleet's part of the attention strip, ranked as `super::attention` ranks: dead hosts
/// and expired leases next to dead instances.
pub(super) fn attention(view: &FleetView) -> Vec<(u8, Attention)> {
    let ttl = time::format_age(Duration::from_millis(view.lease_ttl_ms.unsigned_abs()));
    let mut items = Vec::new();
    for host in view.hosts.iter().filter(|host| host.state == "dead") {
        let age = Duration::from_millis(host.heartbeat_age_ms.unsigned_abs());
        items.push((
            3,
            Attention {
                kind: "dead-host".into(),
                subject: host.name.clone(),
                text: format!(
                    "worker host {} has had no heartbeat for {} (lease TTL {ttl}); its tasks go \
                     to other hosts, restart 'app worker' there",
                    host.name,
                    time::format_age(age)
                ),
                since: time::time_ago(age, "a heartbeat").ok().map(Timestamp::from),
            },
        ));
    }
    for lease in view.leases.iter().filter(|lease| lease.expired) {
        let host = lease.host.as_deref().unwrap_or("?");
        items.push((
            3,
            Attention {
                kind: "expired-lease".into(),
                subject: format!("{}/{}", lease.run, lease.task),
                text: format!(
                    "the lease of task {} (attempt {}, token {}) on host {host} expired; the next \
                     free host takes the task",
                    lease.task,
                    lease.attempt,
                    lease.token.unwrap_or(0)
                ),
                since: lease.expires_in_ms.map(|ms| {
                    let ago = Duration::from_millis(ms.unsigned_abs());
                    Timestamp::from(
                        SystemTime::now()
                            .checked_sub(ago)
                            .unwrap_or(SystemTime::now()),
                    )
                }),
            },
        ));
    }
    items
}
