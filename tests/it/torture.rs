//! A seeded torture test of the never-lose-work promise: random interleavings of `app run`
//! (background writers, `setsid` children, commits, detached HEADs, index flags), SIGKILL of
//! supervisors and whole instances at random moments, `git clean -fdx`, a deleted secret, a
//! lost registry, and `app doctor --fix` while all that runs.
//!
//! Every write a command makes is recorded in a ledger outside the repository *after* it
//! succeeded. After each round, every recorded write is in its worktree, in a rescue ref or on
//! a kept branch (any commit reachable from a ref); no live instance lost its worktree to a
//! doctor; and a second doctor finds nothing.
//!
//! `APP_TORTURE_SEED` replays a run (the seed is printed); `APP_TORTURE_ROUNDS` runs more or
//! fewer rounds (default 100).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::{Running, TestRepo, code, stdout};

/// xorshift64*: small, deterministic, good enough to pick interleavings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max))
    }
}

/// `$W FILE CONTENT` writes FILE (relative to the cwd) and, once that succeeded, records
/// the write in `$LEDGER`.
const WRITER: &str = "#!/bin/sh\nprintf '%s\\n' \"$2\" > \"$1\" && printf '%s %s %s\\n' \"$APP_INSTANCE_ID\" \"$1\" \"$2\" >> \"$LEDGER\"\n";

/// What an instance's command does, and whether it ends by itself.
fn script(rng: &mut Rng) -> (String, bool) {
    let unique = rng.next();
    let tag = |k: usize| format!("{unique:x}-{k}");
    let kind = rng.below(7);
    let body = match kind {
        // Writes files for a while, then waits to be stopped.
        0 => format!(
            "for k in 1 2 3 4 5 6; do $W f$k.txt {t}$k; sleep 0.05; done; sleep 60",
            t = tag(0)
        ),
        // Commits some of its files.
        1 => format!(
            "$W a.txt {a} && git add a.txt && git commit -qm a && $W b.txt {b}; sleep 60",
            a = tag(1),
            b = tag(2)
        ),
        // A background writer outliving its parent.
        2 => format!(
            "(sleep 0.{d}; $W late.txt {t}; sleep 60) & $W early.txt {e}; exit 0",
            d = 1 + rng.below(5),
            t = tag(3),
            e = tag(4)
        ),
        // A writer that left the process group and session.
        3 => format!(
            "setsid sh -c 'sleep 0.{d}; $W away.txt {t}; sleep 60' & sleep 60",
            d = 1 + rng.below(5),
            t = tag(5)
        ),
        // Commits on a detached HEAD.
        4 => format!(
            "git checkout -q --detach && $W d.txt {t} && git add d.txt && git commit -qm d && $W e.txt {u}; sleep 60",
            t = tag(6),
            u = tag(7)
        ),
        // Changes a file the index says to overlook.
        5 => format!(
            "git update-index --skip-worktree README.md && $W README.md {t}; sleep 60",
            t = tag(8)
        ),
        // Does its work and ends by itself.
        _ => format!("$W quick.txt {t}; exit 0", t = tag(9)),
    };
    (body, kind == 2 || kind == 6)
}

/// The writes the ledger recorded: (instance, file, content).
fn ledger(path: &Path) -> Vec<(String, String, String)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            Some((
                parts.next()?.to_string(),
                parts.next()?.to_string(),
                parts.next()?.to_string(),
            ))
        })
        .collect()
}

/// Every (path, content) of every commit reachable from any ref.
fn committed(root: &Path) -> BTreeSet<(String, String)> {
    let repo = git2::Repository::open(root).unwrap();
    let mut walk = repo.revwalk().unwrap();
    for reference in repo.references().unwrap().flatten() {
        if let Ok(commit) = reference.peel_to_commit() {
            walk.push(commit.id()).unwrap();
        }
    }
    let mut found = BTreeSet::new();
    for oid in walk.flatten() {
        let tree = repo.find_commit(oid).unwrap().tree().unwrap();
        tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
            if let Ok(blob) = entry.to_object(&repo).and_then(|o| o.peel_to_blob()) {
                let content = String::from_utf8_lossy(blob.content())
                    .trim_end()
                    .to_string();
                found.insert((format!("{dir}{}", entry.name().unwrap_or("")), content));
            }
            git2::TreeWalkResult::Ok
        })
        .unwrap();
    }
    found
}

/// Ends every process that works in the repository: what the test started and whatever a
/// killed supervisor left behind (found the way doctor finds them).
fn end_everything(repo: &TestRepo, instances: &mut Vec<Instance>) {
    for instance in instances.drain(..) {
        drop(instance.running);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let users = app::inuse::Scan::take().users(repo.root());
        if users.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still running: {users:?}");
        for user in users {
            crate::support::kill(user.pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether any `*.lock` file is under `dir`.
fn ref_locks(dir: &Path) -> bool {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            let path = entry.path();
            path.extension().is_some_and(|e| e == "lock") || (path.is_dir() && ref_locks(&path))
        })
}

struct Instance {
    id: String,
    running: Running,
    /// Ends by itself: its worktree may go at any time.
    finite: bool,
    /// Its supervisor was signalled: its worktree may go.
    signalled: bool,
}

fn doctor(repo: &TestRepo) -> std::process::Output {
    repo.app(&["doctor", "--fix"])
        .env("APP_HEARTBEAT_INTERVAL", "100ms")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn round(rng: &mut Rng, number: u64) {
    let repo = TestRepo::new();
    let ledger_path = repo.scratch().join("ledger");
    let writer = repo.scratch().join("w");
    fs::write(&writer, WRITER).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&writer, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let worktrees = repo.state_dir().join("worktrees");
    let mut instances = Vec::new();
    let count = 1 + rng.below(3) as usize;
    for i in 0..count {
        let (script, finite) = script(rng);
        let id = format!("t{i}");
        let mut command = repo.app(&[
            "run",
            "--instance",
            &id,
            "--stop-timeout",
            "500ms",
            "--",
            "sh",
            "-c",
            &script,
        ]);
        command
            .env("APP_HEARTBEAT_INTERVAL", "100ms")
            .env("LEDGER", &ledger_path)
            .env("W", &writer);
        instances.push(Instance {
            id,
            running: repo.spawn(command),
            finite,
            signalled: false,
        });
    }
    let chaos_until = Instant::now() + Duration::from_millis(300 + rng.below(700));
    while Instant::now() < chaos_until {
        std::thread::sleep(rng.millis(120));
        match rng.below(9) {
            0 => {
                let victim = &mut instances[rng.below(count as u64) as usize];
                crate::support::kill(victim.running.pid(), Signal::SIGKILL);
                victim.signalled = true;
            }
            1 => {
                let victim = &mut instances[rng.below(count as u64) as usize];
                let group = nix::unistd::Pid::from_raw(victim.running.pid() as i32);
                let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
                victim.signalled = true;
            }
            2 => {
                let victim = &mut instances[rng.below(count as u64) as usize];
                crate::support::kill(victim.running.pid(), Signal::SIGTERM);
                victim.signalled = true;
            }
            3 => {
                let _ = repo.command("git").args(["clean", "-fdxq"]).output();
            }
            4 => {
                let _ = fs::remove_file(repo.state_dir().join("secret"));
            }
            5 => {
                let _ = fs::remove_file(repo.state_dir().join("process_registry.json"));
            }
            6 => {
                // A doctor killed half-way: its intents are for the next one to finish.
                let doctor = repo.spawn(repo.app(&["doctor", "--fix"]));
                std::thread::sleep(rng.millis(150));
                doctor.kill_now();
            }
            _ => {
                // Only instances nobody signalled are certainly alive until the doctor ends.
                let before: Vec<(String, PathBuf)> = instances
                    .iter()
                    .filter(|i| !i.signalled && !i.finite)
                    .filter(|i| worktrees.join(&i.id).exists())
                    .map(|i| (i.id.clone(), worktrees.join(&i.id)))
                    .collect();
                let fixed = doctor(&repo);
                for (id, dir) in before {
                    assert!(
                        dir.exists(),
                        "round {number}: doctor --fix removed the worktree of live instance {id}: {}",
                        stdout(&fixed)
                    );
                }
            }
        }
    }
    end_everything(&repo, &mut instances);
    // A ref lock a killed writer left counts as stale once it is a second old.
    if ref_locks(&repo.root().join(".git/refs")) {
        std::thread::sleep(Duration::from_millis(1100));
    }
    let fixed = doctor(&repo);
    assert_eq!(
        code(&fixed),
        0,
        "round {number}: doctor --fix left problems: {}",
        stdout(&fixed)
    );
    let again = repo.run_app(&["doctor"]);
    assert_eq!(
        code(&again),
        0,
        "round {number}: a second doctor found more: {}",
        stdout(&again)
    );
    let committed = committed(repo.root());
    for (id, file, content) in ledger(&ledger_path) {
        let on_disk = fs::read_to_string(worktrees.join(&id).join(&file))
            .is_ok_and(|text| text.trim_end() == content);
        assert!(
            on_disk || committed.contains(&(file.clone(), content.clone())),
            "round {number}: {id} wrote {file} = {content}, and it is nowhere"
        );
    }
}

#[test]
fn torture_never_loses_a_written_byte() {
    let seed = std::env::var("APP_TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let rounds: u64 = std::env::var("APP_TORTURE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    eprintln!("torture: seed {seed}, {rounds} rounds (APP_TORTURE_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    for number in 0..rounds {
        round(&mut rng, number);
    }
    eprintln!(
        "torture: {rounds} rounds passed in {:.1}s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
}
