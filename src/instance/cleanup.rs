//! The end of an instance on disk: its worktree cleaned up and its registry entries removed.
//!
//! Invariants:
//! - The worktree is removed only when that loses nothing (see [`worktree::remove_if_clean`]);
//!   `app ci` saves what is left on `refs/app/rescue/<id>` first and always removes it.
//! - Processes left running under `--keep-running` keep the worktree: they are recorded where
//!   doctor asks before it removes anything.
//! - The stop is journalled, so a crash half-way is finished by the journal recovery.
//! - The branch entry lives as long as the branch it describes.

use git2::Repository;

use super::leftovers::describe;
use super::{RunOptions, WorktreeKind};
use crate::error::Result;
use crate::ids::InstanceId;
use crate::process::ProcessIdentity;
use crate::registry::{Entry, InstanceRecord, InstanceStatus, Registry};
use crate::sign::SigningKey;
use crate::worktree::{self, Cleanup, WorktreePlan};
use crate::{fault, journal};

/// What the end of an instance works on.
pub(super) struct Teardown<'a> {
    pub repo: &'a Repository,
    pub registry: &'a Registry,
    pub key: &'a SigningKey,
    pub record: &'a InstanceRecord,
    pub plan: Option<&'a WorktreePlan>,
    /// Whether the branch is one `app` created (and may delete once it holds nothing).
    pub created_branch: bool,
    pub options: &'a RunOptions,
}

impl Teardown<'_> {
    /// Cleans up the worktree (unless kept, or `still_running` names processes left running
    /// under `--keep-running`, which keep it) and unregisters.
    pub(super) fn finish(
        &self,
        still_running: Option<&[ProcessIdentity]>,
    ) -> Result<Option<Cleanup>> {
        let id = &self.record.id;
        let _ = self.registry.update(|tables| {
            if let Some(mut current) = tables.instance(id) {
                current.status = InstanceStatus::Stopping;
                tables.put_instance(&current);
            }
            Ok(())
        });
        let kept = self.options.worktree_kind() == Some(WorktreeKind::Kept);
        let Some(plan) = self.plan.filter(|_| !kept) else {
            unregister(self.registry, id, None);
            return Ok(None);
        };
        match still_running {
            Some(running) => self.keep_for(running).map(Some),
            None => self.remove_worktree(plan).map(Some),
        }
    }

    /// Leaves the worktree to the processes still running in it, recorded where doctor asks
    /// before it removes anything, and unregisters.
    fn keep_for(&self, running: &[ProcessIdentity]) -> Result<Cleanup> {
        let id = &self.record.id;
        let admin = self.registry.paths().git_worktree_admin(id);
        if let Some(mut supervisor) = crate::inuse::Supervisor::load(&admin) {
            supervisor.kept = running.to_vec();
            supervisor.save(&admin)?;
        }
        unregister(self.registry, id, None);
        Ok(Cleanup {
            worktree_kept_because: Some(format!(
                "--keep-running: {} still running; 'app doctor --fix' reclaims it once they end",
                describe(running)
            )),
            ..Cleanup::default()
        })
    }

    /// The journalled stop: the worktree removed when that loses nothing (rescued first under
    /// `app ci`), then an empty branch `app` created, then the registry entries.
    fn remove_worktree(&self, plan: &WorktreePlan) -> Result<Cleanup> {
        let (paths, id) = (self.registry.paths(), &self.record.id);
        let stop_intent = intent(
            journal::Operation::Stop,
            Some(plan),
            self.created_branch,
            id,
        );
        journal::begin(paths, self.key, &stop_intent)?;
        fault::point("stop.intent-written");
        // A detached worktree (`app ci`) holds no branch.
        let branch = (!plan.detached).then_some(plan.branch.as_str());
        let keep = if self.options.ci() {
            worktree::Keep::Rescue
        } else {
            worktree::Keep::IfClean
        };
        let cleanup = worktree::end_instance(
            self.repo,
            paths,
            self.key,
            (&plan.id, branch),
            (self.recorded_base(plan), self.created_branch),
            keep,
        );
        // The branch entry lives as long as the branch it describes (doctor compares it with
        // its base later); a branch app did not create is released with its worktree.
        let forget_branch = match &cleanup {
            // A detached worktree never held its branch: another instance's entry stays.
            Ok(c) => {
                !plan.detached && (c.branch_deleted || (c.worktree_removed && !self.created_branch))
            }
            Err(_) => false,
        };
        unregister(
            self.registry,
            id,
            forget_branch.then_some(plan.branch.as_str()),
        );
        fault::point("stop.unregistered");
        journal::end(paths, &stop_intent)?;
        cleanup
    }

    /// The base the branch is compared with: the one recorded when it was first claimed.
    fn recorded_base(&self, plan: &WorktreePlan) -> git2::Oid {
        self.registry
            .snapshot()
            .ok()
            .and_then(|s| {
                s.branches.into_iter().find_map(|b| match b {
                    Entry::Valid(b) if b.branch == plan.branch => b.base.parse().ok(),
                    _ => None,
                })
            })
            .unwrap_or(plan.base)
    }

    /// Undoes a start whose worktree could not be made (`worktree::create` rolled itself
    /// back): unregisters, with the branch entry of a branch it was to create, and closes the
    /// start's intent.
    pub(super) fn undo_start(&self, start_intent: &journal::Intent) {
        let branch = self
            .plan
            .filter(|plan| plan.create_branch)
            .map(|plan| plan.branch.as_str());
        unregister(self.registry, &self.record.id, branch);
        let _ = journal::end(self.registry.paths(), start_intent);
    }
}

/// Removes the instance's registry entry, and its branch entry when given.
fn unregister(registry: &Registry, id: &InstanceId, branch: Option<&str>) {
    let result = registry.update(|tables| {
        tables.remove_instance(id);
        if let Some(branch) = branch {
            tables.remove_branch(branch);
        }
        Ok(())
    });
    if let Err(err) = result {
        tracing::warn!(instance = %id, %err, "unregistering failed");
    }
}

/// A new intent of this process for `operation` on instance `id` with worktree `plan`.
pub(super) fn intent(
    operation: journal::Operation,
    plan: Option<&WorktreePlan>,
    create_branch: bool,
    id: &InstanceId,
) -> journal::Intent {
    let mut intent = journal::Intent::new(operation, id);
    if let Some(plan) = plan {
        intent.worktree = Some(plan.path.clone());
        intent.branch = Some(plan.branch.clone());
        intent.base = Some(plan.base.to_string());
        intent.reuse = plan.reuse;
    }
    intent.create_branch = create_branch;
    intent
}
