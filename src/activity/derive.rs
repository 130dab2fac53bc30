//! The state machine that turns one tick's observations into an agent state: pure, so every
//! rule is tested here without processes or clocks.
//!
//! Rules (docs/AGENT-STATE.md):
//! - `exited` once the command has ended, whatever else is seen.
//! - A new report (`app status`) sets its state at once: `working`, `idle` or `needs-input`.
//! - `needs-input` stays until the agent reports `working` or `idle`, its worktree changes, or
//!   its process tree is busy for [`SUSTAINED`] in a row (a short burst, such as the hook's
//!   own `app status` call, does not end it).
//! - Otherwise a tick with CPU use (at least [`BUSY_PERCENT`] of one core) or a change in the
//!   worktree is `working`; quiet for `idle_after` is `idle` (since the last activity); idle
//!   for `stuck_after` while holding a lock or a task is `stuck`.

use std::time::{Duration, SystemTime};

use super::{AgentState, StateReport};
use crate::time::{Timestamp, format_age};

/// CPU use over one tick, in percent of one core, at and above which the tree is busy.
pub(crate) const BUSY_PERCENT: u64 = 5;
/// How long the tree must be busy in a row to end a `needs-input` report.
pub(crate) const SUSTAINED: Duration = Duration::from_secs(5);

/// What one tick saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    /// CPU use of the command's process tree over the tick, in percent of one core.
    pub cpu_percent: u64,
    /// Whether something in the worktree changed during the tick.
    pub worktree_changed: bool,
    /// A report made since the last tick.
    pub report: Option<Report>,
    /// Whether the command has ended.
    pub exited: bool,
}

/// A state the agent reported itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Report {
    /// `working`, `idle` or `needs-input`.
    pub state: AgentState,
    /// Its message, if any.
    pub message: Option<String>,
    /// When it was made.
    pub at: Timestamp,
}

/// The derivation's memory between ticks.
#[derive(Debug, Clone)]
pub(crate) struct Deriver {
    current: StateReport,
    /// The last tick with CPU use or a change in the worktree.
    last_active: SystemTime,
    /// Since when the tree has been busy without a quiet tick in between.
    busy_since: Option<SystemTime>,
    idle_after: Duration,
    stuck_after: Duration,
}

impl Deriver {
    /// A freshly started agent: `working` since `now`.
    pub(crate) fn new(now: SystemTime, idle_after: Duration, stuck_after: Duration) -> Deriver {
        Deriver {
            current: StateReport {
                state: AgentState::Working,
                since: now.into(),
                reason: "started".into(),
            },
            last_active: now,
            busy_since: None,
            idle_after,
            stuck_after,
        }
    }

    /// The current state.
    #[cfg(test)]
    pub(crate) fn current(&self) -> &StateReport {
        &self.current
    }

    /// Takes one tick's observations at `now`; `holds` says what the agent holds (a lock, a
    /// task), asked only when being idle that long could make it stuck.
    pub(crate) fn tick(
        &mut self,
        now: SystemTime,
        seen: &Seen,
        holds: &mut dyn FnMut() -> Option<String>,
    ) -> &StateReport {
        let busy = seen.cpu_percent >= BUSY_PERCENT;
        self.busy_since = if busy {
            Some(self.busy_since.unwrap_or(now))
        } else {
            None
        };
        let active = busy || seen.worktree_changed;
        if active {
            self.last_active = now;
        }
        let activity = || {
            if seen.worktree_changed {
                "the worktree changed".to_string()
            } else {
                format!("cpu {}%", seen.cpu_percent)
            }
        };
        if seen.exited {
            self.set(AgentState::Exited, now, "the command ended".into());
        } else if let Some(report) = &seen.report {
            let said = match &report.message {
                Some(message) => format!("said: {message}"),
                None => "said so".to_string(),
            };
            // A report is news: what it says holds from now, whatever came before.
            self.current = StateReport {
                state: report.state,
                since: report.at,
                reason: said,
            };
            if report.state == AgentState::Working {
                self.last_active = now;
            }
            self.busy_since = None;
        } else if self.current.state == AgentState::NeedsInput {
            let sustained = self
                .busy_since
                .is_some_and(|since| now.duration_since(since).unwrap_or_default() >= SUSTAINED);
            if seen.worktree_changed || sustained {
                self.set(AgentState::Working, now, activity());
            }
        } else if self.current.state == AgentState::Exited {
        } else if active {
            self.set(AgentState::Working, now, activity());
            if self.current.state == AgentState::Working {
                self.current.reason = activity();
            }
        } else {
            let quiet = now.duration_since(self.last_active).unwrap_or_default();
            let reported_idle = self.current.state == AgentState::Idle;
            if quiet >= self.stuck_after
                && let Some(what) = holds()
            {
                self.set(
                    AgentState::Stuck,
                    now,
                    format!("idle for {} holding {what}", format_age(quiet)),
                );
            } else if quiet >= self.idle_after || reported_idle {
                if self.current.state != AgentState::Idle {
                    self.current = StateReport {
                        state: AgentState::Idle,
                        since: self.last_active.into(),
                        reason: format!("no cpu and no change for {}", format_age(quiet)),
                    };
                } else if !self.current.reason.starts_with("said") {
                    self.current.reason = format!("no cpu and no change for {}", format_age(quiet));
                }
            }
        }
        &self.current
    }

    /// Enters `state` at `now` (keeping `since` when it is the state already).
    fn set(&mut self, state: AgentState, now: SystemTime, reason: String) {
        if self.current.state != state {
            self.current = StateReport {
                state,
                since: now.into(),
                reason,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(30);
    const STUCK: Duration = Duration::from_secs(600);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn quiet() -> Seen {
        Seen::default()
    }

    fn cpu(percent: u64) -> Seen {
        Seen {
            cpu_percent: percent,
            ..Seen::default()
        }
    }

    fn said(state: AgentState, message: &str, secs: u64) -> Seen {
        Seen {
            report: Some(Report {
                state,
                message: Some(message.into()),
                at: at(secs).into(),
            }),
            ..Seen::default()
        }
    }

    fn nothing() -> Option<String> {
        None
    }

    #[test]
    fn cpu_is_working_and_quiet_becomes_idle_after_the_threshold() {
        let mut d = Deriver::new(at(0), IDLE, STUCK);
        assert_eq!(
            d.tick(at(1), &cpu(90), &mut nothing).state,
            AgentState::Working
        );
        assert_eq!(d.current().reason, "cpu 90%");
        assert_eq!(
            d.tick(at(20), &quiet(), &mut nothing).state,
            AgentState::Working
        );
        let idle = d.tick(at(31), &quiet(), &mut nothing).clone();
        assert_eq!(idle.state, AgentState::Idle);
        assert_eq!(idle.since, at(1).into(), "idle since the last activity");
        let back = d.tick(at(40), &cpu(50), &mut nothing).clone();
        assert_eq!(
            (back.state, back.since),
            (AgentState::Working, at(40).into())
        );
    }

    #[test]
    fn a_little_cpu_is_not_work() {
        let mut d = Deriver::new(at(0), IDLE, STUCK);
        d.tick(at(31), &cpu(BUSY_PERCENT - 1), &mut nothing);
        assert_eq!(d.current().state, AgentState::Idle);
    }

    #[test]
    fn a_worktree_change_is_work() {
        let mut d = Deriver::new(at(0), IDLE, STUCK);
        d.tick(at(31), &quiet(), &mut nothing);
        let seen = Seen {
            worktree_changed: true,
            ..Seen::default()
        };
        let state = d.tick(at(32), &seen, &mut nothing);
        assert_eq!(state.state, AgentState::Working);
        assert_eq!(state.reason, "the worktree changed");
    }

    #[test]
    fn needs_input_stays_through_bursts_and_ends_on_sustained_work_or_a_report() {
        let mut d = Deriver::new(at(0), IDLE, STUCK);
        let state = d.tick(
            at(1),
            &said(AgentState::NeedsInput, "which db?", 1),
            &mut nothing,
        );
        assert_eq!(state.state, AgentState::NeedsInput);
        assert_eq!(state.reason, "said: which db?");
        d.tick(at(2), &cpu(80), &mut nothing);
        d.tick(at(3), &quiet(), &mut nothing);
        d.tick(at(900), &quiet(), &mut || Some("lock db".into()));
        assert_eq!(
            d.current().state,
            AgentState::NeedsInput,
            "waiting is not stuck"
        );
        for s in 901..=905 {
            d.tick(at(s), &cpu(80), &mut nothing);
        }
        assert_eq!(d.current().state, AgentState::NeedsInput);
        d.tick(at(906), &cpu(80), &mut nothing);
        assert_eq!(
            d.current().state,
            AgentState::Working,
            "5 s of work ends it"
        );
        d.tick(
            at(907),
            &said(AgentState::NeedsInput, "again", 907),
            &mut nothing,
        );
        d.tick(at(908), &said(AgentState::Idle, "done", 908), &mut nothing);
        assert_eq!(d.current().state, AgentState::Idle);
        assert_eq!(d.current().reason, "said: done");
    }

    #[test]
    fn idle_holding_something_past_the_threshold_is_stuck() {
        let mut d = Deriver::new(at(0), IDLE, STUCK);
        let mut asked = 0;
        let mut holds = || {
            asked += 1;
            Some("lock db".to_string())
        };
        d.tick(at(31), &quiet(), &mut holds);
        assert_eq!(d.current().state, AgentState::Idle);
        d.tick(at(600), &quiet(), &mut holds);
        let stuck = d.current().clone();
        assert_eq!(
            (stuck.state, stuck.since),
            (AgentState::Stuck, at(600).into())
        );
        assert_eq!(stuck.reason, "idle for 10m holding lock db");
        assert_eq!(asked, 1, "asked only once idle long enough");
        d.tick(at(601), &quiet(), &mut nothing);
        assert_eq!(
            d.current().state,
            AgentState::Idle,
            "nothing held: idle again"
        );
    }

    #[test]
    fn exited_is_final() {
        let mut d = Deriver::new(at(0), IDLE, STUCK);
        let seen = Seen {
            exited: true,
            ..Seen::default()
        };
        d.tick(at(1), &seen, &mut nothing);
        d.tick(at(2), &cpu(90), &mut nothing);
        assert_eq!(d.current().state, AgentState::Exited);
    }
}
