//! Settings read from the environment, once per command, and validated there.
//!
//! Durations use the syntax of [`crate::time`]. A variable that is set but malformed is an
//! error naming the variable, never silently replaced by the default.

use std::ffi::OsString;
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::error::{Result, SettingsError};
use crate::time::parse_duration;

/// Default time between two heartbeats of a running instance.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Default age past which a heartbeat no longer proves an instance alive.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30);

/// The timing settings shared by every command (part of [`Settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Time between two heartbeats (`APP_HEARTBEAT_INTERVAL`).
    pub heartbeat_interval: Duration,
    /// Heartbeat age past which an instance is stale (`APP_STALE_AFTER`).
    pub stale_after: Duration,
}

/// Every `APP_*` setting a command may need, read from the environment once, at the start of a
/// command, and validated there: a malformed value is bad input naming its variable, whichever
/// command runs. Library code takes its settings from here, never from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `APP_HEARTBEAT_INTERVAL`, `APP_STALE_AFTER`.
    pub timing: Timing,
    /// How long a busy database is retried (`APP_DB_RETRY_DEADLINE`).
    pub db_retry_deadline: Duration,
    /// The largest message payload in bytes (`APP_MAX_MESSAGE_BYTES`).
    pub max_message_bytes: usize,
    /// Time between two scans of a watched directory when no event arrives
    /// (`APP_POLL_INTERVAL`).
    pub poll_interval: Duration,
    /// Where `app run --ports N` leases ports (`APP_PORT_RANGE`).
    pub port_range: RangeInclusive<u16>,
    /// Where the API looks for a free port (`APP_API_PORT_RANGE`).
    pub api_port_range: RangeInclusive<u16>,
    /// The API's address (`APP_API_ADDR`), when set.
    pub api_addr: Option<String>,
    /// The API's bearer token (`APP_API_TOKEN`), when set.
    pub api_token: Option<String>,
    /// How long a fleet lease lasts without renewal (`APP_LEASE_TTL`).
    pub lease_ttl: Duration,
    /// This machine's name in the fleet (`APP_FLEET_HOST`, default the host name).
    pub fleet_host: String,
    /// `APP_SHARED_SECRET`, when set: the signing key in place of `.app/secret`
    /// ([`crate::sign::Keys`]).
    pub shared_secret: Option<SharedSecret>,
    /// Who the calling process says it is (`APP_INSTANCE_ID`, `APP_RUN_ID`, `APP_TASK_ID`).
    pub caller: Caller,
    /// How agent states are derived (`APP_ACTIVITY_INTERVAL`, `APP_IDLE_AFTER`,
    /// `APP_STUCK_AFTER`; docs/AGENT-STATE.md).
    pub activity: ActivityTiming,
}

/// How a supervisor derives its agent's state (part of [`Settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivityTiming {
    /// Time between two looks at the command's CPU time and worktree
    /// (`APP_ACTIVITY_INTERVAL`).
    pub interval: Duration,
    /// Quiet time (no CPU, no change in the worktree) after which an agent is idle
    /// (`APP_IDLE_AFTER`).
    pub idle_after: Duration,
    /// Idle time after which an agent holding a lock or a task is stuck (`APP_STUCK_AFTER`).
    pub stuck_after: Duration,
}

/// Default time between two looks at an agent's CPU time and worktree.
pub const DEFAULT_ACTIVITY_INTERVAL: Duration = Duration::from_secs(1);
/// Default quiet time after which an agent is idle.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(30);
/// Default idle time after which an agent holding a lock or a task is stuck.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(600);

/// `APP_SHARED_SECRET` as the environment holds it; its value never prints (`Debug` shows
/// `SharedSecret(..)`). It is judged only where a key is needed ([`crate::sign::Keys`]): an
/// empty value is bad input there, so a command that signs and verifies nothing runs whatever
/// it holds.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSecret(OsString);

impl SharedSecret {
    /// The secret `value`.
    pub fn new(value: impl Into<OsString>) -> SharedSecret {
        SharedSecret(value.into())
    }

    /// The value as text; `None` when it is not valid UTF-8 (then it is not a key: the
    /// repository's `.app/secret` is used, though restoring that file stays off).
    pub(crate) fn text(&self) -> Option<&str> {
        self.0.to_str()
    }
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(..)")
    }
}

/// Who the calling process says it is: the variables `app run` and the orchestrator give the
/// commands they start. Each is kept as set, an empty value too, and `None` when unset or not
/// valid UTF-8; they are claims, not proof: every reader checks them against the registry or
/// the database (and decides what an empty one means).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// `APP_INSTANCE_ID`: the instance the caller runs in.
    pub instance_id: Option<String>,
    /// `APP_RUN_ID`: the orchestrated run whose task the caller is.
    pub run_id: Option<String>,
    /// `APP_TASK_ID`: that task.
    pub task_id: Option<String>,
}

/// Default largest message payload, in bytes of compact JSON.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024;
/// Default time between two scans of a watched directory when no event arrives.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Default time a busy database is retried before the command gives up (exit 3).
pub const DEFAULT_DB_RETRY_DEADLINE: Duration = Duration::from_secs(30);
/// Default time a fleet host's lease lasts without renewal.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// Default range `app run --ports N` leases from.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=29999;
/// Default range the API binds the first free port of.
pub const DEFAULT_API_PORT_RANGE: RangeInclusive<u16> = 3000..=3010;

impl Default for Settings {
    /// The settings of an environment that sets none of the variables.
    fn default() -> Self {
        Settings::from_vars(|_| None).expect("the defaults are valid")
    }
}

impl Settings {
    /// Reads and validates every setting from the process environment.
    pub fn from_env() -> Result<Settings> {
        Settings::from_vars(|name| std::env::var_os(name))
    }

    /// Reads and validates every setting through `var` (a variable's value, if set).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Result<Settings> {
        let text = |name: &'static str| -> Result<Option<String>> {
            var(name)
                .map(|value| {
                    value
                        .into_string()
                        .map_err(|_| SettingsError::NotUtf8 { var: name }.into())
                })
                .transpose()
        };
        let duration = |name: &'static str, default: Duration| -> Result<Duration> {
            match text(name)? {
                Some(value) => parse_duration(&value).map_err(|err| {
                    SettingsError::Duration {
                        var: name,
                        reason: err.to_string(),
                    }
                    .into()
                }),
                None => Ok(default),
            }
        };
        let heartbeat_interval = duration("APP_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL)?;
        if heartbeat_interval.is_zero() {
            return Err(SettingsError::Zero {
                var: "APP_HEARTBEAT_INTERVAL",
            }
            .into());
        }
        let port_range = |name: &'static str, default: RangeInclusive<u16>| -> Result<_> {
            match text(name)? {
                Some(value) => Ok(parse_port_range(name, &value, &default)?),
                None => Ok(default),
            }
        };
        let nonblank = |name: &'static str| -> Result<Option<String>> {
            Ok(text(name)?.filter(|value| !value.trim().is_empty()))
        };
        // A claim that is not UTF-8 is no claim (as `std::env::var` saw it), never an error.
        let claim = |name: &str| var(name).and_then(|value| value.into_string().ok());
        Ok(Settings {
            timing: Timing {
                heartbeat_interval,
                stale_after: duration("APP_STALE_AFTER", DEFAULT_STALE_AFTER)?,
            },
            db_retry_deadline: duration("APP_DB_RETRY_DEADLINE", DEFAULT_DB_RETRY_DEADLINE)?,
            max_message_bytes: match text("APP_MAX_MESSAGE_BYTES")? {
                Some(value) => parse_message_bytes("APP_MAX_MESSAGE_BYTES", &value)?,
                None => DEFAULT_MAX_MESSAGE_BYTES,
            },
            poll_interval: duration("APP_POLL_INTERVAL", DEFAULT_POLL_INTERVAL)?,
            port_range: port_range("APP_PORT_RANGE", DEFAULT_PORT_RANGE)?,
            api_port_range: port_range("APP_API_PORT_RANGE", DEFAULT_API_PORT_RANGE)?,
            api_addr: nonblank("APP_API_ADDR")?,
            api_token: nonblank("APP_API_TOKEN")?,
            lease_ttl: lease_ttl(duration("APP_LEASE_TTL", DEFAULT_LEASE_TTL)?)?,
            fleet_host: fleet_host(nonblank("APP_FLEET_HOST")?)?,
            activity: ActivityTiming {
                interval: at_least(
                    "APP_ACTIVITY_INTERVAL",
                    duration("APP_ACTIVITY_INTERVAL", DEFAULT_ACTIVITY_INTERVAL)?,
                    Duration::from_millis(10),
                    "10ms",
                )?,
                idle_after: duration("APP_IDLE_AFTER", DEFAULT_IDLE_AFTER)?,
                stuck_after: duration("APP_STUCK_AFTER", DEFAULT_STUCK_AFTER)?,
            },
            shared_secret: var("APP_SHARED_SECRET").map(SharedSecret),
            caller: Caller {
                instance_id: claim("APP_INSTANCE_ID"),
                run_id: claim("APP_RUN_ID"),
                task_id: claim("APP_TASK_ID"),
            },
        })
    }
}

/// `APP_LEASE_TTL`: at least a second.
fn lease_ttl(ttl: Duration) -> Result<Duration, SettingsError> {
    if ttl < Duration::from_secs(1) {
        return Err(SettingsError::LeaseTooShort {
            var: "APP_LEASE_TTL",
        });
    }
    Ok(ttl)
}

/// A duration setting that must be at least `min` (`shown` as written in the error).
fn at_least(
    var: &'static str,
    value: Duration,
    min: Duration,
    shown: &'static str,
) -> Result<Duration, SettingsError> {
    if value < min {
        return Err(SettingsError::TooShort { var, min: shown });
    }
    Ok(value)
}

/// `APP_FLEET_HOST` (a host name), else this machine's host name.
fn fleet_host(name: Option<String>) -> Result<String, SettingsError> {
    let Some(name) = name else {
        return Ok(crate::process::hostname().to_string());
    };
    crate::ids::validate_host_name(&name).map_err(|err| SettingsError::HostName {
        var: "APP_FLEET_HOST",
        reason: err.to_string(),
    })?;
    Ok(name)
}

/// A number of bytes above zero, from the variable `var`.
fn parse_message_bytes(var: &'static str, text: &str) -> Result<usize, SettingsError> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| SettingsError::NotPositive {
            var,
            value: text.to_string(),
        })
}

/// A port range written `LOW-HIGH`, from the variable `var`.
fn parse_port_range(
    var: &'static str,
    text: &str,
    default: &RangeInclusive<u16>,
) -> Result<RangeInclusive<u16>, SettingsError> {
    let parsed = text
        .split_once('-')
        .and_then(|(low, high)| {
            Some((
                low.trim().parse::<u16>().ok()?,
                high.trim().parse::<u16>().ok()?,
            ))
        })
        .filter(|(low, high)| 0 < *low && low <= high);
    match parsed {
        Some((low, high)) => Ok(low..=high),
        None => Err(SettingsError::PortRange {
            var,
            value: text.to_string(),
            example: (*default.start(), *default.end()),
        }),
    }
}

/// The directory for `app`'s per-user data (the default database): `$APP_HOME/data` when
/// `APP_HOME` is set (it moves every default location, for tests and CI jobs), else the
/// platform's data directory (`~/.local/share/app` on Linux).
pub fn data_dir() -> Result<std::path::PathBuf> {
    if let Some(home) = std::env::var_os("APP_HOME").filter(|home| !home.is_empty()) {
        return Ok(std::path::PathBuf::from(home).join("data"));
    }
    directories::ProjectDirs::from("", "", "app")
        .map(|dirs| dirs.data_dir().to_path_buf())
        .ok_or_else(|| SettingsError::NoHome.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_vars(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.into()))
    }

    #[test]
    fn settings_default_when_unset() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.timing.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(s.timing.stale_after, DEFAULT_STALE_AFTER);
        assert_eq!(s.db_retry_deadline, Duration::from_secs(30));
        assert_eq!(s.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        assert_eq!(s.poll_interval, DEFAULT_POLL_INTERVAL);
        assert_eq!(s.port_range, DEFAULT_PORT_RANGE);
        assert_eq!(s.api_port_range, DEFAULT_API_PORT_RANGE);
        assert_eq!((s.api_addr, s.api_token), (None, None));
        assert_eq!(s.shared_secret, None);
        assert_eq!(s.caller, Caller::default());
        assert_eq!(s.activity.stuck_after, Duration::from_secs(600));
        assert_eq!(s.activity.idle_after, DEFAULT_IDLE_AFTER);
        assert_eq!(s.activity.interval, DEFAULT_ACTIVITY_INTERVAL);
    }

    #[test]
    fn the_secret_and_the_caller_are_kept_as_set() {
        let s = settings(&[
            ("APP_SHARED_SECRET", ""),
            ("APP_INSTANCE_ID", ""),
            ("APP_RUN_ID", "r1"),
            ("APP_TASK_ID", "t1"),
        ])
        .unwrap();
        assert_eq!(s.shared_secret, Some(SharedSecret::new("")));
        assert_eq!(s.caller.instance_id.as_deref(), Some(""));
        assert_eq!(s.caller.run_id.as_deref(), Some("r1"));
        assert_eq!(s.caller.task_id.as_deref(), Some("t1"));
        let s = settings(&[("APP_SHARED_SECRET", "hunter2")]).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
    }

    #[test]
    fn a_claim_that_is_not_utf8_is_no_claim() {
        use std::os::unix::ffi::OsStringExt;
        let s = Settings::from_vars(|name| {
            (name == "APP_INSTANCE_ID").then(|| OsString::from_vec(vec![0xff]))
        })
        .unwrap();
        assert_eq!(s.caller.instance_id, None);
    }

    #[test]
    fn settings_read_what_is_set() {
        let s = settings(&[
            ("APP_HEARTBEAT_INTERVAL", "250ms"),
            ("APP_MAX_MESSAGE_BYTES", " 64 "),
            ("APP_PORT_RANGE", "4000-4009"),
            ("APP_API_TOKEN", "  "),
            ("APP_API_ADDR", "127.0.0.1:0"),
        ])
        .unwrap();
        assert_eq!(s.timing.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(s.max_message_bytes, 64);
        assert_eq!(s.port_range, 4000..=4009);
        assert_eq!(s.api_token, None, "a blank token is no token");
        assert_eq!(s.api_addr.as_deref(), Some("127.0.0.1:0"));
    }

    #[test]
    fn a_bad_setting_names_its_variable() {
        for (var, value) in [
            ("APP_HEARTBEAT_INTERVAL", "0s"),
            ("APP_STALE_AFTER", "soon"),
            ("APP_DB_RETRY_DEADLINE", "-1"),
            ("APP_MAX_MESSAGE_BYTES", "0"),
            ("APP_POLL_INTERVAL", "1x"),
            ("APP_PORT_RANGE", "9-1"),
            ("APP_API_PORT_RANGE", "3000"),
            ("APP_STUCK_AFTER", "ten minutes"),
            ("APP_IDLE_AFTER", "5x"),
            ("APP_ACTIVITY_INTERVAL", "0s"),
        ] {
            let err = settings(&[(var, value)]).unwrap_err();
            assert_eq!(err.exit_code(), crate::error::EXIT_USAGE);
            assert!(err.to_string().contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn a_bad_setting_reads_as_it_always_has() {
        for (var, value, text) in [
            (
                "APP_HEARTBEAT_INTERVAL",
                "0s",
                "APP_HEARTBEAT_INTERVAL must be greater than zero",
            ),
            (
                "APP_STALE_AFTER",
                "soon",
                "APP_STALE_AFTER: invalid duration \"soon\"; write a number and a unit such as 500ms, 3s, 2m or 1h",
            ),
            (
                "APP_MAX_MESSAGE_BYTES",
                " 0",
                "APP_MAX_MESSAGE_BYTES=\" 0\" is not a positive number of bytes",
            ),
            (
                "APP_API_PORT_RANGE",
                "3000",
                "APP_API_PORT_RANGE=\"3000\" is not a port range; write it as LOW-HIGH, e.g. 3000-3010",
            ),
            (
                "APP_LEASE_TTL",
                "500ms",
                "APP_LEASE_TTL must be at least 1s (hosts renew their leases every third of it)",
            ),
            (
                "APP_FLEET_HOST",
                "a b",
                "APP_FLEET_HOST: invalid host name \"a b\": use 1-64 of letters, digits and '_.-', starting with a letter or digit",
            ),
        ] {
            assert_eq!(settings(&[(var, value)]).unwrap_err().to_string(), text);
        }
        use std::os::unix::ffi::OsStringExt;
        let err = Settings::from_vars(|name| {
            (name == "APP_POLL_INTERVAL").then(|| OsString::from_vec(vec![0xff]))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "APP_POLL_INTERVAL is not valid UTF-8");
    }
}
