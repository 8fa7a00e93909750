//! The refresh protocol's decision step, pure: given the stored record, why the flight runs,
//! the time and the consumer breaker, what to do next. No I/O, no clock, no randomness, so
//! every branch is unit-tested here and a model checker can drive the same function.
//!
//! The driver ([`super::refresh`]) reads the record, asks [`decide`], and carries the
//! decision out: serve, fail, wait for a peer's lease, or take the lease and call the provider.

use tokenkeeper_core::{
    AccessToken, BackoffCause, ErrorDetail, FailureClass, InstallationId, LeaseHolder,
    ReauthReason, Record, State, Timestamp,
};

use crate::ProviderProfile;
use crate::error::Error;

/// Why a flight runs.
#[derive(Debug, Clone)]
pub enum Mode {
    /// A caller needs a token and the cached one is stale.
    OnDemand,
    /// The background refresher: refresh if the record is due.
    Proactive,
    /// Refresh unless this access token was already replaced: the API rejected it (401), or
    /// the application asked (`force_refresh`).
    Forced {
        /// The access token to replace.
        rejected: AccessToken,
        /// The API answered 401: the refresh happens only if the token is at least
        /// `forced_min_interval` old (an explicit `force_refresh` always refreshes).
        unauthorized: bool,
    },
}

impl Mode {
    /// The mode's name in traces.
    pub fn name(&self) -> &'static str {
        match self {
            Self::OnDemand => "on_demand",
            Self::Proactive => "proactive",
            Self::Forced { .. } => "forced",
        }
    }
}

/// What the flight does next.
#[derive(Debug)]
pub enum Decision {
    /// No refresh needed: serve the stored token, which is fresh (and may be cached).
    Fresh(AccessToken),
    /// Refreshing is on hold or in a peer's hands, but this token is still valid: serve it
    /// without caching it.
    ServeValid(AccessToken),
    /// Nothing to serve: tell the caller why.
    Fail(Error),
    /// A peer holds a live lease and there is no valid token to serve: wait for its result.
    WaitForPeer {
        /// The lease holder, for the `Busy` error if the wait runs out.
        holder: LeaseHolder,
    },
    /// Take the lease (a takeover when a lapsed one is recorded) and refresh.
    TakeLease {
        /// A lapsed lease is still recorded: its holder died or stalled mid-refresh.
        takeover: bool,
        /// The lease is live by its written expiry, but this flight watched this record
        /// version stay unchanged for a whole lease TTL: take it over at that version.
        watched: Option<u64>,
        /// The current access token may be served if the refresh fails transiently.
        serve_valid: bool,
    },
}

/// What the flight knows besides the record.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Why the flight runs.
    pub mode: &'a Mode,
    /// This process's wall-clock time.
    pub now: Timestamp,
    /// When the stored tokens stop being served (expiry minus the skew margin).
    pub stale_at: Timestamp,
    /// The consumer breaker, when open: until when, and the failure that tripped it.
    pub breaker: Option<(Timestamp, &'a ErrorDetail)>,
    /// This manager's consumer (`profile/client_id`): a record of another is never touched.
    pub consumer: &'a str,
    /// The record version this flight has watched stay unchanged under a peer's lease for a
    /// whole lease TTL, if it has (the peer fell silent).
    pub silent: Option<u64>,
    /// A 401 forces a refresh only of tokens at least this old
    /// (`RefreshPolicy::forced_refresh_min_interval`).
    pub forced_min_interval: std::time::Duration,
    /// When the record's refresh token stops working, if known (the earliest of the provider's
    /// word and the profile's inactivity and absolute limits).
    pub refresh_deadline: Option<Timestamp>,
    /// The shortest time between two refreshes of one installation
    /// (`RefreshPolicy::min_refresh_interval`).
    pub min_refresh_interval: std::time::Duration,
    /// A mass-rejection hold written before this is over (the provider works), however long
    /// the hold's backoff runs: one lease span (`lease_ttl + lease_margin`) before this
    /// process's last successful refresh. The span keeps a success that came right after a
    /// hold from lifting it while a stalled holder's late result may still land: a refusal
    /// after a takeover is held, and presenting that retired token again would be a second
    /// reuse (the contention fleet's 11th detection for 10 frozen leases).
    pub lifts_holds_before: Option<Timestamp>,
}

/// Decides the next step for `record`: fail for another consumer's or a terminal record;
/// serve a token that needs no refresh; otherwise serve the still-valid token or say why not
/// while nothing may be presented (unrenewable, backing off, breaker open, a peer's live
/// lease, too soon since the last refresh), and else take the lease.
pub fn decide(record: &Record, cx: Context<'_>) -> Decision {
    // Another consumer's record: its refresh token means nothing to our token endpoint (and
    // must not be sent there), so nothing is leased, refreshed or condemned.
    if record.consumer() != cx.consumer {
        return Decision::Fail(Error::ForeignConsumer {
            id: record.id().clone(),
            owner: record.consumer().to_owned(),
            this: cx.consumer.to_owned(),
        });
    }
    if let Some(err) = terminal_error(record) {
        return Decision::Fail(err);
    }
    let tokens = record.tokens();
    if !refresh_needed(record, &cx) {
        return Decision::Fresh(tokens.access_token.clone());
    }
    let still_valid = cx.now < tokens.expires_at && !matches!(cx.mode, Mode::Forced { .. });
    let held = unrenewable(record, &cx)
        .or_else(|| backing_off(record, &cx, still_valid))
        .or_else(|| peer_refreshing(record, &cx, still_valid))
        .or_else(|| refreshed_too_soon(record, &cx, still_valid));
    if let Some(decision) = held {
        return decision;
    }
    Decision::TakeLease {
        takeover: matches!(record.state(), State::Refreshing { .. }),
        watched: None,
        serve_valid: still_valid,
    }
}

/// Whether the mode calls for a refresh now: on demand when the token is no longer served,
/// proactively also when due; forced when the API refused this very token, unless it was
/// obtained moments ago (an API that refuses fresh tokens for other reasons must not rotate
/// on every call).
fn refresh_needed(record: &Record, cx: &Context<'_>) -> bool {
    let (now, tokens) = (cx.now, record.tokens());
    let usable = now < cx.stale_at;
    match cx.mode {
        Mode::OnDemand => !usable,
        Mode::Proactive => !usable || record.due_at().is_some_and(|d| d <= now),
        Mode::Forced {
            rejected,
            unauthorized,
        } => {
            !usable
                || (&tokens.access_token == rejected
                    && (!unauthorized
                        || now >= tokens.obtained_at.saturating_add(cx.forced_min_interval)))
        }
    }
}

/// Nothing can renew a token without a refresh token, or with one past its deadline: serve it
/// until it expires (a permanent one forever), even to an explicit `force_refresh`; the
/// flight condemns it only after that, or once the API refused it. A record due before that
/// (written by an older version, or not yet moved) is leased once by the refresher only to
/// move its due time to the expiry, so it stops coming due.
fn unrenewable(record: &Record, cx: &Context<'_>) -> Option<Decision> {
    let (now, tokens) = (cx.now, record.tokens());
    let unrenewable = tokens.refresh_token.is_none()
        || cx.refresh_deadline.is_some_and(|deadline| now >= deadline);
    let refused_by_api = matches!(
        cx.mode,
        Mode::Forced {
            unauthorized: true,
            ..
        }
    );
    if !unrenewable || now >= tokens.expires_at || refused_by_api {
        return None;
    }
    let lapsed = |lease: &tokenkeeper_core::Lease| lease.until <= now;
    let misdue = matches!(cx.mode, Mode::Proactive)
        && match record.state() {
            State::Active | State::Backoff { .. } => true,
            State::Refreshing { lease } => lapsed(lease),
            _ => false,
        }
        && record.due_at().is_some_and(|d| d < tokens.expires_at);
    (!misdue).then(|| Decision::ServeValid(tokens.access_token.clone()))
}

/// Backing off, or the consumer's credentials refused moments ago (the breaker): serve the
/// still-valid token, otherwise say when the next try is. A mass-rejection hold ends when the
/// provider is seen working again (a success in this process a lease span after the hold
/// was written), not only when its backoff runs out.
fn backing_off(record: &Record, cx: &Context<'_>, still_valid: bool) -> Option<Decision> {
    let valid = || Decision::ServeValid(record.tokens().access_token.clone());
    let hold_lifted = |cause: &BackoffCause| {
        *cause == BackoffCause::MassRejection
            && record
                .failures()
                .zip(cx.lifts_holds_before)
                .is_some_and(|(f, before)| before >= f.last_at)
    };
    if let State::Backoff { until, cause } = record.state()
        && cx.now < *until
        && !hold_lifted(cause)
    {
        if still_valid {
            return Some(valid());
        }
        return Some(Decision::Fail(deferred_error(
            record.id(),
            *cause,
            *until,
            record,
        )));
    }
    let (until, detail) = cx.breaker?;
    if still_valid {
        return Some(valid());
    }
    let cause = match detail.class {
        FailureClass::Configuration => BackoffCause::Configuration,
        _ => BackoffCause::ConsumerCredentialsInvalid,
    };
    Some(Decision::Fail(backoff_error(
        record.id(),
        cause,
        until,
        detail.clone(),
    )))
}

/// Another process is refreshing: use the valid token or wait for its result (even the
/// refresher waits rather than hand back an expired token: callers may have joined its
/// flight), or take over a lease watched silent for a whole TTL.
fn peer_refreshing(record: &Record, cx: &Context<'_>, still_valid: bool) -> Option<Decision> {
    let State::Refreshing { lease } = record.state() else {
        return None;
    };
    if lease.until <= cx.now {
        return None;
    }
    if still_valid {
        return Some(Decision::ServeValid(record.tokens().access_token.clone()));
    }
    if cx.silent == Some(record.version()) {
        return Some(Decision::TakeLease {
            takeover: true,
            watched: cx.silent,
            serve_valid: false,
        });
    }
    Some(Decision::WaitForPeer {
        holder: lease.holder.clone(),
    })
}

/// Refreshed less than the minimum interval ago: serve the still-valid token, otherwise say
/// when the next refresh is allowed.
fn refreshed_too_soon(record: &Record, cx: &Context<'_>, still_valid: bool) -> Option<Decision> {
    let retry_at = too_soon(record, cx)?;
    let tokens = record.tokens();
    if still_valid {
        return Some(Decision::ServeValid(tokens.access_token.clone()));
    }
    Some(Decision::Fail(Error::RefreshTooSoon {
        id: record.id().clone(),
        expires_at: tokens.expires_at,
        retry_at,
    }))
}

/// When the next refresh of `record` is allowed, if not now: one minimum interval after its
/// tokens were obtained. It guards against refresh storms from tokens a provider makes
/// shorter-lived than that (or expired at birth); an explicit or 401-forced refresh has rules
/// of its own. Tokens obtained "in the future" by this clock (a writer whose clock is ahead)
/// hold nothing off: the interval is not worth a wait as long as the clocks disagree.
pub fn too_soon(record: &Record, cx: &Context<'_>) -> Option<Timestamp> {
    let tokens = record.tokens();
    let obtained = tokens.obtained_at;
    let allowed = obtained.saturating_add(cx.min_refresh_interval);
    let active = matches!(record.state(), State::Active | State::Refreshing { .. });
    (active
        && tokens.refresh_token.is_some()
        && !matches!(cx.mode, Mode::Forced { .. })
        && obtained <= cx.now
        && cx.now < allowed)
        .then_some(allowed)
}

/// Why the provider's refusal of `record`'s refresh token condemns it: `ScopesChanged` for
/// `invalid_scope`; `RotatedTokenLost` when the profile rotates and either this flight took a
/// peer's lease over (the peer may have rotated the token and died before writing) or an
/// attempt of the current failure streak may have rotated it (its reply was lost, or a 5xx
/// came after sending) and, on a provider with a reuse leeway, that leeway has passed since
/// (inside it the provider would still accept the token, so a refusal there is not about a
/// rotation), or a late result revived the record after a peer's verdict (the peer may have
/// presented the retired token and made the provider revoke the grant); otherwise
/// `RefreshTokenRejected`.
pub fn rejection_reason(
    scope_rejected: bool,
    rotates: bool,
    takeover: bool,
    record: &Record,
    now: Timestamp,
    reuse_leeway: Option<std::time::Duration>,
) -> ReauthReason {
    let past_leeway =
        |since: Timestamp| reuse_leeway.is_none_or(|l| now >= since.saturating_add(l));
    let rotation_in_doubt = record.failures().is_some_and(|f| {
        f.revived_after_verdict.is_some()
            || [f.possibly_committed_since, f.server_error_since]
                .into_iter()
                .flatten()
                .any(past_leeway)
    });
    if scope_rejected {
        ReauthReason::ScopesChanged
    } else if rotates && (takeover || rotation_in_doubt) {
        ReauthReason::RotatedTokenLost
    } else {
        ReauthReason::RefreshTokenRejected
    }
}

/// When `record`'s refresh token stops working, and which limit says so: the earliest of the
/// provider's own word (`refresh_token_expires_in`), the profile's inactivity expiry since the
/// token was last used, and the profile's absolute expiry since the authorization. `None`
/// when nothing limits it (or there is no refresh token).
pub fn refresh_token_deadline(
    record: &Record,
    profile: &ProviderProfile,
) -> Option<(Timestamp, &'static str)> {
    record.tokens().refresh_token.as_ref()?;
    [
        record
            .tokens()
            .refresh_expires_at
            .map(|at| (at, "the expiry the provider gave it")),
        profile.refresh_inactivity_expiry.map(|limit| {
            (
                record.refresh_token_last_used().saturating_add(limit),
                "the provider's inactivity limit since it was last used",
            )
        }),
        profile.refresh_absolute_expiry.map(|limit| {
            (
                record.authorized_at().saturating_add(limit),
                "the provider's absolute limit since the authorization",
            )
        }),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|(at, _)| *at)
}

/// Why `record`'s refresh token must not be presented at `now`, if it must not, and since
/// when: there is none (`NoRefreshToken`, since the access token's expiry; the flight runs
/// only once the access token expired or the API refused it), or it expired by
/// [`refresh_token_deadline`] (`RefreshTokenExpired`: the provider would refuse it, so it is
/// recorded as expired rather than as a rejection).
pub fn unpresentable(
    record: &Record,
    profile: &ProviderProfile,
    mode: &Mode,
    now: Timestamp,
) -> Option<(ReauthReason, ErrorDetail, Timestamp)> {
    let detail = |text: String| ErrorDetail {
        description: Some(text),
        ..ErrorDetail::new(FailureClass::RefreshTokenRejected)
    };
    if record.tokens().refresh_token.is_none() {
        let text = if matches!(mode, Mode::Forced { .. }) {
            "the API refused the access token and the provider issued no refresh token to replace it".to_owned()
        } else {
            format!(
                "the access token expired at {} and the provider issued no refresh token to replace it",
                record.tokens().expires_at
            )
        };
        return Some((
            ReauthReason::NoRefreshToken,
            detail(text),
            record.tokens().expires_at,
        ));
    }
    let (deadline, why) = refresh_token_deadline(record, profile)?;
    (now >= deadline).then(|| {
        (
            ReauthReason::RefreshTokenExpired,
            detail(format!(
                "the refresh token expired at {deadline} by {why}; it was not presented"
            )),
            deadline,
        )
    })
}

/// The error of a terminal record (re-authorization required, revoked), if it is one.
pub(crate) fn terminal_error(record: &Record) -> Option<Error> {
    match record.state() {
        State::ReauthorizationRequired { reason, since } => Some(Error::ReauthorizationRequired {
            id: record.id().clone(),
            reason: *reason,
            since: *since,
            detail: record.last_error().cloned(),
        }),
        State::Revoked { at } => Some(Error::Revoked {
            id: record.id().clone(),
            at: *at,
        }),
        _ => None,
    }
}

fn deferred_error(
    id: &InstallationId,
    cause: BackoffCause,
    until: Timestamp,
    record: &Record,
) -> Error {
    let detail = record
        .last_error()
        .cloned()
        .unwrap_or_else(|| ErrorDetail::new(FailureClass::Transient));
    backoff_error(id, cause, until, detail)
}

/// The caller's error for a refresh deferred by `cause` until `retry_at`.
pub(crate) fn backoff_error(
    id: &InstallationId,
    cause: BackoffCause,
    retry_at: Timestamp,
    detail: ErrorDetail,
) -> Error {
    match cause {
        BackoffCause::ConsumerCredentialsInvalid => Error::ConsumerCredentials {
            id: id.clone(),
            retry_at,
            detail,
        },
        BackoffCause::Configuration => Error::Configuration {
            id: id.clone(),
            detail,
        },
        BackoffCause::MassRejection => Error::RefusalsHeld {
            id: id.clone(),
            retry_at,
            detail,
        },
        _ => Error::TemporarilyUnavailable {
            id: id.clone(),
            retry_at,
            detail,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokenkeeper_core::{Event, ReauthReason, Scopes, TokenSet};

    use super::*;

    const T0: Timestamp = Timestamp::from_unix_secs(1_800_000_000);

    fn at(secs: u64) -> Timestamp {
        T0.saturating_add(Duration::from_secs(secs))
    }

    /// An active record whose access token expires at T0 + 3600 s, due at T0 + 3000 s.
    fn active() -> Record {
        let tokens = TokenSet {
            access_token: AccessToken::new("a1"),
            refresh_token: Some(tokenkeeper_core::RefreshToken::new("r1")),
            token_type: "bearer".into(),
            expires_at: at(3600),
            scopes: Scopes::default(),
            obtained_at: T0,
            refresh_expires_at: None,
        };
        Record::new(
            InstallationId::new("i-1").unwrap(),
            "bitbucket/key",
            tokens,
            at(3000),
            T0,
        )
    }

    fn leased(record: &Record, until: Timestamp, now: Timestamp) -> Record {
        record
            .apply(
                Event::LeaseAcquired {
                    holder: LeaseHolder::new("peer"),
                    until,
                },
                now,
            )
            .unwrap()
    }

    fn cx(mode: &Mode, now: Timestamp) -> Context<'_> {
        Context {
            mode,
            now,
            // a 30 s skew margin
            stale_at: at(3570),
            breaker: None,
            consumer: "bitbucket/key",
            silent: None,
            forced_min_interval: Duration::ZERO,
            refresh_deadline: None,
            min_refresh_interval: std::time::Duration::ZERO,
            lifts_holds_before: None,
        }
    }

    #[test]
    fn a_401_on_a_token_younger_than_the_minimum_interval_forces_nothing() {
        let r = active();
        let mode = Mode::Forced {
            rejected: r.tokens().access_token.clone(),
            unauthorized: true,
        };
        let young = Context {
            forced_min_interval: Duration::from_secs(60),
            ..cx(&mode, at(59))
        };
        assert!(matches!(decide(&r, young), Decision::Fresh(_)));
        let old = Context {
            forced_min_interval: Duration::from_secs(60),
            ..cx(&mode, at(60))
        };
        assert!(matches!(decide(&r, old), Decision::TakeLease { .. }));
    }

    #[test]
    fn a_fresh_token_is_served_unless_forced_with_that_very_token() {
        let r = active();
        assert!(matches!(
            decide(&r, cx(&Mode::OnDemand, at(10))),
            Decision::Fresh(t) if t.secret() == "a1"
        ));
        // Proactive before the due time: nothing to do.
        assert!(matches!(
            decide(&r, cx(&Mode::Proactive, at(10))),
            Decision::Fresh(_)
        ));
        // Forced with another token: somebody already replaced the rejected one.
        let other = Mode::Forced {
            rejected: AccessToken::new("a0"),
            unauthorized: true,
        };
        assert!(matches!(decide(&r, cx(&other, at(10))), Decision::Fresh(_)));
        let same = Mode::Forced {
            rejected: AccessToken::new("a1"),
            unauthorized: false,
        };
        assert!(matches!(
            decide(&r, cx(&same, at(10))),
            Decision::TakeLease {
                takeover: false,
                watched: None,
                serve_valid: false
            }
        ));
    }

    #[test]
    fn due_or_stale_records_take_the_lease() {
        let r = active();
        assert!(matches!(
            decide(&r, cx(&Mode::Proactive, at(3000))),
            Decision::TakeLease {
                takeover: false,
                watched: None,
                serve_valid: true
            }
        ));
        assert!(matches!(
            decide(&r, cx(&Mode::OnDemand, at(3570))),
            Decision::TakeLease {
                takeover: false,
                watched: None,
                serve_valid: true
            }
        ));
        assert!(matches!(
            decide(&r, cx(&Mode::OnDemand, at(3600))),
            Decision::TakeLease {
                serve_valid: false,
                ..
            }
        ));
    }

    #[test]
    fn a_live_peer_lease_is_waited_for_or_its_valid_token_served() {
        let r = leased(&active(), at(3650), at(3560));
        // Still valid: serve it, do not wait.
        assert!(matches!(
            decide(&r, cx(&Mode::OnDemand, at(3580))),
            Decision::ServeValid(_)
        ));
        // Expired: wait for the peer.
        assert!(matches!(
            decide(&r, cx(&Mode::OnDemand, at(3610))),
            Decision::WaitForPeer { holder } if holder.to_string() == "peer"
        ));
        // The refresher waits too: an on-demand caller may have joined its flight, and must
        // not get an expired token (finding 10).
        assert!(matches!(
            decide(&r, cx(&Mode::Proactive, at(3610))),
            Decision::WaitForPeer { .. }
        ));
        // Lapsed: take it over.
        assert!(matches!(
            decide(&r, cx(&Mode::OnDemand, at(3650))),
            Decision::TakeLease {
                takeover: true,
                watched: None,
                ..
            }
        ));
    }

    #[test]
    fn a_lease_watched_silent_for_a_ttl_is_taken_over_at_the_watched_version() {
        let r = leased(&active(), at(3650), at(3560));
        let silent = |version| Context {
            silent: Some(version),
            ..cx(&Mode::OnDemand, at(3610))
        };
        // Live by its written expiry, but silent at this very version: take it over.
        assert!(matches!(
            decide(&r, silent(r.version())),
            Decision::TakeLease {
                takeover: true,
                watched: Some(v),
                serve_valid: false,
            } if v == r.version()
        ));
        // Silence watched at another version proves nothing about this one.
        assert!(matches!(
            decide(&r, silent(r.version() - 1)),
            Decision::WaitForPeer { .. }
        ));
        // A still-valid token is served rather than taking a peer's lease.
        let valid = Context {
            silent: Some(r.version()),
            ..cx(&Mode::OnDemand, at(3580))
        };
        assert!(matches!(decide(&r, valid), Decision::ServeValid(_)));
    }

    #[test]
    fn backoff_and_breaker_serve_a_valid_token_or_explain() {
        let r = leased(&active(), at(3650), at(3560));
        let backoff = r
            .apply(
                Event::RefreshDeferred {
                    fence: r.version(),
                    retry_at: at(4000),
                    cause: BackoffCause::Transient,
                    error: ErrorDetail::new(FailureClass::Transient),
                    commit: tokenkeeper_core::CommitEvidence::None,
                },
                at(3561),
            )
            .unwrap();
        assert!(matches!(
            decide(&backoff, cx(&Mode::OnDemand, at(3580))),
            Decision::ServeValid(_)
        ));
        assert!(matches!(
            decide(&backoff, cx(&Mode::OnDemand, at(3700))),
            Decision::Fail(Error::TemporarilyUnavailable { retry_at, .. }) if retry_at == at(4000)
        ));
        // Past the backoff: try again.
        assert!(matches!(
            decide(&backoff, cx(&Mode::OnDemand, at(4000))),
            Decision::TakeLease { .. }
        ));
        let detail = ErrorDetail::new(FailureClass::ConsumerCredentialsInvalid);
        let open = Context {
            breaker: Some((at(5000), &detail)),
            ..cx(&Mode::OnDemand, at(3700))
        };
        assert!(matches!(
            decide(&active(), open),
            Decision::Fail(Error::ConsumerCredentials { .. })
        ));
    }

    #[test]
    fn another_consumers_record_is_never_touched() {
        let r = active();
        let cx = Context {
            consumer: "bitbucket/another-key",
            ..cx(&Mode::OnDemand, at(3600))
        };
        assert!(matches!(
            decide(&r, cx),
            Decision::Fail(Error::ForeignConsumer { owner, .. }) if owner == "bitbucket/key"
        ));
    }

    #[test]
    fn terminal_records_fail_with_their_reason() {
        let r = leased(&active(), at(3650), at(3560));
        let dead = r
            .apply(
                Event::RefreshRejected {
                    fence: r.version(),
                    reason: ReauthReason::ScopesChanged,
                    error: None,
                },
                at(3561),
            )
            .unwrap();
        assert!(matches!(
            decide(&dead, cx(&Mode::OnDemand, at(10))),
            Decision::Fail(Error::ReauthorizationRequired {
                reason: ReauthReason::ScopesChanged,
                ..
            })
        ));
        let revoked = active().apply(Event::Revoked, at(5)).unwrap();
        assert!(matches!(
            decide(&revoked, cx(&Mode::Proactive, at(10))),
            Decision::Fail(Error::Revoked { .. })
        ));
    }
}
