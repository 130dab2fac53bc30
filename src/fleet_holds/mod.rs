//! What the hosts of a fleet hold across each other, in the shared database: fleet locks
//! ([`FleetLocks`], behind [`crate::lock::LockStore`]), fleet reservations
//! ([`FleetReservations`], behind [`crate::reserve::ReservationStore`]), and the host heartbeat
//! that keeps them alive ([`HostBeat`], [`HostFlock`]). docs/FLEET.md.
//!
//! Invariants:
//! - A holder is alive while its host's heartbeat (one `fleet_members` row per
//!   `APP_FLEET_HOST`) is younger than the lease TTL by the server's clock, and, judged on its
//!   own host, while `/proc` still shows its process: a dead local holder lapses at once.
//! - One process per host writes the heartbeat: the holder of the host's flock in the data
//!   directory. Every fleet write also renews its host's heartbeat, so a hold taken from a
//!   shell lasts at least one TTL; a host where no `app` process runs lets its holds lapse
//!   after the TTL.
//! - Every operation is one request (a read, or one atomic batch), except a reservation change
//!   (one read, one write) and a wait (a read per poll, backing off to [`MAX_POLL`]).

mod beat;
mod locks;
mod reservations;

use crate::ids::InstanceId;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub(crate) use beat::{BeatTarget, HostBeat, HostFlock};
pub(crate) use locks::FleetLocks;
pub(crate) use reservations::FleetReservations;

use crate::config::Settings;
use crate::db::Blocking;
use crate::db::holds::{HolderRow, Member};
use crate::lock::Holder;
use crate::process::{Presence, ProcessIdentity};
use crate::time::Timestamp;

/// The first wait of a waiting acquirer between two reads.
const FIRST_POLL: Duration = Duration::from_millis(250);
/// The longest wait between two reads of a waiting acquirer.
const MAX_POLL: Duration = Duration::from_millis(1500);

/// The database the fleet shares and this host's place in it.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    db: Arc<Blocking>,
    /// This host's fleet name (`APP_FLEET_HOST`).
    host: String,
    /// How long a host's heartbeat counts.
    lease_ttl: Duration,
    /// This process, named as the heartbeat writer where its write creates the host's row.
    me: ProcessIdentity,
}

impl Fleet {
    /// The fleet of the server database `db` (the caller checked it is a server), seen from
    /// this host as `settings` name it.
    pub(crate) fn new(db: Arc<Blocking>, settings: &Settings) -> Fleet {
        Fleet {
            db,
            host: settings.fleet_host.clone(),
            lease_ttl: settings.lease_ttl,
            me: ProcessIdentity::current(),
        }
    }

    fn lease_ttl_ms(&self) -> i64 {
        self.lease_ttl.as_millis() as i64
    }

    fn member(&self) -> Member<'_> {
        Member {
            host: &self.host,
            pid: self.me.pid.into(),
            start_time: self.me.start_time as i64,
            secret_check: "",
        }
    }

    /// `holder` as this host stores it: on this fleet host.
    fn row(&self, holder: &Holder) -> HolderRow {
        HolderRow {
            instance: holder.instance.as_ref().map(InstanceId::to_string),
            pid: holder.pid.into(),
            start_time: holder.start_time as i64,
            boot_id: holder.boot_id.clone(),
            host: self.host.clone(),
        }
    }

    /// Why the hold of `holder` no longer counts, if it does not: its ttl ran out
    /// (`expires_in_ms`), its host's heartbeat (`host_age_ms` old) is stale, or it is a
    /// process of this host that is gone.
    fn lapsed(
        &self,
        holder: &HolderRow,
        expires_in_ms: Option<i64>,
        host_age_ms: Option<i64>,
    ) -> Option<String> {
        if let Some(ms) = expires_in_ms.filter(|ms| *ms <= 0) {
            return Some(format!(
                "its ttl ran out {} ago",
                crate::time::format_age(Duration::from_millis(ms.unsigned_abs()))
            ));
        }
        dead_holder(holder, host_age_ms, (&self.host, self.lease_ttl))
    }
}

/// Why `holder` is dead, judged from host `here` with lease TTL `lease_ttl`, if it is: its
/// host's heartbeat (`host_age_ms` old) is missing or stale, or it is a process of `here`
/// that `/proc` says is gone. (A hold also lapses when its `--ttl` runs out; that is not
/// its holder's death.)
pub(crate) fn dead_holder(
    holder: &HolderRow,
    host_age_ms: Option<i64>,
    (here, lease_ttl): (&str, Duration),
) -> Option<String> {
    match host_age_ms {
        None => return Some(format!("host {} has no fleet heartbeat", holder.host)),
        Some(age) if age > lease_ttl.as_millis() as i64 => {
            return Some(format!(
                "host {} has had no fleet heartbeat for {} (lease TTL {})",
                holder.host,
                crate::time::format_age(Duration::from_millis(age.unsigned_abs())),
                crate::time::format_age(lease_ttl)
            ));
        }
        Some(_) => {}
    }
    dead_here(holder, here).map(|_| format!("{} is gone", holder_of(holder)))
}

/// `(pid, start time)` of `holder` when it is a process of host `here` that `/proc` says is
/// gone.
pub(crate) fn dead_here(holder: &HolderRow, here: &str) -> Option<(i64, i64)> {
    if holder.host != here {
        return None;
    }
    let identity = ProcessIdentity {
        pid: u32::try_from(holder.pid).ok()?,
        start_time: u64::try_from(holder.start_time).ok()?,
        boot_id: holder.boot_id.clone(),
    };
    (identity.presence() != Presence::Running).then_some((holder.pid, holder.start_time))
}

/// A stored holder as the lock and reservation types name it.
fn holder_of(row: &HolderRow) -> Holder {
    Holder {
        instance: row.instance.clone().map(InstanceId::stored),
        pid: u32::try_from(row.pid).unwrap_or(0),
        start_time: u64::try_from(row.start_time).unwrap_or(0),
        boot_id: row.boot_id.clone(),
        host: row.host.clone(),
    }
}

/// The local time `ms` milliseconds from now (the server's clock gave the difference).
fn from_now(ms: i64) -> Timestamp {
    let now = SystemTime::now();
    let offset = Duration::from_millis(ms.unsigned_abs());
    let at = if ms >= 0 {
        now.checked_add(offset)
    } else {
        now.checked_sub(offset)
    };
    Timestamp::from(at.unwrap_or(now))
}
