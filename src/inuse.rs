//! Ground truth for "is anybody using this directory?", asked of the operating system rather
//! than of `app`'s own records (which `git clean -fdx`, a lost secret or a user moving a file
//! aside can take away).
//!
//! Invariants:
//! - A directory is in use when any live process other than the caller has its cwd, root,
//!   executable or an open file under it, or was started for it (`APP_WORKTREE` names it in
//!   its environment). Zombies hold nothing and do not count.
//! - A process this user may not inspect cannot be judged; it is skipped. `.app/` is 0700, so
//!   only this user (or root) can be inside it.
//! - A worktree's supervisor is recorded in git's admin directory of the worktree
//!   ([`Supervisor`]: `.git/worktrees/<id>/app-supervisor`), where `git clean` never reaches; a
//!   recorded supervisor that still runs proves the worktree in use even when nothing of it is
//!   inside the directory at this instant.
//! - An instance whose supervisor or command still runs on this host is in use whatever its
//!   heartbeat says (`instance_running`).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::process::{Presence, ProcessIdentity};
use crate::registry::InstanceRecord;

/// Why a process counts as a user of a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// Its current directory is inside.
    Cwd,
    /// Its root directory is inside.
    Root,
    /// It runs an executable from inside.
    Exe,
    /// It has a file inside open.
    OpenFile,
    /// Its `APP_WORKTREE` names the directory.
    Environment,
    /// It is the worktree's recorded supervisor.
    Supervisor,
    /// Its instance's command left it running (`--keep-running`).
    KeptRunning,
}

impl Hold {
    fn describe(self) -> &'static str {
        match self {
            Hold::Cwd => "its working directory is inside",
            Hold::Root => "its root directory is inside",
            Hold::Exe => "it runs a program from inside",
            Hold::OpenFile => "it has a file inside open",
            Hold::Environment => "it was started for this worktree (APP_WORKTREE)",
            Hold::Supervisor => "it is the worktree's supervisor",
            Hold::KeptRunning => "its instance left it running there (--keep-running)",
        }
    }
}

/// A live process that uses a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
    /// How it uses the directory.
    pub hold: Hold,
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}): {}",
            self.pid,
            self.command,
            self.hold.describe()
        )
    }
}

/// What one process holds, read from `/proc/<pid>`.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    places: Vec<(Hold, PathBuf)>,
    worktree_env: Option<PathBuf>,
}

/// One pass over `/proc`: every other live process and the paths it holds. Take one, then ask
/// it about many directories ([`Scan::users`]).
#[derive(Debug, Clone, Default)]
pub struct Scan {
    procs: Vec<Proc>,
}

impl Scan {
    /// Reads every process but the caller.
    pub fn take() -> Scan {
        let me = std::process::id();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Scan::default();
        };
        let procs = entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != me)
            .filter_map(read_proc)
            .collect();
        Scan { procs }
    }

    /// A scan at most `max_age` old: the last one this process took, or a new one. For a first
    /// look that decides whether to do work (a rescue) at all; what decides a destruction is
    /// always a [`Scan::take`] right before it.
    pub fn recent(max_age: std::time::Duration) -> Scan {
        use std::sync::Mutex;
        use std::time::Instant;
        static LAST: Mutex<Option<(Instant, Scan)>> = Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(|poison| poison.into_inner());
        match &*last {
            Some((at, scan)) if at.elapsed() <= max_age => scan.clone(),
            _ => {
                let scan = Scan::take();
                *last = Some((Instant::now(), scan.clone()));
                scan
            }
        }
    }

    /// The processes that use `dir` (canonical, absolute), at most one entry per process.
    pub fn users(&self, dir: &Path) -> Vec<User> {
        self.procs
            .iter()
            .filter_map(|proc| {
                let hold = proc
                    .places
                    .iter()
                    .find(|(_, place)| place.starts_with(dir))
                    .map(|(hold, _)| *hold)
                    .or_else(|| {
                        (proc.worktree_env.as_deref() == Some(dir)).then_some(Hold::Environment)
                    })?;
                // Gone since the scan: it holds nothing any more.
                let command = fs::read_to_string(format!("/proc/{}/comm", proc.pid)).ok()?;
                Some(User {
                    pid: proc.pid,
                    command: command.trim().to_string(),
                    hold,
                })
            })
            .collect()
    }
}

/// What process `pid` holds. Everything is read relative to one open `/proc/<pid>` directory:
/// shorter lookups than a path each (a scan reads every process, once per removal), and a pid
/// reused meanwhile cannot slip in (the directory stays the one process's).
fn read_proc(pid: u32) -> Option<Proc> {
    use nix::fcntl::{AT_FDCWD, OFlag, openat, readlinkat};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let dir = openat(
        AT_FDCWD,
        format!("/proc/{pid}").as_str(),
        flags | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .ok()?;
    let link = |name: &str| readlinkat(&dir, name).ok().map(PathBuf::from);
    // Zombies (and processes gone meanwhile, or this user may not inspect) have no cwd: a
    // process lets go of its cwd after its memory and its files, so it holds nothing else.
    let mut places = vec![(Hold::Cwd, link("cwd")?)];
    // Every process has root "/": only a chroot inside a worktree says anything.
    if let Some(root) = link("root").filter(|root| root != Path::new("/")) {
        places.push((Hold::Root, root));
    }
    // No executable means no memory: a kernel thread, or a process past the point of its exit
    // where it runs no code of its own any more. Its files and environment say nothing (most
    // processes on a machine are kernel threads: this halves a scan).
    let Some(exe) = link("exe") else {
        return Some(Proc {
            pid,
            places,
            worktree_env: None,
        });
    };
    places.push((Hold::Exe, exe));
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.filter_map(|fd| fd.ok()) {
            let mut name = std::ffi::OsString::from("fd/");
            name.push(fd.file_name());
            if let Ok(target) = readlinkat(&dir, name.as_os_str()).map(PathBuf::from)
                && target.is_absolute()
            {
                places.push((Hold::OpenFile, target));
            }
        }
    }
    let worktree_env = openat(&dir, "environ", flags, Mode::empty())
        .ok()
        .and_then(|fd| {
            let mut environ = Vec::with_capacity(4096);
            std::io::Read::read_to_end(&mut fs::File::from(fd), &mut environ).ok()?;
            environ
                .split(|b| *b == 0)
                .find_map(|var| var.strip_prefix(b"APP_WORKTREE="))
                .map(|value| PathBuf::from(std::ffi::OsStr::from_bytes(value)))
        });
    Some(Proc {
        pid,
        places,
        worktree_env,
    })
}

/// The supervisor of a worktree as recorded in git's admin directory of it, and the nonce of
/// the start that made the worktree (so recovery undoes only what that start made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Supervisor {
    /// The process that supervises (or supervised) the worktree.
    pub process: ProcessIdentity,
    /// The nonce of the journal intent of the start that created the worktree.
    pub created_by: String,
    /// Processes its command left running under `app run --keep-running`: the worktree stays
    /// theirs while any of them lives, wherever their cwd and whatever their environment.
    #[serde(default)]
    pub kept: Vec<ProcessIdentity>,
}

/// Where [`Supervisor`] is kept for a worktree whose git admin directory is `admin`.
pub fn supervisor_file(admin: &Path) -> PathBuf {
    admin.join("app-supervisor")
}

impl Supervisor {
    /// Reads the record in `admin` (git's `worktrees/<id>`), if there is a readable one.
    pub fn load(admin: &Path) -> Option<Supervisor> {
        let bytes = fs::read(supervisor_file(admin)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records `self` in `admin` (atomically).
    pub fn save(&self, admin: &Path) -> crate::Result<()> {
        let bytes = serde_json::to_vec(self).expect("supervisor records serialize");
        crate::state::write_atomic(&supervisor_file(admin), &bytes)
    }

    /// Whether the recorded supervisor is a live process other than the caller.
    pub fn alive_elsewhere(&self) -> bool {
        self.process.pid != std::process::id() && self.process.presence() == Presence::Running
    }
}

/// Everything that shows the worktree `dir` (git admin directory `admin`) in use, from `scan`
/// and the recorded supervisor.
pub fn worktree_users(scan: &Scan, dir: &Path, admin: &Path) -> Vec<User> {
    let mut users = scan.users(dir);
    let Some(supervisor) = Supervisor::load(admin) else {
        return users;
    };
    let me = std::process::id();
    let recorded = std::iter::once((&supervisor.process, Hold::Supervisor))
        .chain(supervisor.kept.iter().map(|p| (p, Hold::KeptRunning)));
    for (process, hold) in recorded {
        if process.pid != me
            && process.presence() == Presence::Running
            && !users.iter().any(|u| u.pid == process.pid)
        {
            users.push(User {
                pid: process.pid,
                command: crate::process::command_name(process.pid),
                hold,
            });
        }
    }
    users
}

/// The users as one line: "pid 12 (sh): its working directory is inside; ...".
pub fn describe(users: &[User]) -> String {
    users
        .iter()
        .map(User::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why instance `record` must be left alone although its registration went stale, if it must:
/// its supervisor, or the command it ran in its worktree, still runs. On another host its pids
/// mean nothing, and a stale heartbeat is all there is to go by (`None`).
pub(crate) fn instance_running(record: &InstanceRecord) -> Option<String> {
    if record.host != crate::process::hostname() {
        return None;
    }
    if record.identity().presence() == Presence::Running {
        return Some(format!("its supervisor (pid {}) still runs", record.pid));
    }
    if let (Some(pid), Some(start_time)) = (record.child_pid, record.child_start_time) {
        let child = ProcessIdentity {
            pid,
            start_time,
            boot_id: record.boot_id.clone(),
        };
        if child.presence() == Presence::Running {
            return Some(format!(
                "its command (pid {pid}) still runs in its worktree"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn a_child_with_its_cwd_inside_is_a_user_and_gone_it_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let dir = fs::canonicalize(dir.path()).unwrap();
        let inner = dir.join("sub");
        fs::create_dir(&inner).unwrap();
        assert!(Scan::take().users(&dir).is_empty());
        let mut child = Command::new("sleep")
            .arg("30")
            .current_dir(&inner)
            .spawn()
            .unwrap();
        let started = Instant::now();
        let users = loop {
            let users = Scan::take().users(&dir);
            if !users.is_empty() || started.elapsed() > Duration::from_secs(10) {
                break users;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(users.len(), 1, "{users:?}");
        assert_eq!(users[0].pid, child.id());
        assert_eq!(users[0].hold, Hold::Cwd);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(Scan::take().users(&dir).iter().all(|u| u.pid != child.id()));
    }

    #[test]
    fn an_open_file_inside_counts_and_the_caller_never_does() {
        let dir = tempfile::tempdir().unwrap();
        let dir = fs::canonicalize(dir.path()).unwrap();
        let path = dir.join("held");
        fs::write(&path, "x").unwrap();
        let _mine = fs::File::open(&path).unwrap();
        assert!(Scan::take().users(&dir).is_empty(), "the caller is no user");
        let mut child = Command::new("sh")
            .args(["-c", "exec 3<\"$0\"; exec sleep 30"])
            .arg(&path)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !Scan::take()
            .users(&dir)
            .iter()
            .any(|u| u.pid == child.id() && u.hold == Hold::OpenFile)
        {
            assert!(started.elapsed() < Duration::from_secs(10), "never seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
