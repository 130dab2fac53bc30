//! HMAC-SHA256 signatures on registry entries, messages, locks and reservations.
//!
//! The key is `APP_SHARED_SECRET` when set, else the repository's generated `.app/secret`
//! (32 random bytes, hex, mode 0600, created once and never replaced). An entry whose signature
//! does not verify was not written by `app` with this key: every command ignores it.
//!
//! [`Keys`] is where a command's key comes from: the secret its [`Settings`] carry, else the
//! file. Nothing here reads the environment.

use std::fs::File;
use std::io::Read;

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::Sha256;

use crate::config::Settings;
pub use crate::config::SharedSecret;
use crate::error::{IoContext, Result, SignError};
use crate::paths::AppPaths;
use crate::state;

type HmacSha256 = Hmac<Sha256>;

/// Parses and verifies a value made by [`SigningKey::seal`]; the error says why it is forged.
pub fn open<T: Serialize + DeserializeOwned>(
    value: &Value,
    key: Option<&SigningKey>,
) -> std::result::Result<T, String> {
    let Value::Object(map) = value else {
        return Err("entry is not a JSON object".into());
    };
    let mut fields = map.clone();
    let signature = match fields.remove("signature") {
        Some(Value::String(signature)) => signature,
        _ => return Err("entry is unsigned".into()),
    };
    let record: T = serde_json::from_value(Value::Object(fields))
        .map_err(|err| format!("entry does not parse: {err}"))?;
    let key = key.ok_or("no secret to verify it with (.app/secret is missing)")?;
    let bytes = serde_json::to_vec(&record).expect("records always serialize");
    if !key.verify(&bytes, &signature) {
        return Err("signature does not verify".into());
    }
    Ok(record)
}

/// The shared key that signs and verifies entries.
#[derive(Clone)]
pub struct SigningKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Uses the given bytes as the key.
    pub fn from_bytes(key: impl Into<Vec<u8>>) -> Self {
        SigningKey { key: key.into() }
    }

    /// The record's fields as a JSON object plus `signature`, the HMAC over the record's
    /// canonical JSON.
    pub fn seal<T: Serialize>(&self, record: &T) -> Value {
        let bytes = serde_json::to_vec(record).expect("records always serialize");
        let mut value = serde_json::to_value(record).expect("records always serialize");
        if let Value::Object(map) = &mut value {
            map.insert("signature".into(), Value::String(self.sign(&bytes)));
        }
        value
    }

    /// The hex HMAC-SHA256 of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(message);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `signature` is the HMAC of `message`, compared in constant time.
    pub fn verify(&self, message: &[u8], signature: &str) -> bool {
        let Ok(expected) = hex::decode(signature) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(message);
        mac.verify_slice(&expected).is_ok()
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }
}

/// Where a repository's signing key comes from: the configured `APP_SHARED_SECRET`, else the
/// repository's `.app/secret`. Cheap to clone and hand down.
///
/// The file is read again at every load, never cached: under a long-running command (a
/// supervisor, the API, an MCP server) it can be deleted and restored, or created by another
/// process, and every load sees it as it is on disk now, as every other process does.
#[derive(Debug, Clone)]
pub struct Keys {
    paths: AppPaths,
    configured: Option<SharedSecret>,
}

impl Keys {
    /// The keys of the repository at `paths`, with `configured` (`APP_SHARED_SECRET`) in place
    /// of its `.app/secret` when given.
    pub fn new(paths: &AppPaths, configured: Option<SharedSecret>) -> Keys {
        Keys {
            paths: paths.clone(),
            configured,
        }
    }

    /// The keys of the repository at `paths` as `settings` configure them.
    pub fn from_settings(paths: &AppPaths, settings: &Settings) -> Keys {
        Keys::new(paths, settings.shared_secret.clone())
    }

    /// Whether `APP_SHARED_SECRET` is set (to anything): then `.app/secret` is neither needed
    /// nor restored.
    pub fn configured(&self) -> bool {
        self.configured.is_some()
    }

    /// The configured secret, else `.app/secret`; `None` when neither exists (nothing was
    /// ever signed). A configured secret that is empty is bad input.
    pub fn load(&self) -> Result<Option<SigningKey>> {
        if let Some(secret) = self.configured.as_ref().and_then(SharedSecret::text) {
            if secret.is_empty() {
                return Err(SignError::EmptySecret.into());
            }
            return Ok(Some(SigningKey::from_bytes(secret.as_bytes())));
        }
        let path = self.paths.secret();
        Ok(state::read_optional(&path)?.map(|bytes| SigningKey::from_bytes(trim_ascii(bytes))))
    }

    /// The fleet's key: the configured `APP_SHARED_SECRET`, which every host must share (a
    /// generated `.app/secret` differs on each host, so hosts would refuse each other).
    pub fn shared(&self) -> Result<SigningKey> {
        if !self.configured() {
            return Err(SignError::NoFleetSecret.into());
        }
        Ok(self.load()?.expect("a configured secret is a key"))
    }

    /// The key, generating `.app/secret` on first use.
    pub fn load_or_create(&self) -> Result<SigningKey> {
        if let Some(key) = self.load()? {
            return Ok(key);
        }
        let path = self.paths.secret();
        let mut random = [0u8; 32];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .io_context("reading", "/dev/urandom")?;
        let encoded = format!("{}\n", hex::encode(random));
        // Two first starts may race: the loser reads the winner's key.
        state::create_atomic(&path, encoded.as_bytes())?;
        let bytes = state::read_optional(&path)?
            .ok_or_else(|| SignError::Vanished { path: path.clone() })?;
        Ok(SigningKey::from_bytes(trim_ascii(bytes)))
    }

    /// Writes `key` back to `.app/secret` when that file is gone (`git clean -fdx`, a user
    /// deleting it) and no secret is configured, so what it signed verifies again. A secret
    /// someone else wrote meanwhile is left as it is. Returns whether it wrote one.
    pub fn restore(&self, key: &SigningKey) -> Result<bool> {
        if self.configured() || self.paths.secret().exists() {
            return Ok(false);
        }
        self.paths.ensure_state_dir()?;
        let mut bytes = key.key.clone();
        bytes.push(b'\n');
        state::create_atomic(&self.paths.secret(), &bytes)
    }
}

fn trim_ascii(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips_and_rejects_tampering() {
        let key = SigningKey::from_bytes(b"k".to_vec());
        let sig = key.sign(b"payload");
        assert!(key.verify(b"payload", &sig));
        assert!(!key.verify(b"payloaD", &sig));
        assert!(!key.verify(b"payload", "zz"));
        assert!(!SigningKey::from_bytes(b"other".to_vec()).verify(b"payload", &sig));
    }

    #[test]
    fn keys_take_the_configured_secret_over_the_file_and_never_restore_it() {
        use std::os::unix::ffi::OsStringExt;
        let dir = tempfile::tempdir().unwrap();
        let paths = AppPaths::from_parts(dir.path().to_path_buf(), dir.path().join(".git"));
        let file = Keys::new(&paths, None);
        assert!(file.load().unwrap().is_none(), "nothing was ever signed");
        std::fs::create_dir_all(paths.state_dir()).unwrap();
        let key = file.load_or_create().unwrap();
        assert_eq!(file.load().unwrap().unwrap().sign(b"m"), key.sign(b"m"));

        let configured = Keys::new(&paths, Some(SharedSecret::new("s3cret")));
        let secret = configured.load_or_create().unwrap();
        assert_eq!(
            secret.sign(b"m"),
            SigningKey::from_bytes("s3cret").sign(b"m")
        );
        std::fs::remove_file(paths.secret()).unwrap();
        assert!(
            !configured.restore(&key).unwrap(),
            "a configured secret needs no file"
        );
        assert!(file.restore(&key).unwrap());
        assert_eq!(file.load().unwrap().unwrap().sign(b"m"), key.sign(b"m"));

        let empty = Keys::new(&paths, Some(SharedSecret::new("")));
        let err = empty.load().unwrap_err();
        assert_eq!(err.exit_code(), crate::error::EXIT_USAGE, "{err}");
        // Not UTF-8: not a key, so the file is used (and still not restored).
        let bytes = Keys::new(
            &paths,
            Some(SharedSecret::new(std::ffi::OsString::from_vec(vec![0xff]))),
        );
        assert_eq!(bytes.load().unwrap().unwrap().sign(b"m"), key.sign(b"m"));
        assert!(bytes.configured());
    }
}
