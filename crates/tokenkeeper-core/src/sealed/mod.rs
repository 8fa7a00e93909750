//! `Sealed<S>`: at-rest encryption as a store decorator. Tokens are bearer credentials to
//! customers' repositories; a leaked database file or Redis dump must not leak them.
//!
//! Each token is sealed on its own with XChaCha20-Poly1305 (a fresh random 192-bit nonce per
//! write) into `tksealed1.<key id>.v3.<base64url(nonce ‖ ciphertext ‖ tag)>`, with the
//! installation id, the token's role, and the record's creation time, authorization
//! generation, version, consumer and provider account as associated data. Every write seals
//! the tokens afresh for the version it writes, so a sealed token copied into another record,
//! into the other role, or from any other version of the same record (an earlier refresh of
//! this grant, an older grant, an incarnation deleted and created again) fails to open, and
//! so does a record whose consumer or account was edited in place (review N13: the account is
//! what a re-authorization's identity check compares against). The rest of the record
//! (state, times, history) stays readable so the backends can index it; it holds no secret.
//! (The `v3.` after the key id makes versions of tokenkeeper that predate it refuse the value
//! as malformed instead of taking it for a plaintext token.) Tokens of the `v2.` format, bound
//! without the consumer and the account, still open; the record's next write, or
//! [`Sealed::reseal`], seals them as `v3.`. Until then such a record's account is not
//! authenticated: run `reseal` after upgrading.
//!
//! What this does not stop: an attacker with write access who puts back a whole older record
//! (every field as it was, so the associated data agrees) cannot be detected without state
//! kept outside the store; nor does sealing scrub plaintext written before it was turned on
//! (SQLite free pages and WAL, Redis RDB/AOF files): rotate the tokens after enabling it.
//!
//! A token that is not sealed at all is refused ([`SealError::Plaintext`]): otherwise anyone
//! able to write to the store could plant a token of their choice, which the next write would
//! seal as legitimate. While migrating a store written before encryption was enabled, turn on
//! [`Sealed::allow_plaintext_migration`], run [`Sealed::reseal`], and turn it off again;
//! [`Sealed::plaintext_reads`] counts what it let through. Record tokens of the first sealed
//! format (`tksealed1.<key id>.<body>`, bound to installation and role only) are treated the
//! same way: refused unless the switch is on, because a token of any older version would
//! open in today's record.
//!
//! A [`Keyring`] holds the current key (every write) and older ones (reads only), so keys
//! rotate without downtime; [`Sealed::reseal`] re-encrypts every record under the current key.
//! A wrong or missing key is [`StoreError::Corrupt`] naming the key id, for that installation
//! only, never garbage tokens.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretBox};

use crate::{
    AccessToken, CasOutcome, DeleteOutcome, DueEntry, DuePage, Event, InstallationId, ListFilter,
    ListPage, Record, RefreshToken, State, StoreError, Timestamp, TokenStore,
};

/// Every sealed value starts so (what versions before the record format's marker look for).
const PREFIX: &str = "tksealed1.";
/// After the key id, marks a record token bound to its record's version, consumer and
/// account (see the module).
const RECORD_MARKER: &str = "v3.";
/// The record format before the consumer and the account were bound (still opened).
const V2_MARKER: &str = "v2.";
const NONCE_LEN: usize = 24;

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

    fn cipher(&self, id: &KeyId) -> Option<XChaCha20Poly1305> {
        self.keys
            .get(id)
            .map(|k| XChaCha20Poly1305::new(k.expose_secret().into()))
    }

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
        let cipher = self.cipher(&self.current).ok_or(SealError::UnknownKey {
            key_id: self.current.0.clone(),
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
            self.current.0,
            if binding.is_some() { RECORD_MARKER } else { "" },
            URL_SAFE_NO_PAD.encode(blob)
        ))
    }

    /// The key id a stored value was sealed with (`None` for a plaintext value).
    pub fn sealed_with(value: &str) -> Option<&str> {
        value.strip_prefix(PREFIX)?.split('.').next()
    }

    /// Whether a stored value is a record token of the current format.
    fn bound_to_record(value: &str) -> bool {
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

    fn open_record_with(&self, record: &Record, plaintext: Plaintext) -> Result<Record, SealError> {
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
            Self::bound_to_record(v) && Self::sealed_with(v) == Some(self.current.as_str())
        };
        current(tokens.access_token.secret())
            && tokens
                .refresh_token
                .as_ref()
                .is_none_or(|r| current(r.secret()))
    }
}

/// What a [`Sealed::reseal`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Records now sealed under the current key that were not before.
    pub resealed: u64,
    /// Records already sealed under the current key.
    pub current: u64,
    /// Records skipped because a refresh lease was live (run the pass again later).
    pub skipped_leased: u64,
    /// Records that could not be opened (listed with the reason).
    pub failed: Vec<(InstallationId, String)>,
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

/// Whether a plaintext token in a sealed store is let through (migration) or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plaintext {
    Refuse,
    Allow,
}

/// A [`TokenStore`] that seals tokens before they reach `S` and opens them on the way back.
#[derive(Debug)]
pub struct Sealed<S> {
    inner: S,
    keyring: Keyring,
    plaintext: Plaintext,
    plaintext_reads: std::sync::atomic::AtomicU64,
}

impl<S: TokenStore> Sealed<S> {
    /// Wraps `inner`. Plaintext tokens found in it are refused: see
    /// [`allow_plaintext_migration`](Self::allow_plaintext_migration).
    pub fn new(inner: S, keyring: Keyring) -> Self {
        Self {
            inner,
            keyring,
            plaintext: Plaintext::Refuse,
            plaintext_reads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Lets plaintext tokens through while a store written before encryption is migrated
    /// (each one read is counted in [`plaintext_reads`](Self::plaintext_reads)); run
    /// [`reseal`](Self::reseal), then turn this off again: while it is on, anyone who can
    /// write to the store can plant a token.
    pub fn allow_plaintext_migration(mut self, allow: bool) -> Self {
        self.plaintext = if allow {
            Plaintext::Allow
        } else {
            Plaintext::Refuse
        };
        self
    }

    /// How many unbound tokens (plaintext, or sealed in the first format) were let through
    /// since this handle was made, by reads and by `reseal`.
    pub fn plaintext_reads(&self) -> u64 {
        self.plaintext_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The wrapped store (it sees only sealed tokens).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    fn corrupt(id: &InstallationId, e: SealError) -> StoreError {
        StoreError::corrupt("sealed", id.clone(), e)
    }

    fn open(&self, record: Record) -> Result<Record, StoreError> {
        let open = self
            .keyring
            .open_record_with(&record, self.plaintext)
            .map_err(|e| Self::corrupt(record.id(), e))?;
        self.count_unbound(&record);
        Ok(open)
    }

    /// Counts the tokens of a stored record let through unbound (plaintext or the first
    /// sealed format) while migrating.
    fn count_unbound(&self, record: &Record) {
        if self.plaintext == Plaintext::Allow {
            let tokens = record.tokens();
            let unbound = std::iter::once(tokens.access_token.secret())
                .chain(tokens.refresh_token.as_ref().map(|r| r.secret()))
                .filter(|v| !Keyring::bound_to_record(v))
                .count();
            self.plaintext_reads
                .fetch_add(unbound as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn seal(&self, record: &Record) -> Result<Record, StoreError> {
        self.keyring
            .seal_record(record)
            .map_err(|e| Self::corrupt(record.id(), e))
    }

    /// Re-encrypts every record not sealed under the current key (after adding a new key),
    /// as a `Resealed` transition. Records under a live refresh lease are skipped, not
    /// disturbed: run the pass again until `skipped_leased` is 0.
    pub async fn reseal(&self, now: Timestamp) -> Result<ResealReport, StoreError> {
        let mut report = ResealReport::default();
        let mut after: Option<InstallationId> = None;
        loop {
            let page = self
                .inner
                .list(ListFilter::all(), after.as_ref(), 500)
                .await?;
            for entry in &page.entries {
                let Some(stored) = self.inner.get(&entry.id).await? else {
                    continue;
                };
                if self.keyring.is_current(&stored) {
                    report.current += 1;
                    continue;
                }
                if let State::Refreshing { lease } = stored.state()
                    && lease.until > now
                {
                    report.skipped_leased += 1;
                    continue;
                }
                let open = match self.keyring.open_record_with(&stored, self.plaintext) {
                    Ok(open) => {
                        self.count_unbound(&stored);
                        open
                    }
                    Err(e) => {
                        report.failed.push((entry.id.clone(), e.to_string()));
                        continue;
                    }
                };
                // A record the state machine will not reseal is reported, not a store failure.
                let next = match open.apply(Event::Resealed, now) {
                    Ok(next) => next,
                    Err(e) => {
                        report.failed.push((entry.id.clone(), e.to_string()));
                        continue;
                    }
                };
                match self
                    .inner
                    .compare_and_swap(&self.seal(&next)?, stored.version())
                    .await?
                {
                    CasOutcome::Swapped => report.resealed += 1,
                    // Someone wrote meanwhile: their write used the current key already.
                    CasOutcome::Conflict(_) | CasOutcome::Missing => report.current += 1,
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(report),
            }
        }
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for Sealed<S> {
    fn unsaved_tokens_home(&self) -> crate::UnsavedHome {
        self.inner.unsaved_tokens_home()
    }

    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        self.inner.get(id).await?.map(|r| self.open(r)).transpose()
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.inner.create(&self.seal(record)?).await
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<CasOutcome, StoreError> {
        match self
            .inner
            .compare_and_swap(&self.seal(record)?, expected_version)
            .await?
        {
            CasOutcome::Conflict(current) => {
                Ok(CasOutcome::Conflict(Box::new(self.open(*current)?)))
            }
            other => Ok(other),
        }
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected_version: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        match self.inner.delete(id, expected_version).await? {
            DeleteOutcome::Conflict(current) => {
                Ok(DeleteOutcome::Conflict(Box::new(self.open(*current)?)))
            }
            other => Ok(other),
        }
    }

    async fn due(
        &self,
        consumer: &str,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        self.inner.due(consumer, before, after, limit).await
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.inner.list(filter, after, limit).await
    }
    async fn count_states(&self, cap: u64) -> Result<crate::StateCounts, StoreError> {
        self.inner.count_states(cap).await
    }
    async fn claim_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: std::time::Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.claim_flow(flow, value, ttl).await
    }

    async fn settle_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        self.inner.settle_flow(flow, value, ttl).await
    }

    async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_flow(flow).await
    }

    /// Events hold no token, so they pass through unchanged.
    async fn read_events(
        &self,
        after: &crate::EventCursor,
        limit: usize,
    ) -> Result<crate::EventPage, StoreError> {
        self.inner.read_events(after, limit).await
    }

    async fn event_head(&self) -> Result<crate::EventCursor, StoreError> {
        self.inner.event_head().await
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
