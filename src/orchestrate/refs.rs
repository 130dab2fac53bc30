//! Git ref surgery for the orchestrator: a task branch pointed at its start, early warning of
//! conflicts between finished siblings, and the integration branch; the merges themselves are
//! made in memory by [`super::merge`].
//!
//! Invariants:
//! - A task branch that holds commits its new start does not is first saved under
//!   `refs/app/attempts/<run>/<task>/<n>`: an earlier attempt's work is never dropped.
//! - No branch checked out in any worktree is moved: the task fails, or the integration is
//!   left out, naming where it is checked out.
//! - The integration branch is only moved forward, once, at the end of the run.

use git2::{Oid, Repository};
use serde_json::{Value, json};

use super::plan::Task;
use super::scheduler::Orchestrator;
use super::{Progress, merge};
use crate::db::runs::TaskStatus;
use crate::error::{Error, GitContext, Result};
use crate::paths::AppPaths;
use crate::worktree;

/// Opens the repository at `paths`.
pub(super) fn open(paths: &AppPaths) -> Result<Repository> {
    Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))
}

impl Orchestrator {
    /// Points the task's branch at its start: the base with its dependencies merged in; work
    /// of the launch before (number `previous`) is kept. `Ok(Err(why))` when that cannot be
    /// done (a conflict, a checked-out branch).
    pub(super) fn set_start_point(
        &self,
        task: &Task,
        previous: i64,
    ) -> Result<std::result::Result<(), String>> {
        let start = match self.start_of(task)? {
            Ok(start) => start,
            Err(why) => return Ok(Err(why)),
        };
        if let Some(path) = worktree::checked_out_in(&self.repo, &task.branch)? {
            return Ok(Err(format!(
                "its branch {} is checked out in {}; remove that worktree ('app doctor --fix' for a dead instance's) and resume",
                task.branch,
                path.display()
            )));
        }
        if let Some(tip) = self.branch_tip(&task.branch)?
            && tip != start
            && !self.repo.graph_descendant_of(start, tip).unwrap_or(false)
        {
            // An earlier attempt's commits are kept, never dropped by the reset below.
            let keep = format!("refs/app/attempts/{}/{}/{previous}", self.run.id, task.id);
            self.repo
                .reference(
                    &keep,
                    tip,
                    true,
                    "app orchestrate: an earlier attempt's work",
                )
                .git_context(|| format!("saving {keep}"))?;
        }
        self.repo
            .reference(
                &format!("refs/heads/{}", task.branch),
                start,
                true,
                &format!(
                    "app orchestrate: start of task {} of run {}",
                    task.id, self.run.id
                ),
            )
            .git_context(|| format!("pointing {} at its start", task.branch))?;
        Ok(Ok(()))
    }

    /// The plan's base with `task`'s dependencies merged in, in memory; `Ok(Err(why))` when a
    /// dependency's branch is gone or the dependencies conflict.
    fn start_of(&self, task: &Task) -> Result<std::result::Result<Oid, String>> {
        let base =
            Oid::from_str(&self.plan.base).git_context(|| "reading the plan's base".into())?;
        let mut start = base;
        for dep in &task.depends_on {
            let dep_branch = &self.plan.task(dep).expect("validated dependency").branch;
            let Some(tip) = self.branch_tip(dep_branch)? else {
                return Ok(Err(format!(
                    "the branch {dep_branch} of its dependency {dep} is gone; restore it (see 'git reflog') and resume"
                )));
            };
            let message = format!(
                "Merge {dep_branch} (task {dep}) for task {} of run {}",
                task.id, self.run.id
            );
            match merge::merge(&self.repo, start, tip, &message)? {
                Ok(merged) => start = merged,
                Err(conflict) => {
                    return Ok(Err(format!(
                        "its dependencies conflict: merging {dep} into {} conflicts in {}",
                        task.depends_on
                            .iter()
                            .take_while(|d| *d != dep)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        conflict.files.join(", ")
                    )));
                }
            }
        }
        Ok(Ok(start))
    }

    pub(super) fn branch_tip(&self, branch: &str) -> Result<Option<Oid>> {
        match self.repo.find_branch(branch, git2::BranchType::Local) {
            Ok(found) => Ok(found.get().target()),
            Err(err) if err.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(err) => Err(Error::git(format!("reading branch {branch}"), err)),
        }
    }

    /// Reports every finished unrelated task whose branch would conflict with `task`'s.
    pub(super) fn check_siblings(
        &mut self,
        task: &Task,
        report: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let Some(tip) = self.branch_tip(&task.branch)? else {
            return Ok(());
        };
        for other in self.plan.tasks.clone() {
            if other.id == task.id
                || self.rows[&other.id].status != TaskStatus::Succeeded
                || self.depends(task, &other.id)
                || self.depends(&other, &task.id)
            {
                continue;
            }
            let Some(other_tip) = self.branch_tip(&other.branch)? else {
                continue;
            };
            if let Some(conflict) = merge::conflicts(&self.repo, tip, other_tip)? {
                self.conflicts.push(json!({
                    "a": other.id, "b": task.id, "files": conflict.files,
                }));
                report(Progress::Conflict {
                    a: other.id.clone(),
                    b: task.id.clone(),
                    files: conflict.files,
                });
            }
        }
        Ok(())
    }

    /// Merges every successful task's branch, in dependency order, into `branch`.
    pub(super) fn integrate(
        &mut self,
        branch: &str,
        report: &mut dyn FnMut(Progress),
    ) -> Result<Value> {
        if let Some(path) = worktree::checked_out_in(&self.repo, branch)? {
            let why = format!(
                "{branch} is checked out in {}; it was not touched",
                path.display()
            );
            report(Progress::Integrated {
                branch: branch.to_string(),
                merged: Vec::new(),
                left_out: vec![("*".into(), why.clone())],
            });
            return Ok(json!({ "branch": branch, "error": why }));
        }
        let base =
            Oid::from_str(&self.plan.base).git_context(|| "reading the plan's base".into())?;
        let order: Vec<String> = self.plan.waves().into_iter().flatten().collect();
        let mut current = self.branch_tip(branch)?.unwrap_or(base);
        let mut left_out = self.merge_leaves(&order, &mut current)?;
        let mut merged = Vec::new();
        for id in &order {
            let row = &self.rows[id];
            if row.status != TaskStatus::Succeeded {
                left_out.push((id.clone(), format!("it {}", row.status)));
            } else if let Some(tip) = self.branch_tip(&row.branch)?
                && (tip == current || self.repo.graph_descendant_of(current, tip).unwrap_or(false))
            {
                merged.push(id.clone());
            } else if !left_out.iter().any(|(t, _)| t == id) {
                left_out.push((id.clone(), "a task built on it was left out".into()));
            }
        }
        self.repo
            .reference(
                &format!("refs/heads/{branch}"),
                current,
                true,
                &format!("app orchestrate: integration of run {}", self.run.id),
            )
            .git_context(|| format!("updating {branch}"))?;
        report(Progress::Integrated {
            branch: branch.to_string(),
            merged: merged.clone(),
            left_out: left_out.clone(),
        });
        Ok(json!({
            "branch": branch,
            "commit": current.to_string(),
            "merged": merged,
            "left_out": left_out.iter().map(|(t, why)| json!({"task": t, "why": why})).collect::<Vec<_>>(),
        }))
    }

    /// Merges into `current` the branches of the succeeded tasks (of `order`, dependency
    /// order) nothing else builds on; returns those that conflicted, with why.
    fn merge_leaves(&self, order: &[String], current: &mut Oid) -> Result<Vec<(String, String)>> {
        let succeeded: Vec<&String> = order
            .iter()
            .filter(|id| self.rows[id.as_str()].status == TaskStatus::Succeeded)
            .collect();
        // A task's branch holds its dependencies' work, so merging the tasks nothing else
        // builds on (in dependency order) brings in everything, without a merge per task.
        let leaves: Vec<&String> = succeeded
            .iter()
            .filter(|id| {
                !succeeded.iter().any(|other| {
                    other != *id && self.depends(self.plan.task(other).expect("plan task"), id)
                })
            })
            .copied()
            .collect();
        let mut left_out = Vec::new();
        for id in leaves {
            let task_branch = self.plan.task(id).expect("plan task").branch.clone();
            let Some(tip) = self.branch_tip(&task_branch)? else {
                continue;
            };
            let message = format!("Merge {task_branch} (task {id} of run {})", self.run.id);
            match merge::merge(&self.repo, *current, tip, &message)? {
                Ok(next) => *current = next,
                Err(conflict) => left_out.push((
                    id.to_string(),
                    format!("conflicts in {}", conflict.files.join(", ")),
                )),
            }
        }
        Ok(left_out)
    }
}
