//! Process identity and the children `app` runs.
//!
//! Invariants:
//! - A pid is only the same process while its start time (and the boot it belongs to) matches
//!   what was recorded, so a reused pid is never mistaken for an instance.
//! - A [`Child`] is signalled only until it is reaped: reaping marks it under the same lock
//!   every signal is sent under, so a recycled pid (or process group) is never signalled.
//! - `app`'s exit code for a command is spelled here once: its own code, 128+N when it died of
//!   signal N, 127 when it was not found, 126 when it could not be run.

use std::fs;
use std::io;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus};
use std::sync::{Mutex, MutexGuard, OnceLock};

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// What identifies one process on one machine across pid reuse and reboots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// The process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_time: u64,
    /// The kernel's boot id; a start time from another boot means nothing now.
    pub boot_id: String,
}

/// Whether a recorded process is still the one running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// The pid exists with the recorded start time in this boot.
    Running,
    /// No process has that pid.
    Gone,
    /// The pid exists but belongs to another process (start time or boot differs).
    Reused,
}

impl ProcessIdentity {
    /// The identity of the calling process.
    pub fn current() -> Self {
        let pid = std::process::id();
        Self::of(pid).expect("the calling process can always read its own /proc entry")
    }

    /// The identity of the running process `pid`, or `None` when there is none.
    pub fn of(pid: u32) -> Option<Self> {
        Some(ProcessIdentity {
            pid,
            start_time: start_time(pid)?,
            boot_id: boot_id().to_string(),
        })
    }

    /// Whether this identity still names a running process.
    pub fn presence(&self) -> Presence {
        if self.boot_id != boot_id() {
            // After a reboot the pid, if it exists, is someone else.
            return if start_time(self.pid).is_some() {
                Presence::Reused
            } else {
                Presence::Gone
            };
        }
        match start_time(self.pid) {
            None => Presence::Gone,
            Some(t) if t == self.start_time => Presence::Running,
            Some(_) => Presence::Reused,
        }
    }

    /// Sends `sig` only if this identity still names the running process.
    ///
    /// Returns false when the process is gone or its pid was reused (nothing is sent then).
    pub fn signal(&self, sig: Signal) -> bool {
        if self.presence() != Presence::Running {
            return false;
        }
        match signal::kill(pid_of(self.pid), sig) {
            Ok(()) => true,
            Err(Errno::ESRCH) => false,
            Err(err) => {
                tracing::warn!(pid = self.pid, signal = ?sig, %err, "sending signal failed");
                false
            }
        }
    }
}

/// Converts a recorded pid to nix's type.
pub fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Blocks until child `pid` has exited, without reaping it: until the caller reaps it (with
/// `Child::wait`), the pid cannot be reused, so whoever may still signal it can first be told.
fn wait_unreaped(pid: u32) -> std::io::Result<()> {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    loop {
        match waitid(
            Id::Pid(pid_of(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(std::io::Error::from(err)),
        }
    }
}

/// Whether child `pid` has exited, without waiting and without reaping it (see
/// [`wait_unreaped`]).
fn exited_unreaped(pid: u32) -> std::io::Result<bool> {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
        match waitid(Id::Pid(pid_of(pid)), flags) {
            Ok(WaitStatus::StillAlive) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(std::io::Error::from(err)),
        }
    }
}

/// `app`'s exit code for a command's status: its code, or 128+N for signal N.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => signal_exit_code(signal),
        (None, None) => 1,
    }
}

/// `app`'s exit code for an end by signal `signal`: 128+N.
pub fn signal_exit_code(signal: i32) -> u8 {
    128u8.saturating_add(u8::try_from(signal).unwrap_or(0))
}

/// `app`'s exit code for a command that could not be started, as the shell has it: 127 when
/// it was not found, 126 when it was found but could not be run.
pub fn spawn_failure_code(err: &io::Error) -> u8 {
    if err.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

/// Whom [`Child::signal`] reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The child alone.
    Process,
    /// The child's whole process group (it leads one of its own).
    Group,
}

/// A child process of this one that is signalled only until it is reaped: once reaped its pid
/// (and its process group id) may belong to someone else. Shared between the thread that
/// waits for it and those that signal it (wrap it in an `Arc`).
#[derive(Debug)]
pub struct Child {
    pid: u32,
    target: Target,
    state: Mutex<Reaping>,
}

#[derive(Debug)]
struct Reaping {
    child: std::process::Child,
    /// Set once the child was reaped, or could not be waited for: nothing signals it then.
    reaped: bool,
    status: Option<ExitStatus>,
}

impl Child {
    /// Starts `command`; [`Child::signal`] reaches the child alone.
    pub fn spawn(command: &mut Command) -> io::Result<Child> {
        Ok(Child::new(command.spawn()?, Target::Process))
    }

    /// Starts `command` as the leader of a process group of its own; [`Child::signal`] reaches
    /// the whole group (a pipeline, a shell's children).
    pub fn spawn_group(command: &mut Command) -> io::Result<Child> {
        use std::os::unix::process::CommandExt;
        Ok(Child::new(command.process_group(0).spawn()?, Target::Group))
    }

    fn new(child: std::process::Child, target: Target) -> Child {
        Child {
            pid: child.id(),
            target,
            state: Mutex::new(Reaping {
                child,
                reaped: false,
                status: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Reaping> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The child's piped stdin, stdout and stderr, taken (each `None` when not piped or taken).
    pub fn take_pipes(&self) -> (Option<ChildStdin>, Option<ChildStdout>, Option<ChildStderr>) {
        let mut state = self.lock();
        let child = &mut state.child;
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    }

    /// Sends `signal` to the child (or its group) unless it was reaped. Returns whether it was
    /// sent.
    pub fn signal(&self, signal: Signal) -> bool {
        let state = self.lock();
        if state.reaped {
            return false;
        }
        let sent = match self.target {
            Target::Process => signal::kill(pid_of(self.pid), signal),
            Target::Group => signal::killpg(pid_of(self.pid), signal),
        };
        drop(state);
        sent.is_ok()
    }

    /// Whether the child was reaped (nothing signals it any more).
    pub fn reaped(&self) -> bool {
        self.lock().reaped
    }

    /// Blocks until the child exits, then reaps it: its exit status.
    pub fn wait(&self) -> io::Result<ExitStatus> {
        // Waiting happens without the lock (signals still reach the child meanwhile); the
        // reaping under it.
        let exited = wait_unreaped(self.pid);
        self.reap(exited)
    }

    /// The child's exit status once it has exited (reaping it then), `None` while it runs.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        match exited_unreaped(self.pid) {
            Ok(false) => Ok(None),
            Ok(true) => self.reap(Ok(())).map(Some),
            Err(err) => self.reap(Err(err)).map(Some),
        }
    }

    /// Reaps the child after `exited` said it has exited; an error there leaves it unwaitable,
    /// and so unsignalled too.
    fn reap(&self, exited: io::Result<()>) -> io::Result<ExitStatus> {
        let mut state = self.lock();
        if let Some(status) = state.status {
            return Ok(status);
        }
        state.reaped = true;
        exited?;
        let status = state.child.wait()?;
        state.status = Some(status);
        Ok(status)
    }
}

/// Makes the calling process a child subreaper (`PR_SET_CHILD_SUBREAPER`): a process its
/// descendants leave behind (a background job of a command that exited, a daemon that called
/// `setsid`) is re-parented to it instead of to init, so [`descendants`] still finds it.
pub fn become_subreaper() {
    if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(%err, "cannot become a child subreaper; processes a command leaves behind may escape its stop");
    }
}

/// One line of `/proc/<pid>/stat`: the fields this module needs.
struct Stat {
    pid: u32,
    ppid: u32,
    zombie: bool,
    /// CPU time in clock ticks: its own (utime + stime) and that of its children it waited
    /// for (cutime + cstime).
    own_cpu: u64,
    children_cpu: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // After the command name: state (field 3) is fields[0], ppid fields[1], utime (field 14)
    // fields[11], stime fields[12], cutime fields[13], cstime fields[14].
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(Stat {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        zombie: matches!(*fields.first()?, "Z" | "X" | "x"),
        own_cpu: tick(11) + tick(12),
        children_cpu: tick(13) + tick(14),
    })
}

fn all_stats() -> Vec<Stat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// The live (not zombie) descendants of the calling process, as identities, found by
/// following parent links through `/proc`.
pub fn descendants() -> Vec<ProcessIdentity> {
    let stats = all_stats();
    let mut found = Vec::new();
    let mut parents = vec![std::process::id()];
    while let Some(parent) = parents.pop() {
        for stat in stats.iter().filter(|s| s.ppid == parent) {
            parents.push(stat.pid);
            if !stat.zombie
                && let Some(identity) = ProcessIdentity::of(stat.pid)
            {
                found.push(identity);
            }
        }
    }
    found
}

/// The CPU time, in clock ticks ([`clock_ticks_per_second`]), used so far by the calling
/// process's descendants: each one's own and its waited-for children's, plus the children the
/// calling process itself waited for (a descendant that ended), never the caller's own
/// threads. One pass over `/proc`. It may go down when a descendant ends unwaited for; callers
/// take a drop as no use.
pub fn descendants_cpu_ticks() -> u64 {
    let stats = all_stats();
    let me = std::process::id();
    let mut total = stats
        .iter()
        .find(|s| s.pid == me)
        .map_or(0, |s| s.children_cpu);
    let mut parents = vec![me];
    while let Some(parent) = parents.pop() {
        for stat in stats.iter().filter(|s| s.ppid == parent) {
            parents.push(stat.pid);
            total += stat.own_cpu + stat.children_cpu;
        }
    }
    total
}

/// The kernel's clock ticks per second (`_SC_CLK_TCK`, nearly always 100).
pub fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(100)
}

/// Reaps the calling process's exited children that nobody waits for (as a subreaper it
/// inherits them). Only call this when no `std::process::Child` of its own is still
/// unreaped: their exit status would be taken from them.
pub fn reap_orphans() {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let me = std::process::id();
    for stat in all_stats().into_iter().filter(|s| s.ppid == me && s.zombie) {
        let _ = waitpid(pid_of(stat.pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// The process that called this one, seen through the subshells a shell forks for `$(...)`,
/// a pipeline, or a loop or function body in one: those are copies of the shell (the same
/// program with the same arguments, never exec'd) that end as soon as the command does, so
/// whatever they hold would lapse at once. Walks up from the parent while the next ancestor
/// runs the same program with the same arguments.
pub fn caller() -> Option<ProcessIdentity> {
    let same = |a: u32, b: u32| {
        let exe = |pid: u32| fs::read_link(format!("/proc/{pid}/exe")).ok();
        let cmdline = |pid: u32| fs::read(format!("/proc/{pid}/cmdline")).ok();
        exe(a).is_some() && exe(a) == exe(b) && cmdline(a) == cmdline(b)
    };
    let mut pid = nix::unistd::getppid().as_raw() as u32;
    while let Some(parent) = read_stat(pid).map(|s| s.ppid).filter(|p| *p > 1)
        && same(pid, parent)
    {
        pid = parent;
    }
    ProcessIdentity::of(pid)
}

/// The command name of `pid` (`/proc/<pid>/comm`), or "?".
pub fn command_name(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Start time of `pid` in clock ticks since boot, or `None` when no such process is running.
///
/// A zombie (exited, not yet reaped by its parent) counts as not running: it does nothing more
/// and holds nothing but its pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')': split after the
    // last ')'. Field 3 (the state) is then the first field, and field 22 the twentieth.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    if matches!(state, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), read once.
pub fn boot_id() -> &'static str {
    static BOOT_ID: OnceLock<String> = OnceLock::new();
    BOOT_ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// This machine's host name.
pub fn hostname() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "localhost".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_identity_is_running_and_altered_start_time_is_reused() {
        let me = ProcessIdentity::current();
        assert_eq!(me.presence(), Presence::Running);
        let reused = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert_eq!(reused.presence(), Presence::Reused);
    }

    #[test]
    fn unreaped_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let started = std::time::Instant::now();
        while start_time(pid).is_some() {
            assert!(started.elapsed().as_secs() < 10, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Still a zombie: its /proc entry exists until it is reaped.
        assert!(fs::metadata(format!("/proc/{pid}")).is_ok());
        child.wait().unwrap();
    }

    #[test]
    fn a_reaped_child_is_never_signalled() {
        let child = Child::spawn(std::process::Command::new("sleep").arg("30")).unwrap();
        assert!(!child.reaped());
        assert!(child.signal(Signal::SIGTERM));
        let status = child.wait().unwrap();
        assert_eq!(exit_code(status), 128 + 15);
        assert!(child.reaped());
        assert!(
            !child.signal(Signal::SIGKILL),
            "a reaped pid may be someone else's"
        );
        assert_eq!(
            child.wait().unwrap(),
            status,
            "waiting again gives the same status"
        );
    }

    #[test]
    fn spawn_failures_map_to_the_shells_codes() {
        let missing = std::process::Command::new("/nonexistent/app-test")
            .spawn()
            .unwrap_err();
        assert_eq!(spawn_failure_code(&missing), 127);
        let not_runnable = std::process::Command::new("/").spawn().unwrap_err();
        assert_eq!(spawn_failure_code(&not_runnable), 126);
        assert_eq!(signal_exit_code(2), 130);
    }

    #[test]
    fn missing_pid_is_gone() {
        // Pids above the kernel's pid_max (at most 2^22) never exist.
        let ghost = ProcessIdentity {
            pid: 4_194_304 + 7,
            start_time: 1,
            boot_id: boot_id().to_string(),
        };
        assert_eq!(ghost.presence(), Presence::Gone);
    }
}
