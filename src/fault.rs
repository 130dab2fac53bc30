//! Crash points for tests: `APP_FAULT_POINT=<name>` makes the process SIGKILL itself when it
//! reaches the named step of a multi-step operation, exactly like a crash there.
//! `APP_FAULT_PAUSE=<name>` makes it SIGSTOP itself there instead, so a test can look at (and
//! act on) the state in between, then SIGCONT it. A panic point ([`PANIC_POINTS`]) named by
//! `APP_FAULT_POINT` panics there instead, so a test can watch what a panic leaves behind.
//!
//! Honoured only in debug builds (what `cargo test` builds); a release build ignores it, so an
//! installed `app` cannot be crashed through its environment.

/// Every crash point, in the order an instance passes them; tests iterate this list.
pub const POINTS: &[&str] = &[
    "run.intent-written",
    "run.registered",
    "run.branch-created",
    "run.worktree-linked",
    "run.checked-out",
    "stop.intent-written",
    "remove.rescued",
    "remove.files-removed",
    "stop.worktree-removed",
    "stop.branch-deleted",
    "stop.unregistered",
];

/// Every panic point: `APP_FAULT_POINT=<name>` makes the process panic there.
pub const PANIC_POINTS: &[&str] = &[
    // `app dash`, once its first frame is on the screen (the terminal in raw mode).
    "dash.draw",
];

/// Panics here when `APP_FAULT_POINT` names `point` (debug builds only).
pub fn panic_point(point: &'static str) {
    debug_assert!(
        PANIC_POINTS.contains(&point),
        "unlisted panic point {point}"
    );
    if cfg!(debug_assertions) && std::env::var_os("APP_FAULT_POINT").is_some_and(|v| v == point) {
        panic!("fault point {point} reached (APP_FAULT_POINT)");
    }
}

/// Crashes here when `APP_FAULT_POINT` names `point`, stops (until SIGCONT) when
/// `APP_FAULT_PAUSE` does (debug builds only).
pub fn point(point: &'static str) {
    debug_assert!(POINTS.contains(&point), "unlisted fault point {point}");
    if !cfg!(debug_assertions) {
        return;
    }
    let named = |var: &str| std::env::var_os(var).is_some_and(|wanted| wanted == point);
    if named("APP_FAULT_POINT") {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    if named("APP_FAULT_PAUSE") {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}
