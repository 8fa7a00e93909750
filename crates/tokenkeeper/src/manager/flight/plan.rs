//! Failure planning, pure: what a flight does after the provider did not give it tokens (or
//! before it presents a token that can only be refused). Which reason a refusal condemns for,
//! whether a transient failure spends the failure budget, when to retry (inside a reuse
//! leeway after an attempt that may have rotated the token), and which failures stay in the
//! process. No I/O, no clock, no randomness (the backoff's jitter is an argument), so the
//! model checker (`tokenkeeper-model`) drives the very functions the engine does.
//!
//! The driver ([`super::refresh`]) carries a plan out: a condemnation goes through the
//! mass-rejection guard (which consults the fleet's event log), a deferral is written under
//! the lease, a process-local failure trips this process's breaker or holds the installation
//! back here.

use std::time::Duration;

use tokenkeeper_core::{
    BackoffCause, CommitEvidence, EventKind, FailureClass, ReauthReason, Record, Timestamp,
};

use super::decide::{refresh_token_deadline, rejection_reason};
use crate::ProviderProfile;
use crate::manager::policy::RefreshPolicy;

/// The rules a plan follows: the provider's rotation, leeway and limits, and the policy.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The provider's profile.
    pub profile: &'a ProviderProfile,
    /// The refresh policy.
    pub policy: &'a RefreshPolicy,
}

/// How one attempt failed, as the flight saw it.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    /// The failure's class.
    pub class: FailureClass,
    /// Whether the provider may have committed the request (rotated the token).
    pub commit: CommitEvidence,
    /// The provider's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
    /// This flight took a lapsed lease over (its holder may have rotated and died).
    pub takeover: bool,
    /// Something may have rotated under this flight's lease (an attempt of its own may have
    /// been committed, or the lease was in doubt).
    pub in_doubt: bool,
    /// Where in the backoff window the retry falls, in `[0, 1)` (the engine draws it at
    /// random; the model passes 0, the earliest).
    pub jitter: f64,
}

/// What to do about a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Condemn for this reason, through the mass-rejection guard.
    Condemn(ReauthReason),
    /// Keep the tokens and try again at `retry_at` (written under the lease).
    Defer {
        /// When.
        retry_at: Timestamp,
        /// The evidence of a possible rotation to record.
        commit: CommitEvidence,
    },
    /// The provider refused this process's own configuration: nothing is written into the
    /// shared record; this process holds back until `until` (review E11).
    ProcessLocal {
        /// Credentials (the whole consumer) or configuration (this installation).
        cause: BackoffCause,
        /// Until when.
        until: Timestamp,
    },
}

/// Plans the response to a failed attempt over the leased `record` at `now`.
pub fn plan_failure(record: &Record, failure: &Failure, rules: Rules<'_>, now: Timestamp) -> Plan {
    match failure.class {
        FailureClass::RefreshTokenRejected | FailureClass::ScopeRejected => {
            Plan::Condemn(refusal_reason(record, failure, rules, now))
        }
        FailureClass::ConsumerCredentialsInvalid => Plan::ProcessLocal {
            cause: BackoffCause::ConsumerCredentialsInvalid,
            until: now.saturating_add(rules.policy.consumer_breaker),
        },
        FailureClass::Configuration => Plan::ProcessLocal {
            cause: BackoffCause::Configuration,
            until: now.saturating_add(rules.policy.backoff_max),
        },
        FailureClass::Transient if rules.policy.budget_exhausted(record, now) => {
            Plan::Condemn(ReauthReason::FailureBudgetExhausted)
        }
        _ => Plan::Defer {
            retry_at: transient_retry_at(record, failure, rules, now),
            commit: recorded_evidence(failure, rules),
        },
    }
}

/// The evidence of a possible rotation a deferral records: the attempt's own, or, after a
/// takeover on a rotating provider, the silent holder's possible commit (which no later
/// flight could know otherwise), as a server error dated from the lapsed lease.
fn recorded_evidence(failure: &Failure, rules: Rules<'_>) -> CommitEvidence {
    // Recorded as a server error: it explains a later refusal and keeps retries inside the
    // leeway, but never withholds the token (a lost reply of its own would).
    if failure.takeover
        && failure.commit == CommitEvidence::None
        && rules.profile.rotation.rotates()
    {
        CommitEvidence::ServerError
    } else {
        failure.commit
    }
}

/// Why the provider's refusal of `record`'s refresh token condemns it. Refused at (or within
/// the clock-skew margin of) the token's known expiry: it expired. Otherwise
/// [`rejection_reason`], where a takeover counts as evidence of a lost rotation unless the
/// provider's reuse leeway still covered the earliest moment the lapsed holder could have
/// sent (a retired token inside its leeway is accepted, so its refusal is no lost rotation).
fn refusal_reason(
    record: &Record,
    failure: &Failure,
    rules: Rules<'_>,
    now: Timestamp,
) -> ReauthReason {
    let profile = rules.profile;
    let scope_rejected = failure.class == FailureClass::ScopeRejected;
    let expired = refresh_token_deadline(record, profile)
        .is_some_and(|(deadline, _)| now >= deadline.saturating_sub(profile.timing.skew));
    if expired && !scope_rejected {
        return ReauthReason::RefreshTokenExpired;
    }
    // `taken` is by the lapsed holder's clock, `now` by this one: the leeway net of skew.
    let leeway = rules.leeway();
    let leeway_covers = failure.takeover
        && leeway
            .zip(lapsed_lease_taken_at(record))
            .is_some_and(|(leeway, taken)| now < taken.saturating_add(leeway));
    let another_flight = (failure.takeover || failure.in_doubt) && !leeway_covers;
    rejection_reason(
        scope_rejected,
        profile.rotation.rotates(),
        another_flight,
        record,
        now,
        leeway,
    )
}

/// When the lease this flight took over was taken (the earliest its silent holder could have
/// sent a request), from the record's history: the lease entry before this flight's takeover.
fn lapsed_lease_taken_at(record: &Record) -> Option<Timestamp> {
    let leases: Vec<Timestamp> = record
        .history()
        .filter(|e| {
            matches!(
                e.event,
                EventKind::LeaseAcquired | EventKind::LeaseTakenOver
            )
        })
        .map(|e| e.at)
        .collect();
    // The last is this flight's own takeover; the one before, the lease it took over.
    leases.len().checked_sub(2).map(|i| leases[i])
}

/// When to retry after a transient failure of `record`'s refresh: the policy's backoff
/// (honouring `Retry-After`), except that after an attempt that may have rotated the token (a
/// lost reply, or a 5xx after sending) a provider with a reuse leeway is retried inside it
/// while it lasts, whatever the backoff or `Retry-After` say: past it, the previous token is
/// worthless if the rotation happened.
fn transient_retry_at(
    record: &Record,
    failure: &Failure,
    rules: Rules<'_>,
    now: Timestamp,
) -> Timestamp {
    let streak = record.failures();
    let retry_at =
        rules
            .policy
            .retry_at_with_jitter(now, streak, failure.retry_after, failure.jitter);
    // Retries are scheduled inside the provider's whole leeway (whether it has passed is
    // judged net of clock skew, but a retry inside it is never wrong).
    let Some(leeway) = rules.profile.rotation.reuse_leeway() else {
        return retry_at;
    };
    // Each kind of evidence has its window; this attempt's own opens one too (an older
    // window may have passed), from when it may have been committed, and so does a silent
    // holder this attempt took over from (from when that one's lease was taken).
    let this_attempt = record.possible_commit_since(recorded_evidence(failure, rules), now);
    let taken_over = (failure.takeover && rules.profile.rotation.rotates())
        .then(|| record.possible_commit_since(CommitEvidence::ServerError, now))
        .flatten();
    [
        streak.and_then(|s| s.possibly_committed_since),
        streak.and_then(|s| s.server_error_since),
        this_attempt,
        taken_over,
    ]
    .into_iter()
    .flatten()
    .fold(retry_at, |at, since| {
        at.min(inside_leeway(since, leeway, now, rules.policy.backoff_base))
    })
}

/// The latest retry that still presents the refresh token inside the reuse leeway that began
/// at `since` (when an attempt may have rotated it): half the leeway after `since`, then half
/// of what remains each time (at least `floor` apart), so retries thin out instead of
/// hammering a provider in trouble. Past the leeway there is nothing to protect:
/// `Timestamp::MAX`.
fn inside_leeway(since: Timestamp, leeway: Duration, now: Timestamp, floor: Duration) -> Timestamp {
    let end = since.saturating_add(leeway);
    if now >= end {
        return Timestamp::MAX;
    }
    let half = since.saturating_add(leeway / 2);
    let target = if now < half {
        half
    } else {
        now.saturating_add(end.duration_since(now) / 2)
    };
    target.max(now.saturating_add(floor))
}

/// When an attempt that may have rotated `record`'s refresh token failed, if the provider's
/// reuse leeway has passed since then: presenting the token again would only trip reuse
/// detection (which revokes the whole grant), so the flight records `RotatedTokenLost`
/// instead of presenting it.
pub fn retired_past_leeway(record: &Record, rules: Rules<'_>, now: Timestamp) -> Option<Timestamp> {
    let since = record.failures()?.possibly_committed_since?;
    let leeway = rules.leeway()?;
    (now >= since.saturating_add(leeway)).then_some(since)
}

impl Rules<'_> {
    /// The provider's reuse leeway as every clock of the fleet agrees on it: less the clock
    /// skew tolerated (`lease_margin`), since a possible commit was recorded by one process's
    /// clock and is judged by another's. `None` without a leeway (or rotation), or when the
    /// skew eats it whole: nothing can be known to be inside it, so the provider is treated
    /// as one without a leeway.
    pub fn leeway(&self) -> Option<Duration> {
        let leeway = self.profile.rotation.reuse_leeway()?;
        Some(leeway.saturating_sub(self.policy.lease_margin)).filter(|l| !l.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenkeeper_core::{
        AccessToken, ErrorDetail, Event, InstallationId, LeaseHolder, RefreshToken, TokenSet,
    };

    use crate::ConsumerConfig;
    use crate::profiles;

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_unix_secs(1_800_000_000 + secs as i64)
    }

    fn leased(now: Timestamp) -> Record {
        let tokens = TokenSet::bearer(
            AccessToken::new("a"),
            Some(RefreshToken::new("r")),
            at(0),
            at(3600),
        );
        let id = InstallationId::new("i").unwrap();
        let record = Record::new(id, "c", tokens, at(0), at(0));
        let holder = LeaseHolder::new("h");
        let until = now.saturating_add(Duration::from_secs(30));
        record
            .apply(Event::LeaseAcquired { holder, until }, now)
            .unwrap()
    }

    fn failure(class: FailureClass, commit: CommitEvidence) -> Failure {
        Failure {
            class,
            commit,
            retry_after: Some(Duration::from_secs(3600)),
            takeover: false,
            in_doubt: false,
            jitter: 0.5,
        }
    }

    /// The default policy of a consumer of `profile`.
    fn policy_for(profile: ProviderProfile) -> RefreshPolicy {
        let consumer = ConsumerConfig::builder(profile)
            .client_id("k")
            .client_secret("s")
            .redirect_uri("https://app.example/cb")
            .build()
            .unwrap();
        RefreshPolicy::for_consumer(&consumer)
    }

    fn plan(profile: &ProviderProfile, record: &Record, f: &Failure, now: Timestamp) -> Plan {
        let policy = policy_for(profile.clone());
        plan_failure(
            record,
            f,
            Rules {
                profile,
                policy: &policy,
            },
            now,
        )
    }

    #[test]
    fn a_lost_reply_on_a_leeway_provider_retries_inside_the_leeway_whatever_retry_after_says() {
        let profile = profiles::atlassian_3lo();
        let leeway = profile.rotation.reuse_leeway().unwrap();
        let now = at(100);
        let f = failure(FailureClass::Transient, CommitEvidence::ReplyLost);
        let Plan::Defer { retry_at, .. } = plan(&profile, &leased(now), &f, now) else {
            panic!("a transient failure defers");
        };
        assert!(retry_at < now.saturating_add(leeway), "{retry_at}");
        // Nothing may have committed: Retry-After is honoured.
        let f = failure(FailureClass::Transient, CommitEvidence::None);
        let Plan::Defer { retry_at, .. } = plan(&profile, &leased(now), &f, now) else {
            panic!("a transient failure defers");
        };
        assert!(retry_at >= now.saturating_add(Duration::from_secs(3600)));
    }

    #[test]
    fn a_refusal_is_a_lost_rotation_only_with_evidence_of_one() {
        let profile = profiles::bitbucket();
        let now = at(100);
        let record = leased(now);
        let mut f = failure(FailureClass::RefreshTokenRejected, CommitEvidence::None);
        assert_eq!(
            plan(&profile, &record, &f, now),
            Plan::Condemn(ReauthReason::RefreshTokenRejected)
        );
        f.in_doubt = true;
        assert_eq!(
            plan(&profile, &record, &f, now),
            Plan::Condemn(ReauthReason::RotatedTokenLost)
        );
        f.class = FailureClass::ScopeRejected;
        assert_eq!(
            plan(&profile, &record, &f, now),
            Plan::Condemn(ReauthReason::ScopesChanged)
        );
    }

    /// Found by the model checker: the lapsed lease was taken by a peer's clock, the refusal
    /// is judged by this one; clocks may disagree by the lease margin, so the reuse leeway
    /// covers the refusal only when it does even with that margin.
    #[test]
    fn a_takeover_refusal_is_covered_by_the_leeway_only_beyond_clock_skew() {
        let profile = profiles::atlassian_3lo();
        let leeway = profile.rotation.reuse_leeway().unwrap();
        let taken = at(100);
        let peer = leased(taken);
        let judge = |now: Timestamp| {
            let holder = LeaseHolder::new("me");
            let until = now.saturating_add(Duration::from_secs(30));
            let watched = peer.version();
            let mine = peer
                .apply(
                    Event::LeaseTakenOver {
                        holder,
                        until,
                        watched,
                    },
                    now,
                )
                .unwrap();
            let mut f = failure(FailureClass::RefreshTokenRejected, CommitEvidence::None);
            f.takeover = true;
            f.in_doubt = true;
            plan(&profile, &mine, &f, now)
        };
        // Well inside the leeway by both clocks: the retired token would have been accepted.
        assert_eq!(
            judge(taken.saturating_add(Duration::from_secs(60))),
            Plan::Condemn(ReauthReason::RefreshTokenRejected)
        );
        // Inside it by this clock, but not if the peer's clock ran behind by the margin.
        assert_eq!(
            judge(taken.saturating_add(leeway - Duration::from_secs(10))),
            Plan::Condemn(ReauthReason::RotatedTokenLost)
        );
    }

    /// Found by the model checker: a flight that took a silent holder's lease over and then
    /// failed transiently must not forget that the holder may have rotated the token: its
    /// deferral records it (as a server error, which never withholds the token: review), so
    /// the next flight (no takeover) still knows.
    #[test]
    fn a_takeover_that_fails_transiently_records_its_doubt() {
        let profile = profiles::bitbucket();
        let now = at(100);
        let mut f = failure(FailureClass::Transient, CommitEvidence::ServerError);
        f.takeover = true;
        f.in_doubt = true;
        let Plan::Defer { commit, .. } = plan(&profile, &leased(now), &f, now) else {
            panic!("a transient failure defers");
        };
        assert_eq!(commit, CommitEvidence::ServerError);
        // Without an answer that may have committed (a 429), it is still recorded, as a
        // server error: it explains a later refusal but never withholds the token.
        f.commit = CommitEvidence::None;
        let Plan::Defer { commit, .. } = plan(&profile, &leased(now), &f, now) else {
            panic!("a transient failure defers");
        };
        assert_eq!(commit, CommitEvidence::ServerError);
        // No takeover: only the attempt's own evidence.
        f.takeover = false;
        let Plan::Defer { commit, .. } = plan(&profile, &leased(now), &f, now) else {
            panic!("a transient failure defers");
        };
        assert_eq!(commit, CommitEvidence::None);
    }

    /// The double fault the model's bounds did not reach: a flight takes a silent holder's
    /// lease over and its own reply is lost too. Its own lost reply withholds the token from
    /// its own leeway on, but the holder may have committed earlier: a refusal past the
    /// holder's leeway (inside this flight's own) is a lost rotation, not a revocation.
    #[test]
    fn a_takeover_whose_own_reply_is_lost_remembers_the_holders_earlier_commit() {
        let profile = profiles::atlassian_3lo();
        let policy = policy_for(profile.clone());
        let rules = Rules {
            profile: &profile,
            policy: &policy,
        };
        let leeway = rules.leeway().unwrap();
        let taken = at(100);
        let over = taken.saturating_add(leeway / 2);
        let mine = leased(taken)
            .apply(
                Event::LeaseTakenOver {
                    holder: LeaseHolder::new("me"),
                    until: over.saturating_add(Duration::from_secs(30)),
                    watched: leased(taken).version(),
                },
                over,
            )
            .unwrap();
        let mut f = failure(FailureClass::Transient, CommitEvidence::ReplyLost);
        f.takeover = true;
        f.in_doubt = true;
        let Plan::Defer { retry_at, commit } = plan_failure(&mine, &f, rules, over) else {
            panic!("a transient failure defers");
        };
        assert!(
            retry_at < taken.saturating_add(leeway),
            "the retry stays inside the holder's leeway: {retry_at}"
        );
        let deferred = mine
            .apply(
                Event::RefreshDeferred {
                    fence: mine.version(),
                    retry_at,
                    cause: tokenkeeper_core::BackoffCause::Transient,
                    error: ErrorDetail::new(FailureClass::Transient),
                    commit,
                },
                over,
            )
            .unwrap();
        // Its next flight, past the holder's leeway but inside its own, is refused.
        let now = taken
            .saturating_add(leeway)
            .saturating_add(Duration::from_secs(5));
        let next = deferred
            .apply(
                Event::LeaseAcquired {
                    holder: LeaseHolder::new("me"),
                    until: now.saturating_add(Duration::from_secs(30)),
                },
                now,
            )
            .unwrap();
        let refused = failure(FailureClass::RefreshTokenRejected, CommitEvidence::None);
        assert_eq!(
            plan_failure(&next, &refused, rules, now),
            Plan::Condemn(ReauthReason::RotatedTokenLost)
        );
        // And its own lost reply still withholds the token only from its own leeway on.
        assert_eq!(retired_past_leeway(&next, rules, now), None);
    }

    /// Found by the model checker: a possible commit recorded by a clock ahead of this one
    /// looks more recent than it was; whether the reuse leeway has passed is judged with the
    /// clock skew tolerated (the lease margin) counted against the leeway.
    #[test]
    fn the_leeway_is_judged_net_of_clock_skew() {
        let profile = profiles::atlassian_3lo();
        let policy = policy_for(profile.clone());
        let rules = Rules {
            profile: &profile,
            policy: &policy,
        };
        let leeway = profile.rotation.reuse_leeway().unwrap();
        let since = at(100);
        let mut record = leased(since);
        let fence = record.version();
        record = record
            .apply(
                Event::RefreshDeferred {
                    fence,
                    retry_at: since,
                    cause: BackoffCause::Transient,
                    error: ErrorDetail::new(FailureClass::Transient),
                    commit: CommitEvidence::ReplyLost,
                },
                since,
            )
            .unwrap();
        let holder = LeaseHolder::new("next");
        let almost = since.saturating_add(leeway - policy.lease_margin / 2);
        let until = almost.saturating_add(Duration::from_secs(30));
        record = record
            .apply(Event::LeaseAcquired { holder, until }, almost)
            .unwrap();
        assert!(retired_past_leeway(&record, rules, almost).is_some());
        let f = failure(FailureClass::RefreshTokenRejected, CommitEvidence::None);
        assert_eq!(
            plan_failure(&record, &f, rules, almost),
            Plan::Condemn(ReauthReason::RotatedTokenLost)
        );
    }

    #[test]
    fn a_leeway_the_clock_skew_eats_whole_counts_as_none() {
        let mut profile = profiles::atlassian_3lo();
        profile.rotation = crate::oauth::Rotation::Rotates {
            reuse_leeway: Some(Duration::from_secs(20)),
        };
        let mut policy = policy_for(profile.clone());
        let rules = |policy: &RefreshPolicy| {
            Rules {
                profile: &profile,
                policy,
            }
            .leeway()
        };
        policy.lease_margin = Duration::from_secs(30);
        assert_eq!(rules(&policy), None);
        policy.lease_margin = Duration::from_secs(5);
        assert_eq!(rules(&policy), Some(Duration::from_secs(15)));
    }

    #[test]
    fn configuration_failures_stay_in_the_process() {
        let profile = profiles::bitbucket();
        let now = at(100);
        let f = failure(
            FailureClass::ConsumerCredentialsInvalid,
            CommitEvidence::None,
        );
        assert!(matches!(
            plan(&profile, &leased(now), &f, now),
            Plan::ProcessLocal {
                cause: BackoffCause::ConsumerCredentialsInvalid,
                ..
            }
        ));
        let f = failure(FailureClass::Configuration, CommitEvidence::None);
        assert!(matches!(
            plan(&profile, &leased(now), &f, now),
            Plan::ProcessLocal {
                cause: BackoffCause::Configuration,
                ..
            }
        ));
    }

    #[test]
    fn a_spent_budget_condemns_a_transient_failure() {
        let profile = profiles::bitbucket();
        let mut record = leased(at(0));
        let mut now = at(0);
        for round in 0..5u64 {
            now = at(round * 86_400);
            let fence = record.state().lease().map_or(0, |l| l.fence);
            record = record
                .apply(
                    Event::RefreshDeferred {
                        fence,
                        retry_at: now,
                        cause: BackoffCause::Transient,
                        error: ErrorDetail::new(FailureClass::Transient),
                        commit: CommitEvidence::None,
                    },
                    now,
                )
                .unwrap();
            let holder = LeaseHolder::new(format!("h{round}"));
            let until = now.saturating_add(Duration::from_secs(30));
            record = record
                .apply(Event::LeaseAcquired { holder, until }, now)
                .unwrap();
        }
        let f = failure(FailureClass::Transient, CommitEvidence::None);
        assert_eq!(
            plan(&profile, &record, &f, now),
            Plan::Condemn(ReauthReason::FailureBudgetExhausted)
        );
    }
}
