//! Names and ids that users give: each is a type that can only hold a valid value, parsed once
//! where it enters (a flag, an MCP argument, a plan) with the error that says what is allowed.
//!
//! Invariant: an [`InstanceId`], [`LockName`], [`Namespace`] or [`RunId`] value always
//! satisfies its syntax, so code that holds one never checks it again. Values read back from
//! app's own signed files and database rows are trusted as written (`Deserialize`,
//! [`InstanceId::stored`], [`LockName::stored`] and [`RunId::stored`] do not re-check), so a record written by another version reads as today;
//! except a message's ids and the fleet's instance rows a message goes to
//! ([`InstanceId::deserialize_checked`], [`InstanceId::from_trusted`]): one that is no id makes
//! the message unparsable (quarantined) or the row skipped, never a panic.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{IdError, InstanceError, LockError, Result};

/// Declares a name type over `String` with `as_str`, `Display`, `AsRef<str>`, `Deref<str>`,
/// comparison with text, and transparent serde.
macro_rules! name_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                self.0.as_ref()
            }
        }

        impl AsRef<std::ffi::OsStr> for $name {
            fn as_ref(&self) -> &std::ffi::OsStr {
                self.0.as_ref()
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        /// A valid name is still text: it goes wherever a `&str` does (paths, queries).
        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        /// Maps keyed by a name are looked up by text (ordering and hash are the text's).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }
    };
}

/// Whether `text` is an instance id: `[a-z0-9][a-z0-9_-]{0,63}`.
fn is_instance_id(text: &str) -> bool {
    let mut chars = text.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    first_ok && rest_ok && text.len() <= 64
}

name_type! {
    /// An instance id: `[a-z0-9][a-z0-9_-]{0,63}`, a user's name or 8 random hex characters.
    InstanceId
}

impl InstanceId {
    /// Checks a user-given instance name.
    pub fn parse(text: &str) -> Result<InstanceId> {
        if !is_instance_id(text) {
            return Err(IdError::InstanceName { name: text.into() }.into());
        }
        Ok(InstanceId(text.to_string()))
    }

    /// An instance id read back from app's own records (`what`: a database row, a signed
    /// file): checked as a user's is, and a bad one is [`InstanceError::BadStoredId`], never a
    /// panic.
    pub(crate) fn from_trusted(text: String, what: &'static str) -> Result<InstanceId> {
        if !is_instance_id(&text) {
            return Err(InstanceError::BadStoredId { id: text, what }.into());
        }
        Ok(InstanceId(text))
    }

    /// An instance id as a database row holds it, or a name in `.app/worktrees/` and git's
    /// worktree records, trusted as written (as a signed file's is: app wrote it from an id;
    /// doctor judges a hand-made one there by its name as ever, comparing and joining it to
    /// paths only).
    pub(crate) fn stored(text: String) -> InstanceId {
        InstanceId(text)
    }

    /// Serde's reading of an instance id that is checked (a message's ids): a bad one fails the
    /// parse, so what holds it is not trusted.
    pub(crate) fn deserialize_checked<'de, D>(
        deserializer: D,
    ) -> std::result::Result<InstanceId, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        let text = String::deserialize(deserializer)?;
        if !is_instance_id(&text) {
            return Err(serde::de::Error::custom(format!(
                "{text:?} is no instance id"
            )));
        }
        Ok(InstanceId(text))
    }

    /// [`InstanceId::deserialize_checked`] for an optional one.
    pub(crate) fn deserialize_checked_option<'de, D>(
        deserializer: D,
    ) -> std::result::Result<Option<InstanceId>, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        #[derive(Deserialize)]
        struct Checked(#[serde(deserialize_with = "InstanceId::deserialize_checked")] InstanceId);
        Ok(Option::<Checked>::deserialize(deserializer)?.map(|Checked(id)| id))
    }

    /// A fresh random id: 8 lowercase hex characters from a v4 UUID.
    pub fn random() -> InstanceId {
        InstanceId(uuid::Uuid::new_v4().simple().to_string()[..8].to_string())
    }
}

name_type! {
    /// A lock name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
    LockName
}

impl LockName {
    /// Checks a lock name.
    pub fn parse(text: &str) -> Result<LockName> {
        let ok = text.len() <= 128
            && text.starts_with(|c: char| c.is_ascii_alphanumeric())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(LockError::InvalidName { name: text.into() }.into());
        }
        Ok(LockName(text.to_string()))
    }

    /// A lock name as the database holds it, trusted as written (as a state file's is).
    pub(crate) fn stored(text: String) -> LockName {
        LockName(text)
    }
}

name_type! {
    /// A notes namespace: 1-128 characters from letters, digits and `_ . : / @ -`, starting
    /// with a letter or digit.
    Namespace
}

impl Namespace {
    /// Checks a namespace.
    pub fn parse(text: &str) -> Result<Namespace> {
        let mut chars = text.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.:/@-".contains(c));
        if !first_ok || !rest_ok || text.len() > 128 {
            return Err(IdError::Namespace { name: text.into() }.into());
        }
        Ok(Namespace(text.to_string()))
    }
}

/// Whether `text` is a fleet label key or value, or a host name: 1-64 of letters, digits and
/// `_ . -`, starting with a letter or digit.
fn is_label_word(text: &str) -> bool {
    text.len() <= 64
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Checks one fleet label `key=value`; the error says what is allowed.
pub fn validate_label(key: &str, value: &str) -> std::result::Result<(), String> {
    for word in [key, value] {
        if !is_label_word(word) {
            return Err(format!(
                "label {key:?}={value:?}: keys and values are 1-64 of letters, digits and '_.-', starting with a letter or digit"
            ));
        }
    }
    Ok(())
}

/// Parses `--labels k=v,k2=v2` (empty for none).
pub fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>> {
    let mut labels = std::collections::BTreeMap::new();
    for item in text.split(',').filter(|item| !item.trim().is_empty()) {
        let Some((key, value)) = item.trim().split_once('=') else {
            return Err(IdError::LabelNotPair { item: item.into() }.into());
        };
        validate_label(key, value).map_err(|reason| IdError::Label { reason })?;
        labels.insert(key.to_string(), value.to_string());
    }
    Ok(labels)
}

/// Checks a fleet host name (`app worker --name`).
pub fn validate_host_name(text: &str) -> Result<()> {
    if is_label_word(text) {
        return Ok(());
    }
    Err(IdError::HostName { name: text.into() }.into())
}

/// A plan's name or a task id: 1-32 of `a-z`, `0-9`, `-` and `_`, starting with a letter or
/// digit (run ids and the orchestrator's instance ids are built from them).
pub(crate) fn is_plan_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 32
        && text
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

name_type! {
    /// An orchestrated run: `<plan name>-<6 lowercase hex>`.
    RunId
}

impl RunId {
    /// A fresh id for a run of the plan named `name`; a name that is no plan id (a plan that
    /// its validation will refuse) gives a `plan-` id.
    pub(crate) fn for_plan(name: &str) -> RunId {
        let name = if is_plan_id(name) { name } else { "plan" };
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        RunId(format!("{name}-{suffix}"))
    }

    /// The run id `text` is, or `None` when no run can have it (so it names no run).
    pub(crate) fn parse(text: &str) -> Option<RunId> {
        let (name, suffix) = text.rsplit_once('-')?;
        let hex = suffix.len() == 6
            && suffix
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        (hex && is_plan_id(name)).then(|| RunId(text.to_string()))
    }

    /// A run id as the database holds it, trusted as written.
    pub(crate) fn stored(text: String) -> RunId {
        RunId(text)
    }

    /// The part after the last `-`: the random suffix the run's instance ids start with.
    pub(crate) fn suffix(&self) -> &str {
        self.0.rsplit('-').next().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn instance_ids() {
        for good in ["a", "0", "agent-1", "ci_job", &"x".repeat(64)] {
            assert_eq!(InstanceId::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "-a", "_a", "A", "a b", "a/b", "é", &"x".repeat(65)] {
            let err = InstanceId::parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), crate::error::EXIT_USAGE, "{bad:?}");
        }
        let random = InstanceId::random();
        assert!(InstanceId::parse(random.as_str()).is_ok());
        assert_eq!(random.as_str().len(), 8);
    }

    #[test]
    fn lock_names() {
        for good in [
            "db-schema",
            "Cargo.lock",
            "a",
            "port_3000",
            "A_1.b-c",
            &"x".repeat(128),
        ] {
            assert!(LockName::parse(good).is_ok(), "{good:?}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "../x", &"x".repeat(129)] {
            assert!(
                matches!(
                    LockName::parse(bad),
                    Err(Error::Lock(LockError::InvalidName { .. }))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn namespaces() {
        for good in [
            "global",
            "project:myapp",
            "team/a@b",
            "x",
            "A1_b.c-d",
            &"n".repeat(128),
        ] {
            assert!(Namespace::parse(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ":x",
            "with space",
            "tab\t",
            "a\0b",
            "ü",
            &"n".repeat(129),
        ] {
            assert!(Namespace::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_is_the_bare_string() {
        let id = InstanceId::parse("agent-1").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"agent-1\"");
        let back: InstanceId = serde_json::from_str("\"agent-1\"").unwrap();
        assert_eq!(back, id);
    }

    #[test]
    fn run_ids() {
        let id = RunId::for_plan("demo");
        assert!(id.as_str().starts_with("demo-"), "{id}");
        assert_eq!(id.suffix().len(), 6);
        assert_eq!(RunId::parse(id.as_str()), Some(id));
        assert!(RunId::for_plan("Not A Name").as_str().starts_with("plan-"));
        for good in ["x-0a1b2c", "my-plan_2-ffffff"] {
            assert!(RunId::parse(good).is_some(), "{good:?}");
        }
        for bad in [
            "",
            "x",
            "x-",
            "-0a1b2c",
            "x-0A1B2C",
            "x-0a1b2",
            "X-0a1b2c",
            "../x-0a1b2c",
        ] {
            assert!(RunId::parse(bad).is_none(), "{bad:?}");
        }
        assert_eq!(RunId::stored("odd".into()).suffix(), "odd");
    }
}
