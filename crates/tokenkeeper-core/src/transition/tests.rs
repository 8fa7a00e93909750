//! Unit tests of the transition rules that need a hand-built history: late results landing
//! on condemned, revoked or re-authorized records, the doubt a revival keeps, and when a
//! possible commit counts from. Several were found by the model checker and are kept here as
//! regressions; the property tests over random event sequences are in
//! `tests/transition_props.rs`.

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
