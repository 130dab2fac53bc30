//! HMAC-SHA256 signatures on registry entries, messages, locks and reservations.
//!
//! The key is `APP_SHARED_SECRET` when set, else the repository's generated `.app/secret`
//! (32 random bytes, hex, mode 0600, created once and never replaced). An entry whose signature
//! does not verify was not written by `app` with this key: every command ignores it.

use std::fs::File;
use std::io::Read;

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::Sha256;

use crate::error::{Error, IoContext, Result};
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

    /// Loads `APP_SHARED_SECRET`, else `.app/secret`, creating the latter when `create` is set.
    ///
    /// Returns `None` when there is no key and `create` is false (nothing was ever signed).
    pub fn load(paths: &AppPaths, create: bool) -> Result<Option<Self>> {
        if let Ok(secret) = std::env::var("APP_SHARED_SECRET") {
            if secret.is_empty() {
                return Err(Error::bad_input(
                    "APP_SHARED_SECRET is set but empty; unset it or give it a value",
                ));
            }
            return Ok(Some(Self::from_bytes(secret.into_bytes())));
        }
        let path = paths.secret();
        if let Some(bytes) = state::read_optional(&path)? {
            return Ok(Some(Self::from_bytes(trim_ascii(bytes))));
        }
        if !create {
            return Ok(None);
        }
        let mut random = [0u8; 32];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .io_context("reading", "/dev/urandom")?;
        let encoded = format!("{}\n", hex::encode(random));
        // Two first starts may race: the loser reads the winner's key.
        state::create_atomic(&path, encoded.as_bytes())?;
        let bytes = state::read_optional(&path)?
            .ok_or_else(|| Error::Failed(format!("{} vanished after creation", path.display())))?;
        Ok(Some(Self::from_bytes(trim_ascii(bytes))))
    }

    /// Writes this key back to `.app/secret` when that file is gone (`git clean -fdx`, a user
    /// deleting it) and `APP_SHARED_SECRET` is not set, so what it signed verifies again. A
    /// secret someone else wrote meanwhile is left as it is. Returns whether it wrote one.
    pub fn restore(&self, paths: &AppPaths) -> Result<bool> {
        if std::env::var_os("APP_SHARED_SECRET").is_some() || paths.secret().exists() {
            return Ok(false);
        }
        paths.ensure_state_dir()?;
        let mut bytes = self.key.clone();
        bytes.push(b'\n');
        state::create_atomic(&paths.secret(), &bytes)
    }

    /// The fleet's key: `APP_SHARED_SECRET`, which every host must share (a generated
    /// `.app/secret` differs on each host, so hosts would refuse each other).
    pub fn shared(paths: &AppPaths) -> Result<Self> {
        if std::env::var_os("APP_SHARED_SECRET").is_none() {
            return Err(Error::bad_input(
                "the fleet needs APP_SHARED_SECRET, the same on every host (e.g. 'export APP_SHARED_SECRET=$(openssl rand -hex 32)' once, then the same value everywhere)",
            ));
        }
        Ok(Self::load(paths, false)?.expect("APP_SHARED_SECRET is set"))
    }

    /// The repository's key, generating `.app/secret` on first use.
    pub fn load_or_create(paths: &AppPaths) -> Result<Self> {
        Ok(Self::load(paths, true)?.expect("load with create always yields a key"))
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
}
