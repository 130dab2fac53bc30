//! Instance worktrees: validate, create and remove them without losing anyone's work.
//!
//! Invariants:
//! - [`plan`] only reads: every bad branch name, unknown ref or branch checked out elsewhere is
//!   rejected there, before anything is created.
//! - [`create`] leaves nothing behind when it fails: a branch it made is deleted again.
//! - [`remove_if_clean`] removes a worktree only when that loses nothing: no uncommitted or
//!   untracked (non-ignored) change, and HEAD still on the instance's branch. A branch is
//!   deleted only when `app` created it and it holds no commit beyond its base.
//! - Only the worktree named by the instance id is pruned; `git worktree prune` is never run
//!   repository-wide.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use git2::{BranchType, ErrorCode, Oid, Repository, StatusOptions};

use crate::error::{Error, GitContext, IoContext, Result};
use crate::paths::AppPaths;

/// Everything needed to create an instance's worktree, checked before anything is written.
#[derive(Debug, Clone)]
pub struct WorktreePlan {
    /// Worktree name in git (`.git/worktrees/<id>`) and directory name.
    pub id: String,
    /// `.app/worktrees/<id>`.
    pub path: PathBuf,
    /// Branch to check out.
    pub branch: String,
    /// Commit the branch starts from (or its tip, when it already exists).
    pub base: Oid,
    /// Whether the branch must be created.
    pub create_branch: bool,
    /// Whether an existing worktree of this instance is reused as it is.
    pub reuse: bool,
    /// Whether the worktree gets a detached HEAD at the branch's tip (`app ci` on a branch
    /// checked out elsewhere); the branch itself is then neither claimed nor moved.
    pub detached: bool,
}

/// The default branch name of instance `id`.
pub fn default_branch(id: &str) -> String {
    format!("app/{id}")
}

/// Checks a branch name against git's rules.
pub fn validate_branch_name(name: &str) -> Result<()> {
    let valid = git2::Branch::name_is_valid(name)
        .git_context(|| format!("checking branch name {name:?}"))?;
    if !valid || name == "HEAD" || name.starts_with('-') {
        return Err(Error::bad_input(format!(
            "{name:?} is not a valid branch name (see 'git check-ref-format --branch')"
        )));
    }
    Ok(())
}

/// Validates the worktree an instance would get, touching nothing.
///
/// `branch` defaults to `app/<id>`, `base` to the repository's HEAD. An existing branch is
/// checked out as it is (then `base` must not be given); a branch checked out in any worktree is
/// refused, or with `detach` gets a detached worktree at its tip. When `.app/worktrees/<id>`
/// already is a worktree (kept from an earlier run of a named instance), it is reused.
pub fn plan(
    repo: &Repository,
    paths: &AppPaths,
    id: &str,
    (branch, base): (Option<&str>, Option<&str>),
    detach: bool,
) -> Result<WorktreePlan> {
    let path = paths.worktree(id);
    if let Some(name) = branch {
        validate_branch_name(name)?;
    }
    if path.exists() {
        return plan_reuse(repo, paths, id, branch, base, path);
    }
    let branch = branch.map_or_else(|| default_branch(id), str::to_string);
    let existing = match repo.find_branch(&branch, BranchType::Local) {
        Ok(found) => Some(found),
        Err(err) if err.code() == ErrorCode::NotFound => None,
        Err(err) => return Err(Error::git(format!("looking up branch {branch}"), err)),
    };
    if let Some(existing) = existing {
        if base.is_some() {
            return Err(Error::bad_input(format!(
                "branch {branch} already exists; --base applies only to a new branch (drop --base to check {branch} out as it is)"
            )));
        }
        let holder = checked_out_in(repo, &branch)?;
        if let Some(holder) = &holder
            && !detach
        {
            return Err(Error::bad_input(format!(
                "branch {branch} is already checked out in {}; pick another --branch",
                holder.display()
            )));
        }
        let tip = existing
            .get()
            .peel_to_commit()
            .git_context(|| format!("branch {branch} does not point at a commit"))?;
        return Ok(WorktreePlan {
            id: id.to_string(),
            path,
            branch,
            base: tip.id(),
            create_branch: false,
            reuse: false,
            detached: holder.is_some(),
        });
    }
    let base = resolve_base(repo, base)?;
    Ok(WorktreePlan {
        id: id.to_string(),
        path,
        branch,
        base,
        create_branch: true,
        reuse: false,
        detached: false,
    })
}

fn plan_reuse(
    repo: &Repository,
    paths: &AppPaths,
    id: &str,
    branch: Option<&str>,
    base: Option<&str>,
    path: PathBuf,
) -> Result<WorktreePlan> {
    let kept = || {
        format!(
            "{} already exists but is not a worktree app can reuse; move it aside or run 'app doctor'",
            path.display()
        )
    };
    if !paths.git_worktree_admin(id).is_dir() {
        return Err(Error::Failed(kept()));
    }
    let wt_repo = Repository::open(&path).map_err(|_| Error::Failed(kept()))?;
    let head = wt_repo.head().map_err(|_| Error::Failed(kept()))?;
    let current = head
        .shorthand()
        .ok()
        .filter(|_| head.is_branch())
        .ok_or_else(|| {
            Error::Failed(format!(
                "{} has a detached HEAD; check a branch out there first",
                path.display()
            ))
        })?
        .to_string();
    if branch.is_some_and(|b| b != current) || base.is_some() {
        return Err(Error::bad_input(format!(
            "{} already exists on branch {current} (kept from an earlier run); run without --branch/--base to reuse it",
            path.display()
        )));
    }
    let tip = head
        .peel_to_commit()
        .git_context(|| format!("reading HEAD of {}", path.display()))?;
    let _ = repo;
    Ok(WorktreePlan {
        id: id.to_string(),
        path,
        branch: current,
        base: tip.id(),
        create_branch: false,
        reuse: true,
        detached: false,
    })
}

/// Resolves `--base` (default HEAD) to a commit, or a bad-input error naming the ref.
pub fn resolve_base(repo: &Repository, base: Option<&str>) -> Result<Oid> {
    let spec = base.unwrap_or("HEAD");
    let object = repo.revparse_single(spec).map_err(|err| {
        if base.is_none() && matches!(err.code(), ErrorCode::UnbornBranch | ErrorCode::NotFound) {
            Error::bad_input(
                "the repository has no commit yet; make a first commit, then run app again",
            )
        } else {
            Error::bad_input(format!(
                "unknown ref {spec:?}: {}; give --base a branch, tag or commit",
                err.message()
            ))
        }
    })?;
    let commit = object
        .peel_to_commit()
        .map_err(|_| Error::bad_input(format!("{spec:?} does not name a commit")))?;
    Ok(commit.id())
}

/// The worktree (main or linked) that has `branch` checked out, if any.
pub fn checked_out_in(repo: &Repository, branch: &str) -> Result<Option<PathBuf>> {
    let full = format!("refs/heads/{branch}");
    let main_head = repo
        .find_reference("HEAD")
        .ok()
        .and_then(|r| r.symbolic_target().ok().flatten().map(str::to_string));
    if main_head.as_deref() == Some(full.as_str()) {
        return Ok(Some(repo.workdir().unwrap_or(repo.path()).to_path_buf()));
    }
    let names = repo
        .worktrees()
        .git_context(|| "listing worktrees".into())?;
    for name in names.iter().filter_map(|name| name.ok().flatten()) {
        // Read the linked worktree's HEAD file directly: opening a repository per worktree is
        // slower and fails for worktrees whose directory is gone (they still hold the branch).
        let admin = repo.path().join("worktrees").join(name);
        let head = fs::read_to_string(admin.join("HEAD")).unwrap_or_default();
        if head.trim().strip_prefix("ref: ") == Some(full.as_str()) {
            let gitdir = fs::read_to_string(admin.join("gitdir")).unwrap_or_default();
            let path = Path::new(gitdir.trim())
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or(admin);
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Creates the planned worktree (and branch). On failure nothing it made is left behind.
pub fn create(repo: &Repository, plan: &WorktreePlan) -> Result<()> {
    if plan.reuse {
        return Ok(());
    }
    tune_libgit2();
    if plan.create_branch {
        let commit = repo
            .find_commit(plan.base)
            .git_context(|| format!("reading commit {}", plan.base))?;
        retry_locked(|| repo.branch(&plan.branch, &commit, false)).map_err(|err| {
            if err.code() == ErrorCode::Exists {
                Error::bad_input(format!(
                    "branch {} was created by someone else a moment ago; pick another --branch",
                    plan.branch
                ))
            } else {
                Error::git(format!("creating branch {}", plan.branch), err)
            }
        })?;
        crate::fault::point("run.branch-created");
    }
    prune_dangling_admin(repo, &plan.id);
    let admin = repo.path().join("worktrees").join(&plan.id);
    let added = add_worktree(&admin, plan);
    if added.is_err() {
        // Roll back: a half-made worktree and a branch made for it must not survive.
        let _ = fs::remove_dir_all(&plan.path);
        let _ = fs::remove_dir_all(&admin);
        if plan.create_branch {
            let _ = delete_branch(repo, &plan.branch);
        }
    }
    added
}

/// Writes git's linked-worktree metadata for `plan` and checks its branch out.
///
/// This is what `git worktree add` does (same files, same `locked` marker while it works, so a
/// concurrent `git worktree prune` leaves it alone). libgit2's own `git_worktree_add` is not
/// used: its "branch already checked out" check misfires while another process adds or prunes a
/// worktree, so concurrent instances failed at random. Exclusivity of the branch is checked in
/// [`plan`] and claimed in the registry instead.
fn add_worktree(admin: &Path, plan: &WorktreePlan) -> Result<()> {
    let admin_parent = admin
        .parent()
        .expect("the admin dir lives in <gitdir>/worktrees");
    fs::create_dir_all(admin_parent).io_context("creating", admin_parent)?;
    fs::create_dir(admin).map_err(|err| {
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Failed(format!(
                "git already has a worktree named {} ({}); run 'app doctor' or pick another --instance",
                plan.id,
                admin.display()
            ))
        } else {
            Error::io("creating", admin, err)
        }
    })?;
    let write = |path: PathBuf, text: String| fs::write(&path, text).io_context("writing", &path);
    write(admin.join("locked"), "initializing\n".into())?;
    fs::create_dir(&plan.path).io_context("creating", &plan.path)?;
    let dot_git = plan.path.join(".git");
    write(admin.join("gitdir"), format!("{}\n", dot_git.display()))?;
    write(admin.join("commondir"), "../..\n".into())?;
    let head = if plan.detached {
        format!("{}\n", plan.base)
    } else {
        format!("ref: refs/heads/{}\n", plan.branch)
    };
    write(admin.join("HEAD"), head)?;
    write(dot_git, format!("gitdir: {}\n", admin.display()))?;
    crate::fault::point("run.worktree-linked");

    let worktree = Repository::open(&plan.path)
        .git_context(|| format!("opening new worktree {}", plan.path.display()))?;
    let mut checkout = git2::build::CheckoutBuilder::new();
    checkout.force();
    let tree = worktree
        .find_commit(plan.base)
        .and_then(|commit| commit.tree())
        .git_context(|| format!("reading the tree of {}", plan.base))?;
    // Resolving attributes for every file costs two realpath() calls each (a tenth of the
    // checkout); skip the filters when no attribute or setting could turn one on.
    checkout.disable_filters(filters_cannot_apply(&worktree, &tree));
    worktree
        .checkout_head(Some(&mut checkout))
        .git_context(|| format!("checking out {} in {}", plan.branch, plan.path.display()))?;
    let locked = admin.join("locked");
    fs::remove_file(&locked).io_context("removing", &locked)
}

/// Whether checking `tree` out in `repo` would convert no file: no `.gitattributes` anywhere in
/// the tree, no repository, global or system attributes file, and no line-ending setting.
/// libgit2 runs only built-in filters (CRLF, ident), and only an attribute or one of these
/// settings turns them on.
fn filters_cannot_apply(repo: &Repository, tree: &git2::Tree) -> bool {
    let Ok(config) = repo.config() else {
        return false;
    };
    let autocrlf_off = match config.get_entry("core.autocrlf") {
        Ok(_) => matches!(config.get_bool("core.autocrlf"), Ok(false)),
        Err(_) => true,
    };
    if !autocrlf_off
        || config.get_entry("core.eol").is_ok()
        || config.get_entry("core.attributesFile").is_ok()
    {
        return false;
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| home.map(|h| h.join(".config")));
    let attribute_files = [
        Some(repo.commondir().join("info/attributes")),
        xdg.map(|x| x.join("git/attributes")),
        Some(PathBuf::from("/etc/gitattributes")),
    ];
    if attribute_files.iter().flatten().any(|path| path.exists()) {
        return false;
    }
    let mut has_attributes = false;
    let walked = tree.walk(git2::TreeWalkMode::PreOrder, |_, entry| {
        if entry.name_bytes() == b".gitattributes" {
            has_attributes = true;
            git2::TreeWalkResult::Abort
        } else {
            git2::TreeWalkResult::Ok
        }
    });
    !has_attributes && walked.is_ok()
}

/// Turns off libgit2's re-hashing of every object it reads, once per process.
///
/// The git CLI does not verify hashes on checkout either; zlib's checksum still catches a
/// corrupt object. This was a quarter of the checkout time (SHA-1 with collision detection).
fn tune_libgit2() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| git2::opts::strict_hash_verification(false));
}

/// Removes git's record of worktree `id` when its directory is gone (left by a crash).
pub fn prune_dangling_admin(repo: &Repository, id: &str) {
    if let Ok(wt) = repo.find_worktree(id)
        && wt.validate().is_err()
    {
        let _ = wt.prune(None);
    }
}

/// What happened to an instance's worktree and branch at its end.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cleanup {
    /// The worktree directory was removed.
    pub worktree_removed: bool,
    /// Why the worktree was kept, when it was.
    pub worktree_kept_because: Option<String>,
    /// The branch was deleted.
    pub branch_deleted: bool,
    /// Why the branch was kept, when `app` created it but kept it.
    pub branch_kept_because: Option<String>,
    /// Where uncommitted work was saved before the worktree was removed (`app ci`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rescued_to: Option<String>,
}

/// Removes an instance's worktree and branch when that loses nothing.
///
/// `created_branch` says whether `app` made the branch: a branch it did not make is never
/// deleted. `base` is the commit the branch started from.
pub fn remove_if_clean(
    repo: &Repository,
    id: &str,
    path: &Path,
    branch: &str,
    base: Oid,
    created_branch: bool,
) -> Result<Cleanup> {
    let mut cleanup = Cleanup::default();
    if path.exists() {
        if let Some(reason) = unsaved_work(path, Some(branch))? {
            cleanup.worktree_kept_because = Some(reason);
            // The branch is checked out in the kept worktree: it stays too.
            return Ok(cleanup);
        }
        remove(repo, id, path)?;
        cleanup.worktree_removed = true;
        crate::fault::point("stop.worktree-removed");
    } else {
        prune_dangling_admin(repo, id);
    }

    if !created_branch {
        return Ok(cleanup);
    }
    match delete_branch_if_empty(repo, branch, base)? {
        BranchFate::Gone => {}
        BranchFate::Deleted => {
            cleanup.branch_deleted = true;
            crate::fault::point("stop.branch-deleted");
        }
        BranchFate::Kept(reason) => cleanup.branch_kept_because = Some(reason),
    }
    Ok(cleanup)
}

/// Removes an instance's worktree whatever it holds, saving what that would lose first on
/// `refs/app/rescue/<id>` ([`rescue`]); then deletes the branch as [`remove_if_clean`] does.
/// For `app ci`, whose worktrees never outlive the job.
pub fn remove_saving(
    repo: &Repository,
    id: &str,
    path: &Path,
    branch: Option<&str>,
    base: Oid,
    created_branch: bool,
) -> Result<Cleanup> {
    let mut cleanup = Cleanup::default();
    if path.exists() {
        cleanup.rescued_to = rescue(repo, id, path)?.map(|(name, _)| name);
        remove(repo, id, path)?;
        cleanup.worktree_removed = true;
    } else {
        prune_dangling_admin(repo, id);
    }
    if let Some(branch) = branch.filter(|_| created_branch) {
        match delete_branch_if_empty(repo, branch, base)? {
            BranchFate::Gone => {}
            BranchFate::Deleted => cleanup.branch_deleted = true,
            BranchFate::Kept(reason) => cleanup.branch_kept_because = Some(reason),
        }
    }
    Ok(cleanup)
}

/// What [`delete_branch_if_empty`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BranchFate {
    /// There was no such branch.
    Gone,
    /// It held nothing beyond its base and was deleted.
    Deleted,
    /// It was kept; the text says why.
    Kept(String),
}

/// The commit local branch `branch` points at, or `None` when there is no such branch.
pub fn branch_tip(repo: &Repository, branch: &str) -> Result<Option<Oid>> {
    match repo.find_branch(branch, BranchType::Local) {
        Ok(found) => Ok(Some(
            found
                .get()
                .peel_to_commit()
                .git_context(|| format!("reading branch {branch}"))?
                .id(),
        )),
        Err(err) if err.code() == ErrorCode::NotFound => Ok(None),
        Err(err) => Err(Error::git(format!("looking up branch {branch}"), err)),
    }
}

/// How many commits `tip` holds that `base` does not (0: `tip` is `base` or one of its
/// ancestors, so deleting a branch at `tip` loses nothing).
pub fn commits_beyond(repo: &Repository, tip: Oid, base: Oid) -> Result<usize> {
    let (ahead, _) = repo
        .graph_ahead_behind(tip, base)
        .git_context(|| format!("comparing {tip} with {base}"))?;
    Ok(ahead)
}

/// Deletes `branch` when it holds no commit beyond `base`.
pub fn delete_branch_if_empty(repo: &Repository, branch: &str, base: Oid) -> Result<BranchFate> {
    let Some(tip) = branch_tip(repo, branch)? else {
        return Ok(BranchFate::Gone);
    };
    match commits_beyond(repo, tip, base)? {
        0 => {
            delete_branch(repo, branch)?;
            Ok(BranchFate::Deleted)
        }
        ahead => Ok(BranchFate::Kept(format!(
            "{ahead} commit{} beyond its base",
            if ahead == 1 { "" } else { "s" }
        ))),
    }
}

/// Removes worktree `id` at `path`: its directory (ignored files included) and git's record
/// of it. Callers decide first that this loses nothing.
pub fn remove(repo: &Repository, id: &str, path: &Path) -> Result<()> {
    let wt = repo
        .find_worktree(id)
        .git_context(|| format!("looking up worktree {id}"))?;
    wt.prune(Some(
        git2::WorktreePruneOptions::new()
            .valid(true)
            .working_tree(true),
    ))
    .git_context(|| format!("removing worktree {}", path.display()))
}

/// Saves what removing the worktree at `path` would lose as a commit on `refs/app/rescue/<id>`
/// (or `<id>-2`, `-3`, … when taken): its tracked and untracked (not ignored) files, with the
/// worktree's HEAD as parent, so commits on a detached HEAD stay reachable too. Returns the ref
/// and commit, or `None` when nothing would be lost.
pub fn rescue(repo: &Repository, id: &str, path: &Path) -> Result<Option<(String, Oid)>> {
    let Some(reason) = unsaved_work(path, None)? else {
        return Ok(None);
    };
    let wt =
        Repository::open(path).git_context(|| format!("opening worktree {}", path.display()))?;
    let context = || format!("saving the work in {}", path.display());
    // The index is changed in memory only; the worktree's own index file stays as it was.
    let mut index = wt.index().git_context(context)?;
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .git_context(context)?;
    index.update_all(["*"], None).git_context(context)?;
    let tree_id = index.write_tree_to(repo).git_context(context)?;
    let tree = repo.find_tree(tree_id).git_context(context)?;
    let parent = wt.head().ok().and_then(|head| head.peel_to_commit().ok());
    let signature = repo
        .signature()
        .or_else(|_| git2::Signature::now("app doctor", "app@localhost"))
        .git_context(context)?;
    let message = format!(
        "app: rescued work of instance {id}\n\nFrom worktree {} ({reason}).\n",
        path.display()
    );
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let commit = repo
        .commit(None, &signature, &signature, &message, &tree, &parents)
        .git_context(context)?;
    for n in 1.. {
        let name = if n == 1 {
            format!("refs/app/rescue/{id}")
        } else {
            format!("refs/app/rescue/{id}-{n}")
        };
        match repo.reference(&name, commit, false, &message) {
            Ok(_) => return Ok(Some((name, commit))),
            Err(err) if err.code() == ErrorCode::Exists => continue,
            Err(err) => return Err(Error::git(format!("creating {name}"), err)),
        }
    }
    unreachable!("some rescue ref name is free")
}

/// Deletes local branch `branch` and its configuration section.
///
/// libgit2's `git_branch_delete` is not used: its "checked out in a linked worktree" check
/// reports *any* branch as checked out while another process prunes some other worktree (the
/// lookup failure is taken for a match), which made concurrent cleanups fail. The check is done
/// here instead, from the worktrees' HEAD files.
pub fn delete_branch(repo: &Repository, branch: &str) -> Result<()> {
    if let Some(holder) = checked_out_in(repo, branch)? {
        return Err(Error::Failed(format!(
            "branch {branch} is checked out in {}; not deleting it",
            holder.display()
        )));
    }
    let refname = format!("refs/heads/{branch}");
    retry_locked(|| match repo.find_reference(&refname) {
        Ok(mut reference) => reference.delete(),
        Err(err) if err.code() == ErrorCode::NotFound => Ok(()),
        Err(err) => Err(err),
    })
    .git_context(|| format!("deleting branch {branch}"))?;
    // Like `git branch -d`, drop branch.<name>.* (upstream settings and such).
    if let Ok(mut config) = repo.config() {
        let prefix = format!("branch.{branch}.");
        let names: Vec<String> = config
            .entries(None)
            .map(|entries| {
                let mut names = Vec::new();
                let _ = entries.for_each(|entry| {
                    if let Some(name) = entry.name().ok().filter(|n| n.starts_with(&prefix)) {
                        names.push(name.to_string());
                    }
                });
                names
            })
            .unwrap_or_default();
        for name in names {
            let _ = config.remove_multivar(&name, ".*");
        }
    }
    Ok(())
}

/// Why removing the worktree at `path` would lose work, or `None` when it would not. With
/// `branch`, a HEAD elsewhere counts as work (its commits may exist nowhere else); without, a
/// detached HEAD does.
pub fn unsaved_work(path: &Path, branch: Option<&str>) -> Result<Option<String>> {
    let repo =
        Repository::open(path).git_context(|| format!("opening worktree {}", path.display()))?;
    let head = repo.head().ok();
    let on_branch = head.as_ref().is_some_and(|h| {
        h.is_branch() && branch.is_none_or(|branch| h.shorthand().ok() == Some(branch))
    });
    if !on_branch {
        return Ok(Some(match branch {
            Some(branch) => format!(
                "its HEAD is no longer on branch {branch} (commits there may exist nowhere else)"
            ),
            None => "its HEAD is on no branch (commits there may exist nowhere else)".into(),
        }));
    }
    let mut options = StatusOptions::new();
    options
        .include_untracked(true)
        .recurse_untracked_dirs(false)
        .include_ignored(false)
        .exclude_submodules(false);
    let statuses = repo
        .statuses(Some(&mut options))
        .git_context(|| format!("reading the status of {}", path.display()))?;
    if statuses.is_empty() {
        return Ok(None);
    }
    let n = statuses.len();
    Ok(Some(format!(
        "{n} uncommitted or untracked change{}",
        if n == 1 { "" } else { "s" }
    )))
}

/// Retries a git operation that failed because another process holds one of git's lock files
/// (a ref's `.lock`, `packed-refs.lock`). Many instances ending at once contend for them, and
/// libgit2, unlike the git CLI, does not wait for a lock itself.
fn retry_locked<T>(
    mut op: impl FnMut() -> std::result::Result<T, git2::Error>,
) -> std::result::Result<T, git2::Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut delay = Duration::from_millis(2);
    loop {
        match op() {
            Err(err) if err.code() == ErrorCode::Locked && Instant::now() < deadline => {
                // Jitter keeps the waiters from retrying in lockstep.
                let nanos = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos();
                let jitter =
                    Duration::from_nanos(u64::from(nanos) % delay.as_nanos().max(1) as u64);
                tracing::debug!(%err, ?delay, "git lock held; retrying");
                std::thread::sleep(delay + jitter);
                delay = (delay * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}
