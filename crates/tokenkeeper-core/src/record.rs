//! `Record`: everything the store keeps about one installation, and its storage encoding.
//!
//! Fields are private and change only through [`crate::transition`], so the version, the due
//! time and the history cannot drift apart from the state. Backends persist the bytes of
//! [`Record::encode`] and index [`Record::due_at`] and [`Record::state`]'s kind next to them;
//! [`Record::decode`] checks the invariants again, so a corrupt or tampered row surfaces as a
//! typed error for that installation instead of a panic or a wrong decision.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::InstallationId;
use crate::state::{LeaseHolder, State, StateKind};
use crate::time::Timestamp;
use crate::token::TokenSet;

/// How many transitions a record remembers for `explain`.
pub const HISTORY_LEN: usize = 16;

/// The storage format version written by [`Record::encode`].
pub const RECORD_FORMAT: u32 = 1;

/// The class of a failed exchange with the provider (docs/design.md, "Error classification").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FailureClass {
    /// The refresh token was refused (`invalid_grant` and the providers' spellings of it).
    RefreshTokenRejected,
    /// The consumer's client credentials were refused: consumer-wide.
    ConsumerCredentialsInvalid,
    /// `invalid_scope`: scopes or consent changed.
    ScopeRejected,
    /// A request our side built wrongly (`unsupported_grant_type`, other `invalid_request`).
    Configuration,
    /// 5xx, 429, timeout, connection error, unparseable or incomplete reply.
    Transient,
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RefreshTokenRejected => "refresh token rejected",
            Self::ConsumerCredentialsInvalid => "consumer credentials invalid",
            Self::ScopeRejected => "scope rejected",
            Self::Configuration => "configuration error",
            Self::Transient => "transient failure",
        })
    }
}

/// What the provider said when an exchange failed. Never contains a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The class it was sorted into.
    pub class: FailureClass,
    /// HTTP status, when there was a reply.
    pub status: Option<u16>,
    /// The provider's `error` code.
    pub error: Option<String>,
    /// The provider's `error_description`, or our own description of a transport failure.
    pub description: Option<String>,
}

impl ErrorDetail {
    /// A detail of `class` with no provider text.
    pub fn new(class: FailureClass) -> Self {
        Self {
            class,
            status: None,
            error: None,
            description: None,
        }
    }
}

impl fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.class)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        match (&self.error, &self.description) {
            (Some(e), Some(d)) => write!(f, ": {e}: {d}"),
            (Some(e), None) => write!(f, ": {e}"),
            (None, Some(d)) => write!(f, ": {d}"),
            (None, None) => Ok(()),
        }
    }
}

/// Consecutive failures since the last success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureStreak {
    /// How many transient failures in a row (a consumer-credential or configuration failure
    /// restarts the count at 0: only transient failures spend the failure budget).
    pub consecutive: u32,
    /// When the first of them failed.
    pub first_at: Timestamp,
    /// When the latest failed.
    pub last_at: Timestamp,
    /// When the first attempt of the streak that may have reached the provider and lost its
    /// reply failed (a timeout, a reset after sending, an unreadable 2xx): from then on, a
    /// rotating provider has likely retired the refresh token this record holds, and past
    /// its reuse leeway the token is not presented again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub possibly_committed_since: Option<Timestamp>,
    /// When the first attempt of the streak answered with a server error (5xx) after the
    /// request was sent failed: a gateway may answer so after the origin committed the
    /// rotation. Retries stay inside the provider's reuse leeway while it lasts, and a refusal
    /// afterwards is a lost rotation rather than a revocation; past the leeway the token is
    /// still presented (a 5xx rarely follows a commit, and not presenting would condemn every
    /// installation a provider outage touched). Also set, from the start of the chain of
    /// leases, when an attempt under a lease that took a silent holder's over lost its reply:
    /// the holder may have committed before this attempt's own window opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_error_since: Option<Timestamp>,
    /// When a late result revived the record after a peer's verdict on the refresh token it
    /// rotated away, after a peer's attempt with that token the provider may have committed
    /// (a lost reply, a 5xx), or over a peer's lease: that peer presented (or may present)
    /// the retired token, and a provider with reuse detection may then have revoked the whole
    /// grant. Until the next success, a refusal is
    /// explained as a lost rotation, not as a revocation by the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revived_after_verdict: Option<Timestamp>,
    /// Until when a peer may still present the retired token (the end of the peer's lease
    /// the late result landed over): a success before then does not clear
    /// `revived_after_verdict`, since reuse detection may revoke the grant after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doubt_until: Option<Timestamp>,
    /// How many times the mass-rejection guard held a refusal of this installation's refresh
    /// token in this streak: each retry of a hold comes twice as late as the one before, so a
    /// day's hold presents the refused token a handful of times, not every window.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_refusals: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a failed attempt says about whether the provider committed it (rotated the refresh
/// token) although no usable reply arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommitEvidence {
    /// The provider answered that it did not (a 4xx, a 429), or the request never reached it.
    None,
    /// A server error (5xx) after the request was sent: a gateway may answer so after the
    /// origin committed.
    ServerError,
    /// The reply was lost after sending (a timeout, a reset, an unreadable 2xx): a commit is
    /// likely.
    ReplyLost,
}

/// What kind of event a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EventKind {
    /// The record was created by an authorization or an import.
    Created,
    /// A new authorization replaced the tokens.
    Authorized,
    /// A refresh lease was taken.
    LeaseAcquired,
    /// A refresh lease was extended.
    LeaseRenewed,
    /// A refresh lease its holder stopped renewing was taken over by a peer that watched it
    /// for a whole lease TTL (see `Event::LeaseTakenOver`).
    LeaseTakenOver,
    /// A refresh lease was given back without a result.
    LeaseReleased,
    /// A refresh succeeded.
    Refreshed,
    /// A refresh result landed after its flight had lost the lease (see
    /// `Event::LateRefreshed`).
    LateRefreshed,
    /// A refresh failed and will be retried later.
    RefreshDeferred,
    /// A refresh failed for good.
    RefreshRejected,
    /// The application revoked the installation.
    Revoked,
    /// The record was re-encrypted under a new key.
    Resealed,
    /// The record was deleted (only in the event log, never in a record's history).
    Deleted,
    /// An event log entry this build cannot read (written by a newer version, or damaged).
    Unknown,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Authorized => "authorized",
            Self::LeaseAcquired => "refresh lease acquired",
            Self::LeaseRenewed => "refresh lease renewed",
            Self::LeaseTakenOver => "refresh lease taken over (its holder fell silent)",
            Self::LeaseReleased => "refresh lease released",
            Self::Refreshed => "refreshed",
            Self::LateRefreshed => "refreshed (late result)",
            Self::RefreshDeferred => "refresh deferred",
            Self::RefreshRejected => "refresh rejected",
            Self::Revoked => "revoked",
            Self::Resealed => "resealed",
            Self::Deleted => "deleted",
            Self::Unknown => "unknown (unreadable event)",
        })
    }
}

/// One remembered transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub event: EventKind,
    /// The state before.
    pub from: StateKind,
    /// The state after.
    pub to: StateKind,
    /// The provider's error, for failures.
    pub error: Option<ErrorDetail>,
    /// The record version written by this transition.
    pub version: u64,
}

/// Everything stored about one installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub(crate) id: InstallationId,
    pub(crate) consumer: String,
    pub(crate) state: State,
    pub(crate) tokens: TokenSet,
    pub(crate) version: u64,
    pub(crate) due_at: Option<Timestamp>,
    pub(crate) failures: Option<FailureStreak>,
    pub(crate) last_error: Option<ErrorDetail>,
    pub(crate) refresh_token_last_used: Timestamp,
    pub(crate) created_at: Timestamp,
    /// When the current grant was authorized (creation or the latest `Authorized`).
    pub(crate) authorized_at: Timestamp,
    pub(crate) updated_at: Timestamp,
    pub(crate) history: VecDeque<HistoryEntry>,
    /// The lease this version was written under (set by the leased events: a refresh's
    /// result or failure, a renewal, a release). A store's compare-and-swap writes it only
    /// over the record holding that very lease: versions alone can repeat after a store lost
    /// an acknowledged write, lease holders (unique per flight) cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) written_under: Option<LeaseHolder>,
    /// The provider account the current grant belongs to (Bitbucket user uuid, GitHub user
    /// id, OpenID `sub`…), when the profile's identity check read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) account: Option<String>,
    /// Counts authorizations: 1 for the creating one, +1 for each new grant (0 for records
    /// written before the count existed). Sealed tokens are bound to it.
    #[serde(default)]
    pub(crate) generation: u64,
}

/// Why stored bytes are not a usable record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not a record of any known format.
    #[error("undecodable record payload: {0}")]
    Malformed(#[source] serde_json::Error),
    /// Written by a newer tokenkeeper (or a format this build never wrote).
    #[error(
        "record format {found} is not the one this build understands ({RECORD_FORMAT}); upgrade tokenkeeper if a newer version wrote it"
    )]
    FutureFormat {
        /// The format found.
        found: u32,
    },
    /// Decoded, but stored under another installation's key (copied or swapped rows).
    #[error("record belongs to installation {found:?}, not the one it is stored under")]
    WrongInstallation {
        /// The id inside the payload.
        found: String,
    },
    /// Decoded, but its fields contradict each other.
    #[error("record is inconsistent: {0}")]
    Inconsistent(&'static str),
}

#[derive(Serialize)]
struct EncodeEnvelope<'a> {
    format: u32,
    record: &'a Record,
}

#[derive(Deserialize)]
struct FormatProbe {
    format: u32,
}

#[derive(Deserialize)]
struct DecodeEnvelope {
    format: u32,
    record: Record,
}

impl Record {
    /// A new installation in [`State::Active`] at version 1, first due for refresh at
    /// `refresh_at`.
    pub fn new(
        id: InstallationId,
        consumer: impl Into<String>,
        tokens: TokenSet,
        refresh_at: Timestamp,
        now: Timestamp,
    ) -> Self {
        let mut history = VecDeque::with_capacity(HISTORY_LEN);
        history.push_back(HistoryEntry {
            at: now,
            event: EventKind::Created,
            from: StateKind::Active,
            to: StateKind::Active,
            error: None,
            version: 1,
        });
        Self {
            id,
            consumer: consumer.into(),
            state: State::Active,
            tokens,
            version: 1,
            due_at: Some(refresh_at),
            failures: None,
            last_error: None,
            refresh_token_last_used: now,
            created_at: now,
            authorized_at: now,
            updated_at: now,
            history,
            written_under: None,
            account: None,
            generation: 1,
        }
    }

    /// The same new record, naming the provider account its grant belongs to. Only for a
    /// record not yet stored: afterwards the account changes only with a new authorization.
    pub fn with_account(mut self, account: Option<String>) -> Self {
        self.account = account;
        self
    }

    /// From when evidence `commit` of an attempt under the current lease, recorded at `now`,
    /// says the provider may have committed: a lost reply from when this lease was taken (its
    /// own request was sent no earlier, and its own reuse leeway counts from then); a server
    /// error, which is also how a takeover's doubt is recorded (the silent holder may have
    /// committed), from the start of the chain of leases it took over. `None` for no evidence.
    pub fn possible_commit_since(
        &self,
        commit: CommitEvidence,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let since = match commit {
            CommitEvidence::None => return None,
            CommitEvidence::ReplyLost => self.lease_entry_at(),
            CommitEvidence::ServerError => self.lease_taken_at(),
        };
        Some(since.map_or(now, |at| at.min(now)))
    }

    /// When the current lease was taken (by its holder's clock), if a lease is held and its
    /// history entry is kept: a request under it was sent no earlier.
    pub fn lease_entry_at(&self) -> Option<Timestamp> {
        let fence = self.state().lease()?.fence;
        self.history
            .iter()
            .rev()
            .find(|e| e.version == fence)
            .map(|e| e.at)
    }

    /// The earliest a request under the current lease may have been sent, if a lease is held
    /// and its history is kept: when it was taken (by its holder's clock), or, when it took a
    /// silent holder's lease over, when that one was taken (and so on down a chain of
    /// takeovers): that holder may have sent from then.
    pub fn lease_taken_at(&self) -> Option<Timestamp> {
        let fence = self.state().lease()?.fence;
        let mut earliest = None;
        let mut in_chain = false;
        for entry in self.history.iter().rev() {
            if entry.version == fence {
                in_chain = true;
            }
            let acquired = matches!(
                entry.event,
                EventKind::LeaseAcquired | EventKind::LeaseTakenOver
            );
            if !in_chain || !acquired {
                continue;
            }
            earliest = Some(entry.at);
            if entry.from != StateKind::Refreshing {
                break;
            }
        }
        earliest
    }

    /// The installation.
    pub fn id(&self) -> &InstallationId {
        &self.id
    }
    /// The consumer (provider profile and client) it belongs to.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }
    /// Where it is in its lifecycle.
    pub fn state(&self) -> &State {
        &self.state
    }
    /// The current tokens.
    pub fn tokens(&self) -> &TokenSet {
        &self.tokens
    }
    /// Bumped by every write; the compare-and-swap key.
    pub fn version(&self) -> u64 {
        self.version
    }
    /// When the next action (refresh, retry, lease takeover) is due; `None` when terminal.
    pub fn due_at(&self) -> Option<Timestamp> {
        self.due_at
    }
    /// The current failure streak, if the last attempt failed.
    pub fn failures(&self) -> Option<&FailureStreak> {
        self.failures.as_ref()
    }
    /// The last error the provider returned (kept after recovery, for `explain`).
    pub fn last_error(&self) -> Option<&ErrorDetail> {
        self.last_error.as_ref()
    }
    /// When the refresh token was last used (or issued): keep-alive counts from here.
    pub fn refresh_token_last_used(&self) -> Timestamp {
        self.refresh_token_last_used
    }
    /// When the record was created.
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }
    /// The provider account the current grant belongs to, when the identity check read it.
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }
    /// Which authorization of the installation the current tokens came from: 1 for the
    /// first, +1 for each re-authorization (0 for records older than this count).
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// When the current grant was authorized: creation, or the latest new authorization.
    pub fn authorized_at(&self) -> Timestamp {
        self.authorized_at
    }
    /// The lease this version was written under, for a version written by a leased event.
    /// Stores must apply such a record only over the stored record that holds that lease
    /// ([`lease_matches`](Self::lease_matches)).
    pub fn written_under(&self) -> Option<&LeaseHolder> {
        self.written_under.as_ref()
    }

    /// Whether this record may be written over `stored` as far as leases go: true unless it
    /// was written under a lease that `stored` does not hold. Every store's compare-and-swap
    /// checks it besides the version.
    pub fn lease_matches(&self, stored: &Record) -> bool {
        match &self.written_under {
            None => true,
            Some(holder) => stored.state.lease().is_some_and(|l| &l.holder == holder),
        }
    }

    /// When it was last written.
    pub fn updated_at(&self) -> Timestamp {
        self.updated_at
    }
    /// The last transitions, oldest first, at most [`HISTORY_LEN`].
    pub fn history(&self) -> impl ExactSizeIterator<Item = &HistoryEntry> {
        self.history.iter()
    }

    /// The storage encoding (versioned JSON). It contains the tokens: never log it.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data to a Vec cannot fail: no map has non-string keys.
        serde_json::to_vec(&EncodeEnvelope {
            format: RECORD_FORMAT,
            record: self,
        })
        .unwrap_or_default()
    }

    /// Decodes bytes stored under `id`, checking the format, the id and the invariants.
    pub fn decode(id: &InstallationId, bytes: &[u8]) -> Result<Self, DecodeError> {
        // One parse on the hot path; the format probe only runs to explain a failure.
        let envelope: DecodeEnvelope = match serde_json::from_slice(bytes) {
            Ok(envelope) => envelope,
            Err(e) => {
                return Err(match serde_json::from_slice::<FormatProbe>(bytes) {
                    Ok(FormatProbe { format }) if format > RECORD_FORMAT => {
                        DecodeError::FutureFormat { found: format }
                    }
                    _ => DecodeError::Malformed(e),
                });
            }
        };
        if envelope.format != RECORD_FORMAT {
            return Err(DecodeError::FutureFormat {
                found: envelope.format,
            });
        }
        let record = envelope.record;
        if &record.id != id {
            return Err(DecodeError::WrongInstallation {
                found: record.id.as_str().to_owned(),
            });
        }
        record
            .check_invariants()
            .map_err(DecodeError::Inconsistent)?;
        Ok(record)
    }

    /// Checks the invariants every transition keeps (decode runs it on every stored record).
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        if self.version == 0 {
            return Err("version 0 is never written");
        }
        if self.history.len() > HISTORY_LEN {
            return Err("history longer than the bound");
        }
        if self.state.is_terminal() != self.due_at.is_none() {
            return Err("due time present on a terminal state or missing on a live one");
        }
        if let Some(lease) = self.state.lease() {
            if lease.fence > self.version {
                return Err("lease fence is newer than the record");
            }
            if self.due_at != Some(lease.until) {
                return Err("a refreshing record must fall due when its lease lapses");
            }
        }
        if let State::Backoff { until, .. } = self.state
            && self.due_at != Some(until)
        {
            return Err("a record in backoff must fall due when the backoff ends");
        }
        Ok(())
    }
}
