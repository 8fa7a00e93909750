//! The refresh protocol of DESIGN.md §6, steps 3 to 7, run by one flight per installation.
//!
//! Re-read the record; use it if fresh; wait (bounded) for another process's live lease; take
//! the lease by compare-and-swap; call the token endpoint; **write the new tokens before
//! anyone uses them**; on a rejection re-read before condemning; on a transient failure keep
//! the tokens, back off and keep serving the still-valid access token. Every step is a
//! transition of the pure state machine written with the store's compare-and-swap, so a
//! writer that lost its lease fails its write whatever its clock says.

use std::time::Duration;

use tokenkeeper_core::{
    AccessToken, BackoffCause, CasOutcome, ErrorDetail, Event, FailureClass, InstallationId,
    LeaseHolder, ReauthReason, Record, State, StoreError,
};
use tracing::{Instrument, field};

use super::Inner;
use super::error::Error;
use super::events::LifecycleEventKind;
use super::flight::Outcome;
use crate::profile::Rotation;

/// Why a flight runs.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    /// A caller needs a token and the cached one is stale.
    OnDemand,
    /// The background refresher: refresh if the record is due.
    Proactive,
    /// The API rejected this access token (401): refresh unless it was already replaced.
    Forced { rejected: AccessToken },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Self::OnDemand => "on_demand",
            Self::Proactive => "proactive",
            Self::Forced { .. } => "forced",
        }
    }
}

enum Step {
    Done(Outcome),
    /// Re-read the record and start over.
    Again,
}

/// Runs one flight to completion, inside a `tokenkeeper.refresh` span.
pub(crate) async fn run(inner: &Inner, id: &InstallationId, mode: &Mode) -> Outcome {
    let span = tracing::info_span!(
        "tokenkeeper.refresh",
        installation = %id,
        mode = mode.name(),
        attempt = field::Empty,
        outcome = field::Empty,
    );
    async {
        let outcome = flight(inner, id, mode).await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(Error::ReauthorizationRequired { .. }) => "reauthorization_required",
            Err(Error::Revoked { .. }) => "revoked",
            Err(Error::TemporarilyUnavailable { .. }) => "temporarily_unavailable",
            Err(_) => "error",
        };
        tracing::Span::current().record("outcome", label);
        outcome
    }
    .instrument(span)
    .await
}

async fn flight(inner: &Inner, id: &InstallationId, mode: &Mode) -> Outcome {
    let wait_deadline = tokio::time::Instant::now() + inner.policy.peer_wait;
    let mut poll = Duration::from_millis(10);
    for attempt in 1u32.. {
        tracing::Span::current().record("attempt", attempt);
        let now = inner.clock.now();
        let record = match inner.store.get(id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                inner.cache.remove(id);
                return Err(Error::NotFound { id: id.clone() });
            }
            Err(e) => return Err(Error::store(id, e)),
        };
        if let Some(err) = terminal_error(&record) {
            inner.cache.remove(id);
            return Err(err);
        }
        let tokens = record.tokens();
        let stale_at = inner.policy.stale_at(tokens);
        let usable = now < stale_at;
        let needed = match mode {
            Mode::OnDemand => !usable,
            Mode::Proactive => !usable || record.due_at().is_some_and(|d| d <= now),
            Mode::Forced { rejected } => &tokens.access_token == rejected,
        };
        if !needed {
            inner.cache.put(&record, stale_at);
            return Ok(tokens.access_token.clone());
        }
        let still_valid = now < tokens.expires_at && !matches!(mode, Mode::Forced { .. });

        // Backing off: serve the still-valid token, otherwise say when the next try is.
        if let State::Backoff { until, cause } = record.state()
            && now < *until
        {
            if still_valid {
                return Ok(tokens.access_token.clone());
            }
            return Err(deferred_error(id, *cause, *until, &record));
        }
        // The consumer's credentials were refused moments ago: fail fast, touch nothing.
        if let Some((until, detail)) = inner.breaker_open(now) {
            if still_valid {
                return Ok(tokens.access_token.clone());
            }
            return Err(Error::ConsumerCredentials {
                id: id.clone(),
                retry_at: until,
                detail,
            });
        }
        // Another process is refreshing: use the valid token or wait for its result.
        if let State::Refreshing { lease } = record.state()
            && lease.until > now
        {
            if still_valid || matches!(mode, Mode::Proactive) {
                return Ok(tokens.access_token.clone());
            }
            if tokio::time::Instant::now() >= wait_deadline {
                return Err(Error::Busy {
                    id: id.clone(),
                    holder: lease.holder.to_string(),
                    waited: inner.policy.peer_wait,
                });
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(250));
            continue;
        }
        // Take the lease (a takeover if a lapsed lease is still recorded).
        let takeover = matches!(record.state(), State::Refreshing { .. });
        let holder = LeaseHolder::new(format!(
            "{}:{}",
            inner.process_tag,
            inner
                .flight_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let until = now.saturating_add(inner.policy.lease_ttl);
        let Ok(leased) = record.apply(Event::LeaseAcquired { holder, until }, now) else {
            continue;
        };
        match inner
            .store
            .compare_and_swap(&leased, record.version())
            .await
        {
            Ok(CasOutcome::Swapped) => {}
            Ok(CasOutcome::Conflict(_)) => continue,
            Ok(CasOutcome::Missing) => return Err(Error::NotFound { id: id.clone() }),
            Err(e) => return Err(Error::store(id, e)),
        }
        if takeover {
            tracing::warn!(
                "took over a lapsed refresh lease: its holder died or stalled mid-refresh"
            );
        }
        match exchange(inner, id, leased, takeover, still_valid).await {
            Step::Done(outcome) => return outcome,
            Step::Again => continue,
        }
    }
    unreachable!("the attempt counter is unbounded")
}

fn terminal_error(record: &Record) -> Option<Error> {
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
    until: tokenkeeper_core::Timestamp,
    record: &Record,
) -> Error {
    let detail = record
        .last_error()
        .cloned()
        .unwrap_or_else(|| ErrorDetail::new(FailureClass::Transient));
    deferred_error_from(id, cause, until, detail)
}

/// Whether the previous attempt may have reached the provider and lost its reply (a transport
/// failure or an unreadable 200): with a rotating provider, that attempt may have rotated the
/// refresh token we still hold.
fn reply_may_have_been_lost(record: &Record) -> bool {
    record
        .last_error()
        .is_some_and(|e| e.class == FailureClass::Transient && matches!(e.status, None | Some(200)))
        && record.failures().is_some()
}

/// Calls the provider under the lease and writes the result.
async fn exchange(
    inner: &Inner,
    id: &InstallationId,
    leased: Record,
    takeover: bool,
    serve_old: bool,
) -> Step {
    let fence = leased.version();
    let result = inner.client.refresh(id, leased.tokens()).await;
    let now = inner.clock.now();
    let old_access = leased.tokens().access_token.clone();
    match result {
        Ok(tokens) => {
            let refresh_at = inner.policy.refresh_at(&tokens, now);
            let next = match leased.apply(
                Event::Refreshed {
                    fence,
                    tokens,
                    refresh_at,
                },
                now,
            ) {
                Ok(next) => next,
                Err(e) => {
                    return Step::Done(Err(Error::Internal {
                        id: id.clone(),
                        reason: e.to_string(),
                    }));
                }
            };
            // Write before use: the rotated refresh token exists nowhere else.
            match write(inner, &next, fence).await {
                Ok(true) => {
                    let stale_at = inner.policy.stale_at(next.tokens());
                    inner.cache.put(&next, stale_at);
                    inner.emit(
                        id,
                        LifecycleEventKind::Refreshed {
                            expires_at: next.tokens().expires_at,
                        },
                    );
                    tracing::info!(expires_at = %next.tokens().expires_at, "refreshed");
                    Step::Done(Ok(next.tokens().access_token.clone()))
                }
                Ok(false) => {
                    tracing::error!(
                        "the refresh lease was lost before the new tokens were written; they are discarded (the lease TTL is too short for this provider's latency?)"
                    );
                    Step::Again
                }
                Err(e) => {
                    tracing::error!(error = %e, "the new tokens could not be written; they are discarded");
                    Step::Done(Err(Error::store(id, e)))
                }
            }
        }
        Err(e) => {
            let detail = e.to_detail();
            tracing::warn!(class = %e.class(), error = %e, "refresh failed");
            match e.class() {
                FailureClass::RefreshTokenRejected | FailureClass::ScopeRejected => {
                    // Step 6: a peer may have rotated the token while we were not looking.
                    match inner.store.get(id).await {
                        Ok(Some(current)) if current.version() != fence => return Step::Again,
                        Ok(None) => return Step::Done(Err(Error::NotFound { id: id.clone() })),
                        Err(err) => return Step::Done(Err(Error::store(id, err))),
                        Ok(Some(_)) => {}
                    }
                    let rotates = matches!(
                        inner.client.consumer().profile().rotation,
                        Rotation::Rotates { .. }
                    );
                    let reason = if e.class() == FailureClass::ScopeRejected {
                        ReauthReason::ScopesChanged
                    } else if rotates && (takeover || reply_may_have_been_lost(&leased)) {
                        ReauthReason::RotatedTokenLost
                    } else {
                        ReauthReason::RefreshTokenRejected
                    };
                    condemn(inner, id, &leased, reason, detail, now).await
                }
                class => {
                    let transient = class == FailureClass::Transient;
                    if transient && inner.policy.budget_exhausted(&leased, now) {
                        let reason = ReauthReason::FailureBudgetExhausted;
                        return condemn(inner, id, &leased, reason, detail, now).await;
                    }
                    let (cause, retry_at) = match class {
                        FailureClass::ConsumerCredentialsInvalid => {
                            let until = now.saturating_add(inner.policy.consumer_breaker);
                            inner.trip_breaker(until, detail.clone());
                            (BackoffCause::ConsumerCredentialsInvalid, until)
                        }
                        FailureClass::Configuration => (
                            BackoffCause::Configuration,
                            now.saturating_add(inner.policy.backoff_max),
                        ),
                        _ => (
                            BackoffCause::Transient,
                            inner
                                .policy
                                .retry_at(now, leased.failures(), e.retry_after()),
                        ),
                    };
                    let event = Event::RefreshDeferred {
                        fence,
                        retry_at,
                        cause,
                        error: detail.clone(),
                    };
                    settle(inner, id, &leased, event, fence).await;
                    inner.emit(
                        id,
                        LifecycleEventKind::Backoff {
                            until: retry_at,
                            cause,
                            error: detail.clone(),
                        },
                    );
                    if serve_old && now < leased.tokens().expires_at {
                        return Step::Done(Ok(old_access));
                    }
                    Step::Done(Err(deferred_error_from(id, cause, retry_at, detail)))
                }
            }
        }
    }
}

fn deferred_error_from(
    id: &InstallationId,
    cause: BackoffCause,
    retry_at: tokenkeeper_core::Timestamp,
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
        _ => Error::TemporarilyUnavailable {
            id: id.clone(),
            retry_at,
            detail,
        },
    }
}

/// Ends the installation's life until a new authorization: records the rejection with the
/// provider's words, forgets the cached token and tells subscribers.
async fn condemn(
    inner: &Inner,
    id: &InstallationId,
    leased: &Record,
    reason: ReauthReason,
    detail: ErrorDetail,
    now: tokenkeeper_core::Timestamp,
) -> Step {
    let fence = leased.version();
    let event = Event::RefreshRejected {
        fence,
        reason,
        error: Some(detail.clone()),
    };
    settle(inner, id, leased, event, fence).await;
    inner.cache.remove(id);
    inner.emit(
        id,
        LifecycleEventKind::ReauthorizationRequired {
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

/// Records a failed attempt under the lease (best effort: if it cannot be written, the lease
/// lapses and the next flight retries).
async fn settle(inner: &Inner, id: &InstallationId, leased: &Record, event: Event, fence: u64) {
    let now = inner.clock.now();
    match leased.apply(event, now) {
        Ok(next) => {
            if let Err(e) = write(inner, &next, fence).await {
                tracing::warn!(installation = %id, error = %e, "could not record the failed refresh");
            }
        }
        Err(e) => {
            tracing::warn!(installation = %id, error = %e, "could not record the failed refresh")
        }
    }
}

/// Writes `next` over the leased version, retrying while the store is briefly unavailable.
/// Returns false if the lease was lost.
async fn write(inner: &Inner, next: &Record, fence: u64) -> Result<bool, StoreError> {
    let mut delay = Duration::from_millis(50);
    let deadline = tokio::time::Instant::now() + inner.policy.lease_ttl / 2;
    loop {
        match inner.store.compare_and_swap(next, fence).await {
            Ok(CasOutcome::Swapped) => return Ok(true),
            Ok(CasOutcome::Conflict(_) | CasOutcome::Missing) => return Ok(false),
            Err(StoreError::Unavailable { .. })
                if tokio::time::Instant::now() + delay < deadline =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}
