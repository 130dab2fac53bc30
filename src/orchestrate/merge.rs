//! Merges in memory, for the orchestrator: a task's start point (its base with its
//! dependencies merged in), early warning of sibling conflicts, and the integration branch.
//! Nothing here touches a worktree or the index of one; results are commits, and refs are
//! only moved by the caller.

use git2::{Oid, Repository, Signature};

use crate::error::{GitContext, Result};

/// Why two histories could not be merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The paths in conflict.
    pub files: Vec<String>,
}

/// Merges commit `theirs` into commit `ours`: a fast-forward when one contains the other,
/// else a merge commit with `message`. Returns the resulting commit, or the conflicting files.
pub fn merge(
    repo: &Repository,
    ours: Oid,
    theirs: Oid,
    message: &str,
) -> Result<std::result::Result<Oid, Conflict>> {
    if contains(repo, ours, theirs)? {
        return Ok(Ok(ours));
    }
    if contains(repo, theirs, ours)? {
        return Ok(Ok(theirs));
    }
    let (our_commit, their_commit) = (commit(repo, ours)?, commit(repo, theirs)?);
    let mut index = repo
        .merge_commits(&our_commit, &their_commit, None)
        .git_context(|| format!("merging {theirs} into {ours}"))?;
    if index.has_conflicts() {
        return Ok(Err(conflict_of(&index)?));
    }
    let tree_id = index
        .write_tree_to(repo)
        .git_context(|| "writing the merged tree".to_string())?;
    let tree = repo
        .find_tree(tree_id)
        .git_context(|| "reading the merged tree".to_string())?;
    let signature = signature(repo)?;
    let merged = repo
        .commit(
            None,
            &signature,
            &signature,
            message,
            &tree,
            &[&our_commit, &their_commit],
        )
        .git_context(|| "writing a merge commit".to_string())?;
    Ok(Ok(merged))
}

/// Whether `a` and `b` would conflict if merged (nothing is written).
pub fn conflicts(repo: &Repository, a: Oid, b: Oid) -> Result<Option<Conflict>> {
    if contains(repo, a, b)? || contains(repo, b, a)? {
        return Ok(None);
    }
    let index = repo
        .merge_commits(&commit(repo, a)?, &commit(repo, b)?, None)
        .git_context(|| format!("merging {a} and {b}"))?;
    if index.has_conflicts() {
        Ok(Some(conflict_of(&index)?))
    } else {
        Ok(None)
    }
}

/// Whether commit `a` contains commit `b` (is it, or descends from it).
fn contains(repo: &Repository, a: Oid, b: Oid) -> Result<bool> {
    Ok(a == b
        || repo
            .graph_descendant_of(a, b)
            .git_context(|| format!("comparing commits {a} and {b}"))?)
}

fn commit(repo: &Repository, id: Oid) -> Result<git2::Commit<'_>> {
    repo.find_commit(id)
        .git_context(|| format!("reading commit {id}"))
}

/// The conflicting paths of a merged index, sorted.
fn conflict_of(index: &git2::Index) -> Result<Conflict> {
    let mut files: Vec<String> = index
        .conflicts()
        .git_context(|| "listing merge conflicts".to_string())?
        .filter_map(|conflict| conflict.ok())
        .filter_map(|conflict| conflict.our.or(conflict.their).or(conflict.ancestor))
        .map(|entry| String::from_utf8_lossy(&entry.path).into_owned())
        .collect();
    files.sort();
    files.dedup();
    Ok(Conflict { files })
}

/// The repository's configured identity, else `app`'s own.
fn signature(repo: &Repository) -> Result<Signature<'static>> {
    match repo.signature() {
        Ok(signature) => Ok(signature.to_owned()),
        Err(_) => {
            Signature::now("app", "app@localhost").git_context(|| "making a signature".to_string())
        }
    }
}
