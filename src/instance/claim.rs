//! Claiming an instance's id, branch and ports.
//!
//! Invariants:
//! - Choosing an id only reads; the claim itself happens inside one registry update (under the
//!   registry lock), so two instances racing for the same name or branch cannot both win.
//! - A live holder of the name or branch refuses the claim (exit 3), except that `app ci` jobs
//!   on one branch never collide: the later one tests it detached.

use std::collections::HashSet;
use std::ops::RangeInclusive;

use git2::Repository;

use crate::config::Timing;
use crate::error::{InstanceError, Result};
use crate::ids::InstanceId;
use crate::paths::AppPaths;
use crate::ports;
use crate::registry::{BranchRecord, Entry, InstanceRecord, Liveness, Registry, Snapshot, Tables};
use crate::worktree::{self, WorktreePlan};

/// The id for a new instance: `name` unless a live instance holds it, else an unused random
/// one. Only reads.
pub(super) fn choose_id(
    (repo, paths): (&Repository, &AppPaths),
    snapshot: &Snapshot,
    name: Option<InstanceId>,
    timing: Timing,
) -> Result<InstanceId> {
    match name {
        Some(name) => {
            refuse_live_holder(snapshot, &name, timing)?;
            Ok(name)
        }
        None => (0..16)
            .map(|_| InstanceId::random())
            .find(|id| !id_in_use(repo, paths, snapshot, id))
            .ok_or_else(|| InstanceError::NoFreeId.into()),
    }
}

/// Whether `id` was ever used in this repository as far as any trace shows.
fn id_in_use(repo: &Repository, paths: &AppPaths, snapshot: &Snapshot, id: &InstanceId) -> bool {
    snapshot.instances.iter().any(|entry| match entry {
        Entry::Valid(record) => &record.id == id,
        Entry::Forged { key, .. } => key == id,
    }) || paths.worktree(id).exists()
        || paths.git_worktree_admin(id).exists()
        || repo
            .find_branch(&worktree::default_branch(id), git2::BranchType::Local)
            .is_ok()
}

fn refuse_live_holder(snapshot: &Snapshot, name: &str, timing: Timing) -> Result<()> {
    if let Some(record) = snapshot.instance(name)
        && record.liveness(timing.stale_after) == Liveness::Live
    {
        return Err(InstanceError::NameHeld {
            name: name.to_string(),
            pid: record.pid,
            started: record.started_at.to_string(),
        }
        .into());
    }
    Ok(())
}

/// What an instance claims besides its id.
pub(super) struct Claim<'a> {
    /// Its worktree, when it has one (`app ci` may turn it detached).
    pub plan: Option<&'a mut WorktreePlan>,
    /// How many ports to lease, and the range to lease them from (`APP_PORT_RANGE`).
    pub ports: Option<(usize, RangeInclusive<u16>)>,
    /// `app ci`: a branch a live instance holds is tested detached instead of refused.
    pub ci: bool,
}

/// Registers the instance and claims its branch (and ports) under the lock. Returns whether
/// the branch is one `app` creates (or created, for a reused worktree).
pub(super) fn claim(
    registry: &Registry,
    record: &mut InstanceRecord,
    mut claim: Claim<'_>,
    timing: Timing,
) -> Result<bool> {
    registry.update(|tables| {
        check_id(tables, record, timing)?;
        let mut created_branch = false;
        if let Some(plan) = claim.plan.as_deref_mut() {
            claim_branch(tables, record, plan, claim.ci, timing)?;
        }
        if let Some(plan) = claim.plan.as_deref().filter(|plan| !plan.detached) {
            // An existing branch app made earlier keeps its provenance: its original base, and
            // app's right to delete it once it holds nothing beyond that base.
            let previous = tables.branch(&plan.branch).filter(|_| !plan.create_branch);
            created_branch =
                plan.create_branch || previous.as_ref().is_some_and(|b| b.created_branch);
            let base = previous.map_or_else(|| plan.base.to_string(), |b| b.base);
            tables.put_branch(&BranchRecord {
                branch: plan.branch.clone(),
                instance: record.id.clone(),
                worktree: plan.path.clone(),
                base,
                created_at: record.started_at,
                created_branch,
            });
        }
        if let Some((count, range)) = claim.ports.clone() {
            record.ports = lease_ports(tables, &record.id, (count, range), timing)?;
        }
        tables.put_instance(record);
        Ok(created_branch)
    })
}

/// Refuses an id a live instance holds, or one whose entry does not verify.
fn check_id(tables: &Tables, record: &InstanceRecord, timing: Timing) -> Result<()> {
    if let Some(existing) = tables.instance(&record.id) {
        if existing.liveness(timing.stale_after) == Liveness::Live {
            return Err(InstanceError::NameTaken {
                name: record.id.to_string(),
                pid: existing.pid,
            }
            .into());
        }
    } else if tables.has_instance_key(&record.id) {
        return Err(InstanceError::Unverified {
            id: record.id.to_string(),
        }
        .into());
    }
    Ok(())
}

/// Refuses a branch a live instance holds, or under `app ci` turns the worktree detached.
fn claim_branch(
    tables: &Tables,
    record: &mut InstanceRecord,
    plan: &mut WorktreePlan,
    ci: bool,
    timing: Timing,
) -> Result<()> {
    let holder = tables
        .instances()
        .into_iter()
        .find_map(|entry| match entry {
            Entry::Valid(other)
                if other.id != record.id
                    && other.branch.as_deref() == Some(plan.branch.as_str())
                    && other.liveness(timing.stale_after) == Liveness::Live =>
            {
                Some(other)
            }
            _ => None,
        });
    let Some(other) = holder else {
        return Ok(());
    };
    if !ci {
        return Err(InstanceError::BranchHeld {
            branch: plan.branch.clone(),
            holder: other.id.into_string(),
            pid: other.pid,
        }
        .into());
    }
    // `app ci` jobs on one branch never collide: this one tests it detached, at the commit the
    // branch has (or, while another job is creating it, will have).
    plan.detached = true;
    plan.create_branch = false;
    record.branch = None;
    Ok(())
}

/// `count` consecutive ports no other live instance holds.
fn lease_ports(
    tables: &Tables,
    id: &InstanceId,
    (count, port_range): (usize, RangeInclusive<u16>),
    timing: Timing,
) -> Result<Vec<u16>> {
    let taken: HashSet<u16> = tables
        .instances()
        .into_iter()
        .filter_map(|entry| match entry {
            Entry::Valid(other)
                if &other.id != id && other.liveness(timing.stale_after) == Liveness::Live =>
            {
                Some(other.ports)
            }
            _ => None,
        })
        .flatten()
        .collect();
    ports::lease(count, &taken, port_range.clone()).ok_or_else(|| {
        InstanceError::NoPorts {
            count,
            low: *port_range.start(),
            high: *port_range.end(),
        }
        .into()
    })
}
