//! Instance worktrees: validate, create and remove them without losing anyone's work.
//!
//! Invariants:
//! - [`plan`] only reads: every bad branch name, unknown ref or branch checked out elsewhere is
//!   rejected there, before anything is created.
//! - [`create`] leaves nothing behind when it fails: a branch it made is deleted again.
//! - Every removal goes through [`guard::remove`] (see its invariants: in use means never,
//!   work is saved or kept). [`end_instance`] adds the branch: it is deleted only when `app`
//!   created it and it holds no commit beyond its base.
//! - Only the worktree named by the instance id is touched; `git worktree prune` is never run
//!   repository-wide.

use std::fs;
use std::path::{Path, PathBuf};

use git2::{BranchType, ErrorCode, Oid, Repository};

use crate::error::{Error, GitContext, IoContext, Result, WorktreeError};
use crate::ids::InstanceId;
use crate::inuse::Supervisor;
use crate::paths::AppPaths;
use crate::process::ProcessIdentity;
use crate::sign::SigningKey;

pub mod changes;
pub mod guard;
pub(crate) mod reflock;

pub use guard::{
    Keep, Removal, Target, forget_missing, only_a_partial_dot_git, remove, user_must_decide,
};

/// What an unfinished checkout writes into git's `locked` file of the worktree (as `git
/// worktree add` does), so a concurrent `git worktree prune` leaves it alone.
pub(crate) const CHECKOUT_LOCK_REASON: &str = "initializing";

/// Everything needed to create an instance's worktree, checked before anything is written.
#[derive(Debug, Clone)]
pub struct WorktreePlan {
    /// Worktree name in git (`.git/worktrees/<id>`) and directory name.
    pub id: InstanceId,
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
pub fn default_branch(id: &InstanceId) -> String {
    format!("app/{id}")
}

/// Checks a branch name against git's rules.
pub fn validate_branch_name(name: &str) -> Result<()> {
    let valid = git2::Branch::name_is_valid(name)
        .git_context(|| format!("checking branch name {name:?}"))?;
    if !valid || name == "HEAD" || name.starts_with('-') {
        return Err(WorktreeError::InvalidBranch {
            name: name.to_string(),
        }
        .into());
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
    id: &InstanceId,
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
            return Err(WorktreeError::BaseForExistingBranch { branch }.into());
        }
        let holder = checked_out_in(repo, &branch)?;
        if let Some(holder) = &holder
            && !detach
        {
            return Err(WorktreeError::CheckedOut {
                branch,
                holder: holder.clone(),
            }
            .into());
        }
        let tip = existing
            .get()
            .peel_to_commit()
            .git_context(|| format!("branch {branch} does not point at a commit"))?;
        return Ok(WorktreePlan {
            id: id.clone(),
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
        id: id.clone(),
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
    id: &InstanceId,
    branch: Option<&str>,
    base: Option<&str>,
    path: PathBuf,
) -> Result<WorktreePlan> {
    let kept = || WorktreeError::NotReusable { path: path.clone() };
    let admin = paths.git_worktree_admin(id);
    if !admin.is_dir() {
        return Err(kept().into());
    }
    let users = crate::inuse::worktree_users(&crate::inuse::Scan::take(), &path, &admin);
    if !users.is_empty() {
        return Err(WorktreeError::InUse {
            path,
            users: crate::inuse::describe(&users),
        }
        .into());
    }
    let wt_repo = Repository::open(&path).map_err(|_| kept())?;
    let head = wt_repo.head().map_err(|_| kept())?;
    let current = head
        .shorthand()
        .ok()
        .filter(|_| head.is_branch())
        .ok_or_else(|| WorktreeError::DetachedHead { path: path.clone() })?
        .to_string();
    if branch.is_some_and(|b| b != current) || base.is_some() {
        return Err(WorktreeError::KeptOnBranch { path, current }.into());
    }
    let tip = head
        .peel_to_commit()
        .git_context(|| format!("reading HEAD of {}", path.display()))?;
    let _ = repo;
    Ok(WorktreePlan {
        id: id.clone(),
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
            WorktreeError::NoCommit
        } else {
            WorktreeError::UnknownRef {
                spec: spec.to_string(),
                reason: err.message().to_string(),
            }
        }
    })?;
    let commit = object
        .peel_to_commit()
        .map_err(|_| WorktreeError::NotACommit {
            spec: spec.to_string(),
        })?;
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
    // git's records of the linked worktrees, read directly: libgit2's listing and opening a
    // repository per worktree cost far more (doctor asks once per worktree it reclaims), and
    // opening fails for worktrees whose directory is gone (they still hold the branch).
    let records = repo.commondir().join("worktrees");
    let entries = match fs::read_dir(&records) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(Error::io("listing the worktrees in", &records, err)),
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let admin = entry.path();
        let head = fs::read(admin.join("HEAD")).unwrap_or_default();
        let head = std::str::from_utf8(&head)
            .map(str::trim)
            .unwrap_or_default();
        if head.strip_prefix("ref: ") != Some(full.as_str())
            // What libgit2 counts as a worktree (and so as holding its branch).
            || !["commondir", "gitdir"]
                .iter()
                .all(|file| fs::metadata(admin.join(file)).is_ok_and(|m| m.is_file()))
        {
            continue;
        }
        let gitdir = fs::read_to_string(admin.join("gitdir")).unwrap_or_default();
        let path = Path::new(gitdir.trim())
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or(admin);
        return Ok(Some(path));
    }
    Ok(None)
}

/// Creates the planned worktree (and branch), and records the calling process as its
/// supervisor, made by the start whose intent has `nonce`. On failure nothing it made is left
/// behind (through the guarded removal: nothing anyone else made is touched).
pub fn create(
    repo: &Repository,
    paths: &AppPaths,
    key: &SigningKey,
    plan: &WorktreePlan,
    nonce: &str,
) -> Result<()> {
    let admin = paths.git_worktree_admin(&plan.id);
    if plan.reuse {
        // A kept worktree keeps the nonce of the start that made it.
        let created_by =
            Supervisor::load(&admin).map_or_else(|| nonce.to_string(), |s| s.created_by);
        return Supervisor {
            process: ProcessIdentity::current(),
            created_by,
            kept: Vec::new(),
        }
        .save(&admin);
    }
    tune_libgit2();
    if plan.create_branch {
        let commit = repo
            .find_commit(plan.base)
            .git_context(|| format!("reading commit {}", plan.base))?;
        let reference = format!("refs/heads/{}", plan.branch);
        reflock::retry(repo, &reference, || {
            repo.branch(&plan.branch, &commit, false)
        })
        .map_err(|err| {
            if err.code() == ErrorCode::Exists {
                WorktreeError::BranchRaced {
                    branch: plan.branch.clone(),
                }
                .into()
            } else {
                Error::git(format!("creating branch {}", plan.branch), err)
            }
        })?;
        crate::fault::point("run.branch-created");
    }
    forget_missing(paths, &plan.id)?;
    let added = add_worktree(&admin, plan, nonce);
    if added.is_err() {
        // Roll back: a half-made worktree and a branch made for it must not survive.
        let target = Target {
            id: &plan.id,
            branch: None,
        };
        if let Err(err) = guard::remove(repo, paths, key, target, Keep::RescueUndo) {
            tracing::warn!(instance = %plan.id, %err, "rolling back a failed checkout failed; 'app doctor' reports what is left");
        }
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
fn add_worktree(admin: &Path, plan: &WorktreePlan, nonce: &str) -> Result<()> {
    let admin_parent = admin
        .parent()
        .expect("the admin dir lives in <gitdir>/worktrees");
    fs::create_dir_all(admin_parent).io_context("creating", admin_parent)?;
    fs::create_dir(admin).map_err(|err| {
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            WorktreeError::AdminTaken {
                id: plan.id.to_string(),
                admin: admin.to_path_buf(),
            }
            .into()
        } else {
            Error::io("creating", admin, err)
        }
    })?;
    let write = |path: PathBuf, text: String| fs::write(&path, text).io_context("writing", &path);
    write(admin.join("locked"), format!("{CHECKOUT_LOCK_REASON}\n"))?;
    Supervisor {
        process: ProcessIdentity::current(),
        created_by: nonce.to_string(),
        kept: Vec::new(),
    }
    .save(admin)?;
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

/// The end of an instance's worktree and branch: the worktree goes through the guarded
/// removal with `keep` ([`Keep::IfClean`] for `app run`, [`Keep::Rescue`] for `app ci`), then
/// the branch is deleted when `app` made it (`created_branch`) and it holds no commit beyond
/// `base`. `branch` is `None` for a detached worktree, which holds no branch.
pub fn end_instance(
    repo: &Repository,
    paths: &AppPaths,
    key: &SigningKey,
    (id, branch): (&InstanceId, Option<&str>),
    (base, created_branch): (Oid, bool),
    keep: Keep,
) -> Result<Cleanup> {
    let mut cleanup = Cleanup::default();
    match guard::remove(repo, paths, key, Target { id, branch }, keep).map_err(then_doctor)? {
        Removal::Removed { rescued_to } => {
            cleanup.worktree_removed = true;
            cleanup.rescued_to = rescued_to;
            crate::fault::point("stop.worktree-removed");
        }
        Removal::Absent => {}
        Removal::Kept { because, .. } => {
            cleanup.worktree_kept_because = Some(because);
            // The branch is checked out in the kept worktree: it stays too.
            return Ok(cleanup);
        }
    }
    let Some(branch) = branch.filter(|_| created_branch) else {
        return Ok(cleanup);
    };
    match delete_branch_if_empty(repo, branch, base).map_err(then_doctor)? {
        BranchFate::Gone => {}
        BranchFate::Deleted => {
            cleanup.branch_deleted = true;
            crate::fault::point("stop.branch-deleted");
        }
        BranchFate::Kept(reason) => cleanup.branch_kept_because = Some(reason),
    }
    Ok(cleanup)
}

/// `err`, when a lock file stopped the end of an instance (the worktree or branch it could not
/// take is still there), with what finishes it once the lock file is seen to.
fn then_doctor(err: Error) -> Error {
    match err {
        Error::Git { message, source } if source.code() == ErrorCode::Locked => {
            let text = format!("{}, then run 'app doctor --fix'", source.message());
            Error::git(
                message,
                git2::Error::new(source.code(), source.class(), text),
            )
        }
        other => other,
    }
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

/// Deletes local branch `branch` and its configuration section.
///
/// libgit2's `git_branch_delete` is not used: its "checked out in a linked worktree" check
/// reports *any* branch as checked out while another process prunes some other worktree (the
/// lookup failure is taken for a match), which made concurrent cleanups fail. The check is done
/// here instead, from the worktrees' HEAD files.
pub fn delete_branch(repo: &Repository, branch: &str) -> Result<()> {
    if let Some(holder) = checked_out_in(repo, branch)? {
        return Err(WorktreeError::CheckedOutNotDeleting {
            branch: branch.to_string(),
            holder,
        }
        .into());
    }
    let refname = format!("refs/heads/{branch}");
    reflock::retry(repo, &refname, || match repo.find_reference(&refname) {
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
