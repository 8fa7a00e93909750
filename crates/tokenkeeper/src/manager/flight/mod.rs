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
//!
//! The room reads in this order: [`decide`] (the pure step) and [`plan`] (the pure failure
//! plan), this file (the driver: lease, exchange), `success.rs` (the result written before
//! use), `failure.rs` (condemn, hold, defer), then the pieces they use: `lease.rs` (the held
//! lease and its renewals), `single.rs` (one flight per installation in this process),
//! `guard.rs` (the mass-rejection guard), `retry.rs` (own writes after a lost
//! acknowledgement), `restore.rs` (held results put back before a lease) and `writes.rs`
//! (what each write sequence does after the store answered, and the lease timing: pure, and
//! shared with the model checker).

pub(crate) mod decide;
mod failure;
pub(crate) mod guard;
pub(crate) mod lease;
pub(crate) mod plan;
pub(crate) mod restore;
pub(crate) mod retry;
pub(crate) mod single;
mod success;
pub(crate) mod writes;

use std::time::Duration;

use tokenkeeper_core::{
    AccessToken, CasOutcome, CommitEvidence, ErrorDetail, Event, FailureClass, InstallationId,
    LeaseHolder, ReauthReason, Record, Timestamp,
};
use tracing::{Instrument, field};

use crate::error::Error;
use crate::manager::Engine;
use crate::manager::cache::Insert;
use crate::oauth::OAuthError;
use decide::{Context, Decision, Mode, decide, refresh_token_deadline, unpresentable};
use failure::{condemn, judge, on_failed, serve_until_expiry};
use lease::{HeldLease, Renewal, Watch};
use plan::{Rules, retired_past_leeway};
use retry::applied;
use single::Outcome;
use success::on_refreshed;

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
    let mut driver = Driver::new(engine, id, mode);
    for attempt in 1u32.. {
        tracing::Span::current().record("attempt", attempt);
        if let Some(token) = driver.pass().await? {
            return Ok(token);
        }
    }
    unreachable!("the attempt counter is unbounded")
}

/// What the driver keeps from one pass to the next.
struct Driver<'a> {
    engine: &'a Engine,
    id: &'a InstallationId,
    mode: &'a Mode,
    wait_deadline: tokio::time::Instant,
    poll: Duration,
    watch: Watch,
    /// A lease of this flight under which nothing was sent: not a peer's, no need to watch
    /// it (and whether that lease was itself a takeover, whose doubt carries over).
    unsent: Option<(LeaseHolder, bool)>,
    /// Leases this drive wrote that the store did not make durable in time.
    unconfirmed: u32,
    /// This flight's place among the rotating refreshes in flight, once it has one.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// A read to decide on again instead of reading anew (with when it started and the
    /// cache's generation then): the one this flight made before it waited for its place.
    reuse: Option<(Record, (Timestamp, u64))>,
}

impl<'a> Driver<'a> {
    fn new(engine: &'a Engine, id: &'a InstallationId, mode: &'a Mode) -> Self {
        Self {
            engine,
            id,
            mode,
            wait_deadline: tokio::time::Instant::now() + engine.policy.peer_wait,
            poll: Duration::from_millis(10),
            watch: Watch::default(),
            unsent: None,
            unconfirmed: 0,
            permit: None,
            reuse: None,
        }
    }

    /// One read and decision, and what it calls for: a token (the flight ends), or `None`
    /// (read again).
    async fn pass(&mut self) -> Result<Option<AccessToken>, Error> {
        let engine = self.engine;
        // The cache bound counts from when the read started, not from when it returned, and
        // the cache orders the read against its own changes by generation.
        let reused = self.reuse.is_some();
        let (record, read) = match self.reuse.take() {
            Some(kept) => kept,
            None => {
                let read = (engine.clock.now(), engine.cache.generation());
                (engine.load(self.id).await?, read)
            }
        };
        let now = engine.clock.now();
        let breaker = engine.breaker_open(self.id, now);
        let silent = match record.state().lease() {
            Some(lease)
                if self
                    .unsent
                    .as_ref()
                    .is_some_and(|(h, _)| *h == lease.holder) =>
            {
                Some(record.version())
            }
            _ => self.watch.silent_for(&record, engine.policy.lease_ttl),
        };
        let cx = context(engine, &record, self.mode, now, &breaker, silent);
        let decision = decide(&record, cx);
        if reused && !matches!(decision, Decision::TakeLease { .. }) {
            // Only a lease (a compare-and-swap on that read's version) may act on the read
            // from before the wait: serving, caching or failing waits for a fresh one (the
            // breaker may have opened meanwhile while a peer revoked the installation).
            return Ok(None);
        }
        match decision {
            Decision::Fresh(token) => {
                let stale_at = engine.policy.stale_at(record.tokens());
                let insert = cache_insert(self.mode);
                engine.cache.put(&record, stale_at, read, insert);
                Ok(Some(token))
            }
            Decision::ServeValid(token) => Ok(Some(token)),
            Decision::Fail(err) => {
                engine.cache.forget(self.id, Some(&record));
                Err(err)
            }
            Decision::WaitForPeer { holder } => self.wait_for_peer(holder).await,
            Decision::TakeLease {
                takeover,
                watched,
                serve_valid,
            } => {
                let lease = Lease {
                    takeover,
                    watched,
                    serve_valid,
                };
                self.fly(&record, read, now, lease).await
            }
        }
    }

    /// A live peer holds the lease: wait a little (backing off), within `peer_wait`.
    async fn wait_for_peer(&mut self, holder: LeaseHolder) -> Result<Option<AccessToken>, Error> {
        self.permit = None;
        if tokio::time::Instant::now() >= self.wait_deadline {
            return Err(Error::Busy {
                id: self.id.clone(),
                holder: holder.to_string(),
                waited: self.engine.policy.peer_wait,
            });
        }
        tokio::time::sleep(self.poll).await;
        self.poll = (self.poll * 2).min(Duration::from_millis(250));
        Ok(None)
    }

    /// Takes the lease and exchanges the refresh token, once held results are put back and
    /// this flight has its place among the rotating refreshes in flight.
    async fn fly(
        &mut self,
        record: &Record,
        read: (Timestamp, u64),
        now: Timestamp,
        lease: Lease,
    ) -> Result<Option<AccessToken>, Error> {
        let (engine, id) = (self.engine, self.id);
        engine.restore_done().await;
        // Held results land before anything is presented (read again after a restore); a
        // result of this installation the store still refuses keeps its retired refresh
        // token from being presented.
        if engine.restore_waiting(id).await? {
            return Ok(None);
        }
        if self.permit.is_none() && !rotation_permit(engine, &mut self.permit).await {
            // Waited for a place: decide again (the time has moved) on the same read. No
            // second read: the lease is a compare-and-swap on this version, so what a peer
            // wrote meanwhile (a refresh, its own lease) makes it a conflict, read then.
            self.reuse = Some((record.clone(), read));
            return Ok(None);
        }
        // Counted until its last write, so shutdown() can wait for it.
        let Some(_in_flight) = engine.in_flight.enter() else {
            return Err(Error::ShuttingDown { id: id.clone() });
        };
        let lapsed = record.state().lease().map(|l| l.holder.clone());
        let takeover =
            takeover_evidence(engine, lapsed.as_ref(), self.unsent.take(), lease.takeover);
        let Some(mut held) = self.hold(record, now, lease.watched, takeover).await? else {
            return Ok(None);
        };
        if let Some(l) = &lapsed {
            engine.quiet_leases.forget(l);
        }
        if takeover {
            held.mark_doubt();
            tracing::warn!(
                silent_for_a_ttl = lease.watched.is_some(),
                "took over a peer's refresh lease: its holder died or stalled mid-refresh"
            );
        }
        match exchange(engine, id, self.mode, held, takeover, lease.serve_valid).await {
            Step::Done(outcome) => outcome.map(Some),
            Step::Reread => Ok(None),
            Step::Unsent(holder) => {
                self.unsent = Some((holder, takeover));
                Ok(None)
            }
        }
    }

    /// Writes the lease: held, or `None` to read again (somebody wrote first, or the store
    /// did not make it durable in time).
    async fn hold(
        &mut self,
        record: &Record,
        now: Timestamp,
        watched: Option<u64>,
        takeover: bool,
    ) -> Result<Option<HeldLease>, Error> {
        match take_lease(self.engine, record, now, watched).await {
            Ok(Taken::Held(held)) => Ok(Some(*held)),
            Ok(Taken::Lost) => Ok(None),
            // Applied without the store's durability (a replica did not confirm it in time):
            // not acted on, but not a failure either. The next read finds it this drive's own
            // unsent lease and takes it over by a write that must be confirmed in its turn (or
            // finds the failover undid it).
            Err(e) if e.is_not_durable() && self.unconfirmed < MAX_UNCONFIRMED => {
                self.unconfirmed += 1;
                if let Some(holder) = e.holder {
                    self.unsent = Some((holder, takeover));
                }
                Ok(None)
            }
            Err(e) => Err(e.error),
        }
    }
}

/// What `decide` said about the lease to take.
struct Lease {
    takeover: bool,
    watched: Option<u64>,
    serve_valid: bool,
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
                crate::manager::metrics::takeover(&engine.consumer_label);
            }
            Ok(Taken::Held(Box::new(HeldLease::new(
                leased,
                started,
                engine.policy.lease_ttl,
            ))))
        }
        Ok(CasOutcome::Conflict(_)) => {
            crate::manager::metrics::conflict(&engine.consumer_label, "lease");
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
    if let Some(step) = withhold(engine, id, mode, &mut held).await {
        return step;
    }
    if let Some(step) = confirm_before_sending(engine, &mut held).await {
        return step;
    }
    let current = held.record().tokens().clone();
    let sent = std::time::Instant::now();
    let result = held
        .while_working(engine, engine.client.refresh(id, &current))
        .await;
    crate::manager::metrics::refresh(
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

/// What the flight does instead of presenting the refresh token when presenting it could
/// only fail or harm: `None` when it may be presented.
async fn withhold(
    engine: &Engine,
    id: &InstallationId,
    mode: &Mode,
    held: &mut HeldLease,
) -> Option<Step> {
    let profile = engine.client.consumer().profile();
    let rules = Rules {
        profile,
        policy: &engine.policy,
    };
    let now = engine.clock.now();
    if let Some(since) = retired_past_leeway(held.record(), rules, now) {
        // Presenting the previous token now would only trip the provider's reuse detection,
        // which revokes the whole grant: record the loss instead.
        let detail = ErrorDetail {
            description: Some(format!(
                "an attempt at {since} may have rotated the refresh token and lost the reply; the provider's reuse leeway has passed since, so the previous token was not presented"
            )),
            ..ErrorDetail::new(FailureClass::RefreshTokenRejected)
        };
        let reason = ReauthReason::RotatedTokenLost;
        return Some(judge(engine, id, held, reason, detail, now).await);
    }
    let unpresentable = unpresentable(held.record(), profile, mode, now)?;
    Some(on_unpresentable(engine, id, mode, held, unpresentable, now).await)
}

/// No refresh token, or one past its expiry: the provider would only refuse it, so nothing
/// is presented. While the access token is valid (and the API has not refused it) it is
/// served and the installation falls due at its expiry; then the truthful reason is
/// recorded.
async fn on_unpresentable(
    engine: &Engine,
    id: &InstallationId,
    mode: &Mode,
    held: &mut HeldLease,
    (reason, detail, deadline): (ReauthReason, ErrorDetail, Timestamp),
    now: Timestamp,
) -> Step {
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
        return condemn(engine, id, held, reason, detail, now).await;
    }
    if now < tokens.expires_at {
        return serve_until_expiry(engine, held, &tokens).await;
    }
    // Judged at its due time, an expiry is ordinary. Long overdue by this clock (a host whose
    // clock jumped ahead, a fleet back after months), it counts against the mass-rejection
    // guard like a refusal.
    let overdue = engine
        .policy
        .mass_rejection
        .as_ref()
        .is_some_and(|g| now.duration_since(deadline) > g.window);
    if overdue {
        return judge(engine, id, held, reason, detail, now).await;
    }
    condemn(engine, id, held, reason, detail, now).await
}

/// Stalled since the lease was confirmed (a paused process, a slow store): a peer may be
/// about to take it over, so the lease is confirmed again before the refresh token is
/// presented; `Some` when it cannot be, and nothing is sent.
async fn confirm_before_sending(engine: &Engine, held: &mut HeldLease) -> Option<Step> {
    let bound = crate::manager::policy::request_bound(engine.client.consumer());
    if held.may_send(bound) {
        return None;
    }
    if matches!(held.renew(engine).await, Ok(Renewal::Renewed)) && held.may_send(bound) {
        return None;
    }
    tracing::warn!(
        "stalled after taking the refresh lease and could not confirm it again; the refresh token is not presented"
    );
    Some(match held.record().state().lease() {
        Some(lease) => Step::Unsent(lease.holder.clone()),
        None => Step::Reread,
    })
}
