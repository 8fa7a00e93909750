//! The pure transition function: `(Record, Event, now) -> Result<Record, IllegalTransition>`.
//!
//! All I/O (HTTP, stores, clocks) lives outside. Callers read a record, compute the next one
//! here, and write it with the store's compare-and-swap; the function bumps the version by
//! exactly one, keeps the due time in step with the state, merges refresh responses by the
//! RFC 6749 rules and appends to the bounded history. Property tests drive it with random event
//! sequences (`tests/transition_props.rs`).
//!
//! Read it top-down: [`transition`] checks the event's fence, then `Step::apply` is the
//! dispatch table, one rule per event, whose rules follow grouped by family (installation,
//! lease, result, failure events), each in a function of its own.

use std::fmt;

use crate::record::{
    CommitEvidence, ErrorDetail, EventKind, FailureStreak, HISTORY_LEN, HistoryEntry, Record,
};
use crate::secret::RefreshToken;
use crate::state::{BackoffCause, Lease, LeaseHolder, ReauthReason, State, StateKind};
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

/// Installation events: a new grant, a revocation, a reseal.
impl Step<'_> {
    fn authorize(
        &mut self,
        tokens: TokenSet,
        refresh_at: Timestamp,
        account: Option<String>,
    ) -> Applied {
        let next = &mut self.next;
        next.tokens = tokens;
        next.account = account;
        next.generation = self.record.generation.saturating_add(1);
        next.state = State::Active;
        next.due_at = Some(refresh_at);
        next.failures = None;
        next.refresh_token_last_used = self.now;
        next.authorized_at = self.now;
        Ok(None)
    }

    fn revoke(&mut self) -> Applied {
        if matches!(self.record.state, State::Revoked { .. }) {
            return Err(Refusal::AlreadyRevoked);
        }
        self.next.state = State::Revoked { at: self.now };
        self.next.due_at = None;
        Ok(None)
    }
}

/// Lease events: take over a silent lease, acquire, renew, release.
impl Step<'_> {
    fn take_over_lease(&mut self, holder: LeaseHolder, until: Timestamp, watched: u64) -> Applied {
        match &self.record.state {
            State::Refreshing { .. } if self.record.version == watched => {}
            State::Refreshing { .. } => {
                return Err(Refusal::NotSilent {
                    watched,
                    current: self.record.version,
                });
            }
            s if s.is_terminal() => return Err(Refusal::Terminal),
            _ => return Err(Refusal::NotLeased),
        }
        self.next.take_lease(holder, until, self.version);
        Ok(None)
    }

    fn acquire_lease(&mut self, holder: LeaseHolder, until: Timestamp) -> Applied {
        match &self.record.state {
            State::Active | State::Backoff { .. } => {}
            State::Refreshing { lease } if lease.until <= self.now => {}
            State::Refreshing { lease } => {
                return Err(Refusal::LeaseHeld {
                    holder: lease.holder.clone(),
                    until: lease.until,
                });
            }
            _ => return Err(Refusal::Terminal),
        }
        self.next.take_lease(holder, until, self.version);
        Ok(None)
    }

    fn renew_lease(&mut self, until: Timestamp) -> Applied {
        if let State::Refreshing { lease } = &mut self.next.state {
            lease.until = until;
        }
        self.next.due_at = Some(until);
        Ok(None)
    }

    fn release_lease(&mut self, refresh_at: Timestamp) -> Applied {
        self.next.state = State::Active;
        self.next.due_at = Some(refresh_at);
        Ok(None)
    }
}

/// Result events: a refresh's new tokens, under the lease or late.
impl Step<'_> {
    fn land_late_result(
        &mut self,
        presented: &RefreshToken,
        tokens: TokenSet,
        refresh_at: Timestamp,
        obtained_under: Option<&LeaseHolder>,
    ) -> Applied {
        let record = self.record;
        // Every condemnation is a verdict about the refresh token this result rotated
        // away (refused, expired, a budget spent on it): none says anything about the
        // rotated one, so each is revived. Only a revocation (the application's word)
        // and a new grant (another refresh token) make the result obsolete.
        let revivable = !matches!(record.state, State::Revoked { .. });
        // Only a rotation needs saving: a reply that kept the presented refresh token
        // (or sent none) left it valid at the provider, and whatever is stored now is at
        // least as new as this result.
        if !revivable
            || !tokens.rotated_from(presented)
            || record.tokens.refresh_token.as_ref() != Some(presented)
        {
            return Err(Refusal::Superseded);
        }
        let next = &mut self.next;
        next.tokens = tokens.merged_onto(&record.tokens);
        next.state = State::Active;
        next.due_at = Some(refresh_at);
        next.failures = revival_doubt(record, obtained_under, self.now);
        next.refresh_token_last_used = self.now;
        Ok(None)
    }

    fn land_result(
        &mut self,
        tokens: TokenSet,
        refresh_at: Timestamp,
        anomaly: Option<ErrorDetail>,
    ) -> Applied {
        let (record, now) = (self.record, self.now);
        let next = &mut self.next;
        next.tokens = tokens.merged_onto(&record.tokens);
        next.state = State::Active;
        next.due_at = Some(refresh_at);
        // A success clears the streak, but not a revival's doubt unless this refresh was
        // sent after the peer it came from could still present the retired token (its
        // lease taken after that peer's lease ended: the provider was alive then).
        let sent_after = record.lease_entry_at().unwrap_or(now);
        next.failures = record
            .failures
            .as_ref()
            .and_then(|f| f.doubt_until)
            .filter(|until| sent_after < *until)
            .map(|until| doubt_streak(now, Some(until)));
        next.refresh_token_last_used = now;
        Ok(anomaly)
    }
}

/// Failure events: a refresh deferred to a later try, or rejected for good.
impl Step<'_> {
    fn defer(
        &mut self,
        retry_at: Timestamp,
        cause: BackoffCause,
        detail: ErrorDetail,
        commit: CommitEvidence,
    ) -> Applied {
        let (record, now) = (self.record, self.now);
        let next = &mut self.next;
        next.state = State::Backoff {
            until: retry_at,
            cause,
        };
        next.due_at = Some(retry_at);
        // The attempt may have been committed from the moment it was sent, which came
        // after the lease was taken (the recording may come much later: a request's
        // deadline, a pause): evidence of a commit counts from the lease.
        next.failures = Some(next_streak(
            record.failures.as_ref(),
            cause,
            commit_windows(record, commit, now),
            now,
        ));
        next.last_error = Some(detail.clone());
        Ok(Some(detail))
    }

    fn reject(&mut self, reason: ReauthReason, detail: Option<ErrorDetail>) -> Applied {
        self.next.state = State::ReauthorizationRequired {
            reason,
            since: self.now,
        };
        self.next.due_at = None;
        if detail.is_some() {
            self.next.last_error.clone_from(&detail);
        }
        Ok(detail)
    }
}

impl Record {
    /// Puts the record under a new lease whose fence is `fence` (the version being written),
    /// due when it lapses.
    fn take_lease(&mut self, holder: LeaseHolder, until: Timestamp, fence: u64) {
        self.state = State::Refreshing {
            lease: Lease {
                holder,
                until,
                fence,
            },
        };
        self.due_at = Some(until);
    }

    /// `transition(self, event, now)` as a method.
    pub fn apply(&self, event: Event, now: Timestamp) -> Result<Record, IllegalTransition> {
        transition(self, event, now)
    }
}

/// The failure streak after one more failed attempt. Only transient failures count against
/// the failure budget: a refused consumer credential or a configuration error is no fault of
/// the installation, so it restarts the count (and the budget's clock). Evidence that an
/// attempt may have rotated the token is kept whatever follows, until a success or a new grant;
/// it counts from `since` ([`Record::possible_commit_since`]).
fn next_streak(
    previous: Option<&FailureStreak>,
    cause: BackoffCause,
    (lost_reply, server_error): (Option<Timestamp>, Option<Timestamp>),
    now: Timestamp,
) -> FailureStreak {
    let transient = cause == BackoffCause::Transient;
    let held = u32::from(cause == BackoffCause::MassRejection);
    let (consecutive, first_at) = match previous {
        Some(streak) if transient && streak.consecutive > 0 => {
            (streak.consecutive.saturating_add(1), streak.first_at)
        }
        // The first transient failure (after none, or after a revival or a consumer-side
        // failure) starts the failure budget's clock.
        _ if transient => (1, now),
        _ => (0, now),
    };
    FailureStreak {
        consecutive,
        first_at,
        last_at: now,
        possibly_committed_since: previous
            .and_then(|s| s.possibly_committed_since)
            .or(lost_reply),
        server_error_since: previous.and_then(|s| s.server_error_since).or(server_error),
        revived_after_verdict: previous.and_then(|s| s.revived_after_verdict),
        doubt_until: previous.and_then(|s| s.doubt_until),
        held_refusals: previous.map_or(0, |s| s.held_refusals).saturating_add(held),
    }
}

/// The windows evidence `commit` of an attempt under `record`'s lease opens: a lost reply's
/// (which withholds the token past the leeway) and a server error's (which explains a later
/// refusal). A lost reply under a lease that took a silent holder's over opens both: its own
/// from this lease, and the holder's, which may have committed earlier still, from the start
/// of the chain (a double fault: otherwise a refusal past the holder's leeway but inside this
/// lease's would be explained as a revocation).
fn commit_windows(
    record: &Record,
    commit: CommitEvidence,
    now: Timestamp,
) -> (Option<Timestamp>, Option<Timestamp>) {
    let since = record.possible_commit_since(commit, now);
    match commit {
        CommitEvidence::None => (None, None),
        CommitEvidence::ServerError => (None, since),
        CommitEvidence::ReplyLost => {
            let chain = record
                .possible_commit_since(CommitEvidence::ServerError, now)
                .filter(|start| since.is_some_and(|own| *start < own));
            (since, chain)
        }
    }
}

/// What a late result landing on `record` leaves in the failure streak. A revival after a
/// peer's verdict (reached by presenting the retired token, unless there was none to
/// present), after a peer's attempt with the retired token that the provider may have
/// committed, or over a peer's lease (which may present it): reuse detection may have
/// revoked the grant then, so the revival remembers it until a success that proves
/// otherwise. Any other revival is a plain success.
fn revival_doubt(
    record: &Record,
    obtained_under: Option<&LeaseHolder>,
    now: Timestamp,
) -> Option<FailureStreak> {
    let peer_attempt_in_doubt = record
        .failures
        .as_ref()
        .is_some_and(|f| f.possibly_committed_since.is_some() || f.server_error_since.is_some());
    let peer_lease = record
        .state
        .lease()
        .filter(|l| Some(&l.holder) != obtained_under)
        .map(|l| l.until);
    let verdict = matches!(
        &record.state,
        State::ReauthorizationRequired { reason, .. } if *reason != ReauthReason::NoRefreshToken
    );
    (verdict || peer_attempt_in_doubt || peer_lease.is_some())
        .then(|| doubt_streak(now, peer_lease))
}

/// The streak a revival leaves: no failure, but the doubt that a peer presented (or, until
/// `until`, may still present) the retired token.
fn doubt_streak(now: Timestamp, until: Option<Timestamp>) -> FailureStreak {
    FailureStreak {
        consecutive: 0,
        first_at: now,
        last_at: now,
        possibly_committed_since: None,
        server_error_since: None,
        revived_after_verdict: Some(now),
        doubt_until: until,
        held_refusals: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{AccessToken, FailureClass, InstallationId};

    const T0: Timestamp = Timestamp::from_unix_secs(1_800_000_000);

    fn tokens(access: &str, refresh: Option<&str>) -> TokenSet {
        TokenSet::bearer(
            AccessToken::new(access),
            refresh.map(RefreshToken::new),
            T0,
            T0.saturating_add(Duration::from_secs(3600)),
        )
    }

    fn record(refresh: &str) -> Record {
        Record::new(
            InstallationId::new("i").unwrap(),
            "p/c",
            tokens("a0", Some(refresh)),
            T0,
            T0,
        )
    }

    fn late(presented: &str, reply: TokenSet) -> Event {
        Event::LateRefreshed {
            presented: RefreshToken::new(presented),
            tokens: reply,
            refresh_at: T0,
            obtained_under: Some(LeaseHolder::new("late:1")),
        }
    }

    /// `record` leased by `holder` at `at` for 30 s.
    fn leased_by(record: &Record, holder: &str, at: Timestamp) -> Record {
        let holder = LeaseHolder::new(holder);
        let until = at.saturating_add(Duration::from_secs(30));
        record
            .apply(Event::LeaseAcquired { holder, until }, at)
            .unwrap()
    }

    /// `leased`'s attempt failed transiently with `commit`, recorded at `at`.
    fn deferred(leased: &Record, commit: CommitEvidence, at: Timestamp) -> Record {
        let event = Event::RefreshDeferred {
            fence: leased.version(),
            retry_at: at,
            cause: BackoffCause::Transient,
            error: ErrorDetail::new(FailureClass::Transient),
            commit,
        };
        leased.apply(event, at).unwrap()
    }

    #[test]
    fn a_late_rotation_lands_on_the_presented_token_only() {
        let r = record("r0");
        let landed = r.apply(late("r0", tokens("a1", Some("r1"))), T0).unwrap();
        assert_eq!(landed.tokens().refresh_token, Some(RefreshToken::new("r1")));
        assert_eq!(landed.state().kind(), StateKind::Active);
        // A peer already holds newer tokens.
        let err = r
            .apply(late("r-old", tokens("a1", Some("r1"))), T0)
            .unwrap_err();
        assert_eq!(err.why, Refusal::Superseded);
    }

    /// A provider that does not rotate (Google) keeps the same refresh token: a late result
    /// must not put an older access token over a newer one.
    #[test]
    fn a_late_result_that_did_not_rotate_is_dropped() {
        let r = record("r0");
        for reply in [tokens("a-old", Some("r0")), tokens("a-old", None)] {
            let err = r.apply(late("r0", reply), T0).unwrap_err();
            assert_eq!(err.why, Refusal::Superseded);
        }
    }

    /// Review E1: whatever a peer concluded about the presented token (refused, expired, a
    /// failure budget spent on it, lost), a late result that rotated it is the only live
    /// refresh token, and lands.
    #[test]
    fn a_late_result_revives_every_condemnation_of_the_presented_token() {
        for reason in [
            ReauthReason::RefreshTokenRejected,
            ReauthReason::ScopesChanged,
            ReauthReason::RefreshTokenExpired,
            ReauthReason::RotatedTokenLost,
            ReauthReason::FailureBudgetExhausted,
        ] {
            let leased = leased_by(&record("r0"), "peer:1", T0);
            let condemned = leased
                .apply(
                    Event::RefreshRejected {
                        fence: leased.version(),
                        reason,
                        error: None,
                    },
                    T0,
                )
                .unwrap();
            let revived = condemned
                .apply(late("r0", tokens("a1", Some("r1"))), T0)
                .unwrap_or_else(|e| panic!("{reason:?}: {e}"));
            assert_eq!(revived.state().kind(), StateKind::Active, "{reason:?}");
            assert_eq!(
                revived.tokens().refresh_token,
                Some(RefreshToken::new("r1"))
            );
        }
    }

    /// Found by the model checker: a peer presented the retired token and its attempt may
    /// have been committed (a 5xx or a lost reply after sending): a provider with reuse
    /// detection may then have revoked the grant, so the revival remembers it and a later
    /// refusal is explained as a lost rotation. An attempt the provider surely did not
    /// commit (a 429, a connection refused) leaves no such doubt.
    #[test]
    fn a_late_result_over_a_peer_attempt_in_doubt_remembers_it() {
        for (commit, doubt) in [
            (CommitEvidence::ServerError, true),
            (CommitEvidence::ReplyLost, true),
            (CommitEvidence::None, false),
        ] {
            let leased = leased_by(&record("r0"), "peer:1", T0);
            let revived = deferred(&leased, commit, T0)
                .apply(late("r0", tokens("a1", Some("r1"))), T0)
                .unwrap();
            assert_eq!(
                revived
                    .failures()
                    .is_some_and(|f| f.revived_after_verdict.is_some()),
                doubt,
                "{commit:?}"
            );
        }
    }

    /// Found by the model checker: a peer took the lease over (it may have presented the
    /// retired token, and a provider with reuse detection revoked the grant) and crashed; the
    /// result, put back from the unsaved-tokens place, lands over that lease and remembers
    /// the doubt. Over the result's own lease there is none.
    #[test]
    fn a_late_result_over_a_peer_lease_remembers_it() {
        for (holder, doubt) in [("peer:1", true), ("late:1", false)] {
            let leased = leased_by(&record("r0"), holder, T0);
            let revived = leased
                .apply(late("r0", tokens("a1", Some("r1"))), T0)
                .unwrap();
            assert_eq!(
                revived
                    .failures()
                    .is_some_and(|f| f.revived_after_verdict.is_some()),
                doubt
            );
        }
    }

    /// Found by the model checker: the peer whose lease a late result landed over may still
    /// be presenting the retired token (its request is in flight until its lease ends), so a
    /// success before then does not clear the doubt: reuse detection may revoke the grant
    /// after it. A success after that lease's end does.
    #[test]
    fn a_success_during_the_peer_lease_keeps_the_doubt() {
        let leased = leased_by(&record("r0"), "peer:1", T0);
        let revived = leased
            .apply(late("r0", tokens("a1", Some("r1"))), T0)
            .unwrap();
        let refresh = |at: Timestamp| {
            let holder = LeaseHolder::new("own:2");
            let until = at.saturating_add(Duration::from_secs(30));
            let own = revived
                .apply(Event::LeaseAcquired { holder, until }, at)
                .unwrap();
            let fence = own.version();
            let event = Event::Refreshed {
                fence,
                tokens: tokens("a2", Some("r2")),
                refresh_at: at,
                anomaly: None,
            };
            own.apply(event, at).unwrap()
        };
        let doubt = |r: &Record| {
            r.failures()
                .is_some_and(|f| f.revived_after_verdict.is_some())
        };
        assert!(doubt(&refresh(T0.saturating_add(Duration::from_secs(10)))));
        assert!(!doubt(&refresh(T0.saturating_add(Duration::from_secs(31)))));
    }

    /// Found by the model checker: a holder that lost its reply records the failure when it
    /// gets to it (after the request's deadline, or after a pause), but the provider may have
    /// committed the request from the moment it was sent, which came after the lease was
    /// taken: the reuse leeway is counted from the lease, not from the recording.
    #[test]
    fn a_possible_commit_counts_from_the_lease_not_from_the_recording() {
        let leased = leased_by(&record("r0"), "h:1", T0);
        let later = T0.saturating_add(Duration::from_secs(20));
        for commit in [CommitEvidence::ReplyLost, CommitEvidence::ServerError] {
            let streak = deferred(&leased, commit, later)
                .failures()
                .cloned()
                .unwrap();
            let since = streak
                .possibly_committed_since
                .or(streak.server_error_since);
            assert_eq!(since, Some(T0), "{commit:?}");
        }
    }

    /// A lease that took over a silent holder's: that holder may have sent from when it took
    /// its own lease, so a server error (how a takeover's doubt is recorded) counts from then;
    /// the flight's own lost reply counts from its own lease (review of the model's fixes).
    #[test]
    fn a_possible_commit_after_a_takeover_counts_from_the_lapsed_lease() {
        // The silent holder's lease (30 s) lapsed; this flight takes it 40 s later.
        let lapsed = leased_by(&record("r0"), "silent:1", T0);
        let later = T0.saturating_add(Duration::from_secs(40));
        let mine = leased_by(&lapsed, "me:1", later);
        let server_error = deferred(&mine, CommitEvidence::ServerError, later);
        assert_eq!(
            server_error.failures().unwrap().server_error_since,
            Some(T0)
        );
        // Its own lost reply counts from its own lease (its own leeway is still to use).
        let lost = deferred(&mine, CommitEvidence::ReplyLost, later);
        assert_eq!(
            lost.failures().unwrap().possibly_committed_since,
            Some(later)
        );
    }

    #[test]
    fn a_late_result_never_revives_a_revoked_or_reauthorized_record() {
        let revoked = record("r0").apply(Event::Revoked, T0).unwrap();
        let err = revoked
            .apply(late("r0", tokens("a1", Some("r1"))), T0)
            .unwrap_err();
        assert_eq!(err.why, Refusal::Superseded);
        let reauthorized = record("r0")
            .apply(
                Event::Authorized {
                    tokens: tokens("a9", Some("r9")),
                    refresh_at: T0,
                    account: None,
                },
                T0,
            )
            .unwrap();
        let err = reauthorized
            .apply(late("r0", tokens("a1", Some("r1"))), T0)
            .unwrap_err();
        assert_eq!(err.why, Refusal::Superseded);
    }
}
