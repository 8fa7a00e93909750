//! Short leases, kept alive by renewal (issue "zero lost, zero reused": a dead holder blocks
//! nobody for long). A lease lasts a few seconds beyond the HTTP timeout; its holder renews it
//! while it still works; a peer that watches a lease go unrenewed for a whole lease TTL takes
//! it over, whatever the clocks say; and a holder that stalled after taking its lease does not
//! present the refresh token once a peer may have taken over.
//!
//! The fixture's wall clock is manual and never moves here, so a lease can only lapse by the
//! silence a peer watched (real time), never by the time written in it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokenkeeper::core::EventKind;
use tokenkeeper::core::{CasOutcome, Event, LeaseHolder};
use tokenkeeper::{InstallationId, core::StateKind, policy::RefreshPolicy, profiles};
use tokenkeeper_memory::MemoryStore;
use tokenkeeper_mock_provider::MockProfile;
use tokenkeeper_testkit::wrappers::{FaultKind, FaultTarget, FlakyStore, GatedStore};

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);

/// The HTTP timeout of the fixtures is 2 s: a 4 s lease is "a few seconds beyond" it.
const LEASE: Duration = Duration::from_secs(4);

fn short_lease(p: &mut RefreshPolicy) {
    p.lease_ttl = LEASE;
    p.peer_wait = Duration::from_secs(20);
}

/// A Bitbucket fixture with short leases over `store`.
async fn bitbucket_on(store: impl tokenkeeper::core::TokenStore) -> Fixture {
    Fixture::tuned(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
        short_lease,
    )
    .await
}

fn spawn_access_token(
    manager: &tokenkeeper::TokenManager,
    id: &InstallationId,
) -> tokio::task::JoinHandle<Result<tokenkeeper::AccessToken, tokenkeeper::Error>> {
    let (m, id) = (manager.clone(), id.clone());
    tokio::spawn(async move { m.access_token(&id).await })
}

fn events(record: &tokenkeeper::core::Record) -> Vec<EventKind> {
    record.history().map(|h| h.event).collect()
}

/// A holder died right after taking its lease (the lease is recorded, nobody renews it). A
/// caller that needs a token watches the lease for one lease TTL of silence and takes it over:
/// seconds, not the skew margin on top, and not never (the wall clock does not move here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_is_taken_over_after_one_lease_ttl_of_silence() {
    let f = bitbucket_on(MemoryStore::new()).await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    // The dead holder's lease, as it wrote it.
    let record = f.record(&id).await;
    let now = tokenkeeper::core::Clock::now(&f.clock);
    let policy = f.manager.policy().clone();
    let leased = record
        .apply(
            Event::LeaseAcquired {
                holder: LeaseHolder::new("dead-process:1"),
                until: now.saturating_add(policy.lease_ttl + policy.lease_margin),
            },
            now,
        )
        .unwrap();
    assert!(matches!(
        f.store
            .compare_and_swap(&leased, record.version())
            .await
            .unwrap(),
        CasOutcome::Swapped
    ));
    let started = Instant::now();
    let token = f
        .manager
        .access_token(&id)
        .await
        .expect("the dead holder's lease is taken over");
    let waited = started.elapsed();
    assert!(
        waited >= LEASE,
        "taken over after {waited:?}, before one lease TTL of silence"
    );
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::Active);
    assert_eq!(record.tokens().access_token, token);
    assert!(events(&record).contains(&EventKind::LeaseTakenOver));
    let c = f.mock.counters().totals;
    assert_eq!((c.refreshes, c.rejected_refreshes), (1, 0), "{c:?}");
    eprintln!("a dead holder's {LEASE:?} lease was taken over after {waited:?}");
}

/// The store refuses the holder's result write for longer than the lease. The holder renews
/// its lease while it retries, so a peer that needs the token waits for the result instead
/// of taking over and presenting the refresh token the provider has already rotated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_retrying_its_write_renews_its_lease_and_keeps_it() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let f = bitbucket_on(store).await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Unavailable,
    );
    let holder = spawn_access_token(&f.manager, &id);
    for _ in 0..500 {
        if f.mock.counters().totals.rotations == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let peer = f.peer_tuned(profiles::bitbucket(), short_lease);
    let waiting = spawn_access_token(&peer, &id);
    // Longer than the lease: without renewal the peer would take over.
    tokio::time::sleep(LEASE + LEASE / 2).await;
    switch.heal();
    let token = holder.await.unwrap().expect("the holder's result lands");
    assert_eq!(waiting.await.unwrap().expect("the peer waited"), token);
    let record = f.record(&id).await;
    assert!(
        events(&record).contains(&EventKind::LeaseRenewed),
        "{:?}",
        events(&record)
    );
    let c = f.mock.counters().totals;
    assert_eq!((c.refreshes, c.rejected_refreshes), (1, 0), "{c:?}");
}

/// The holder stalls right after its lease landed, before it sends anything (a paused
/// process, a stalled runtime). A peer watches the lease go unrenewed, takes it over and
/// refreshes. When the holder resumes, its lease may be gone: it must not present the refresh
/// token (the peer has rotated it; Bitbucket would revoke the grant), only re-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stalled_after_its_lease_write_does_not_present_the_token() {
    let (store, gate) = GatedStore::gated_after(MemoryStore::new(), EventKind::LeaseAcquired);
    let f = bitbucket_on(store).await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    let holder = spawn_access_token(&f.manager, &id);
    gate.held().await;
    let peer = f.peer_tuned(profiles::bitbucket(), short_lease);
    let token = peer
        .access_token(&id)
        .await
        .expect("the peer takes the silent lease over");
    gate.release();
    assert_eq!(
        holder
            .await
            .unwrap()
            .expect("the holder serves the peer's result"),
        token
    );
    assert!(events(&f.record(&id).await).contains(&EventKind::LeaseTakenOver));
    let c = f.mock.counters().totals;
    assert_eq!(
        (c.refreshes, c.rejected_refreshes, c.reuse_detections),
        (1, 0, 0),
        "{c:?}"
    );
}

/// The provider answers after 1.8 s, so the lease is renewed while the request is on its way,
/// and that renewal hangs in the store (a stuck connection). The request is still polled, its
/// reply is taken when it arrives, and the caller is served: a slow store never holds a token
/// request past its deadline (where a peer could take the lease over and present the same
/// refresh token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_stuck_in_the_store_does_not_hold_up_the_request() {
    let (store, gate) = GatedStore::gated(MemoryStore::new(), EventKind::LeaseRenewed);
    let f = bitbucket_on(store).await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    slow_token_endpoint(&f, 1800);
    let caller = spawn_access_token(&f.manager, &id);
    gate.held().await;
    let token = tokio::time::timeout(Duration::from_secs(10), caller)
        .await
        .expect("the reply is taken while the renewal hangs")
        .unwrap()
        .expect("the refresh succeeds");
    gate.release();
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::Active);
    assert_eq!(record.tokens().access_token, token);
    let c = f.mock.counters().totals;
    assert_eq!((c.refreshes, c.rejected_refreshes), (1, 0), "{c:?}");
}

/// A renewal lands but its acknowledgement is lost (the store reports a failure). The flight
/// must recognise its own lease at the newer version rather than take it for a peer's: on a
/// provider that does not rotate (Google), the refreshed access token is written and served
/// (a late-result write would be refused, and the flight would wait for itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_acknowledgement_was_lost_is_still_our_lease() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let f = Fixture::tuned(
        profiles::google(),
        MockProfile::Google,
        Arc::new(store),
        short_lease,
    )
    .await;
    let id = f.install().await;
    let before = f.record(&id).await.tokens().access_token.clone();
    f.advance(TWO_HOURS);
    slow_token_endpoint(&f, 1800);
    switch.fail(
        FaultTarget::WritesOf(EventKind::LeaseRenewed),
        FaultKind::LostAck,
    );
    let token = tokio::time::timeout(Duration::from_secs(15), f.manager.access_token(&id))
        .await
        .expect("the flight does not wait for itself")
        .expect("the refreshed token is written and served");
    assert_ne!(token, before);
    assert!(switch.injected() > 0, "no acknowledgement was lost");
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::Active);
    assert_eq!(record.tokens().access_token, token);
    assert_eq!(f.mock.counters().totals.refreshes, 1);
}

/// The token endpoint answers the next request after `ms` milliseconds.
fn slow_token_endpoint(f: &Fixture, ms: u64) {
    f.mock
        .set_faults(vec![tokenkeeper_mock_provider::FaultRule::next(
            tokenkeeper_mock_provider::Endpoint::Token,
            1,
            tokenkeeper_mock_provider::Fault::Latency {
                min_ms: ms,
                max_ms: ms,
            },
        )]);
}

/// Applies the first renewal and reports it failed (a lost acknowledgement), then fails the
/// next result write once before it runs.
#[derive(Debug, Default)]
struct LostRenewalThenFailedResult {
    renewal_lost: std::sync::atomic::AtomicBool,
    result_failed: std::sync::atomic::AtomicBool,
}

fn written_by(record: &tokenkeeper::core::Record, kind: EventKind) -> bool {
    record.history().last().map(|h| h.event) == Some(kind)
}

#[async_trait::async_trait]
impl tokenkeeper_testkit::wrappers::Hook for LostRenewalThenFailedResult {
    async fn before(
        &self,
        operation: tokenkeeper_testkit::wrappers::Operation<'_>,
    ) -> Result<(), tokenkeeper::core::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if let tokenkeeper_testkit::wrappers::Operation::CompareAndSwap(r) = operation
            && written_by(r, EventKind::Refreshed)
            && !self.result_failed.swap(true, SeqCst)
        {
            return Err(tokenkeeper::core::StoreError::unavailable(
                "hook",
                "compare_and_swap",
                "injected before the result write",
            ));
        }
        Ok(())
    }

    async fn written(
        &self,
        r: &tokenkeeper::core::Record,
    ) -> Result<(), tokenkeeper::core::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if written_by(r, EventKind::LeaseRenewed) && !self.renewal_lost.swap(true, SeqCst) {
            return Err(tokenkeeper::core::StoreError::unavailable(
                "hook",
                "compare_and_swap",
                "injected: the renewal was applied, its acknowledgement lost",
            ));
        }
        Ok(())
    }
}

/// Fails the first failure write (`RefreshDeferred`) after holding it long enough for the
/// lease to fall due for renewal, and loses the acknowledgement of the first renewal.
#[derive(Debug, Default)]
struct SlowFailedDeferralThenLostRenewal {
    deferral_failed: std::sync::atomic::AtomicBool,
    renewal_lost: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl tokenkeeper_testkit::wrappers::Hook for SlowFailedDeferralThenLostRenewal {
    async fn before(
        &self,
        operation: tokenkeeper_testkit::wrappers::Operation<'_>,
    ) -> Result<(), tokenkeeper::core::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if let tokenkeeper_testkit::wrappers::Operation::CompareAndSwap(r) = operation
            && written_by(r, EventKind::RefreshDeferred)
            && !self.deferral_failed.swap(true, SeqCst)
        {
            tokio::time::sleep(LEASE * 2 / 5).await;
            return Err(tokenkeeper::core::StoreError::unavailable(
                "hook",
                "compare_and_swap",
                "injected before the failure write",
            ));
        }
        Ok(())
    }

    async fn written(
        &self,
        r: &tokenkeeper::core::Record,
    ) -> Result<(), tokenkeeper::core::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if written_by(r, EventKind::LeaseRenewed) && !self.renewal_lost.swap(true, SeqCst) {
            return Err(tokenkeeper::core::StoreError::unavailable(
                "hook",
                "compare_and_swap",
                "injected: the renewal was applied, its acknowledgement lost",
            ));
        }
        Ok(())
    }
}

/// Review E8, the failure path: while a failure write (`RefreshDeferred`) is retried, a
/// renewal lands unacknowledged and is adopted; the failure is then written from the adopted
/// record, not given up as a lost lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_retried_after_a_renewal_was_adopted_is_recorded() {
    let (store, hook) = tokenkeeper_testkit::wrappers::Hooked::new(
        MemoryStore::new(),
        SlowFailedDeferralThenLostRenewal::default(),
    );
    let f = Fixture::tuned(
        profiles::google(),
        MockProfile::Google,
        Arc::new(store),
        short_lease,
    )
    .await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    f.mock
        .set_faults(vec![tokenkeeper_mock_provider::FaultRule::next(
            tokenkeeper_mock_provider::Endpoint::Token,
            1,
            tokenkeeper_mock_provider::Fault::ServerError {
                status: 503,
                html: false,
            },
        )]);
    match f.manager.access_token(&id).await {
        Err(tokenkeeper::Error::LeaseLost { .. }) => panic!("the failure was given up"),
        Err(_) => {}
        Ok(_) => panic!("the provider failed"),
    }
    let renewal_lost = hook.renewal_lost.load(std::sync::atomic::Ordering::SeqCst);
    assert!(renewal_lost, "a renewal's acknowledgement was lost");
    let record = f.record(&id).await;
    assert_eq!(
        record.state().kind(),
        StateKind::Backoff,
        "the failure is recorded"
    );
}

/// Review E8: a renewal whose acknowledgement was lost is adopted by a later renewal attempt
/// while the result write is being retried. The result write must go on from the adopted
/// record (not take its own lease for a peer's, drop the result of a non-rotating provider
/// and wait a whole TTL to refresh a second time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_retried_after_a_renewal_was_adopted_lands_once() {
    let (store, _hook) = tokenkeeper_testkit::wrappers::Hooked::new(
        MemoryStore::new(),
        LostRenewalThenFailedResult::default(),
    );
    let f = Fixture::tuned(
        profiles::google(),
        MockProfile::Google,
        Arc::new(store),
        short_lease,
    )
    .await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    slow_token_endpoint(&f, 1500);
    let started = Instant::now();
    let token = f.manager.access_token(&id).await.expect("refreshed");
    assert!(
        started.elapsed() < LEASE,
        "the flight did not wait for its own lease: {:?}",
        started.elapsed()
    );
    assert_eq!(f.record(&id).await.tokens().access_token, token);
    let c = f.mock.counters().totals;
    assert_eq!(c.refreshes, 1, "{c:?}");
}
