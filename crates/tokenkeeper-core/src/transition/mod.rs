//! The pure transition function: `(Record, Event, now) -> Result<Record, IllegalTransition>`.
//!
//! All I/O (HTTP, stores, clocks) lives outside. Callers read a record, compute the next one
//! here, and write it with the store's compare-and-swap; the function bumps the version by
//! exactly one, keeps the due time in step with the state, merges refresh responses by the
//! RFC 6749 rules and appends to the bounded history. Property tests drive it with random event
//! sequences (`tests/transition_props.rs`).
//!
//! Read it top-down: [`transition`] checks the event's fence, then `Step::apply` is the
//! dispatch table, one rule per event. The rules themselves live in `rules.rs`, grouped by
//! family (installation, lease, result, failure events), each in a function of its own, with
//! the failure-streak arithmetic they share; the unit tests are in `tests.rs`.

mod rules;
#[cfg(test)]
mod tests;

use std::fmt;

use crate::record::{CommitEvidence, ErrorDetail, EventKind, HISTORY_LEN, HistoryEntry, Record};
use crate::secret::RefreshToken;
use crate::state::{BackoffCause, LeaseHolder, ReauthReason, State, StateKind};
use crate::time::Timestamp;
use crate::token::TokenSet;

/// Something that happened to an installation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A new authorization (or an import) replaces the tokens; the only way out of a terminal
    /// state. Clears any lease and failure streak.
    Authorized {
        /// The new tokens.
        tokens: TokenSet,
        /// When the next refresh is due.
        refresh_at: Timestamp,
        /// The provider account the new grant belongs to, when known (see
        /// [`Record::account`]).
        account: Option<String>,
    },
    /// A flight takes the refresh lease. Allowed from `Active`, `Backoff`, or `Refreshing`
    /// whose lease has lapsed (takeover). The fence is the version this transition writes.
    LeaseAcquired {
        /// Who takes it.
        holder: LeaseHolder,
        /// When it lapses.
        until: Timestamp,
    },
    /// A flight takes over a lease whose holder fell silent: it read this very record
    /// version and watched it stay unchanged (no renewal, no result) for a whole lease TTL of
    /// its own monotonic time. Allowed only from `Refreshing` at version `watched`, so the
    /// store's compare-and-swap on that version proves the silence lasted until the takeover.
    /// Unlike a wall-clock lapse (`LeaseAcquired` after `until`), it does not depend on the
    /// holder's and the peer's clocks agreeing.
    LeaseTakenOver {
        /// Who takes it.
        holder: LeaseHolder,
        /// When it lapses.
        until: Timestamp,
        /// The record version the flight watched stay unchanged.
        watched: u64,
    },
    /// The holder extends its lease during a slow refresh.
    LeaseRenewed {
        /// The fence of the lease being renewed.
        fence: u64,
        /// The new lapse time.
        until: Timestamp,
    },
    /// The holder gives the lease back without a result (cancelled flight, nothing to do).
    LeaseReleased {
        /// The fence of the lease.
        fence: u64,
        /// When the next refresh is due.
        refresh_at: Timestamp,
    },
    /// The provider issued new tokens. A reply without a refresh token or scopes keeps the
    /// previous ones.
    Refreshed {
        /// The fence of the lease under which the refresh ran.
        fence: u64,
        /// The tokens from the reply.
        tokens: TokenSet,
        /// When the next refresh is due.
        refresh_at: Timestamp,
        /// What was irregular about the reply, kept anyway (a rotating provider that sent no
        /// new refresh token, no access token, another token type); recorded as the history
        /// entry's error so `explain` can name it.
        anomaly: Option<ErrorDetail>,
    },
    /// A refresh result that arrives after its flight lost the lease (paused past it, or its
    /// write was delayed by a store outage and a peer took over). It needs no lease: it
    /// applies when the result rotated the refresh token (a reply that kept it loses nothing
    /// by being dropped) and the stored record still holds the refresh token the flight `presented`,
    /// which proves no peer has rotated since, and revives a record a peer condemned on that
    /// very token, whatever the reason (refused, expired, a failure budget spent on it). A
    /// revoked record, or one holding any other refresh token, refuses it
    /// ([`Refusal::Superseded`]): the application ended it, or a peer holds newer tokens.
    LateRefreshed {
        /// The refresh token the flight sent to the provider.
        presented: RefreshToken,
        /// The tokens from the reply.
        tokens: TokenSet,
        /// When the next refresh is due.
        refresh_at: Timestamp,
        /// The lease the result was obtained under (`None` when unknown). A stored record
        /// under any other lease was taken over by a peer that may have presented the retired
        /// token: the revival then remembers it (see `FailureStreak::revived_after_verdict`).
        obtained_under: Option<LeaseHolder>,
    },
    /// The refresh failed but the tokens are not condemned; try again at `retry_at`.
    RefreshDeferred {
        /// The fence of the lease.
        fence: u64,
        /// When to try again.
        retry_at: Timestamp,
        /// What kind of failure.
        cause: BackoffCause,
        /// What the provider (or the transport) said.
        error: ErrorDetail,
        /// Whether the attempt may have been committed by the provider although no usable
        /// reply arrived, so a rotating provider may have retired the refresh token
        /// (remembered in the failure streak).
        commit: CommitEvidence,
    },
    /// The refresh failed for good; the user must authorize again.
    RefreshRejected {
        /// The fence of the lease.
        fence: u64,
        /// Why.
        reason: ReauthReason,
        /// What the provider said, if it said anything.
        error: Option<ErrorDetail>,
    },
    /// The application revoked the installation. Overrides any lease.
    Revoked,
    /// The record was rewritten unchanged (re-encrypted under a new key). Allowed in every
    /// state; callers must not use it on a record under a live lease, whose holder it would
    /// fence out.
    Resealed,
}

impl Event {
    /// The kind recorded in the history.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Authorized { .. } => EventKind::Authorized,
            Self::LeaseAcquired { .. } => EventKind::LeaseAcquired,
            Self::LeaseRenewed { .. } => EventKind::LeaseRenewed,
            Self::LeaseTakenOver { .. } => EventKind::LeaseTakenOver,
            Self::LeaseReleased { .. } => EventKind::LeaseReleased,
            Self::Refreshed { .. } => EventKind::Refreshed,
            Self::LateRefreshed { .. } => EventKind::LateRefreshed,
            Self::RefreshDeferred { .. } => EventKind::RefreshDeferred,
            Self::RefreshRejected { .. } => EventKind::RefreshRejected,
            Self::Revoked => EventKind::Revoked,
            Self::Resealed => EventKind::Resealed,
        }
    }

    fn fence(&self) -> Option<u64> {
        match self {
            Self::LeaseRenewed { fence, .. }
            | Self::LeaseReleased { fence, .. }
            | Self::Refreshed { fence, .. }
            | Self::RefreshDeferred { fence, .. }
            | Self::RefreshRejected { fence, .. } => Some(*fence),
            _ => None,
        }
    }
}

/// Why an event cannot apply to a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("installation {id}: {event} is not allowed in state {from}: {why}")]
pub struct IllegalTransition {
    /// The installation.
    pub id: crate::InstallationId,
    /// Its state.
    pub from: StateKind,
    /// The refused event.
    pub event: EventKind,
    /// Why it was refused.
    pub why: Refusal,
}

/// The reason an [`IllegalTransition`] was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The state is terminal; only a new authorization leaves it.
    Terminal,
    /// Another flight holds a lease that has not lapsed.
    LeaseHeld {
        /// The holder.
        holder: LeaseHolder,
        /// Until when.
        until: Timestamp,
    },
    /// The event needs a lease and there is none.
    NotLeased,
    /// The event names a lease that is not the current one.
    FenceMismatch {
        /// The current lease's fence.
        current: u64,
        /// The event's fence.
        given: u64,
    },
    /// A late result whose presented refresh token is no longer the stored one: a peer
    /// holds newer tokens (or the installation was re-authorized or revoked since).
    Superseded,
    /// Already revoked.
    AlreadyRevoked,
    /// A takeover of a silent lease, but the record changed since the flight watched it
    /// (its holder renewed it or wrote a result).
    NotSilent {
        /// The version the flight watched.
        watched: u64,
        /// The current version.
        current: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Terminal => {
                f.write_str("the state is terminal; only a new authorization leaves it")
            }
            Self::LeaseHeld { holder, until } => {
                write!(f, "the refresh lease is held by {holder} until {until}")
            }
            Self::NotLeased => f.write_str("no refresh lease is held"),
            Self::FenceMismatch { current, given } => write!(
                f,
                "the lease was lost (current fence {current}, this flight's {given})"
            ),
            Self::Superseded => f.write_str(
                "the stored refresh token is no longer the one this result's refresh presented",
            ),
            Self::AlreadyRevoked => f.write_str("it is already revoked"),
            Self::NotSilent { watched, current } => write!(
                f,
                "the lease holder was not silent: the record moved from version {watched} to {current} while it was watched"
            ),
        }
    }
}

/// Applies `event` to `record` at `now`, returning the record to write (version + 1).
///
/// # Errors
///
/// [`IllegalTransition`] when the state machine refuses the event in the record's state (a
/// lease that has not lapsed, a fence of another lease, a late result over other tokens,
/// ...), saying which rule refused it ([`Refusal`]).
///
/// ```
/// use std::time::Duration;
/// use tokenkeeper_core::*;
///
/// let now = Timestamp::from_unix_secs(1_000);
/// let tokens = TokenSet::bearer(
///     AccessToken::new("a"), Some(RefreshToken::new("r")), now,
///     now.saturating_add(Duration::from_secs(7200)));
/// let id = InstallationId::new("install-1").unwrap();
/// let rec = Record::new(id, "bitbucket", tokens, now, now);
/// let leased = transition(&rec, Event::LeaseAcquired {
///     holder: LeaseHolder::new("proc-1:flight-1"),
///     until: now.saturating_add(Duration::from_secs(30)),
/// }, now).unwrap();
/// assert_eq!(leased.version(), 2);
/// assert_eq!(leased.state().lease().unwrap().fence, 2);
/// // A second flight cannot take a lease that has not lapsed.
/// assert!(transition(&leased, Event::LeaseAcquired {
///     holder: LeaseHolder::new("proc-2:flight-1"),
///     until: now.saturating_add(Duration::from_secs(30)),
/// }, now).is_err());
/// ```
pub fn transition(
    record: &Record,
    event: Event,
    now: Timestamp,
) -> Result<Record, IllegalTransition> {
    let kind = event.kind();
    let from = record.state.kind();
    let refuse = |why: Refusal| IllegalTransition {
        id: record.id.clone(),
        from,
        event: kind,
        why,
    };
    check_fence(record, event.fence()).map_err(refuse)?;
    let mut step = Step::new(record, event.fence().is_some(), now);
    let error = step.apply(event).map_err(refuse)?;
    Ok(step.finish(kind, from, error))
}

/// Leased events must name the current lease.
fn check_fence(record: &Record, fence: Option<u64>) -> Result<(), Refusal> {
    let Some(given) = fence else {
        return Ok(());
    };
    match &record.state {
        State::Refreshing { lease } if lease.fence == given => Ok(()),
        State::Refreshing { lease } => Err(Refusal::FenceMismatch {
            current: lease.fence,
            given,
        }),
        s if s.is_terminal() => Err(Refusal::Terminal),
        _ => Err(Refusal::NotLeased),
    }
}

/// What one event's rule returns: the error to record in the history entry, or why the event
/// cannot apply.
type Applied = Result<Option<ErrorDetail>, Refusal>;

/// One transition under way: the record as read, the record to write, the version it is
/// written at, and the time.
struct Step<'a> {
    record: &'a Record,
    next: Record,
    version: u64,
    now: Timestamp,
}

impl<'a> Step<'a> {
    /// Starts from a copy of `record`. A leased event is written under its lease; anything
    /// else under none.
    fn new(record: &'a Record, leased: bool, now: Timestamp) -> Self {
        let mut next = record.clone();
        next.written_under = match &record.state {
            State::Refreshing { lease } if leased => Some(lease.holder.clone()),
            _ => None,
        };
        Self {
            record,
            next,
            version: record.version.saturating_add(1),
            now,
        }
    }

    /// The dispatch table, read top-down: one rule per event, grouped by family (installation,
    /// lease, result, failure) in the `impl` blocks below.
    ///
    /// Writes are ordered by versions and fences, never by comparing wall clocks: two
    /// machines' clocks disagree, and a refusal here would discard rotated tokens.
    fn apply(&mut self, event: Event) -> Applied {
        match event {
            Event::Authorized {
                tokens,
                refresh_at,
                account,
            } => self.authorize(tokens, refresh_at, account),
            Event::LeaseTakenOver {
                holder,
                until,
                watched,
            } => self.take_over_lease(holder, until, watched),
            Event::LeaseAcquired { holder, until } => self.acquire_lease(holder, until),
            Event::LeaseRenewed { until, .. } => self.renew_lease(until),
            Event::LeaseReleased { refresh_at, .. } => self.release_lease(refresh_at),
            Event::LateRefreshed {
                presented,
                tokens,
                refresh_at,
                obtained_under,
            } => self.land_late_result(&presented, tokens, refresh_at, obtained_under.as_ref()),
            Event::Refreshed {
                tokens,
                refresh_at,
                anomaly,
                ..
            } => self.land_result(tokens, refresh_at, anomaly),
            Event::RefreshDeferred {
                retry_at,
                cause,
                error,
                commit,
                ..
            } => self.defer(retry_at, cause, error, commit),
            Event::RefreshRejected { reason, error, .. } => self.reject(reason, error),
            Event::Revoked => self.revoke(),
            Event::Resealed => Ok(None),
        }
    }

    /// Stamps the new version and time and appends the history entry.
    fn finish(mut self, event: EventKind, from: StateKind, error: Option<ErrorDetail>) -> Record {
        let (next, version, now) = (&mut self.next, self.version, self.now);
        next.version = version;
        next.updated_at = now;
        if next.history.len() >= HISTORY_LEN {
            next.history.pop_front();
        }
        next.history.push_back(HistoryEntry {
            at: now,
            event,
            from,
            to: next.state.kind(),
            error,
            version,
        });
        self.next
    }
}

impl Record {
    /// `transition(self, event, now)` as a method.
    pub fn apply(&self, event: Event, now: Timestamp) -> Result<Record, IllegalTransition> {
        transition(self, event, now)
    }
}
