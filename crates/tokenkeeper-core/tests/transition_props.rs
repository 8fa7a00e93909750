//! Property tests of the pure transition function (docs/design.md, "Transitions"): random event sequences,
//! including stale fences, lease takeovers and clock jumps, never break the lifecycle invariants.

use std::time::Duration;

use proptest::prelude::*;
use tokenkeeper_core::*;

const T0: Timestamp = Timestamp::from_unix_secs(1_767_225_600);

/// An abstract step; turned into a concrete event against the current record.
#[derive(Debug, Clone)]
enum Op {
    Acquire {
        holder: u8,
        ttl: u16,
    },
    Renew {
        wrong_fence: bool,
        ttl: u16,
    },
    Release {
        wrong_fence: bool,
    },
    Refresh {
        wrong_fence: bool,
        rotate: bool,
        keep_scopes: bool,
        stale: bool,
    },
    Defer {
        wrong_fence: bool,
        wait: u16,
        consumer_wide: bool,
    },
    Reject {
        wrong_fence: bool,
        reason: u8,
    },
    Revoke,
    Authorize {
        stale: bool,
    },
    Late {
        presented_current: bool,
    },
    TakeOver {
        holder: u8,
        ttl: u16,
        watched_current: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u8>(), 1..600u16).prop_map(|(holder, ttl)| Op::Acquire { holder, ttl }),
        (any::<bool>(), 1..600u16).prop_map(|(wrong_fence, ttl)| Op::Renew { wrong_fence, ttl }),
        (any::<u8>(), 1..600u16, any::<bool>()).prop_map(|(holder, ttl, watched_current)| {
            Op::TakeOver {
                holder,
                ttl,
                watched_current,
            }
        }),
        any::<bool>().prop_map(|wrong_fence| Op::Release { wrong_fence }),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop::bool::weighted(0.1)
        )
            .prop_map(|(wrong_fence, rotate, keep_scopes, stale)| Op::Refresh {
                wrong_fence,
                rotate,
                keep_scopes,
                stale
            }),
        (any::<bool>(), 1..3600u16, any::<bool>()).prop_map(
            |(wrong_fence, wait, consumer_wide)| {
                Op::Defer {
                    wrong_fence,
                    wait,
                    consumer_wide,
                }
            }
        ),
        (prop::bool::weighted(0.3), any::<u8>()).prop_map(|(wrong_fence, reason)| Op::Reject {
            wrong_fence,
            reason
        }),
        Just(Op::Revoke),
        prop::bool::weighted(0.1).prop_map(|stale| Op::Authorize { stale }),
        any::<bool>().prop_map(|presented_current| Op::Late { presented_current }),
    ]
}

fn tokens(n: usize, obtained: Timestamp, refresh: bool) -> TokenSet {
    TokenSet::bearer(
        AccessToken::new(format!("a{n}")),
        refresh.then(|| RefreshToken::new(format!("r{n}"))),
        obtained,
        obtained.saturating_add(Duration::from_secs(7200)),
    )
}

fn fence_of(r: &Record, wrong: bool) -> u64 {
    let real = r.state().lease().map_or(r.version(), |l| l.fence);
    if wrong {
        real.wrapping_add(1 + r.version() % 3)
    } else {
        real
    }
}

fn event_for(op: &Op, r: &Record, now: Timestamp, n: usize) -> Event {
    let secs = |s: u16| now.saturating_add(Duration::from_secs(u64::from(s)));
    let obtained = |stale: bool| {
        if stale {
            r.tokens()
                .obtained_at
                .saturating_sub(Duration::from_nanos(1))
        } else {
            now
        }
    };
    match *op {
        Op::Acquire { holder, ttl } => Event::LeaseAcquired {
            holder: LeaseHolder::new(format!("holder-{holder}")),
            until: secs(ttl),
        },
        Op::TakeOver {
            holder,
            ttl,
            watched_current,
        } => Event::LeaseTakenOver {
            holder: LeaseHolder::new(format!("holder-{holder}")),
            until: secs(ttl),
            watched: if watched_current {
                r.version()
            } else {
                r.version() + 1
            },
        },
        Op::Renew { wrong_fence, ttl } => Event::LeaseRenewed {
            fence: fence_of(r, wrong_fence),
            until: secs(ttl),
        },
        Op::Release { wrong_fence } => Event::LeaseReleased {
            fence: fence_of(r, wrong_fence),
            refresh_at: secs(100),
        },
        Op::Refresh {
            wrong_fence,
            rotate,
            keep_scopes,
            stale,
        } => {
            let mut t = tokens(n, obtained(stale), rotate);
            if !keep_scopes {
                t.scopes = Scopes::parse("account");
            }
            Event::Refreshed {
                fence: fence_of(r, wrong_fence),
                tokens: t,
                refresh_at: secs(5000),
                anomaly: None,
            }
        }
        Op::Defer {
            wrong_fence,
            wait,
            consumer_wide,
        } => Event::RefreshDeferred {
            fence: fence_of(r, wrong_fence),
            retry_at: secs(wait),
            cause: if consumer_wide {
                BackoffCause::ConsumerCredentialsInvalid
            } else {
                BackoffCause::Transient
            },
            error: ErrorDetail::new(FailureClass::Transient),
            commit: [
                CommitEvidence::None,
                CommitEvidence::ServerError,
                CommitEvidence::ReplyLost,
            ][usize::from(wait % 3)],
        },
        Op::Reject {
            wrong_fence,
            reason,
        } => Event::RefreshRejected {
            fence: fence_of(r, wrong_fence),
            reason: [
                ReauthReason::RefreshTokenRejected,
                ReauthReason::ScopesChanged,
                ReauthReason::RefreshTokenExpired,
                ReauthReason::RotatedTokenLost,
                ReauthReason::FailureBudgetExhausted,
            ][usize::from(reason) % 5],
            error: Some(ErrorDetail::new(FailureClass::RefreshTokenRejected)),
        },
        Op::Revoke => Event::Revoked,
        Op::Authorize { stale } => Event::Authorized {
            tokens: tokens(n, obtained(stale), true),
            refresh_at: secs(5000),
            account: None,
        },
        Op::Late { presented_current } => Event::LateRefreshed {
            presented: match (&r.tokens().refresh_token, presented_current) {
                (Some(current), true) => current.clone(),
                _ => RefreshToken::new("a-retired-token"),
            },
            tokens: tokens(n, now, true),
            refresh_at: secs(5000),
            obtained_under: None,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The invariants of docs/design.md ("The record and its states") hold after every accepted event, and a refused event
    /// is refused for a reason that matches the record.
    #[test]
    fn random_event_sequences_keep_invariants(
        steps in prop::collection::vec((op(), 0..900u32), 1..80),
    ) {
        let mut now = T0;
        let id = InstallationId::new("prop").unwrap();
        let mut rec = Record::new(id, "prop", tokens(0, T0, true), T0, T0);
        let mut accepted = 0u64;
        for (n, (op, dt)) in steps.iter().enumerate() {
            // Time mostly moves forward, sometimes by nothing (same-nanosecond events).
            now = now.saturating_add(Duration::from_millis(u64::from(*dt) * 100));
            let event = event_for(op, &rec, now, n + 1);
            let kind = event.kind();
            let was_terminal = rec.state().is_terminal();
            let held_lease = rec.state().lease().filter(|l| l.until > now).cloned();
            match transition(&rec, event.clone(), now) {
                Ok(next) => {
                    accepted += 1;
                    // Version strictly increases, by exactly one.
                    prop_assert_eq!(next.version(), rec.version() + 1);
                    // A terminal state is left only by a new authorization, or by a late result
                    // on the very token a peer's verdict was about (whatever that verdict:
                    // refused, expired, a spent budget, all said of the retired token). A
                    // revocation is the application's word and stays.
                    if was_terminal && !next.state().is_terminal() {
                        prop_assert!(matches!(kind, EventKind::Authorized | EventKind::LateRefreshed));
                        if kind == EventKind::LateRefreshed {
                            prop_assert!(
                                matches!(rec.state(), State::ReauthorizationRequired { .. }),
                                "a late result revived {:?}", rec.state()
                            );
                        }
                    }

                    // A leased event's record says which lease it was written under; others none.
                    let leased_event = matches!(kind, EventKind::Refreshed | EventKind::RefreshDeferred
                        | EventKind::RefreshRejected | EventKind::LeaseRenewed | EventKind::LeaseReleased);
                    prop_assert_eq!(
                        next.written_under(),
                        if leased_event { rec.state().lease().map(|l| &l.holder) } else { None }
                    );
                    // A revival after a peer's verdict, a peer's attempt the provider may have
                    // committed, or over a peer's lease (these results' lease is unknown) is
                    // remembered until the next success; any other is a plain success.
                    if kind == EventKind::LateRefreshed {
                        let doubt = matches!(rec.state(), State::ReauthorizationRequired { reason, .. }
                                if *reason != ReauthReason::NoRefreshToken)
                            || rec.state().lease().is_some()
                            || rec.failures().is_some_and(|f| {
                                f.possibly_committed_since.is_some() || f.server_error_since.is_some()
                            });
                        prop_assert_eq!(
                            next.failures().is_some_and(|f| f.revived_after_verdict.is_some()),
                            doubt
                        );
                    }
                    // A possibly committed attempt is remembered until a success or a new grant.
                    let success = matches!(kind, EventKind::Refreshed | EventKind::LateRefreshed | EventKind::Authorized);
                    if let (Some(before), Some(after), false) = (rec.failures(), next.failures(), success) {
                        if before.possibly_committed_since.is_some() {
                            prop_assert_eq!(before.possibly_committed_since, after.possibly_committed_since);
                        }
                        if before.server_error_since.is_some() {
                            prop_assert_eq!(before.server_error_since, after.server_error_since);
                        }
                    }
                    // A late result lands only on the refresh token its flight presented, and
                    // only if it rotated it.
                    if let Event::LateRefreshed { presented, tokens, .. } = &event {
                        prop_assert_eq!(rec.tokens().refresh_token.as_ref(), Some(presented));
                        prop_assert!(tokens.refresh_token.as_ref().is_some_and(|r| r != presented));
                    }
                    // The refresh token is never dropped unless to a terminal state.
                    if rec.tokens().refresh_token.is_some() && !next.state().is_terminal() {
                        prop_assert!(next.tokens().refresh_token.is_some());
                    }
                    // Only a refresh or an authorization changes the tokens at all.
                    if !matches!(kind, EventKind::Refreshed | EventKind::LateRefreshed | EventKind::Authorized) {
                        prop_assert_eq!(next.tokens(), rec.tokens());
                    }
                    // A silent lease is taken over only at the version that was watched.
                    if let Event::LeaseTakenOver { watched, .. } = &event {
                        prop_assert_eq!(rec.state().kind(), StateKind::Refreshing);
                        prop_assert_eq!(*watched, rec.version());
                        prop_assert_eq!(next.state().lease().unwrap().fence, next.version());
                    }
                    // A valid lease is never taken over by the clock.
                    if kind == EventKind::LeaseAcquired {
                        prop_assert!(held_lease.is_none(), "took over a live lease");
                        prop_assert_eq!(next.state().lease().unwrap().fence, next.version());
                    }
                    // Leased events only apply under the lease they name.
                    if let Some(lease) = rec.state().lease()
                        && matches!(kind, EventKind::Refreshed | EventKind::RefreshDeferred
                            | EventKind::RefreshRejected | EventKind::LeaseRenewed
                            | EventKind::LeaseReleased)
                    {
                        let named = match &event {
                            Event::Refreshed { fence, .. }
                            | Event::RefreshDeferred { fence, .. }
                            | Event::RefreshRejected { fence, .. }
                            | Event::LeaseRenewed { fence, .. }
                            | Event::LeaseReleased { fence, .. } => *fence,
                            _ => unreachable!(),
                        };
                        prop_assert_eq!(named, lease.fence);
                    }
                    // Structural invariants: history bound, due time in step with state.
                    prop_assert_eq!(next.check_invariants(), Ok(()));
                    let last = next.history().last().unwrap();
                    prop_assert_eq!(last.version, next.version());
                    prop_assert_eq!(last.event, kind);
                    prop_assert_eq!(last.to, next.state().kind());
                    // What the store would persist decodes to the same record.
                    let decoded = Record::decode(next.id(), &next.encode()).unwrap();
                    prop_assert_eq!(&decoded, &next);
                    rec = next;
                }
                Err(e) => {
                    prop_assert_eq!(e.event, kind);
                    prop_assert_eq!(e.from, rec.state().kind());
                    match e.why {
                        Refusal::Terminal => prop_assert!(was_terminal),
                        Refusal::LeaseHeld { .. } => prop_assert!(held_lease.is_some()),
                        Refusal::NotSilent { watched, current } => {
                            prop_assert_eq!(kind, EventKind::LeaseTakenOver);
                            prop_assert_ne!(watched, current);
                        }
                        Refusal::NotLeased => prop_assert!(rec.state().lease().is_none()),
                        Refusal::FenceMismatch { current, given } => prop_assert_ne!(current, given),
                        Refusal::Superseded => {
                            prop_assert_eq!(kind, EventKind::LateRefreshed);
                            // A late result that rotated the stored refresh token is refused
                            // only by a revocation: every condemnation, whatever its reason,
                            // was a verdict about the token it rotated away.
                            if let Event::LateRefreshed { presented, tokens, .. } = &event
                                && rec.tokens().refresh_token.as_ref() == Some(presented)
                                && tokens.rotated_from(presented)
                            {
                                prop_assert_eq!(rec.state().kind(), StateKind::Revoked);
                            }
                        }
                        Refusal::AlreadyRevoked => prop_assert_eq!(rec.state().kind(), StateKind::Revoked),
                        _ => prop_assert!(false, "unknown refusal {:?}", e.why),
                    }
                }
            }
        }
        prop_assert_eq!(rec.version(), 1 + accepted);
    }

    /// Rotation keeps the newest refresh token; a reply without one keeps the previous.
    #[test]
    fn refresh_merges_by_rfc6749(rotate in any::<bool>(), with_scopes in any::<bool>()) {
        let id = InstallationId::new("merge").unwrap();
        let mut first = tokens(0, T0, true);
        first.scopes = Scopes::parse("repository account");
        let rec = Record::new(id, "p", first, T0, T0);
        let leased = rec.apply(Event::LeaseAcquired {
            holder: LeaseHolder::new("h"), until: T0.saturating_add(Duration::from_secs(30)) }, T0).unwrap();
        let mut reply = tokens(1, T0, rotate);
        if with_scopes { reply.scopes = Scopes::parse("account"); }
        let fence = leased.state().lease().unwrap().fence;
        let next = leased.apply(Event::Refreshed { fence, tokens: reply, refresh_at: T0, anomaly: None }, T0).unwrap();
        let want = if rotate { "r1" } else { "r0" };
        prop_assert_eq!(next.tokens().refresh_token.as_ref().unwrap().secret(), want);
        prop_assert_eq!(next.tokens().access_token.secret(), "a1");
        let scopes = if with_scopes { "account" } else { "account repository" };
        prop_assert_eq!(next.tokens().scopes.to_string(), scopes);
    }
}

#[test]
fn lease_boundary_at_one_nanosecond() {
    let id = InstallationId::new("boundary").unwrap();
    let rec = Record::new(id, "p", tokens(0, T0, true), T0, T0);
    let until = T0.saturating_add(Duration::from_secs(30));
    let leased = rec
        .apply(
            Event::LeaseAcquired {
                holder: LeaseHolder::new("a"),
                until,
            },
            T0,
        )
        .unwrap();
    let take = |now| {
        leased.apply(
            Event::LeaseAcquired {
                holder: LeaseHolder::new("b"),
                until: Timestamp::MAX,
            },
            now,
        )
    };
    let err = take(until.saturating_sub(Duration::from_nanos(1))).unwrap_err();
    assert!(matches!(err.why, Refusal::LeaseHeld { .. }));
    assert!(err.to_string().contains("held by a"), "{err}");
    let taken = take(until).expect("a lapsed lease can be taken over at its expiry");
    // The old holder's write is fenced out.
    let stale = taken.apply(
        Event::Refreshed {
            fence: 2,
            tokens: tokens(1, until, true),
            refresh_at: until,
            anomaly: None,
        },
        until,
    );
    assert!(matches!(
        stale.unwrap_err().why,
        Refusal::FenceMismatch {
            current: 3,
            given: 2
        }
    ));
}

#[test]
fn decode_reports_typed_errors() {
    let id = InstallationId::new("decode").unwrap();
    let other = InstallationId::new("other").unwrap();
    let rec = Record::new(id.clone(), "p", tokens(0, T0, true), T0, T0);
    let bytes = rec.encode();
    assert!(matches!(
        Record::decode(&other, &bytes),
        Err(DecodeError::WrongInstallation { .. })
    ));
    assert!(matches!(
        Record::decode(&id, b"\x00garbage"),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        Record::decode(&id, &bytes[..bytes.len() / 2]),
        Err(DecodeError::Malformed(_))
    ));
    let future =
        String::from_utf8(bytes.clone())
            .unwrap()
            .replacen("\"format\":1", "\"format\":99", 1);
    assert!(matches!(
        Record::decode(&id, future.as_bytes()),
        Err(DecodeError::FutureFormat { found: 99 })
    ));
    let zero = String::from_utf8(bytes)
        .unwrap()
        .replacen("\"version\":1", "\"version\":0", 1);
    assert!(matches!(
        Record::decode(&id, zero.as_bytes()),
        Err(DecodeError::Inconsistent(_))
    ));
}
