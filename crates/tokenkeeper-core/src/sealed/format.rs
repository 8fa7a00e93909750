//! The sealed value's format: `tksealed1.<key id>.v3.<base64url(nonce ‖ ciphertext ‖ tag)>`
//! for a record token (and the `v2.` and first formats it still opens), the associated data
//! each binds the token to (installation, role, and for a record token its creation time,
//! generation, version, consumer and account: [`RecordBinding`]), and the [`Keyring`] methods
//! that seal and open one value or a whole record's tokens. It is apart from the keys so the
//! byte-level format, which stored data depends on and older versions must keep refusing,
//! reads in one place; the unit tests beside it pin the `v2.` compatibility and the binding.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::XNonce;
use chacha20poly1305::aead::{Aead, Payload};

use super::Plaintext;
use super::keyring::{KeyId, Keyring, SealError};
use crate::{AccessToken, InstallationId, Record, RefreshToken};

/// Every sealed value starts so (what versions before the record format's marker look for).
const PREFIX: &str = "tksealed1.";
/// After the key id, marks a record token bound to its record's version, consumer and
/// account (see the module).
const RECORD_MARKER: &str = "v3.";
/// The record format before the consumer and the account were bound (still opened).
const V2_MARKER: &str = "v2.";
const NONCE_LEN: usize = 24;

impl Keyring {
    fn aad(installation: &InstallationId, field: &str, binding: Option<&RecordBinding>) -> Vec<u8> {
        match binding {
            None => format!("tokenkeeper/sealed/v1/{field}/{}", installation.as_str()),
            Some(b) if b.format == BindingFormat::V2 => format!(
                "tokenkeeper/sealed/v2/{field}/{}/{}/{}/{}",
                b.created_at,
                b.generation,
                b.version,
                installation.as_str()
            ),
            // Length-prefixed, so no consumer or account can be read as another split.
            Some(b) => format!(
                "tokenkeeper/sealed/v3/{field}/{}/{}/{}/{}:{}/{}/{}",
                b.created_at,
                b.generation,
                b.version,
                b.consumer.len(),
                b.consumer,
                b.account
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |a| format!("+{}:{a}", a.len())),
                installation.as_str()
            ),
        }
        .into_bytes()
    }

    /// Seals one value (bound to the installation and the value's role).
    pub fn seal(
        &self,
        installation: &InstallationId,
        field: &'static str,
        plaintext: &str,
    ) -> Result<String, SealError> {
        self.seal_as(installation, field, None, plaintext)
    }

    fn seal_as(
        &self,
        installation: &InstallationId,
        field: &'static str,
        binding: Option<&RecordBinding>,
        plaintext: &str,
    ) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| SealError::Random(e.to_string()))?;
        let cipher = self.cipher(self.current()).ok_or(SealError::UnknownKey {
            key_id: self.current().as_str().to_owned(),
            field,
        })?;
        let aad = Self::aad(installation, field, binding);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Malformed { field })?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(format!(
            "{PREFIX}{}.{}{}",
            self.current().as_str(),
            if binding.is_some() { RECORD_MARKER } else { "" },
            URL_SAFE_NO_PAD.encode(blob)
        ))
    }

    /// The key id a stored value was sealed with (`None` for a plaintext value).
    pub fn sealed_with(value: &str) -> Option<&str> {
        value.strip_prefix(PREFIX)?.split('.').next()
    }

    /// Whether a stored value is a record token of the current format.
    pub(super) fn bound_to_record(value: &str) -> bool {
        value
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(_, body)| body.starts_with(RECORD_MARKER))
    }

    /// A record token's body and the binding it was sealed with: the current format, or the
    /// one before the consumer and the account were bound (opened as it was sealed; the
    /// next write of the record seals it anew). `None` for anything else.
    fn record_body<'v>(
        value: &'v str,
        binding: &RecordBinding,
    ) -> Option<(&'v str, &'v str, RecordBinding)> {
        let (key_id, body) = value.strip_prefix(PREFIX)?.split_once('.')?;
        if let Some(body) = body.strip_prefix(RECORD_MARKER) {
            return Some((key_id, body, binding.clone()));
        }
        let body = body.strip_prefix(V2_MARKER)?;
        Some((
            key_id,
            body,
            RecordBinding {
                format: BindingFormat::V2,
                ..binding.clone()
            },
        ))
    }

    /// Opens one value [`seal`](Self::seal) made.
    ///
    /// # Errors
    ///
    /// [`SealError::Plaintext`] for a value that is not sealed; the other variants name the
    /// key or say the value was tampered with.
    pub fn open(
        &self,
        installation: &InstallationId,
        field: &'static str,
        stored: &str,
    ) -> Result<String, SealError> {
        let rest = stored
            .strip_prefix(PREFIX)
            .ok_or(SealError::Plaintext { field })?;
        let (key_id, body) = rest.split_once('.').ok_or(SealError::Malformed { field })?;
        if body.starts_with(RECORD_MARKER) || body.starts_with(V2_MARKER) {
            // A record token opens only with its record.
            return Err(SealError::Malformed { field });
        }
        self.open_body(installation, field, None, key_id, body)
    }

    /// Opens a record token of the current format, bound to `binding`. One of the first
    /// format, or plaintext, is [`SealError::Plaintext`] (the migration switch decides).
    fn open_token(
        &self,
        installation: &InstallationId,
        field: &'static str,
        binding: &RecordBinding,
        stored: &str,
    ) -> Result<String, SealError> {
        if !stored.starts_with(PREFIX) {
            return Err(SealError::Plaintext { field });
        }
        let (key_id, body, binding) =
            Self::record_body(stored, binding).ok_or(SealError::Plaintext { field })?;
        self.open_body(installation, field, Some(&binding), key_id, body)
    }

    /// Opens a first-format value (only while migrating).
    fn open_legacy(
        &self,
        installation: &InstallationId,
        field: &'static str,
        stored: &str,
    ) -> Option<Result<String, SealError>> {
        let (key_id, body) = stored.strip_prefix(PREFIX)?.split_once('.')?;
        Some(self.open_body(installation, field, None, key_id, body))
    }

    fn open_body(
        &self,
        installation: &InstallationId,
        field: &'static str,
        binding: Option<&RecordBinding>,
        key_id: &str,
        body: &str,
    ) -> Result<String, SealError> {
        let kid = KeyId::new(key_id).map_err(|_| SealError::Malformed { field })?;
        let cipher = self.cipher(&kid).ok_or_else(|| SealError::UnknownKey {
            key_id: key_id.to_owned(),
            field,
        })?;
        let blob = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SealError::Malformed { field })?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(SealError::Malformed { field });
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let aad = Self::aad(installation, field, binding);
        let plain = cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Tampered {
                key_id: key_id.to_owned(),
                field,
            })?;
        String::from_utf8(plain).map_err(|_| SealError::Malformed { field })
    }

    /// A copy of `record` whose tokens are sealed under the current key, bound to its
    /// installation, their roles and its authorization generation.
    pub fn seal_record(&self, record: &Record) -> Result<Record, SealError> {
        let mut sealed = record.clone();
        let binding = RecordBinding::of(record);
        let (id, generation) = (record.id(), Some(&binding));
        let tokens = &mut sealed.tokens;
        tokens.access_token = AccessToken::new(self.seal_as(
            id,
            "access",
            generation,
            tokens.access_token.secret(),
        )?);
        if let Some(r) = &tokens.refresh_token {
            tokens.refresh_token = Some(RefreshToken::new(self.seal_as(
                id,
                "refresh",
                generation,
                r.secret(),
            )?));
        }
        Ok(sealed)
    }

    /// A copy of a stored `record` with its tokens opened. A plaintext token is
    /// [`SealError::Plaintext`].
    pub fn open_record(&self, record: &Record) -> Result<Record, SealError> {
        self.open_record_with(record, Plaintext::Refuse)
    }

    pub(super) fn open_record_with(
        &self,
        record: &Record,
        plaintext: Plaintext,
    ) -> Result<Record, SealError> {
        let mut open = record.clone();
        let (id, binding) = (record.id(), RecordBinding::of(record));
        let one = |field, value: &str| match self.open_token(id, field, &binding, value) {
            // Migrating: a first-format value opens as it used to, plaintext passes.
            Err(SealError::Plaintext { .. }) if plaintext == Plaintext::Allow => self
                .open_legacy(id, field, value)
                .unwrap_or_else(|| Ok(value.to_owned())),
            other => other,
        };
        let tokens = &mut open.tokens;
        tokens.access_token = AccessToken::new(one("access", tokens.access_token.secret())?);
        if let Some(r) = &tokens.refresh_token {
            tokens.refresh_token = Some(RefreshToken::new(one("refresh", r.secret())?));
        }
        Ok(open)
    }

    /// Whether every token of a stored record is sealed under the current key, in the
    /// current format.
    pub fn is_current(&self, record: &Record) -> bool {
        let tokens = record.tokens();
        let current = |v: &str| {
            Self::bound_to_record(v) && Self::sealed_with(v) == Some(self.current().as_str())
        };
        current(tokens.access_token.secret())
            && tokens
                .refresh_token
                .as_ref()
                .is_none_or(|r| current(r.secret()))
    }
}
/// What a record token is bound to besides its installation and role.
#[derive(Clone)]
struct RecordBinding {
    format: BindingFormat,
    created_at: i64,
    generation: u64,
    version: u64,
    /// The consumer and the provider account the record belongs to (review N13: someone
    /// who can write the store but holds no key must not move an installation to their own
    /// account, which a re-authorization's identity check compares against, or to another
    /// consumer).
    consumer: String,
    account: Option<String>,
}

/// Which record binding a sealed token carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BindingFormat {
    /// Creation time, generation and version (`v2.`).
    V2,
    /// Those, the consumer and the account (`v3.`, what every write seals).
    V3,
}

impl RecordBinding {
    fn of(record: &Record) -> Self {
        Self {
            format: BindingFormat::V3,
            created_at: record.created_at().unix_nanos(),
            generation: record.generation(),
            version: record.version(),
            consumer: record.consumer().to_owned(),
            account: record.account().map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{T0, sample_record};

    fn keyring() -> Keyring {
        let key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        Keyring::new("k1", &key).unwrap()
    }

    /// `record` with its tokens sealed in the `v2.` format (what the release before the
    /// consumer and account binding wrote).
    fn sealed_as_v2(keyring: &Keyring, record: &Record) -> Record {
        let binding = RecordBinding {
            format: BindingFormat::V2,
            ..RecordBinding::of(record)
        };
        let mut sealed = record.clone();
        let v2 = |field, plain: &str| {
            keyring
                .seal_as(record.id(), field, Some(&binding), plain)
                .unwrap()
                .replacen(RECORD_MARKER, V2_MARKER, 1)
        };
        sealed.tokens.access_token =
            AccessToken::new(v2("access", record.tokens().access_token.secret()));
        if let Some(r) = record.tokens().refresh_token.as_ref() {
            sealed.tokens.refresh_token = Some(RefreshToken::new(v2("refresh", r.secret())));
        }
        sealed
    }

    #[test]
    fn a_v2_record_still_opens_and_is_not_current() {
        let keyring = keyring();
        let id = InstallationId::new("v2").unwrap();
        let record = sample_record(&id, T0).with_account(Some("acct".into()));
        let old = sealed_as_v2(&keyring, &record);
        assert!(!keyring.is_current(&old), "reseal upgrades it");
        assert_eq!(keyring.open_record(&old).unwrap(), record);
        let new = keyring.seal_record(&record).unwrap();
        assert!(keyring.is_current(&new));
        assert!(new.tokens().access_token.secret().contains(".v3."));
        assert_eq!(keyring.open_record(&new).unwrap(), record);
    }

    #[test]
    fn the_account_and_the_consumer_are_bound_and_unambiguous() {
        let keyring = keyring();
        let id = InstallationId::new("bound").unwrap();
        let record = sample_record(&id, T0).with_account(Some("a/b".into()));
        let sealed = keyring.seal_record(&record).unwrap();
        for other in [
            sealed.clone().with_account(None),
            sealed.clone().with_account(Some("a".into())),
            sealed.clone().with_account(Some("a/b/".into())),
        ] {
            assert!(matches!(
                keyring.open_record(&other),
                Err(SealError::Tampered { .. })
            ));
        }
        // An account of `None` and one spelled "-" do not share associated data.
        let dash = sample_record(&id, T0).with_account(Some("-".into()));
        let sealed = keyring.seal_record(&dash).unwrap();
        assert!(matches!(
            keyring.open_record(&sealed.with_account(None)),
            Err(SealError::Tampered { .. })
        ));
    }
}
