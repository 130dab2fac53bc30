//! Drives the agent-state derivation for `scripts/bench-state.sh`: the cost of one
//! [`app::activity::Probe::tick`] on a worktree, against `git status --porcelain` of the same
//! worktree (what each tick avoids).
//!
//! ```text
//! state_bench WORKTREE BASE TICKS    prints one line per measurement:
//!   first_tick_us N                  the first tick (sets up the watch, one full diff)
//!   quiet_tick_us N                  mean tick, nothing changed
//!   edit_tick_us N                   mean tick, one file edited before each
//!   git_status_us N                  mean `git status --porcelain` of the worktree
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use app::activity::{ActivityTiming, Probe, Watched};
use app::paths::AppPaths;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(worktree), Some(base), Some(ticks)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: state_bench WORKTREE BASE TICKS");
        std::process::exit(2);
    };
    let worktree = PathBuf::from(worktree);
    let base = git2::Oid::from_str(&base).expect("BASE is a commit id");
    let ticks: u32 = ticks.parse().expect("TICKS is a number");
    let paths = AppPaths::discover(&worktree).expect("WORKTREE is in a git repository");
    let timing = ActivityTiming {
        interval: Duration::from_secs(1),
        idle_after: Duration::from_secs(30),
        stuck_after: Duration::from_secs(600),
    };
    let watched = Watched {
        paths,
        id: "bench".into(),
        worktree: Some(worktree.clone()),
        base: Some(base),
        timing,
        started: app::time::Timestamp::now(),
    };
    let started = Instant::now();
    let mut probe = Probe::new(watched, Box::new(|| false), Box::new(|| None));
    probe.tick();
    println!("first_tick_us {}", started.elapsed().as_micros());

    let mut quiet = Duration::ZERO;
    for _ in 0..ticks {
        let t = Instant::now();
        probe.tick();
        quiet += t.elapsed();
    }
    println!("quiet_tick_us {}", quiet.as_micros() / u128::from(ticks));

    // One file edited before each tick; the watch's event is waited for (not timed) so that
    // every timed tick diffs the edit.
    let file = worktree.join("d00/e0/f00000.txt");
    let mut edit = Duration::ZERO;
    for i in 0..ticks {
        let mut text = std::fs::read_to_string(&file).expect("the benchmark repository's file");
        text.push_str(&format!("edit {i}\n"));
        std::fs::write(&file, text).expect("write");
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        let (_, progress) = probe.tick();
        edit += t.elapsed();
        assert!(
            progress.is_some_and(|p| p.uncommitted.insertions == u64::from(i) + 1),
            "each tick sees the edit: {progress:?}"
        );
    }
    println!("edit_tick_us {}", edit.as_micros() / u128::from(ticks));

    let runs = 10u32;
    let mut status = Duration::ZERO;
    for _ in 0..runs {
        let t = Instant::now();
        let output = std::process::Command::new("git")
            .args(["status", "--porcelain"])
            .current_dir(&worktree)
            .output()
            .expect("git status");
        assert!(output.status.success());
        status += t.elapsed();
    }
    println!("git_status_us {}", status.as_micros() / u128::from(runs));
}
