//! The per-event rules of [`transition`](super::transition), one function per event, grouped
//! by family as the dispatch table in `Step::apply` names them: installation events (a new
//! grant, a revocation), lease events (take over, acquire, renew, release), result events (a
//! refresh's tokens, under the lease or late) and failure events (deferred, rejected). Below
//! them are the pure helpers the result and failure rules share to keep the failure streak:
//! how it grows, which commit windows an attempt opens, and the doubt a revival leaves. They
//! live apart from the dispatch so `mod.rs` reads as the function's contract and its table,
//! and this file as what each row does.

use super::{Applied, Refusal, Step};
use crate::record::{CommitEvidence, ErrorDetail, FailureStreak, Record};
use crate::secret::RefreshToken;
use crate::state::{BackoffCause, Lease, LeaseHolder, ReauthReason, State};
use crate::time::Timestamp;
use crate::token::TokenSet;

/// Installation events: a new grant, a revocation, a reseal.
impl Step<'_> {
    pub(super) fn authorize(
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

    pub(super) fn revoke(&mut self) -> Applied {
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
    pub(super) fn take_over_lease(
        &mut self,
        holder: LeaseHolder,
        until: Timestamp,
        watched: u64,
    ) -> Applied {
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

    pub(super) fn acquire_lease(&mut self, holder: LeaseHolder, until: Timestamp) -> Applied {
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

    pub(super) fn renew_lease(&mut self, until: Timestamp) -> Applied {
        if let State::Refreshing { lease } = &mut self.next.state {
            lease.until = until;
        }
        self.next.due_at = Some(until);
        Ok(None)
    }

    pub(super) fn release_lease(&mut self, refresh_at: Timestamp) -> Applied {
        self.next.state = State::Active;
        self.next.due_at = Some(refresh_at);
        Ok(None)
    }
}

/// Result events: a refresh's new tokens, under the lease or late.
impl Step<'_> {
    pub(super) fn land_late_result(
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

    pub(super) fn land_result(
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
    pub(super) fn defer(
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

    pub(super) fn reject(&mut self, reason: ReauthReason, detail: Option<ErrorDetail>) -> Applied {
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
