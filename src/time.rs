//! Time as app writes and reads it: the [`Timestamp`] every record stores, and the duration
//! syntax every flag, variable and plan field shares.
//!
//! Durations are written as a number and a unit: `500ms`, `3s`, `2m`, `1h`, `1d` (a bare number
//! means seconds; units may be combined, `1m30s`); [`format_age`] writes them back compactly.
//!
//! Invariants:
//! - A [`Timestamp`] is RFC 3339 text with milliseconds on disk, and [`Timestamp::now`] is
//!   truncated to the millisecond, so a timestamp compares equal to itself after a round trip.
//! - A parsed duration is at most [`MAX_DURATION`], so adding one to the current time (an
//!   `Instant` or a `SystemTime` that is stored as RFC 3339 text) never overflows; a ttl is at
//!   most [`MAX_TTL`].

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A point in time, stored as RFC 3339 text with milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    /// The current time, truncated to the millisecond it is stored with, so a timestamp
    /// compares equal to itself after a round trip through a file.
    pub fn now() -> Self {
        Timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(unix_millis()))
    }

    /// The wrapped time.
    pub fn system_time(self) -> SystemTime {
        self.0
    }

    /// Time elapsed since this timestamp (zero if it lies in the future).
    pub fn age(self) -> Duration {
        SystemTime::now().duration_since(self.0).unwrap_or_default()
    }
}

impl std::str::FromStr for Timestamp {
    type Err = humantime::TimestampError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        humantime::parse_rfc3339_weak(text).map(Timestamp)
    }
}

impl From<SystemTime> for Timestamp {
    fn from(time: SystemTime) -> Self {
        Timestamp(time)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Milliseconds since 1970-01-01 (zero for a clock set before it).
pub(crate) fn unix_millis() -> u64 {
    since_epoch().as_millis() as u64
}

/// Whole seconds since 1970-01-01 (zero for a clock set before it).
pub(crate) fn unix_secs() -> u64 {
    since_epoch().as_secs()
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The longest duration any flag, variable or plan field accepts: 36500 days (100 years).
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);
/// The longest ttl of a lock, a path reservation or a message: 365 days.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

/// Parses a duration such as `500ms`, `3s`, `2m`, `1h30m` or `10` (seconds), at most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration> {
    parse_at_most(text, MAX_DURATION, "duration")
}

/// Parses a ttl: a duration (see [`parse_duration`]) of at most [`MAX_TTL`].
pub fn parse_ttl(text: &str) -> Result<Duration> {
    parse_at_most(text, MAX_TTL, "ttl")
}

fn parse_at_most(text: &str, max: Duration, what: &str) -> Result<Duration> {
    let bad = || {
        Error::bad_input(format!(
            "invalid duration {text:?}; write a number and a unit such as 500ms, 3s, 2m or 1h"
        ))
    };
    let too_long = || {
        Error::bad_input(format!(
            "{what} {text:?} is too long; give at most {}d",
            max.as_secs() / 86_400
        ))
    };
    let bounded = |duration: Duration| {
        if duration > max {
            Err(too_long())
        } else {
            Ok(duration)
        }
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds > max.as_secs_f64() {
            return Err(too_long());
        }
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| bad())
            .and_then(bounded);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let seconds = number * unit_seconds;
        if seconds.is_finite() && seconds > max.as_secs_f64() {
            return Err(too_long());
        }
        let part = Duration::try_from_secs_f64(seconds).map_err(|_| bad())?;
        total = bounded(total.checked_add(part).ok_or_else(too_long)?)?;
    }
    Ok(total)
}

/// Refuses a ttl over [`MAX_TTL`].
pub fn check_ttl(ttl: Duration) -> Result<Duration> {
    if ttl > MAX_TTL {
        return Err(Error::bad_input(format!(
            "a ttl of {} is too long; give at most {}d",
            format_age(ttl),
            MAX_TTL.as_secs() / 86_400
        )));
    }
    Ok(ttl)
}

/// When a hold of `ttl` taken at `now` runs out; a ttl over [`MAX_TTL`] is bad input, so the
/// result is always a time a timestamp can be written as.
pub fn expiry(now: SystemTime, ttl: Duration) -> Result<SystemTime> {
    check_ttl(ttl)?;
    now.checked_add(ttl)
        .ok_or_else(|| Error::bad_input("a ttl reaches past the end of time; give a shorter one"))
}

/// The time `age` before now: for "since" filters. Going back before 1970-01-01 is bad input
/// naming `what` (a flag or variable), since no timestamp can be written before it.
pub fn time_ago(age: Duration, what: &str) -> Result<SystemTime> {
    let now = SystemTime::now();
    now.checked_sub(age)
        .filter(|time| *time >= SystemTime::UNIX_EPOCH)
        .ok_or_else(|| {
            let days = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                / 86_400;
            Error::bad_input(format!(
                "{what} {} reaches back before 1970-01-01; give at most {days}d",
                format_age(age)
            ))
        })
}

/// Formats a duration compactly for tables: `850ms`, `12s`, `4m`, `3h`, `2d`.
pub fn format_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0 => format!("{}ms", age.as_millis()),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// Milliseconds since `at`, for the phase timings of `APP_LOG=debug`.
pub(crate) fn elapsed_ms(at: std::time::Instant) -> u64 {
    at.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "3x", "-1s", "ms5", "1s2", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn bounds_durations_and_ttls() {
        assert_eq!(parse_duration("36500d").unwrap(), MAX_DURATION);
        assert_eq!(parse_ttl("365d").unwrap(), MAX_TTL);
        for long in [
            "36501d",
            "2920000d",
            "1e300",
            "10000000000000000000s10000000000000000000s",
        ] {
            let err = parse_duration(long).unwrap_err().to_string();
            assert!(err.contains("at most 36500d"), "{long}: {err}");
        }
        let err = parse_ttl("366d").unwrap_err().to_string();
        assert!(err.contains("at most 365d"), "{err}");
        assert!(expiry(SystemTime::now(), MAX_TTL + Duration::from_secs(1)).is_err());
        assert!(time_ago(Duration::from_secs(21_000 * 86_400), "--since").is_err());
        assert!(time_ago(Duration::from_secs(60), "--since").is_ok());
    }

    #[test]
    fn formats_ages() {
        assert_eq!(format_age(Duration::from_millis(850)), "850ms");
        assert_eq!(format_age(Duration::from_secs(12)), "12s");
        assert_eq!(format_age(Duration::from_secs(240)), "4m");
        assert_eq!(format_age(Duration::from_secs(3 * 86400)), "3d");
    }
    #[test]
    fn timestamps_round_trip() {
        let ts = Timestamp::now();
        let json = serde_json::to_string(&ts).unwrap();
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(ts, back);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parsing_never_panics_and_stays_in_bounds(text in any::<String>()) {
            if let Ok(duration) = parse_duration(&text) {
                prop_assert!(duration <= MAX_DURATION);
            }
            if let Ok(ttl) = parse_ttl(&text) {
                prop_assert!(ttl <= MAX_TTL);
            }
        }

        #[test]
        fn number_and_unit_soup_never_panics(text in "[0-9.]{0,25}(ms|s|m|h|d|x)?([0-9.]{0,25}(ms|s|m|h|d))*") {
            let _ = parse_duration(&text);
        }

        #[test]
        fn whole_units_parse_to_what_they_say(n in 0u64..100_000, unit in 0usize..5) {
            let (suffix, seconds) = [("ms", 0), ("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)][unit];
            let want = if seconds == 0 {
                Duration::from_millis(n)
            } else {
                Duration::from_secs(n * seconds)
            };
            let parsed = parse_duration(&format!("{n}{suffix}"));
            if want <= MAX_DURATION {
                prop_assert_eq!(parsed.unwrap(), want);
            } else {
                prop_assert!(parsed.is_err());
            }
        }

        /// `format_age` keeps the largest whole unit: parsing it back gives the age rounded
        /// down to that unit.
        #[test]
        fn formatted_ages_parse_back_to_at_most_the_age(millis in 0u64..(40 * 86_400_000)) {
            let age = Duration::from_millis(millis);
            let text = format_age(age);
            let back = parse_duration(&text).unwrap();
            prop_assert!(back <= age, "{text} is {back:?}, more than {age:?}");
            let unit = match age.as_secs() {
                0 => Duration::from_millis(1),
                1..60 => Duration::from_secs(1),
                60..3600 => Duration::from_secs(60),
                3600..86400 => Duration::from_secs(3600),
                _ => Duration::from_secs(86_400),
            };
            prop_assert!(age - back < unit, "{text} is {back:?}, for {age:?}");
        }
    }
}
