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
//!
//! The decorator is here; the keys (and their validation) are in `keyring.rs`, the sealed
//! value's format, its associated data and the sealing and opening of records in `format.rs`.

mod format;
mod keyring;

pub use keyring::{KeyId, Keyring, SealError};

use async_trait::async_trait;

use crate::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, Event, InstallationId, ListFilter, ListPage,
    Record, State, StoreError, Timestamp, TokenStore,
};

/// What a [`Sealed::reseal`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Records now sealed under the current key that were not before.
    pub resealed: u64,
    /// Records already sealed under the current key.
    pub current: u64,
    /// Records skipped because a refresh lease was live (run the pass again later).
    pub skipped_leased: u64,
    /// Records another process wrote while the pass was resealing them, still sealed under
    /// an older key (a process not yet given the new key): run the pass again once every
    /// process has it (review SU6).
    pub raced: u64,
    /// Records that could not be opened (listed with the reason).
    pub failed: Vec<(InstallationId, String)>,
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
    /// disturbed: run the pass again until `skipped_leased` and `raced` are 0.
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
                    // Someone wrote meanwhile: current only if their write used the current key.
                    CasOutcome::Conflict(theirs) if self.keyring.is_current(&theirs) => {
                        report.current += 1;
                    }
                    CasOutcome::Conflict(_) => report.raced += 1,
                    // Deleted meanwhile: nothing left to reseal.
                    CasOutcome::Missing => {}
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
