//! Every write the engine makes recognises its own applied write after a lost
//! acknowledgement (a timeout after the server committed, a `WAIT` shortfall, a connection
//! dropped after commit) and then behaves as if the acknowledgement had arrived: the lease is
//! used, the failure is recorded and announced, the new installation is reported created
//! (review findings E5, E6, E8 and E12). The store applies each write and reports
//! `Unavailable` ([`FaultKind::LostAck`]) for one event kind at a time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokenkeeper::core::EventKind;
use tokenkeeper::{Error, core::ReauthReason, core::StateKind, events::LocalEventKind, profiles};
use tokenkeeper_memory::MemoryStore;
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};
use tokenkeeper_testkit::wrappers::{FaultKind, FaultSwitch, FaultTarget, FlakyStore};

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);

/// A bitbucket fixture on a flaky memory store, with one installation due.
async fn due_on_flaky_store() -> (Fixture, Arc<FaultSwitch>, tokenkeeper::InstallationId) {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let f = Fixture::with_store(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
    )
    .await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    (f, switch, id)
}

/// E6: the lease write was applied but its acknowledgement lost. The flight recognises its
/// own lease and refreshes (no orphan lease blocking the installation for a TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_acknowledgement_was_lost_is_used() {
    let (f, switch, id) = due_on_flaky_store().await;
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

/// E6, the consequence: after a lost lease acknowledgement, a grant the user revoked is
/// explained as a revocation, not as a lost rotation (nothing was ever sent under the lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_after_a_lost_lease_acknowledgement_is_explained_as_one() {
    let (f, switch, id) = due_on_flaky_store().await;
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

/// E5: the provider refused the grant and the store recorded the condemnation but lost the
/// acknowledgement. The caller hears the condemnation and subscribers are told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condemnation_whose_acknowledgement_was_lost_is_reported_and_announced() {
    let (f, switch, id) = due_on_flaky_store().await;
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

/// E5, deferred: a 503 whose backoff the store recorded without acknowledging it is still
/// announced as a backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backoff_whose_acknowledgement_was_lost_is_announced() {
    let (f, switch, id) = due_on_flaky_store().await;
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

/// E12: the new installation's `create` was applied but its acknowledgement lost; the retry
/// finds the very row it wrote. The installation was created, and the caller hears so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_whose_acknowledgement_was_lost_is_reported_created() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let f = Fixture::with_store(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
    )
    .await;
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

/// E5 with a re-authorization: the `Authorized` write landed, its acknowledgement did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reauthorization_whose_acknowledgement_was_lost_is_reported_done() {
    let (f, switch, id) = due_on_flaky_store().await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Authorized),
        FaultKind::LostAck,
    );
    let completed = authorize_with(&f.manager, &f.mock, Some(id.clone())).await;
    assert!(!completed.created);
    assert_eq!(completed.installation, id);
    assert!(switch.injected() >= 1, "the fault was injected");
}

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
