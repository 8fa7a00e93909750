//! The refresh protocol (see [the design document](crate::_documentation::design), "The refresh protocol"), run by one flight
//! per installation: a driver loop around the pure [`decide`] step, and one named handler per
//! way the provider can answer.
//!
//! Re-read the record; use it if fresh; wait (bounded) for another process's live lease; take
//! the lease by compare-and-swap; call the token endpoint; **write the new tokens before
//! anyone uses them** ([`on_refreshed`]); on a failure carry out the pure plan of
//! [`super::plan`] ([`on_failed`]): re-read before condemning a rejection, with the reason the
//! plan chose; on a transient failure keep the tokens, back off and keep serving the
//! still-valid access token ([`on_deferred`]). Every step is a transition of the
//! pure state machine written with the store's compare-and-swap, so a writer that lost its
//! lease fails its write whatever its clock says.

use std::time::Duration;

use tokenkeeper_core::{
    BackoffCause, CasOutcome, CommitEvidence, ErrorDetail, Event, FailureClass, InstallationId,
    LeaseHolder, ReauthReason, Record, RefreshToken, StoreError, Timestamp, TokenSet,
};
use tracing::{Instrument, field};

use super::Engine;
use super::cache::Insert;
use super::decide::{
    Context, Decision, Mode, backoff_error, decide, refresh_token_deadline, unpresentable,
};
use super::events::LocalEventKind;
use super::flight::Outcome;
use super::guard::{self, Verdict};
use super::lease::{HeldLease, Renewal, Watch};
use super::plan::{Failure, Plan, Rules, plan_failure, retired_past_leeway};
use super::retry::{applied, is_own_write};
use super::unsaved::UnsavedTokens;
use crate::error::Error;
use crate::oauth::error::OAuthError;

/// What a handler tells the driver.
enum Step {
    Done(Outcome),
    /// Re-read the record and decide again.
    Reread,
    /// The flight stalled under its lease and could not confirm it again, so it sent
    /// nothing: re-read, and if the lease is still this one, take it back at once.
    Unsent(LeaseHolder),
}

/// Runs one flight to completion, inside a `tokenkeeper.refresh` span.
pub(crate) async fn run(engine: &Engine, id: &InstallationId, mode: &Mode) -> Outcome {
    let span = tracing::info_span!(
        "tokenkeeper.refresh",
        installation = %id,
        mode = mode.name(),
        attempt = field::Empty,
        outcome = field::Empty,
    );
    async {
        let outcome = drive(engine, id, mode).await;
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

/// The driver: read, decide, act, until a decision ends the flight.
async fn drive(engine: &Engine, id: &InstallationId, mode: &Mode) -> Outcome {
    let wait_deadline = tokio::time::Instant::now() + engine.policy.peer_wait;
    let mut poll = Duration::from_millis(10);
    let mut watch = Watch::default();
    // A lease of this flight under which nothing was sent: not a peer's, no need to watch it
    // (and whether that lease was itself a takeover, whose doubt carries over).
    let mut unsent: Option<(LeaseHolder, bool)> = None;
    // Leases this drive wrote that the store did not make durable in time.
    let mut unconfirmed = 0u32;
    // This flight's place among the rotating refreshes in flight, once it has one.
    let mut permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
    for attempt in 1u32.. {
        tracing::Span::current().record("attempt", attempt);
        // The cache bound counts from when the read started, not from when it returned, and
        // the cache orders the read against its own changes by generation.
        let read = (engine.clock.now(), engine.cache.generation());
        let record = engine.load(id).await?;
        let now = engine.clock.now();
        let stale_at = engine.policy.stale_at(record.tokens());
        let breaker = engine.breaker_open(id, now);
        let silent = match record.state().lease() {
            Some(lease) if unsent.as_ref().is_some_and(|(h, _)| *h == lease.holder) => {
                Some(record.version())
            }
            _ => watch.silent_for(&record, engine.policy.lease_ttl),
        };
        match decide(
            &record,
            context(engine, &record, mode, now, &breaker, silent),
        ) {
            Decision::Fresh(token) => {
                engine
                    .cache
                    .put(&record, stale_at, read, cache_insert(mode));
                return Ok(token);
            }
            Decision::ServeValid(token) => return Ok(token),
            Decision::Fail(err) => {
                engine.cache.forget(id, Some(&record));
                return Err(err);
            }
            Decision::WaitForPeer { holder } => {
                permit = None;
                if tokio::time::Instant::now() >= wait_deadline {
                    return Err(Error::Busy {
                        id: id.clone(),
                        holder: holder.to_string(),
                        waited: engine.policy.peer_wait,
                    });
                }
                tokio::time::sleep(poll).await;
                poll = (poll * 2).min(Duration::from_millis(250));
            }
            Decision::TakeLease {
                takeover,
                watched,
                serve_valid,
            } => {
                engine.restore_done().await;
                // Held results land before anything is presented (read again after a
                // restore); a result of this installation the store still refuses keeps its
                // retired refresh token from being presented.
                if engine.restore_waiting(id).await? {
                    continue;
                }
                if permit.is_none() && !rotation_permit(engine, &mut permit).await {
                    continue; // waited for a place: read again (a peer may have refreshed)
                }
                // Counted until its last write, so shutdown() can wait for it.
                let Some(_in_flight) = engine.in_flight.enter() else {
                    return Err(Error::ShuttingDown { id: id.clone() });
                };
                let lapsed = record.state().lease().map(|l| l.holder.clone());
                let takeover = takeover_evidence(engine, lapsed.as_ref(), unsent.take(), takeover);
                let mut held = match take_lease(engine, &record, now, watched).await {
                    Ok(Taken::Held(held)) => *held,
                    Ok(Taken::Lost) => continue,
                    // Applied without the store's durability (a replica did not confirm it in
                    // time): not acted on, but not a failure either. The next read finds it
                    // this drive's own unsent lease and takes it over by a write that must be
                    // confirmed in its turn (or finds the failover undid it).
                    Err(e) if e.is_not_durable() && unconfirmed < MAX_UNCONFIRMED => {
                        unconfirmed += 1;
                        if let Some(holder) = e.holder {
                            unsent = Some((holder, takeover));
                        }
                        continue;
                    }
                    Err(e) => return Err(e.error),
                };
                if let Some(l) = &lapsed {
                    engine.quiet_leases.forget(l);
                }
                if takeover {
                    held.mark_doubt();
                    tracing::warn!(
                        silent_for_a_ttl = watched.is_some(),
                        "took over a peer's refresh lease: its holder died or stalled mid-refresh"
                    );
                }
                match exchange(engine, id, mode, held, takeover, serve_valid).await {
                    Step::Done(outcome) => return outcome,
                    Step::Reread => continue,
                    Step::Unsent(holder) => unsent = Some((holder, takeover)),
                }
            }
        }
    }
    unreachable!("the attempt counter is unbounded")
}

/// Takes a place among this process's rotating refreshes in flight
/// (`RefreshPolicy::max_rotations_in_flight`) into `permit`: true when one was free at once
/// (or no bound applies); false after waiting for one, without a lease, so the caller reads
/// the record again.
async fn rotation_permit(
    engine: &Engine,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> bool {
    let Some(places) = &engine.rotations else {
        return true;
    };
    if let Ok(p) = places.clone().try_acquire_owned() {
        *permit = Some(p);
        return true;
    }
    tracing::debug!("at the bound of rotating refreshes in flight: waiting without a lease");
    *permit = places.clone().acquire_owned().await.ok();
    false
}

/// Whether taking the `lapsed` lease over is evidence that something may have rotated under
/// it. A lapsed lease of this process's own under which nothing rotated (this drive's
/// `unsent` one, or one noted quiet) is not; one that was itself a takeover still is.
fn takeover_evidence(
    engine: &Engine,
    lapsed: Option<&LeaseHolder>,
    unsent: Option<(LeaseHolder, bool)>,
    takeover: bool,
) -> bool {
    match (unsent, lapsed) {
        (Some((h, was_takeover)), Some(l)) if h == *l => was_takeover,
        (_, Some(l)) if engine.quiet_leases.contains(l) => false,
        _ => takeover,
    }
}

/// Callers' flights cache what they get; the background refresher only updates tokens that
/// callers already use, so it never fills the cache with installations nobody asked for.
fn cache_insert(mode: &Mode) -> Insert {
    match mode {
        Mode::Proactive => Insert::OnlyUpdate,
        Mode::OnDemand | Mode::Forced { .. } => Insert::Yes,
    }
}

/// What `decide` needs besides the record, at `now`, with the breaker as read.
fn context<'a>(
    engine: &'a Engine,
    record: &Record,
    mode: &'a Mode,
    now: Timestamp,
    breaker: &'a Option<(Timestamp, ErrorDetail)>,
    silent: Option<u64>,
) -> Context<'a> {
    Context {
        mode,
        now,
        stale_at: engine.policy.stale_at(record.tokens()),
        breaker: breaker.as_ref().map(|(until, detail)| (*until, detail)),
        consumer: &engine.consumer,
        silent,
        forced_min_interval: engine.policy.forced_refresh_min_interval,
        refresh_deadline: refresh_token_deadline(record, engine.client.consumer().profile())
            .map(|(at, _)| at),
        min_refresh_interval: engine.policy.min_refresh_interval,
        lifts_holds_before: engine
            .guard
            .last_success()
            .map(|ok| ok.saturating_sub(engine.policy.lease_ttl + engine.policy.lease_margin)),
    }
}

/// Whether a proactive flight over `record` would take its lease now (the refresher's look
/// before it spends a rate slot): the very decision the flight will make, not a copy of it.
pub(super) fn would_take_lease(engine: &Engine, record: &Record) -> bool {
    let now = engine.clock.now();
    let breaker = engine.breaker_open(record.id(), now);
    let cx = context(engine, record, &Mode::Proactive, now, &breaker, None);
    matches!(decide(record, cx), Decision::TakeLease { .. })
}

/// How many leases a drive writes that the store does not confirm durable before it gives up.
const MAX_UNCONFIRMED: u32 = 3;

/// How taking a lease went.
enum Taken {
    Held(Box<HeldLease>),
    /// Somebody wrote first: re-read.
    Lost,
}

/// A lease write that failed, with this flight's holder when the store may hold it.
struct LeaseError {
    error: Error,
    holder: Option<LeaseHolder>,
}

impl LeaseError {
    fn is_not_durable(&self) -> bool {
        matches!(&self.error, Error::Store { source, .. } if source.is_not_durable())
    }
}

/// Takes the refresh lease by compare-and-swap (over a silent peer's lease when `watched`
/// names the version this flight watched).
async fn take_lease(
    engine: &Engine,
    record: &Record,
    now: Timestamp,
    watched: Option<u64>,
) -> Result<Taken, LeaseError> {
    let fail = |error, holder| LeaseError { error, holder };
    let id = record.id();
    let holder = LeaseHolder::new(format!(
        "{}:{}",
        engine.process_tag,
        engine
            .flight_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let quiet = holder.clone();
    let until = engine.policy.lease_until(now);
    let event = match watched {
        Some(watched) => Event::LeaseTakenOver {
            holder,
            until,
            watched,
        },
        None => Event::LeaseAcquired { holder, until },
    };
    let Ok(leased) = record.apply(event, now) else {
        return Ok(Taken::Lost);
    };
    let started = tokio::time::Instant::now();
    match engine
        .store
        .compare_and_swap(&leased, record.version())
        .await
    {
        Ok(CasOutcome::Swapped) => {
            if record.state().lease().is_some() {
                super::metrics::takeover(&engine.consumer_label);
            }
            Ok(Taken::Held(Box::new(HeldLease::new(
                leased,
                started,
                engine.policy.lease_ttl,
            ))))
        }
        Ok(CasOutcome::Conflict(_)) => {
            super::metrics::conflict(&engine.consumer_label, "lease");
            Ok(Taken::Lost)
        }
        Ok(CasOutcome::Missing) => Err(fail(Error::NotFound { id: id.clone() }, None)),
        // Applied, but the acknowledgement was lost: the lease is ours, confirmed no later
        // than when the write started.
        Err(e) if applied(engine, &leased, &e).await => {
            tracing::warn!(error = %e, "the store reported an error but holds this flight's lease");
            Ok(Taken::Held(Box::new(HeldLease::new(
                leased,
                started,
                engine.policy.lease_ttl,
            ))))
        }
        Err(e) => {
            // Perhaps applied all the same: nothing will be sent under it, whoever finds it.
            engine.quiet_leases.note(&quiet);
            Err(fail(Error::store(id, e), Some(quiet)))
        }
    }
}

/// Calls the provider under the lease and hands its answer to the matching handler.
async fn exchange(
    engine: &Engine,
    id: &InstallationId,
    mode: &Mode,
    mut held: HeldLease,
    takeover: bool,
    serve_valid: bool,
) -> Step {
    let profile = engine.client.consumer().profile();
    let rules = Rules {
        profile,
        policy: &engine.policy,
    };
    if let Some(since) = retired_past_leeway(held.record(), rules, engine.clock.now()) {
        // Presenting the previous token now would only trip the provider's reuse detection,
        // which revokes the whole grant: record the loss instead.
        let detail = ErrorDetail {
            description: Some(format!(
                "an attempt at {since} may have rotated the refresh token and lost the reply; the provider's reuse leeway has passed since, so the previous token was not presented"
            )),
            ..ErrorDetail::new(FailureClass::RefreshTokenRejected)
        };
        let now = engine.clock.now();
        return judge(
            engine,
            id,
            &mut held,
            ReauthReason::RotatedTokenLost,
            detail,
            now,
        )
        .await;
    }
    // No refresh token, or one past its expiry: the provider would only refuse it, so
    // nothing is presented. While the access token is valid (and the API has not refused it)
    // it is served and the installation falls due at its expiry; then the truthful reason is
    // recorded.
    let now = engine.clock.now();
    if let Some((reason, detail, deadline)) = unpresentable(held.record(), profile, mode, now) {
        let tokens = held.record().tokens().clone();
        let refused_by_api = matches!(
            mode,
            Mode::Forced {
                unauthorized: true,
                ..
            }
        );
        if refused_by_api {
            // The API refused the token itself: nothing to hold, nothing to serve.
            return condemn(engine, id, &mut held, reason, detail, now).await;
        }
        if now < tokens.expires_at {
            return serve_until_expiry(engine, &mut held, &tokens).await;
        }
        // Judged at its due time, an expiry is ordinary. Long overdue by this clock (a host
        // whose clock jumped ahead, a fleet back after months), it counts against the
        // mass-rejection guard like a refusal.
        let overdue = engine
            .policy
            .mass_rejection
            .as_ref()
            .is_some_and(|g| now.duration_since(deadline) > g.window);
        if overdue {
            return judge(engine, id, &mut held, reason, detail, now).await;
        }
        return condemn(engine, id, &mut held, reason, detail, now).await;
    }
    // Stalled since the lease was confirmed (a paused process, a slow store): a peer may be
    // about to take it over, so confirm it again before presenting the refresh token.
    let bound = super::policy::request_bound(engine.client.consumer());
    if !held.may_send(bound) {
        match held.renew(engine).await {
            Ok(Renewal::Renewed) if held.may_send(bound) => {}
            _ => {
                tracing::warn!(
                    "stalled after taking the refresh lease and could not confirm it again; the refresh token is not presented"
                );
                return match held.record().state().lease() {
                    Some(lease) => Step::Unsent(lease.holder.clone()),
                    None => Step::Reread,
                };
            }
        }
    }
    let current = held.record().tokens().clone();
    let sent = std::time::Instant::now();
    let result = held
        .while_working(engine, engine.client.refresh(id, &current))
        .await;
    super::metrics::refresh(
        &engine.consumer_label,
        result.as_ref().err().map(OAuthError::class),
        sent.elapsed(),
    );
    let now = engine.clock.now();
    match result {
        Ok(tokens) => on_refreshed(engine, id, mode, &mut held, tokens, now).await,
        Err(e) => {
            tracing::warn!(class = %e.class(), error = %e, "refresh failed");
            if e.commit_evidence() != CommitEvidence::None {
                held.mark_doubt();
            }
            on_failed(engine, id, &mut held, &e, (takeover, serve_valid), now).await
        }
    }
}

/// The provider rotated the tokens: write them before anyone uses them (the rotated refresh
/// token exists nowhere else), then cache, announce and serve them.
async fn on_refreshed(
    engine: &Engine,
    id: &InstallationId,
    mode: &Mode,
    held: &mut HeldLease,
    tokens: TokenSet,
    now: Timestamp,
) -> Step {
    let Some(presented) = held.record().tokens().refresh_token.clone() else {
        // Unreachable: the client refuses to refresh without a refresh token.
        return Step::Done(Err(Error::Internal {
            id: id.clone(),
            reason: "refreshed without a refresh token".into(),
        }));
    };
    let refresh_at = engine.policy.refresh_at(&tokens, now);
    let anomaly = reply_anomaly(engine, &presented, &tokens);
    // What the write lands is newer than anything this cache saw before it.
    let written = (now, engine.cache.generation());
    if let Some(anomaly) = &anomaly {
        tracing::error!(anomaly = %anomaly, "the provider's refresh reply is irregular; it is kept and the anomaly recorded");
    }
    match land(engine, held, presented, tokens, refresh_at, anomaly).await {
        Landed::Written(next) if next.tokens().access_token.secret().is_empty() => {
            // The rotated refresh token is stored; there is just no access token to serve.
            Step::Done(Err(Error::TemporarilyUnavailable {
                id: id.clone(),
                retry_at: now,
                detail: ErrorDetail {
                    description: Some(
                        "the provider rotated the refresh token but sent no access token; the new refresh token is stored and the next call refreshes again".into(),
                    ),
                    ..ErrorDetail::new(FailureClass::Transient)
                },
            }))
        }
        Landed::Written(next) => {
            engine.guard.succeeded(now);
            let stale_at = engine.policy.stale_at(next.tokens());
            engine
                .cache
                .put(&next, stale_at, written, cache_insert(mode));
            engine.emit(
                id,
                LocalEventKind::Refreshed {
                    expires_at: next.tokens().expires_at,
                },
            );
            tracing::info!(expires_at = %next.tokens().expires_at, "refreshed");
            Step::Done(Ok(next.tokens().access_token.clone()))
        }
        Landed::Superseded => {
            tracing::warn!(
                "a peer stored newer tokens while this refresh was in flight; its result is discarded"
            );
            Step::Reread
        }
        Landed::Failed(e) => Step::Done(Err(e)),
    }
}

/// What is irregular about a refresh reply that is kept anyway (the reply has already been
/// merged onto the previous tokens, so a missing refresh token shows as an unrotated one).
fn reply_anomaly(
    engine: &Engine,
    presented: &RefreshToken,
    tokens: &TokenSet,
) -> Option<ErrorDetail> {
    let mut notes = Vec::new();
    if engine.client.consumer().profile().rotation.rotates() && !tokens.rotated_from(presented) {
        notes.push(
            "the reply carried no new refresh token although this provider rotates them; the previous one is kept but the provider has likely retired it, so the next refresh may be refused",
        );
    }
    if tokens.access_token.secret().is_empty() {
        notes.push("the reply carried no access token");
    }
    if !tokens.token_type.eq_ignore_ascii_case("bearer") {
        notes.push("the reply's token type is not bearer");
    }
    (!notes.is_empty()).then(|| ErrorDetail {
        description: Some(notes.join("; ")),
        ..ErrorDetail::new(FailureClass::Configuration)
    })
}

/// How writing a refresh result ended.
enum Landed {
    /// Stored (under the lease, or on top of a peer's record as a late result).
    Written(Box<Record>),
    /// A peer holds newer tokens (or the installation was re-authorized, revoked or deleted):
    /// this result is obsolete.
    Superseded,
    /// Not written: the store refused for longer than `result_write_patience` (the tokens
    /// went to the unsaved-tokens sink), or the state machine refused the write.
    Failed(Error),
}

/// Writes a refresh result; never drops it while the stored record still holds the refresh
/// token this flight presented. Under the lease it is a `Refreshed` write; once the lease is
/// lost (a conflict), it is a `LateRefreshed` write on top of whatever is stored, which the
/// state machine accepts only while that record still holds `presented`. Store errors are
/// retried for `result_write_patience` (a short grace while shutting down), renewing the
/// lease meanwhile (so no peer takes it over and presents the rotated-away token); after that
/// the tokens go to the unsaved-tokens sink, as do rotated tokens that can no longer land (a
/// new grant is stored): they are live at the provider and exist nowhere else.
async fn land(
    engine: &Engine,
    held: &mut HeldLease,
    presented: RefreshToken,
    tokens: TokenSet,
    refresh_at: Timestamp,
    anomaly: Option<ErrorDetail>,
) -> Landed {
    let id = held.record().id().clone();
    let id = &id;
    let event = Event::Refreshed {
        fence: held.fence(),
        tokens: tokens.clone(),
        refresh_at,
        anomaly,
    };
    let under = held.record().state().lease().map(|l| l.holder.clone());
    let late = Event::LateRefreshed {
        presented: presented.clone(),
        tokens: tokens.clone(),
        refresh_at,
        obtained_under: under.clone(),
    };
    // What to write, and over which version; `None` until computed from the held lease.
    let mut pending: Option<(Record, u64)> = None;
    // Once the lease is lost, the result is a late one: no more renewals.
    let mut lease_lost = false;
    let mut retry = super::retry::Patience::new(engine, engine.policy.result_write_patience);
    // A write the store applied without its configured durability (a Redis `WAIT` shortfall)
    // may vanish in a failover even once we see it stored: then a copy goes to the unsaved
    // place as well (a restore sets it aside as obsolete if the write survived).
    let mut not_durable = false;
    let (last_error, last) = loop {
        let (next, expected) = match pending.take() {
            Some(p) if lease_lost || p.1 == held.record().version() => p,
            // First try, or the held record moved on (a renewal, or one of ours adopted).
            _ => match held.record().apply(event.clone(), engine.clock.now()) {
                Ok(next) => (next, held.record().version()),
                Err(e) => return Landed::Failed(Error::transition(id, e)),
            },
        };
        match engine.store.compare_and_swap(&next, expected).await {
            Ok(CasOutcome::Swapped) => return Landed::Written(Box::new(next)),
            Ok(CasOutcome::Missing) => return Landed::Superseded,
            // Our own write is there: the store applied it but reported a failure (e.g.
            // replicas did not confirm it in time).
            Ok(CasOutcome::Conflict(stored)) if is_own_write(&stored, &next) => {
                if not_durable && tokens.rotated_from(&presented) {
                    let why = "written, but without the store's configured durability at first";
                    sink(engine, id, (presented, under), tokens, why.to_owned()).await;
                }
                return Landed::Written(Box::new(next));
            }
            // One of our renewals landed unacknowledged: still our lease; recompute.
            Ok(CasOutcome::Conflict(stored)) if !lease_lost && held.adopt_if_ours(&stored) => {}
            Ok(CasOutcome::Conflict(stored)) => {
                match stored.apply(late.clone(), engine.clock.now()) {
                    Ok(revived) => {
                        tracing::warn!(
                            stored = %stored.state().kind(),
                            "the lease was lost before the result was written; the stored record still holds the presented refresh token, so the result lands on top of it"
                        );
                        pending = Some((revived, stored.version()));
                        lease_lost = true;
                    }
                    Err(_) => {
                        return obsolete(engine, id, &stored, (presented, under), tokens).await;
                    }
                }
            }
            Err(e) => {
                not_durable |= e.is_not_durable();
                if !retry.wait(&e).await {
                    break (e, next);
                }
                pending = Some((next, expected));
                if !lease_lost {
                    held.renew_if_due(engine).await;
                }
            }
        }
    };
    if applied(engine, &last, &last_error).await {
        return Landed::Written(Box::new(last));
    }
    if tokens.rotated_from(&presented) {
        tracing::error!(error = %last_error, "the store did not take the rotated tokens; handing them to the unsaved-tokens sink");
        sink(
            engine,
            id,
            (presented, under),
            tokens,
            last_error.to_string(),
        )
        .await;
    } else {
        // Nothing rotated: the stored refresh token still works; nothing to keep.
        tracing::warn!(error = %last_error, "the store did not take the refreshed access token; the stored refresh token still works");
    }
    Landed::Failed(Error::store(id, last_error))
}

/// A result the stored record refuses: revoked (its live tokens are revoked at the provider
/// too), or holding another refresh token (a peer rotated inside a reuse leeway, or a new
/// grant was stored). A rotated result is still live at the provider and stored nowhere
/// else, so it goes to the unsaved-tokens sink rather than vanishing.
async fn obsolete(
    engine: &Engine,
    id: &InstallationId,
    stored: &Record,
    obtained: (RefreshToken, Option<LeaseHolder>),
    tokens: TokenSet,
) -> Landed {
    if matches!(stored.state(), tokenkeeper_core::State::Revoked { .. }) {
        revoke_orphan(engine, id, &tokens).await;
    } else if tokens.rotated_from(&obtained.0) {
        tracing::warn!(
            stored = %stored.state().kind(),
            "the stored record holds another refresh token; this result's rotated tokens go to the unsaved-tokens sink"
        );
        let why =
            "the stored record holds another refresh token (a new grant, or a peer's rotation)";
        sink(engine, id, obtained, tokens, why.to_owned()).await;
    }
    Landed::Superseded
}

/// Hands rotated tokens that could not be stored to the unsaved-tokens place, with the
/// refresh token presented and the lease they were obtained under.
async fn sink(
    engine: &Engine,
    id: &InstallationId,
    (presented, obtained_under): (RefreshToken, Option<LeaseHolder>),
    tokens: TokenSet,
    error: String,
) {
    let unsaved = UnsavedTokens {
        installation: id.clone(),
        presented,
        obtained_under,
        tokens,
        at: engine.clock.now(),
        error,
    };
    engine.unsaved.keep(&engine.seal, unsaved).await;
    // The next flight puts it back before presenting anything (`restore.rs`).
    engine.unsaved_held();
}

/// The application revoked the installation while this flight's refresh was on its way: the
/// provider's new tokens are live but nowhere stored. Revoke them at the provider too (best
/// effort), or the grant would survive the revocation.
async fn revoke_orphan(engine: &Engine, id: &InstallationId, tokens: &TokenSet) {
    if let Err(e) = engine.client.revoke_tokens(Some(id), tokens).await {
        tracing::warn!(error = %e, "could not revoke the tokens of a refresh that raced the revocation");
    }
}

/// The attempt failed: plan the response ([`plan_failure`], pure) and carry it out. A refusal
/// of the grant is planned only after a re-read: a peer may have rotated the token while this
/// flight was not looking, and only a record still at this flight's fence is condemned.
async fn on_failed(
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
async fn judge(
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
async fn serve_until_expiry(engine: &Engine, held: &mut HeldLease, tokens: &TokenSet) -> Step {
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
async fn condemn(
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
    let mut retry = super::retry::Patience::new(engine, engine.policy.lease_ttl / 2);
    // What was last sent: kept across retries so our own applied write is recognisable.
    let mut sent: Option<Record> = None;
    loop {
        let expected = held.record().version();
        let next = match sent.take() {
            Some(next) if next.version() == expected.saturating_add(1) => next,
            _ => held
                .record()
                .apply(event.clone(), engine.clock.now())
                .map_err(|e| Error::transition(id, e))?,
        };
        match engine.store.compare_and_swap(&next, expected).await {
            Ok(CasOutcome::Swapped) => return Ok(()),
            Ok(CasOutcome::Missing) => return Err(Error::NotFound { id: id.clone() }),
            Ok(CasOutcome::Conflict(stored)) if is_own_write(&stored, &next) => return Ok(()),
            // One of our renewals landed unacknowledged: still our lease; recompute.
            Ok(CasOutcome::Conflict(stored)) if held.adopt_if_ours(&stored) => {}
            Ok(CasOutcome::Conflict(_)) => {
                super::metrics::conflict(&engine.consumer_label, "result");
                return Err(Error::LeaseLost { id: id.clone() });
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
