//! Registry trust: reused pids, tampered and unsigned entries.

use std::fs;
use std::process::Stdio;

use app::registry::{Entry, InstanceRecord, InstanceStatus, Registry};
use app::time::Timestamp;

use crate::support::{TestRepo, code, hermetic, stderr, stdout};

fn record(id: &str, pid: u32, start_time: u64) -> InstanceRecord {
    InstanceRecord {
        id: app::ids::InstanceId::parse(id).unwrap(),
        pid,
        start_time,
        boot_id: app::process::boot_id().into(),
        host: app::process::hostname().into(),
        started_at: Timestamp::now(),
        heartbeat_at: Timestamp::now(),
        worktree: None,
        cwd: "/".into(),
        branch: None,
        base: None,
        command: vec!["sleep".into(), "30".into()],
        child_pid: None,
        child_start_time: None,
        status: InstanceStatus::Running,
        ports: Vec::new(),
        api_url: None,
    }
}

fn writable(repo: &TestRepo) -> Registry {
    Registry::open_for_write(&repo.paths(), &repo.keys()).unwrap()
}

#[test]
fn a_reused_pid_with_another_start_time_is_not_the_instance() {
    let repo = TestRepo::new();
    let mut sleeper = hermetic("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    let real_start = app::process::start_time(pid).unwrap();
    let registry = writable(&repo);
    registry
        .update(|t| {
            t.put_instance(&record("impostor", pid, real_start + 1));
            t.put_instance(&record("genuine", pid, real_start));
            Ok(())
        })
        .unwrap();

    let live = stdout(&repo.run_app(&["instance", "list"]));
    assert_eq!(live, format!("genuine:{pid}\n"));
    let all = stdout(&repo.run_app(&["instance", "list", "--all"]));
    assert!(
        all.contains(&format!(
            "impostor:{pid} stale (pid {pid} now belongs to another process"
        )),
        "{all}"
    );
    // stop refuses to signal a process that is not the instance.
    let output = repo.run_app(&["instance", "stop", "impostor", "--timeout", "100ms"]);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the unrelated process was not signalled"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn tampered_and_unsigned_entries_are_reported_as_forged_and_ignored() {
    let repo = TestRepo::new();
    let me = app::process::ProcessIdentity::current();
    let registry = writable(&repo);
    registry
        .update(|t| {
            t.put_instance(&record("honest", me.pid, me.start_time));
            t.put_instance(&record("tampered", me.pid, me.start_time));
            Ok(())
        })
        .unwrap();
    let path = repo.state_dir().join("process_registry.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    doc["entries"]["tampered"]["command"] = serde_json::json!(["rm", "-rf", "/"]);
    let mut unsigned = doc["entries"]["honest"].clone();
    unsigned.as_object_mut().unwrap().remove("signature");
    unsigned["id"] = serde_json::json!("unsigned");
    doc["entries"]["unsigned"] = unsigned;
    fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();

    assert_eq!(
        stdout(&repo.run_app(&["instance", "list"])),
        format!("honest:{}\n", me.pid)
    );
    let all = stdout(&repo.run_app(&["instance", "list", "--all"]));
    assert!(
        all.contains("tampered:? forged (signature does not verify)"),
        "{all}"
    );
    assert!(
        all.contains("unsigned:? forged (entry is unsigned)"),
        "{all}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &repo.run_app(&["instance", "list", "--all", "--json"]),
    ))
    .unwrap();
    let forged: Vec<_> = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["liveness"] == "forged")
        .collect();
    assert_eq!(forged.len(), 2);
    assert_eq!(
        code(&repo.run_app(&["instance", "info", "tampered"])),
        2,
        "forged is unknown"
    );

    // A different secret makes every entry forged.
    let other = repo
        .app(&["instance", "list", "--all"])
        .env("APP_SHARED_SECRET", "another")
        .output()
        .unwrap();
    assert_eq!(
        stdout(&other).matches("forged").count(),
        3,
        "{}",
        stdout(&other)
    );

    // Forged entries survive other writers untouched, for doctor to report.
    let output = repo.run_app(&["run", "--", "true"]);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let entries = repo.entries();
    assert!(
        entries
            .iter()
            .any(|e| matches!(e, Entry::Forged { key, .. } if key == "tampered"))
    );
}
