//! The supervisor's activity thread: each tick it reads the command's CPU time, the
//! worktree's changes and the latest report, derives the state, brings the progress up to
//! date, and writes both to `.app/activity/<id>.json` when they changed (or every
//! [`REWRITE_EVERY`] ticks). The file goes when the thread stops.

use std::path::PathBuf;
use std::thread;
use std::time::{Instant, SystemTime};

use git2::Oid;

use super::derive::{Deriver, Seen};
use super::progress::ProgressTracker;
use super::{Activity, Progress, StateReport, load_report, remove, save};
use crate::config::ActivityTiming;
use crate::paths::AppPaths;
use crate::process;
use crate::stop::Stopper;
use crate::time::Timestamp;

/// Ticks between two writes of an unchanged state (its reason and `updated_at` refreshed).
pub(crate) const REWRITE_EVERY: u32 = 10;

/// What the tracker of one instance watches.
pub struct Watched {
    /// The repository's `.app/` layout.
    pub paths: AppPaths,
    /// The instance.
    pub id: String,
    /// Its worktree, if it has one (progress needs one).
    pub worktree: Option<PathBuf>,
    /// The commit it started from.
    pub base: Option<Oid>,
    /// How often and with which thresholds.
    pub timing: ActivityTiming,
    /// When the instance started: an older report (left by an earlier instance of the same
    /// name that crashed) is not its.
    pub started: Timestamp,
}

/// Asked each tick: whether the command has ended.
pub type ExitedFn = Box<dyn Fn() -> bool + Send>;
/// Asked when idle long enough to be stuck: what the agent holds ("lock db", "task t1").
pub type HoldsFn = Box<dyn FnMut() -> Option<String> + Send>;

/// One instance's state derivation, one [`Probe::tick`] at a time (the thread calls it; the
/// benchmark calls it directly).
pub struct Probe {
    watched: Watched,
    deriver: Deriver,
    progress: Option<ProgressTracker>,
    cpu: (u64, Instant),
    ticks_per_second: u64,
    /// The `at` of the last report taken.
    last_report: Option<Timestamp>,
    exited: ExitedFn,
    holds: HoldsFn,
    written: Option<(StateReport, Option<Progress>)>,
    unchanged_ticks: u32,
}

impl Probe {
    /// Starts watching: the worktree's watch is set up here, before the first tick.
    pub fn new(watched: Watched, exited: ExitedFn, holds: HoldsFn) -> Probe {
        let progress = match (&watched.worktree, watched.base) {
            (Some(root), Some(base)) => {
                let base_ref = base_branch(&watched.paths, root);
                ProgressTracker::open(root, base, base_ref)
                    .inspect_err(|err| tracing::warn!(instance = %watched.id, %err, "no progress for this worktree"))
                    .ok()
            }
            _ => None,
        };
        let timing = watched.timing;
        Probe {
            watched,
            deriver: Deriver::new(SystemTime::now(), timing.idle_after, timing.stuck_after),
            progress,
            cpu: (process::descendants_cpu_ticks(), Instant::now()),
            ticks_per_second: process::clock_ticks_per_second(),
            last_report: None,
            exited,
            holds,
            written: None,
            unchanged_ticks: 0,
        }
    }

    /// Gives up a probe whose command never started: its files go.
    pub fn discard(self) {
        remove(&self.watched.paths, &self.watched.id);
    }

    /// One tick: observe, derive, write when changed. Returns what it derived.
    pub fn tick(&mut self) -> (StateReport, Option<Progress>) {
        let (ticks, now) = (process::descendants_cpu_ticks(), Instant::now());
        let used = ticks.saturating_sub(self.cpu.0);
        let elapsed_ms = now.duration_since(self.cpu.1).as_millis().max(1) as u64;
        self.cpu = (ticks, now);
        let cpu_percent = used * 1000 * 100 / self.ticks_per_second.max(1) / elapsed_ms;
        let (progress, worktree_changed) = match &mut self.progress {
            Some(tracker) => {
                let (progress, changed) = tracker.refresh();
                (Some(progress), changed)
            }
            None => (None, false),
        };
        let report = load_report(&self.watched.paths, &self.watched.id).filter(|report| {
            report.at >= self.watched.started && self.last_report != Some(report.at)
        });
        if let Some(report) = &report {
            self.last_report = Some(report.at);
        }
        let seen = Seen {
            cpu_percent,
            worktree_changed,
            report,
            exited: (self.exited)(),
        };
        let state = self
            .deriver
            .tick(SystemTime::now(), &seen, &mut *self.holds)
            .clone();
        self.write(&state, progress);
        (state, progress)
    }

    fn write(&mut self, state: &StateReport, progress: Option<Progress>) {
        let changed = self.written.as_ref().is_none_or(|(s, p)| {
            (s.state, s.since) != (state.state, state.since) || *p != progress
        });
        self.unchanged_ticks += 1;
        if !changed && self.unchanged_ticks < REWRITE_EVERY {
            return;
        }
        self.unchanged_ticks = 0;
        let activity = Activity {
            agent: state.clone(),
            progress,
            updated_at: Timestamp::now(),
        };
        match save(&self.watched.paths, &self.watched.id, &activity) {
            Ok(()) => self.written = Some((state.clone(), progress)),
            Err(err) => {
                tracing::warn!(instance = %self.watched.id, %err, "cannot write the agent state")
            }
        }
    }
}

/// The branch the instance's base is followed on: the branch the main worktree has checked
/// out, unless that is the instance's own.
fn base_branch(paths: &AppPaths, worktree: &std::path::Path) -> Option<String> {
    let main = git2::Repository::open(paths.repo_root()).ok()?;
    let name = main.head().ok()?.name().ok().map(str::to_string)?;
    let own = git2::Repository::open(worktree)
        .ok()
        .and_then(|repo| repo.head().ok()?.name().ok().map(str::to_string));
    (name.starts_with("refs/heads/") && own.as_deref() != Some(&name)).then_some(name)
}

/// The running activity thread of one instance; [`Tracker::stop`] ends it and removes the
/// instance's activity files.
pub struct Tracker {
    stopper: Stopper,
    handle: thread::JoinHandle<()>,
    paths: AppPaths,
    id: String,
}

impl Tracker {
    /// Ticks `probe` (made, and ticked once, before the command started: see
    /// [`Probe::new`]) every `interval` on a thread of its own until stopped; `exited` says
    /// from now on whether the command has ended.
    pub fn start(mut probe: Probe, exited: ExitedFn) -> Tracker {
        probe.exited = exited;
        let (paths, id, interval) = (
            probe.watched.paths.clone(),
            probe.watched.id.clone(),
            probe.watched.timing.interval,
        );
        let stopper = Stopper::new();
        let stop = stopper.token();
        let handle = thread::spawn(move || {
            while !stop.wait_timeout(interval) {
                probe.tick();
            }
        });
        Tracker {
            stopper,
            handle,
            paths,
            id,
        }
    }

    /// Ends the thread, waits for it, and removes the activity files.
    pub fn stop(self) {
        self.stopper.stop();
        let _ = self.handle.join();
        remove(&self.paths, &self.id);
    }
}
