//! The repository's git remote, as the fleet uses it: fetch a ref into a ref of ours, push a
//! commit only over the value we expect (never over someone else's newer work), list refs.
//!
//! Through the `git` command, so the user's transports, credential helpers and SSH settings
//! apply as for their own `git push`.
//!
//! Invariants:
//! - Every push names the value it expects the remote ref to hold (`--force-with-lease` with an
//!   explicit old value, empty for "must not exist"): a push over anything else is refused by
//!   the remote, and reported as [`Pushed::Refused`], never retried by force.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::{Error, GitContext, Result};

/// A named remote of the repository at `root`.
#[derive(Debug, Clone)]
pub struct Remote {
    root: PathBuf,
    name: String,
    url: String,
}

/// One ref a push sets: `target` to `commit`, only if it holds `expected` (`None`: if it does
/// not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The commit.
    pub commit: String,
    /// The remote's ref.
    pub target: String,
    /// What it must hold now.
    pub expected: Option<String>,
}

/// How a push ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// The remote ref now holds the commit.
    Done,
    /// The remote ref held something else than expected; nothing changed.
    Refused(String),
}

impl Remote {
    /// The remote `name` of the repository at `root`; exit 2 when it has none of that name.
    pub fn open(root: &Path, name: &str) -> Result<Remote> {
        let output = git(root, ["remote", "get-url", name])?;
        if !output.status.success() {
            return Err(Error::bad_input(format!(
                "the repository {} has no git remote {name:?}; add one ('git remote add {name} URL', a bare repository works) or pass --remote NAME",
                root.display()
            )));
        }
        let url = String::from_utf8_lossy(&output.stdout).trim().to_string();
        Ok(Remote {
            root: root.to_path_buf(),
            name: name.to_string(),
            url,
        })
    }

    /// The remote's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The repository's identity in the fleet: the remote's URL without a trailing `/` or
    /// `.git`, so every clone of one remote serves the same runs.
    pub fn repo_key(&self) -> String {
        let url = self.url.trim_end_matches('/');
        url.strip_suffix(".git").unwrap_or(url).to_string()
    }

    /// Fetches each (source, target) pair, remote ref into our ref, in one `git fetch`; returns
    /// the commit each target holds after. When one source is missing (the whole fetch fails),
    /// they are fetched one by one, a missing one as `None`.
    pub fn fetch_all(&self, pairs: &[(String, String)]) -> Result<Vec<Option<String>>> {
        if pairs.len() > 1 {
            let mut args: Vec<String> = ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"]
                .map(String::from)
                .to_vec();
            args.push(self.name.clone());
            args.extend(
                pairs
                    .iter()
                    .map(|(source, target)| format!("+{source}:{target}")),
            );
            if git(&self.root, &args)?.status.success() {
                return pairs
                    .iter()
                    .map(|(_, target)| self.resolve(target))
                    .collect();
            }
        }
        pairs
            .iter()
            .map(|(source, target)| self.fetch(source, target))
            .collect()
    }

    /// Fetches the remote's `source` ref into our ref `target` (replacing it) and returns the
    /// commit it holds; `None` when the remote has no such ref.
    pub fn fetch(&self, source: &str, target: &str) -> Result<Option<String>> {
        let refspec = format!("+{source}:{target}");
        let output = git(
            &self.root,
            [
                OsStr::new("fetch"),
                OsStr::new("--quiet"),
                OsStr::new("--no-tags"),
                OsStr::new("--no-write-fetch-head"),
                OsStr::new(&self.name),
                OsStr::new(&refspec),
            ],
        )?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains("couldn't find remote ref") {
                return Ok(None);
            }
            return Err(self.failed(&format!("fetching {source}"), &output));
        }
        self.resolve(target)
    }

    /// Pushes `commit` to the remote's `target` ref if that ref holds `expected` (`None`: if it
    /// does not exist).
    pub fn push(&self, commit: &str, target: &str, expected: Option<&str>) -> Result<Pushed> {
        let update = Update {
            commit: commit.to_string(),
            target: target.to_string(),
            expected: expected.map(str::to_string),
        };
        Ok(self
            .push_all(std::slice::from_ref(&update))?
            .pop()
            .expect("one update, one answer"))
    }

    /// Pushes every update in one `git push` (one connection to the remote), each only over its
    /// expected value; returns how each ended, in order. One refused update does not stop the
    /// others.
    pub fn push_all(&self, updates: &[Update]) -> Result<Vec<Pushed>> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<String> = ["push", "--quiet", "--porcelain", "--no-verify"]
            .map(String::from)
            .to_vec();
        for update in updates {
            args.push(format!(
                "--force-with-lease={}:{}",
                update.target,
                update.expected.as_deref().unwrap_or("")
            ));
        }
        args.push(self.name.clone());
        args.extend(updates.iter().map(|u| format!("{}:{}", u.commit, u.target)));
        let output = git(&self.root, &args)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        // Porcelain: "<flag>\t<src>:<dst>\t<summary>", flag '!' for a refused ref.
        let refusal = |target: &str| {
            stdout
                .lines()
                .find(|line| line.starts_with('!') && line.contains(&format!(":{target}\t")))
                .map(|line| line.rsplit('\t').next().unwrap_or_default().to_string())
        };
        let answers: Vec<Pushed> = updates
            .iter()
            .map(|u| refusal(&u.target).map_or(Pushed::Done, Pushed::Refused))
            .collect();
        if !output.status.success() && answers.iter().all(|a| *a == Pushed::Done) {
            return Err(self.failed(&format!("pushing {} refs", updates.len()), &output));
        }
        Ok(answers)
    }

    /// Deletes the remote's ref `target` if it holds `expected` (never anything newer).
    pub(crate) fn delete(&self, target: &str, expected: &str) -> Result<Pushed> {
        let lease = format!("--force-with-lease={target}:{expected}");
        let refspec = format!(":{target}");
        let output = git(
            &self.root,
            [
                OsStr::new("push"),
                OsStr::new("--quiet"),
                OsStr::new("--porcelain"),
                OsStr::new("--no-verify"),
                OsStr::new(&lease),
                OsStr::new(&self.name),
                OsStr::new(&refspec),
            ],
        )?;
        if output.status.success() {
            return Ok(Pushed::Done);
        }
        match refused(&output) {
            Some(why) => Ok(Pushed::Refused(why)),
            None => Err(self.failed(&format!("deleting {target}"), &output)),
        }
    }

    /// Fetches the commits of the remote's refs `sources` into the object store, moving no
    /// ref of ours (no remote-tracking branch, no `FETCH_HEAD`).
    pub(crate) fn fetch_objects(&self, sources: &[String]) -> Result<()> {
        if sources.is_empty() {
            return Ok(());
        }
        let mut args = vec![
            OsStr::new("fetch"),
            OsStr::new("--quiet"),
            OsStr::new("--no-tags"),
            OsStr::new("--no-write-fetch-head"),
            OsStr::new("--refmap="),
            OsStr::new(&self.name),
        ];
        args.extend(sources.iter().map(OsStr::new));
        let output = git(&self.root, args)?;
        if !output.status.success() {
            return Err(self.failed("fetching task refs", &output));
        }
        Ok(())
    }

    /// The remote's refs matching `pattern` (`refs/heads/app/*`), as (ref, commit).
    pub fn list(&self, pattern: &str) -> Result<Vec<(String, String)>> {
        let output = git(
            &self.root,
            [
                OsStr::new("ls-remote"),
                OsStr::new("--quiet"),
                OsStr::new(&self.name),
                OsStr::new(pattern),
            ],
        )?;
        if !output.status.success() {
            return Err(self.failed("listing refs", &output));
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (commit, name) = line.split_once('\t')?;
                Some((name.to_string(), commit.to_string()))
            })
            .collect())
    }

    /// The commit our ref `name` holds, if it exists (read in-process: no `git` per ref).
    fn resolve(&self, name: &str) -> Result<Option<String>> {
        let repo = git2::Repository::open(&self.root)
            .git_context(|| format!("opening {}", self.root.display()))?;
        Ok(repo
            .revparse_single(name)
            .and_then(|object| object.peel_to_commit())
            .ok()
            .map(|commit| commit.id().to_string()))
    }

    fn failed(&self, what: &str, output: &Output) -> Error {
        Error::Failed(format!(
            "{what} on the remote {} ({}) failed: {}",
            self.name,
            self.url,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Why a push was refused (porcelain: "!\t<src>:<dst>\t[rejected] (stale info)" for a lease
/// that did not hold), if it was.
fn refused(output: &Output) -> Option<String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|line| line.starts_with('!'))?;
    Some(line.rsplit('\t').next().unwrap_or_default().to_string())
}

/// Runs `git` in `root` with no terminal prompt (a task host has nobody to answer it).
fn git<I, S>(root: &Path, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new("git")
        .args(args)
        .current_dir(root)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: "git".into(),
            source,
        })
}
