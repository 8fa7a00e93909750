//! The failure path of a flight: carry out the pure failure plan ([`super::plan`]):
//! condemn (through the mass-rejection guard), defer with the tokens kept, serve the access
//! token until it expires, or keep a configuration failure in this process. Every write goes
//! through [`settle`] under the flight's lease.

use tokenkeeper_core::{
    BackoffCause, CasOutcome, CommitEvidence, ErrorDetail, Event, FailureClass, InstallationId,
    ReauthReason, Record, StoreError, Timestamp, TokenSet,
};

use super::Step;
use super::decide::backoff_error;
use super::guard::{self, Verdict};
use super::lease::HeldLease;
use super::plan::{Failure, Plan, Rules, plan_failure};
use super::retry::{self, applied};
use super::writes::{SettleConflict, settle_conflict, settle_next};
use crate::error::Error;
use crate::manager::Engine;
use crate::manager::events::LocalEventKind;
use crate::oauth::OAuthError;

/// The attempt failed: plan the response ([`plan_failure`], pure) and carry it out. A refusal
/// of the grant is planned only after a re-read: a peer may have rotated the token while this
/// flight was not looking, and only a record still at this flight's fence is condemned.
pub(super) async fn on_failed(
    engine: &Engine,
    id: &InstallationId,
    held: &mut HeldLease,
    error: &OAuthError,
    (takeover, serve_valid): (bool, bool),
    now: Timestamp,
) -> Step {
    let class = error.class();
    if matches!(
        class,
        FailureClass::RefreshTokenRejected | FailureClass::ScopeRejected
    ) {
        match engine.load(id).await {
            Ok(current)
                if current.version() != held.record().version()
                    && !held.adopt_if_ours(&current) =>
            {
                return Step::Reread;
            }
            Ok(_) => {}
            Err(e) => return Step::Done(Err(e)),
        }
    }
    let failure = Failure {
        class,
        commit: error.commit_evidence(),
        retry_after: error.retry_after(),
        takeover,
        in_doubt: held.in_doubt(),
        jitter: fastrand::f64(),
    };
    let rules = Rules {
        profile: engine.client.consumer().profile(),
        policy: &engine.policy,
    };
    let detail = error.to_detail();
    match plan_failure(held.record(), &failure, rules, now) {
        Plan::Condemn(reason) => judge(engine, id, held, reason, detail, now).await,
        Plan::Defer { retry_at, commit } => {
            on_deferred(
                engine,
                id,
                held,
                detail,
                (retry_at, commit),
                serve_valid,
                now,
            )
            .await
        }
        Plan::ProcessLocal { cause, until } => {
            on_process_local(engine, id, held, (cause, until), detail, serve_valid, now).await
        }
    }
}

/// Condemns for `reason`, unless the mass-rejection guard says many installations were
/// condemned like this since the last successful refresh: then the installation is held in
/// `Backoff { MassRejection }` with its tokens, and tried again after a short wait (the
/// guard's window, at most `backoff_max`), so it recovers soon after the provider does.
/// Every condemnation of an incident goes through here: refusals, a spent failure budget, a
/// reuse leeway passed after lost replies, and expiries long overdue by this clock (a host
/// whose clock jumped ahead by months must not condemn the fleet).
pub(super) async fn judge(
    engine: &Engine,
    id: &InstallationId,
    held: &mut HeldLease,
    reason: ReauthReason,
    detail: ErrorDetail,
    now: Timestamp,
) -> Step {
    let guard = engine.policy.mass_rejection.as_ref();
    let Verdict::Hold {
        until,
        refused,
        since,
        ..
    } = guard_verdict(engine, id, now).await
    else {
        return condemn(engine, id, held, reason, detail, now).await;
    };
    // Each retry of one installation's hold comes twice as late as the one before (review
    // E14): the refused token is presented a handful of times in a day's hold, not every
    // window.
    let step = guard.map_or(engine.policy.backoff_max, |g| {
        g.window.min(engine.policy.backoff_max)
    });
    let held_before = held.record().failures().map_or(0, |f| f.held_refusals);
    let retry_at = until.min(now.saturating_add(step.saturating_mul(1 << held_before.min(16))));
    let mut detail = detail;
    let said = detail.description.take().unwrap_or_default();
    detail.description = Some(
        format!(
            "{said} [{}; held, not condemned: {refused} installations were condemned or refused since {since} without one successful refresh in between; held at most until {until}]",
            reason.describe()
        )
        .trim_start()
        .to_owned(),
    );
    let event = Event::RefreshDeferred {
        fence: held.fence(),
        retry_at,
        cause: BackoffCause::MassRejection,
        error: detail.clone(),
        commit: CommitEvidence::None,
    };
    if let Err(e) = settle(engine, held, event).await {
        note_quiet(engine, held);
        return Step::Done(Err(e));
    }
    engine.emit(
        id,
        LocalEventKind::Backoff {
            until: retry_at,
            cause: BackoffCause::MassRejection,
            error: detail.clone(),
        },
    );
    Step::Done(Err(backoff_error(
        id,
        BackoffCause::MassRejection,
        retry_at,
        detail,
    )))
}

/// The mass-rejection guard's verdict on one refusal, with the fleet consulted (review E2):
/// a hold that begins notes where the store's event log stands; a hold that ran out without
/// a success in this process is believed only if no process of the fleet refreshed since
/// then, and is otherwise held again (so is it when the log cannot be read).
async fn guard_verdict(engine: &Engine, id: &InstallationId, now: Timestamp) -> Verdict {
    let config = engine.policy.mass_rejection.as_ref();
    match engine.guard.refused(config, id, now) {
        Verdict::HoldOver { log_at_trip } => {
            let fleet = match &log_at_trip {
                Some(from) => {
                    guard::fleet_refreshed_since(engine.store.as_ref(), &engine.consumer, from)
                        .await
                }
                // Where the log stood is unknown (it could not be read then): look next time.
                None => Err(StoreError::unavailable(
                    "event log",
                    "read_events",
                    "where the log stood when the hold began is unknown (its head could not be read then)",
                )),
            };
            match fleet {
                Ok(false) => {
                    engine.guard.believe();
                    return Verdict::Condemn;
                }
                Ok(true) => tracing::warn!(
                    "other processes refreshed successfully during this process's whole mass-rejection hold: its refusals stay held (check this process's configuration and clock)"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not read the event log to see whether the fleet refreshed during the mass-rejection hold: the refusals stay held"
                ),
            }
            engine
                .guard
                .hold_again(now, engine.store.event_head().await.ok());
            note_hold_start(engine, engine.guard.refused(config, id, now)).await
        }
        verdict => note_hold_start(engine, verdict).await,
    }
}

/// A hold that begins with `verdict` notes where the store's event log stands.
async fn note_hold_start(engine: &Engine, verdict: Verdict) -> Verdict {
    if let Verdict::Hold { began: true, .. } = verdict
        && let Ok(log) = engine.store.event_head().await
    {
        engine.guard.began_at(log);
    }
    verdict
}

/// Gives the lease back without presenting anything: the access token is served until it
/// expires, and the installation falls due then (to be judged without a refresh token, or
/// with an expired one).
pub(super) async fn serve_until_expiry(
    engine: &Engine,
    held: &mut HeldLease,
    tokens: &TokenSet,
) -> Step {
    let event = Event::LeaseReleased {
        fence: held.fence(),
        refresh_at: tokens.expires_at,
    };
    if let Err(e) = settle(engine, held, event).await {
        // The lease lapses instead; the token is valid all the same.
        tracing::warn!(error = %e, "could not give the refresh lease back");
    }
    Step::Done(Ok(tokens.access_token.clone()))
}

/// A transient failure: keep the tokens, record the failure under the lease with the
/// planned retry time, and serve the still-valid access token when the flight may.
async fn on_deferred(
    engine: &Engine,
    id: &InstallationId,
    held: &mut HeldLease,
    detail: ErrorDetail,
    (retry_at, commit): (Timestamp, CommitEvidence),
    serve_valid: bool,
    now: Timestamp,
) -> Step {
    let leased = held.record().clone();
    let cause = BackoffCause::Transient;
    let event = Event::RefreshDeferred {
        fence: held.fence(),
        retry_at,
        cause,
        error: detail.clone(),
        commit,
    };
    if let Err(e) = settle(engine, held, event).await {
        // Not recorded: the lease lapses and the next flight retries. Nothing to announce.
        tracing::warn!(error = %e, "could not record the failed refresh");
        note_quiet(engine, held);
    } else {
        engine.emit(
            id,
            LocalEventKind::Backoff {
                until: retry_at,
                cause,
                error: detail.clone(),
            },
        );
    }
    if serve_valid && now < leased.tokens().expires_at {
        return Step::Done(Ok(leased.tokens().access_token.clone()));
    }
    Step::Done(Err(backoff_error(id, cause, retry_at, detail)))
}

/// The provider refused this process's own configuration (its client credentials, or the
/// form of its request), which says nothing about the installation. It stays in this process:
/// its consumer breaker fails its next refreshes fast (credentials), or this installation
/// alone is held back here (a malformed request). Nothing is written into the shared record,
/// where it would stop healthy processes from refreshing (review finding E11): the lease is
/// given back, due at once, for a healthy process to take.
async fn on_process_local(
    engine: &Engine,
    id: &InstallationId,
    held: &mut HeldLease,
    (cause, until): (BackoffCause, Timestamp),
    detail: ErrorDetail,
    serve_valid: bool,
    now: Timestamp,
) -> Step {
    match cause {
        // Credentials are the consumer's: every refresh of this process would be refused.
        BackoffCause::ConsumerCredentialsInvalid => engine.trip_breaker(until, detail.clone()),
        // A malformed request may be about this installation alone (an `invalid_request`):
        // only it is held back here, so one odd installation cannot stop the process, nor,
        // each process tripping in turn, the fleet.
        _ => engine.hold_back(id, until, detail.clone()),
    }
    let tokens = held.record().tokens().clone();
    let event = Event::LeaseReleased {
        fence: held.fence(),
        refresh_at: now,
    };
    if let Err(e) = settle(engine, held, event).await {
        // The lease lapses instead; nothing rotated under it.
        tracing::warn!(error = %e, "could not give the refresh lease back");
        note_quiet(engine, held);
    }
    engine.emit(
        id,
        LocalEventKind::Backoff {
            until,
            cause,
            error: detail.clone(),
        },
    );
    if serve_valid && now < tokens.expires_at {
        return Step::Done(Ok(tokens.access_token));
    }
    Step::Done(Err(backoff_error(id, cause, until, detail)))
}

/// The outcome of the attempt under `held` was not recorded: if nothing can have rotated
/// under it (no takeover, no attempt that may have been committed), a later takeover of it by
/// this process is no evidence of a lost rotation.
fn note_quiet(engine: &Engine, held: &HeldLease) {
    if let Some(lease) = held.record().state().lease()
        && !held.in_doubt()
    {
        engine.quiet_leases.note(&lease.holder);
    }
}

/// Ends the installation's life until a new authorization: records the rejection with the
/// provider's words, forgets the cached token and tells subscribers.
pub(super) async fn condemn(
    engine: &Engine,
    id: &InstallationId,
    held: &mut HeldLease,
    reason: ReauthReason,
    detail: ErrorDetail,
    now: Timestamp,
) -> Step {
    let event = Event::RefreshRejected {
        fence: held.fence(),
        reason,
        error: Some(detail.clone()),
    };
    engine.cache.forget(id, Some(held.record()));
    if let Err(e) = settle(engine, held, event).await {
        // Not recorded: say so. The lease lapses and the next flight tries again, knowing
        // that nothing rotated under it.
        note_quiet(engine, held);
        tracing::error!(error = %e, reason = reason.describe(), "the provider refused the grant but the store did not record it");
        return Step::Done(Err(e));
    }
    engine.emit(
        id,
        LocalEventKind::ReauthorizationRequired {
            reason,
            error: Some(detail.clone()),
        },
    );
    Step::Done(Err(Error::ReauthorizationRequired {
        id: id.clone(),
        reason,
        since: now,
        detail: Some(detail),
    }))
}

/// Records a failed attempt under the lease, renewing it while the store is unavailable. A
/// write the store applied but did not acknowledge counts as recorded (it is recognised on the
/// retry, or by one read after the last failure). A failure means it was not recorded (the
/// lease lapses and the next flight retries); the caller must not announce it.
async fn settle(engine: &Engine, held: &mut HeldLease, event: Event) -> Result<(), Error> {
    let id = held.record().id().clone();
    let id = &id;
    let mut retry = retry::Patience::new(engine, engine.policy.lease_ttl / 2);
    // What was last sent: kept across retries so our own applied write is recognisable.
    let mut sent: Option<Record> = None;
    loop {
        let expected = held.record().version();
        let next = settle_next(held.record(), &event, sent.take(), engine.clock.now())
            .map_err(|e| Error::transition(id, e))?;
        match engine.store.compare_and_swap(&next, expected).await {
            Ok(CasOutcome::Swapped) => return Ok(()),
            Ok(CasOutcome::Missing) => return Err(Error::NotFound { id: id.clone() }),
            Ok(CasOutcome::Conflict(stored)) => {
                match settle_conflict(held.record(), &next, &stored) {
                    SettleConflict::Written => return Ok(()),
                    // One of our renewals landed unacknowledged: still our lease; recompute.
                    SettleConflict::Adopt => {
                        held.adopt_if_ours(&stored);
                    }
                    SettleConflict::Lost => {
                        crate::manager::metrics::conflict(&engine.consumer_label, "result");
                        return Err(Error::LeaseLost { id: id.clone() });
                    }
                }
            }
            Err(e @ StoreError::Unavailable { .. }) if retry.wait(&e).await => {
                sent = Some(next);
                held.renew_if_due(engine).await;
            }
            Err(e) if applied(engine, &next, &e).await => {
                tracing::warn!(error = %e, "the store reported an error but holds the write");
                return Ok(());
            }
            Err(e) => return Err(Error::store(id, e)),
        }
    }
}
