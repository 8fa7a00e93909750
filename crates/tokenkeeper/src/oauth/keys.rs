//! The keys that sign authorization `state` values: their own secret (never derived from the
//! client secret, so rotating one does not rotate the other, and a leaked client secret does
//! not let anyone forge states), with a key id in every state so a fleet can rotate keys:
//! sign with the current key, still accept states of the previous ones until their flows
//! expired (`authorization_ttl`, 10 minutes by default).
//!
//! A key is refused when it is shorter than 32 bytes or obviously not random (few distinct
//! bytes, a repeated pattern, too little entropy by a byte-frequency estimate). That check
//! catches mistakes such as a password or `"change-me-change-me…"`; it cannot prove a key is
//! random, so generate keys with [`StateKey::generate`] or `openssl rand -base64 32`.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretSlice};

use crate::oauth::config::ConfigError;

/// The shortest key accepted: 256 bits.
pub const MIN_STATE_KEY_BYTES: usize = 32;

/// A key that signs authorization states, with its id (carried in every state it signs).
///
/// ```
/// use tokenkeeper::StateKey;
///
/// // In production, load it from your secret store: 32 random bytes, base64.
/// let key = StateKey::from_base64(1, "q8Cq0dTnqzM4o3d0m2v6y5cX6Lw0lR9dF2g1hJk3nQs=")?;
/// assert_eq!(key.id(), 1);
/// assert!(StateKey::from_base64(2, "cGFzc3dvcmQ=").is_err()); // "password": too short
/// # Ok::<(), tokenkeeper::oauth::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct StateKey {
    id: u8,
    secret: SecretSlice<u8>,
}

impl StateKey {
    /// A key from raw bytes (at least [`MIN_STATE_KEY_BYTES`], random).
    ///
    /// # Errors
    ///
    /// [`ConfigError::OutOfRange`] (field `state_key`) for a short or low-entropy key.
    pub fn new(id: u8, key: impl Into<Vec<u8>>) -> Result<Self, ConfigError> {
        let key: Vec<u8> = key.into();
        if let Some(reason) = weakness(&key) {
            return Err(ConfigError::OutOfRange {
                field: "state_key",
                reason: format!(
                    "key {id} {reason}; generate one with StateKey::generate or `openssl rand -base64 32`"
                ),
            });
        }
        Ok(Self {
            id,
            secret: SecretSlice::from(key),
        })
    }

    /// A key from base64 text (standard or URL-safe alphabet, padding optional), as kept in a
    /// secret store or an environment variable.
    ///
    /// # Errors
    ///
    /// [`ConfigError::OutOfRange`] for text that is not base64 (the text is not echoed), or
    /// for a key [`StateKey::new`] refuses.
    pub fn from_base64(id: u8, text: &str) -> Result<Self, ConfigError> {
        let text = text.trim();
        let bytes = STANDARD
            .decode(text)
            .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
            .map_err(|_| ConfigError::OutOfRange {
                field: "state_key",
                reason: format!("key {id} is not base64 text"),
            })?;
        Self::new(id, bytes)
    }

    /// A fresh random key, for a single process (tests, demos): a fleet must share one key,
    /// so load it from configuration instead.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Random`] only if the operating system's random generator fails.
    pub fn generate(id: u8) -> Result<Self, ConfigError> {
        let mut key = vec![0u8; MIN_STATE_KEY_BYTES];
        getrandom::fill(&mut key).map_err(|e| ConfigError::Random(e.to_string()))?;
        Self::new(id, key)
    }

    /// The key id carried in the states it signs.
    pub fn id(&self) -> u8 {
        self.id
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateKey")
            .field("id", &self.id)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// Why `key` is not acceptable as a signing key, if it is not.
fn weakness(key: &[u8]) -> Option<String> {
    tokenkeeper_core::backend::keycheck::weakness(key, MIN_STATE_KEY_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_keys_and_their_text_forms_are_accepted() {
        for _ in 0..200 {
            let key = StateKey::generate(1).unwrap();
            let b64 = STANDARD.encode(key.bytes());
            assert!(StateKey::from_base64(1, &b64).is_ok());
            assert!(StateKey::from_base64(1, &URL_SAFE_NO_PAD.encode(key.bytes())).is_ok());
            // A hex string of 32 random bytes, used as the key bytes themselves.
            let hex: String = key.bytes().iter().map(|b| format!("{b:02x}")).collect();
            assert!(StateKey::new(2, hex).is_ok());
        }
    }

    #[test]
    fn short_repetitive_and_low_entropy_keys_are_refused() {
        for (what, key) in [
            ("short", b"0123456789abcdef0123456789abcde".to_vec()),
            ("one byte", vec![b'a'; 64]),
            ("pattern", b"0123456789abcdef0123456789abcdef".to_vec()),
            (
                "two symbols",
                b"abababababababababbabababababababababa".to_vec(),
            ),
            ("password", b"password1password1password1password1".to_vec()),
        ] {
            let e = StateKey::new(3, key).unwrap_err();
            assert!(e.to_string().contains("key 3"), "{what}: {e}");
        }
        let e = StateKey::from_base64(4, "not base64 at all!").unwrap_err();
        assert!(!e.to_string().contains("not base64 at all"), "{e}");
    }

    #[test]
    fn debug_shows_the_id_only() {
        let key = StateKey::generate(9).unwrap();
        let text = format!("{key:?}");
        assert_eq!(text, "StateKey { id: 9, key: \"[redacted]\" }");
    }
}
