//! Every write the engine makes recognises its own applied write after a lost
//! acknowledgement (a timeout after the server committed, a `WAIT` shortfall, a connection
//! dropped after commit) and then behaves as if the acknowledgement had arrived: the lease is
//! used, the failure is recorded and announced, the new installation is reported created
//! (review findings E5, E6, E8 and E12). The store applies each write and reports
//! `Unavailable` ([`FaultKind::LostAck`]) for one event kind at a time: the lease
//! (`LeaseAcquired`, `LeaseTakenOver`), the result (`Refreshed`, and `LateRefreshed` after the
//! lease was lost), the failure (`RefreshRejected`, `RefreshDeferred`), the install
//! (`Created`, `Authorized`) and the application's revocation (`Revoked`), each on every store:
//! memory, SQLite on disk, the test redis-server and the test PostgreSQL server
//! ([`on_every_store!`]). The renewal (`LeaseRenewed`) is in `lease.rs`; a real Redis `WAIT`
//! shortfall is in the Redis and PostgreSQL crates' own tests.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokenkeeper::core::EventKind;
use tokenkeeper::{Error, core::ReauthReason, core::StateKind, events::LocalEventKind, profiles};
use tokenkeeper_memory::MemoryStore;
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};
use tokenkeeper_testkit::backend::Backend;
use tokenkeeper_testkit::wrappers::{FaultKind, FaultSwitch, FaultTarget, FlakyStore, GatedStore};

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);

/// Generates one test per store from `async fn $scenario(backend: Backend)`: a module named
/// after the scenario with `memory`, `sqlite`, `redis` and `postgres` tests.
macro_rules! on_every_store {
    ($scenario:ident) => {
        mod $scenario {
            use tokenkeeper_testkit::backend::Backend;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$scenario(Backend::Memory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario(Backend::fresh_sqlite("own_writes")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$scenario(Backend::fresh_redis("own_writes")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario(Backend::fresh_postgres("own_writes")).await;
            }
        }
    };
}

/// A bitbucket fixture on a flaky `backend` store, with one installation due.
async fn due_on(backend: Backend) -> (Fixture, Arc<FaultSwitch>, tokenkeeper::InstallationId) {
    due_on_tuned(backend, |_| {}).await
}

/// [`due_on`] with the policy tuned.
async fn due_on_tuned(
    backend: Backend,
    tune: fn(&mut tokenkeeper::policy::RefreshPolicy),
) -> (Fixture, Arc<FaultSwitch>, tokenkeeper::InstallationId) {
    let (store, switch) = FlakyStore::flaky(backend.open().await);
    let f = Fixture::tuned(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
        tune,
    )
    .await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    moves_time_on_lost_acks(&f, &switch);
    (f, switch, id)
}

/// Every lost acknowledgement takes a second of the fixture's clock, as a real timeout takes
/// time: a writer that recomputed its record for the retry (instead of resending what it
/// sent) would then write a different record and not recognise its own.
fn moves_time_on_lost_acks(f: &Fixture, switch: &FaultSwitch) {
    let clock = f.clock.clone();
    switch.after_lost_ack(move || clock.advance(Duration::from_secs(1)));
}

/// E6: the lease write was applied but its acknowledgement lost. The flight recognises its
/// own lease and refreshes (no orphan lease blocking the installation for a TTL).
async fn a_lease_whose_acknowledgement_was_lost_is_used(backend: Backend) {
    let (f, switch, id) = due_on(backend).await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::LeaseAcquired),
        FaultKind::LostAck,
    );
    let token = f
        .manager
        .access_token(&id)
        .await
        .expect("the flight recognises its own lease");
    assert!(switch.injected() >= 1, "the fault was injected");
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::Active);
    assert_eq!(record.tokens().access_token, token);
    let c = f.mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (1, 0), "{c:?}");
}
on_every_store!(a_lease_whose_acknowledgement_was_lost_is_used);

/// E6, the consequence: after a lost lease acknowledgement, a grant the user revoked is
/// explained as a revocation, not as a lost rotation (nothing was ever sent under the lease).
async fn a_revocation_after_a_lost_lease_acknowledgement_is_explained_as_one(backend: Backend) {
    let (f, switch, id) = due_on(backend).await;
    let current = f.record(&id).await.tokens().access_token.clone();
    f.mock.revoke_grant_of(current.secret()).unwrap();
    switch.fail(
        FaultTarget::WritesOf(EventKind::LeaseAcquired),
        FaultKind::LostAck,
    );
    match f.manager.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RefreshTokenRejected,
            ..
        }) => {}
        other => panic!("expected RefreshTokenRejected, got {other:?}"),
    }
}
on_every_store!(a_revocation_after_a_lost_lease_acknowledgement_is_explained_as_one);

/// E5: the provider refused the grant and the store recorded the condemnation but lost the
/// acknowledgement. The caller hears the condemnation and subscribers are told.
async fn a_condemnation_whose_acknowledgement_was_lost_is_reported_and_announced(backend: Backend) {
    let (f, switch, id) = due_on(backend).await;
    let current = f.record(&id).await.tokens().access_token.clone();
    f.mock.revoke_grant_of(current.secret()).unwrap();
    let mut events = f.manager.subscribe();
    switch.fail(
        FaultTarget::WritesOf(EventKind::RefreshRejected),
        FaultKind::LostAck,
    );
    match f.manager.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RefreshTokenRejected,
            ..
        }) => {}
        other => panic!("the recorded condemnation is reported: {other:?}"),
    }
    assert_eq!(
        f.record(&id).await.state().kind(),
        StateKind::ReauthorizationRequired
    );
    let announced = std::iter::from_fn(|| events.try_recv().ok())
        .any(|e| matches!(e.kind, LocalEventKind::ReauthorizationRequired { .. }));
    assert!(announced, "the recorded condemnation is announced");
}
on_every_store!(a_condemnation_whose_acknowledgement_was_lost_is_reported_and_announced);

/// E5, deferred: a 503 whose backoff the store recorded without acknowledging it is still
/// announced as a backoff.
async fn a_backoff_whose_acknowledgement_was_lost_is_announced(backend: Backend) {
    let (f, switch, id) = due_on(backend).await;
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::ServerError {
            status: 503,
            html: false,
        },
    )]);
    let mut events = f.manager.subscribe();
    switch.fail(
        FaultTarget::WritesOf(EventKind::RefreshDeferred),
        FaultKind::LostAck,
    );
    assert!(f.manager.access_token(&id).await.is_err());
    assert_eq!(f.record(&id).await.state().kind(), StateKind::Backoff);
    let announced = std::iter::from_fn(|| events.try_recv().ok())
        .any(|e| matches!(e.kind, LocalEventKind::Backoff { .. }));
    assert!(announced, "the recorded backoff is announced");
}
on_every_store!(a_backoff_whose_acknowledgement_was_lost_is_announced);

/// E12: the new installation's `create` was applied but its acknowledgement lost; the retry
/// finds the very row it wrote. The installation was created, and the caller hears so.
async fn an_install_whose_acknowledgement_was_lost_is_reported_created(backend: Backend) {
    let (f, switch, _) = due_on(backend).await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Created),
        FaultKind::LostAck,
    );
    let begun = f.manager.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    let completed = f
        .manager
        .complete_authorization(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
        )
        .await
        .expect("the installation was created");
    assert!(completed.created);
    assert!(switch.injected() >= 1, "the fault was injected");
    let record = f.record(&completed.installation).await;
    assert_eq!(record.state().kind(), StateKind::Active);
}
on_every_store!(an_install_whose_acknowledgement_was_lost_is_reported_created);

/// E5 with a re-authorization: the `Authorized` write landed, its acknowledgement did not.
async fn a_reauthorization_whose_acknowledgement_was_lost_is_reported_done(backend: Backend) {
    let (f, switch, id) = due_on(backend).await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Authorized),
        FaultKind::LostAck,
    );
    let completed = authorize_with(&f.manager, &f.mock, Some(id.clone())).await;
    assert!(!completed.created);
    assert_eq!(completed.installation, id);
    assert!(switch.injected() >= 1, "the fault was injected");
}
on_every_store!(a_reauthorization_whose_acknowledgement_was_lost_is_reported_done);

/// Applies the first lease write and reports it applied without its durability (a Redis
/// `WAIT` that no replica answered in time).
#[derive(Debug, Default)]
struct FirstLeaseNotDurable(std::sync::atomic::AtomicBool);

#[async_trait::async_trait]
impl tokenkeeper_testkit::wrappers::Hook for FirstLeaseNotDurable {
    async fn before(
        &self,
        _: tokenkeeper_testkit::wrappers::Operation<'_>,
    ) -> Result<(), tokenkeeper::core::StoreError> {
        Ok(())
    }

    async fn written(
        &self,
        r: &tokenkeeper::core::Record,
    ) -> Result<(), tokenkeeper::core::StoreError> {
        let lease = r.history().last().map(|h| h.event) == Some(EventKind::LeaseAcquired);
        if lease && !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(tokenkeeper::core::StoreError::not_durable(
                "hook",
                "compare_and_swap",
                "0 of 1 replicas acknowledged it in time",
            ));
        }
        Ok(())
    }
}

/// A lease the store applied without its configured durability is not acted on (a failover
/// could undo it while its refresh token is presented), but it is no failure for the caller
/// either: the flight takes it over by a write that is confirmed, and refreshes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_applied_without_durability_is_confirmed_before_it_is_used() {
    let (store, _hook) = tokenkeeper_testkit::wrappers::Hooked::new(
        MemoryStore::new(),
        FirstLeaseNotDurable::default(),
    );
    let f = Fixture::with_store(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
    )
    .await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    let token = f
        .manager
        .access_token(&id)
        .await
        .expect("the lease is confirmed by a second write, then used");
    assert_eq!(f.record(&id).await.tokens().access_token, token);
    let c = f.mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (1, 0), "{c:?}");
    let events: Vec<_> = f.record(&id).await.history().map(|h| h.event).collect();
    assert!(events.contains(&EventKind::LeaseTakenOver), "{events:?}");
}

/// The result was stored, so nothing went to the unsaved place.
async fn nothing_went_to_the_unsaved_place(f: &Fixture) {
    let unsaved = f.manager.restore_unsaved_files().await.unwrap();
    assert_eq!(
        (unsaved.restored, unsaved.obsolete, unsaved.kept),
        (0, 0, 0),
        "nothing went to the unsaved place"
    );
}

/// Two hours on, the next refresh presents the rotated refresh token: two rotations in all,
/// no reuse, no refusal.
async fn the_next_refresh_presents_the_rotated_token(
    f: &Fixture,
    id: &tokenkeeper::InstallationId,
) {
    f.advance(TWO_HOURS);
    f.manager.access_token(id).await.expect("the next refresh");
    let c = f.mock.counters().totals;
    assert_eq!(
        (c.rotations, c.reuse_detections, c.rejected_refreshes),
        (2, 0, 0),
        "{c:?}"
    );
}

/// The result write (`Refreshed`) applied, its acknowledgement lost: the flight finds its own
/// result stored and serves it; nothing goes to the unsaved place, and the next refresh
/// presents the new refresh token (no reuse).
async fn a_result_whose_acknowledgement_was_lost_is_served(backend: Backend) {
    let (f, switch, id) = due_on(backend).await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::LostAck,
    );
    let token = f.manager.access_token(&id).await.expect("its own result");
    assert!(switch.injected() >= 1, "the fault was injected");
    switch.heal();
    nothing_went_to_the_unsaved_place(&f).await;
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::Active);
    assert_eq!(record.tokens().access_token, token);
    the_next_refresh_presents_the_rotated_token(&f, &id).await;
}

on_every_store!(a_result_whose_acknowledgement_was_lost_is_served);

/// The late result (`LateRefreshed`): the holder's lease lapsed while its result was on the
/// way to the store, and a peer took the lease and froze before presenting anything. The
/// holder's result lands on top of the peer's record (it still holds the presented refresh
/// token), that write is applied but its acknowledgement lost: the holder recognises it,
/// serves its token, and the next refresh presents the rotated refresh token (no reuse).
async fn a_late_result_whose_acknowledgement_was_lost_is_served(backend: Backend) {
    let (gated, gate) = GatedStore::gated(backend.open().await, EventKind::Refreshed);
    let (store, switch) = FlakyStore::flaky(gated);
    let f = Fixture::with_store(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
    )
    .await;
    moves_time_on_lost_acks(&f, &switch);
    let id = f.install().await;
    f.advance(TWO_HOURS);
    let holder = {
        let (m, id) = (f.manager.clone(), id.clone());
        tokio::spawn(async move { m.access_token(&id).await })
    };
    gate.held().await;
    // The holder's lease lapses by its written expiry; a peer takes the lease and freezes.
    let p = f.manager.policy();
    f.clock
        .advance(p.lease_ttl + p.lease_margin + Duration::from_secs(1));
    let record = f.record(&id).await;
    let now = tokenkeeper::core::Clock::now(&f.clock);
    let frozen = record
        .apply(
            tokenkeeper::core::Event::LeaseAcquired {
                holder: tokenkeeper::core::LeaseHolder::new("frozen-peer:1"),
                until: now.saturating_add(Duration::from_secs(60)),
            },
            now,
        )
        .expect("a lapsed lease can be taken");
    f.store
        .compare_and_swap(&frozen, record.version())
        .await
        .unwrap();
    switch.fail(
        FaultTarget::WritesOf(EventKind::LateRefreshed),
        FaultKind::LostAck,
    );
    gate.release();
    let token = holder
        .await
        .unwrap()
        .expect("the late result, applied unacknowledged, is served");
    assert!(switch.injected() >= 1, "the fault was injected");
    switch.heal();
    let record = f.record(&id).await;
    assert_eq!(record.tokens().access_token, token);
    let events: Vec<_> = record.history().map(|h| h.event).collect();
    assert_eq!(events.last(), Some(&EventKind::LateRefreshed), "{events:?}");
    nothing_went_to_the_unsaved_place(&f).await;
    the_next_refresh_presents_the_rotated_token(&f, &id).await;
}
on_every_store!(a_late_result_whose_acknowledgement_was_lost_is_served);

/// The takeover write (`LeaseTakenOver`) over a holder's lease that is live by its written
/// expiry but was watched silent for a whole TTL (the holder froze) applied, its
/// acknowledgement lost: the flight recognises its own lease and refreshes.
async fn a_takeover_whose_acknowledgement_was_lost_is_used(backend: Backend) {
    fn short_lease(p: &mut tokenkeeper::policy::RefreshPolicy) {
        p.lease_ttl = Duration::from_secs(4);
        p.peer_wait = Duration::from_secs(10);
    }
    let (f, switch, id) = due_on_tuned(backend, short_lease).await;
    let record = f.record(&id).await;
    let now = tokenkeeper::core::Clock::now(&f.clock);
    let frozen = record
        .apply(
            tokenkeeper::core::Event::LeaseAcquired {
                holder: tokenkeeper::core::LeaseHolder::new("frozen-process:1"),
                until: now.saturating_add(Duration::from_secs(3600)),
            },
            now,
        )
        .unwrap();
    f.store
        .compare_and_swap(&frozen, record.version())
        .await
        .unwrap();
    switch.fail(
        FaultTarget::WritesOf(EventKind::LeaseTakenOver),
        FaultKind::LostAck,
    );
    let token = f.manager.access_token(&id).await.expect("its own takeover");
    assert!(switch.injected() >= 1, "the fault was injected");
    switch.heal();
    assert_eq!(f.record(&id).await.tokens().access_token, token);
    assert_eq!(f.mock.counters().totals.rotations, 1);
}

on_every_store!(a_takeover_whose_acknowledgement_was_lost_is_used);

/// The application's revocation (`Revoked`) applied, its acknowledgement lost: the manager
/// recognises its own write, reports the revocation and revokes the tokens at the provider
/// (they would otherwise stay live behind a record that says revoked).
async fn a_revocation_whose_acknowledgement_was_lost_is_completed(backend: Backend) {
    let (f, switch, id) = due_on(backend).await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Revoked),
        FaultKind::LostAck,
    );
    f.manager
        .revoke(&id)
        .await
        .expect("the revocation was applied");
    assert!(switch.injected() >= 1, "the fault was injected");
    switch.heal();
    assert_eq!(f.record(&id).await.state().kind(), StateKind::Revoked);
    assert!(
        f.mock.counters().totals.revocations >= 1,
        "the tokens were revoked at the provider"
    );
}

on_every_store!(a_revocation_whose_acknowledgement_was_lost_is_completed);
