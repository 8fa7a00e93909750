//! The keys of [`Sealed`](super::Sealed): [`KeyId`] (validated, since it is written into
//! every sealed value), [`Keyring`] (one current key that every write uses, and previous
//! ones kept to open what they sealed, so keys rotate without downtime), the check that a
//! new current key is random, and [`SealError`], what a key or a sealed value can be wrong
//! about. It holds the secrets and nothing else: what a sealed value looks like and how a
//! record's tokens are sealed with these keys is in `format.rs`.

use std::collections::BTreeMap;
use std::fmt;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::KeyInit;
use secrecy::{ExposeSecret, SecretBox};

/// Why a key or a sealed token is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// A key id is empty, too long, or uses characters other than `A-Z a-z 0-9 _ -`.
    #[error("key id {0:?} must be 1 to 32 characters of A-Z, a-z, 0-9, '_' or '-'")]
    InvalidKeyId(String),
    /// A key is not 32 bytes.
    #[error("key {id:?} must be exactly 32 bytes (256 bits), got {len}")]
    InvalidKeyLength {
        /// The key id.
        id: String,
        /// Its length.
        len: usize,
    },
    /// A key that is not random (all zeros, a repeated pattern, a typed phrase): it would
    /// protect nothing (review N13).
    #[error(
        "key {id:?} {reason}; generate one with `openssl rand -base64 32` (or 32 bytes from the system's random generator)"
    )]
    WeakKey {
        /// The key id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same key id twice.
    #[error("key id {0:?} is in the keyring twice")]
    DuplicateKeyId(String),
    /// The record was sealed with a key this keyring does not hold.
    #[error(
        "the {field} token was sealed with key {key_id:?}, which is not in the keyring; add it as a previous key"
    )]
    UnknownKey {
        /// The key id in the sealed value.
        key_id: String,
        /// Which token.
        field: &'static str,
    },
    /// Authentication failed: the wrong key under that id, tampering, or a token copied from
    /// another installation or field.
    #[error(
        "the {field} token does not open with key {key_id:?}: wrong key, tampered data, or a token copied from another installation"
    )]
    Tampered {
        /// The key id in the sealed value.
        key_id: String,
        /// Which token.
        field: &'static str,
    },
    /// Not in the sealed format.
    #[error("the {field} token is not a well-formed sealed value")]
    Malformed {
        /// Which token.
        field: &'static str,
    },
    /// A token stored in plaintext in a sealed store (or sealed in the first format, which
    /// is not bound to its record's version): written beneath the sealing layer (tampering),
    /// or before encryption was enabled or upgraded.
    #[error(
        "the {field} token is not sealed: it was written beneath the encryption layer or before encryption was enabled; if the store is being migrated to encryption, enable Sealed::allow_plaintext_migration and run reseal, otherwise treat it as tampering and authorize the installation again"
    )]
    Plaintext {
        /// Which token.
        field: &'static str,
    },
    /// The system random generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(String),
}

/// A key id: 1 to 32 characters of `A-Z a-z 0-9 _ -` (it is stored in every sealed value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// Validates a key id.
    pub fn new(id: &str) -> Result<Self, SealError> {
        let ok = (1..=32).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err(SealError::InvalidKeyId(id.to_owned()))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The keys that seal and open tokens: one current key and any number of previous ones.
/// `Debug` shows key ids only.
pub struct Keyring {
    current: KeyId,
    keys: BTreeMap<KeyId, SecretBox<[u8; 32]>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.0)
            .field(
                "keys",
                &self.keys.keys().map(|k| k.0.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Clone for Keyring {
    /// A copy with the same keys (each in its own zeroed-on-drop box): the manager seals
    /// the store and its unsaved-tokens files with one keyring.
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
            keys: self
                .keys
                .iter()
                .map(|(id, key)| (id.clone(), SecretBox::new(Box::new(*key.expose_secret()))))
                .collect(),
        }
    }
}

fn key_bytes(id: &str, key: &[u8]) -> Result<SecretBox<[u8; 32]>, SealError> {
    let bytes: [u8; 32] = key.try_into().map_err(|_| SealError::InvalidKeyLength {
        id: id.to_owned(),
        len: key.len(),
    })?;
    Ok(SecretBox::new(Box::new(bytes)))
}

impl Keyring {
    /// A keyring whose current key is `key` (32 bytes) under `id`.
    pub fn new(id: &str, key: &[u8]) -> Result<Self, SealError> {
        let current = KeyId::new(id)?;
        // The key new writes use must be random (review N13). A previous key is not checked:
        // records sealed under a weak one must stay readable until `reseal` moves them.
        if key.len() == 32
            && let Some(reason) = crate::keycheck::weakness(key, 32)
        {
            return Err(SealError::WeakKey {
                id: id.to_owned(),
                reason,
            });
        }
        let mut keys = BTreeMap::new();
        keys.insert(current.clone(), key_bytes(id, key)?);
        Ok(Self { current, keys })
    }

    /// Adds an older key: it still opens what it sealed; new writes use the current key.
    pub fn with_previous(mut self, id: &str, key: &[u8]) -> Result<Self, SealError> {
        let kid = KeyId::new(id)?;
        if self.keys.contains_key(&kid) {
            return Err(SealError::DuplicateKeyId(id.to_owned()));
        }
        self.keys.insert(kid, key_bytes(id, key)?);
        Ok(self)
    }

    /// The id of the key new writes use.
    pub fn current(&self) -> &KeyId {
        &self.current
    }

    pub(super) fn cipher(&self, id: &KeyId) -> Option<XChaCha20Poly1305> {
        self.keys
            .get(id)
            .map(|k| XChaCha20Poly1305::new(k.expose_secret().into()))
    }
}
