//! Late results: a holder paused between the provider's rotation and its write resumes after
//! a peer reached a verdict on the very refresh token it presented. Any verdict about the
//! retired token (a spent failure budget, an expiry, a refusal) says nothing about the
//! rotated one, so the result lands; where it truly cannot land (a new grant, a revocation),
//! its tokens reach the unsaved-tokens sink or are revoked, never dropped silently (review
//! finding E1).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokenkeeper::core::EventKind;
use tokenkeeper::{Error, core::ReauthReason, core::StateKind, policy::RefreshPolicy, profiles};
use tokenkeeper_memory::MemoryStore;
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};
use tokenkeeper_testkit::wrappers::GatedStore;

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);

fn tight_budget(p: &mut RefreshPolicy) {
    p.failure_budget = Duration::from_secs(60);
    p.failure_budget_attempts = 2;
}

fn server_error() -> Vec<FaultRule> {
    vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::ServerError {
            status: 503,
            html: false,
        },
    )]
}

/// How far the wall clock must move for a lease taken now to lapse by its written expiry.
fn lapse(f: &Fixture) -> Duration {
    let p = f.manager.policy();
    p.lease_ttl + p.lease_margin + Duration::from_secs(1)
}

/// E1: a peer spends the failure budget on the retired token while the holder of the only
/// live (rotated) refresh token is paused. The holder's result lands and revives the
/// installation; the provider rotated once and the rotated token is the one stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_lands_on_a_spent_failure_budget() {
    let (store, gate) = GatedStore::gated(MemoryStore::new(), EventKind::Refreshed);
    let f = Fixture::tuned(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
        tight_budget,
    )
    .await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    // One transient failure starts the streak.
    f.mock.set_faults(server_error());
    assert!(f.manager.access_token(&id).await.is_err());
    f.advance(Duration::from_secs(61));
    f.mock.set_faults(Vec::new());
    // The holder rotates and pauses before its write.
    let holder = {
        let (m, id) = (f.manager.clone(), id.clone());
        tokio::spawn(async move { m.access_token(&id).await })
    };
    gate.held().await;
    assert_eq!(f.mock.counters().totals.rotations, 1);
    // The holder's lease lapses; a peer presents the retired token and meets a 503: the
    // budget is spent and the peer condemns.
    f.mock.set_faults(server_error());
    f.clock.advance(lapse(&f));
    let peer = f.peer_tuned(profiles::bitbucket(), tight_budget);
    match peer.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::FailureBudgetExhausted,
            ..
        }) => {}
        other => panic!("the peer spends the budget: {other:?}"),
    }
    gate.release();
    let token = holder
        .await
        .unwrap()
        .expect("the late result lands on a verdict about the retired token");
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::Active, "revived");
    assert_eq!(record.tokens().access_token, token);
    f.mock.set_faults(Vec::new());
    f.advance(TWO_HOURS);
    peer.access_token(&id)
        .await
        .expect("the rotated refresh token was kept and works");
    let c = f.mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (2, 0), "{c:?}");
}

/// E1, the other side: a late result that truly cannot land (the user re-authorized, a new
/// grant is stored) still holds live tokens of the old grant: they reach the unsaved-tokens
/// sink instead of vanishing, and the new grant stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_that_cannot_land_reaches_the_sink() {
    let (store, gate) = GatedStore::gated(MemoryStore::new(), EventKind::Refreshed);
    let mock = tokenkeeper_mock_provider::MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    let kept = Arc::new(Mutex::new(Vec::new()));
    let store: Arc<dyn tokenkeeper::core::TokenStore> = Arc::new(store);
    let clock = now_clock();
    let manager = tokenkeeper::TokenManager::builder_shared(
        consumer_for(
            profiles::bitbucket(),
            &mock,
            tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET,
        ),
        store.clone(),
    )
    .clock(clock.clone())
    .on_unsaved_tokens({
        let kept = kept.clone();
        move |u| kept.lock().unwrap().push(u)
    })
    .build()
    .unwrap();
    let id = authorize_with(&manager, &mock, None).await.installation;
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    let holder = {
        let (m, id) = (manager.clone(), id.clone());
        tokio::spawn(async move { m.access_token(&id).await })
    };
    gate.held().await;
    authorize_with(&manager, &mock, Some(id.clone())).await;
    let granted = store.get(&id).await.unwrap().unwrap().tokens().clone();
    gate.release();
    let served = holder.await.unwrap().unwrap();
    assert_eq!(served, granted.access_token, "the new grant is served");
    let kept = kept.lock().unwrap();
    assert_eq!(kept.len(), 1, "the old grant's rotated tokens were kept");
    assert_eq!(kept[0].installation, id);
    assert_ne!(kept[0].tokens.access_token, granted.access_token);
}

/// Review E7: on a provider with reuse detection, a peer that took a stalled holder's lease
/// over after the leeway presented the retired token, and the provider revoked the whole
/// grant, the holder's rotated tokens with it. Before the holder's late result revives the
/// peer's verdict, the manager asks the provider once (the profile's identity endpoint, with
/// the result's access token): refused, the verdict stands, the holder is told so instead of
/// being handed a dead token announced as healthy, and later calls hear the lost rotation,
/// not "the user revoked the app".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_over_a_grant_the_provider_revoked_is_not_announced_healthy() {
    let (store, gate) = GatedStore::gated(MemoryStore::new(), EventKind::Refreshed);
    let f = Fixture::with_store(
        profiles::atlassian_3lo(),
        MockProfile::Atlassian3lo,
        Arc::new(store),
    )
    .await;
    let id = f.install().await;
    let mut events = f.manager.subscribe();
    f.advance(Duration::from_secs(3600));
    let holder = {
        let (m, id) = (f.manager.clone(), id.clone());
        tokio::spawn(async move { m.access_token(&id).await })
    };
    gate.held().await;
    f.advance(Duration::from_secs(11 * 60));
    let peer = f.peer(profiles::atlassian_3lo());
    assert!(peer.access_token(&id).await.is_err());
    assert_eq!(f.mock.counters().totals.reuse_detections, 1);
    gate.release();
    match holder.await.unwrap() {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RotatedTokenLost,
            ..
        }) => {}
        other => panic!("the holder must hear the verdict, got {other:?}"),
    }
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::ReauthorizationRequired);
    let revived = std::iter::from_fn(|| events.try_recv().ok()).any(|e| {
        matches!(
            e.kind,
            tokenkeeper::events::LocalEventKind::Refreshed { .. }
        )
    });
    assert!(!revived, "a dead grant is not announced as refreshed");
    f.advance(Duration::from_secs(3600));
    match f.manager.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RotatedTokenLost,
            ..
        }) => {}
        other => panic!("expected RotatedTokenLost, got {other:?}"),
    }
}

/// The contention fleet's eleventh reuse detection (one run in eight under the full suite):
/// a refusal right after taking over a silent holder's lease is held by the mass-rejection
/// guard, and a peer whose own success came right after lifted the hold and presented the
/// retired token again before the holder's late result landed. A success lifts only holds
/// written a lease span before it, so the retired token is presented once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_a_takeover_is_not_presented_again() {
    fn trips_at_once(p: &mut RefreshPolicy) {
        p.mass_rejection = Some(tokenkeeper::policy::MassRejectionGuard {
            threshold: 1,
            ..tokenkeeper::policy::MassRejectionGuard::default()
        });
    }
    let (store, gate) = GatedStore::gated(MemoryStore::new(), EventKind::Refreshed);
    let f = Fixture::tuned(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
        trips_at_once,
    )
    .await;
    let x = f.install().await;
    let y = f.install().await;
    f.advance(TWO_HOURS);
    // The holder rotates x's token and pauses before its write.
    let holder = {
        let (m, x) = (f.manager.clone(), x.clone());
        tokio::spawn(async move { m.access_token(&x).await })
    };
    gate.held().await;
    f.clock.advance(lapse(&f));
    // A peer takes the lapsed lease over and presents the retired token: refused.
    let peer = f.peer_tuned(profiles::bitbucket(), trips_at_once);
    match peer.access_token(&x).await {
        Err(Error::RefusalsHeld { .. }) => {}
        other => panic!("the guard, tripping at once, holds the refusal: {other:?}"),
    }
    // Another process refreshes successfully (the provider works) and then meets x.
    let other = f.peer_tuned(profiles::bitbucket(), trips_at_once);
    other.access_token(&y).await.unwrap();
    assert!(other.access_token(&x).await.is_err());
    let c = f.mock.counters().totals;
    assert_eq!(
        c.reuse_detections, 1,
        "the retired token was presented again: {c:?}"
    );
    gate.release();
    holder
        .await
        .unwrap()
        .expect("the late result lands on the takeover's verdict");
    assert_eq!(f.record(&x).await.state().kind(), StateKind::Active);
}

/// A takeover inside the provider's reuse leeway: whatever the silent holder sent, the token
/// it retired is still accepted there, so a refusal is no lost rotation but the refusal it
/// says it is (here a consumer scope change), and it counts for the mass-rejection guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_a_takeover_inside_the_leeway_is_what_the_provider_said() {
    let (store, gate) = GatedStore::gated_after(MemoryStore::new(), EventKind::LeaseAcquired);
    let f = Fixture::with_store(
        profiles::atlassian_3lo(),
        MockProfile::Atlassian3lo,
        Arc::new(store),
    )
    .await;
    let id = f.install().await;
    f.advance(Duration::from_secs(3600));
    // The holder takes the lease and stalls before sending anything.
    let holder = {
        let (m, id) = (f.manager.clone(), id.clone());
        tokio::spawn(async move { m.access_token(&id).await })
    };
    gate.held().await;
    f.mock
        .set_consumer_scopes(
            tokenkeeper_mock_provider::DEFAULT_CLIENT_ID,
            &["read:me", "offline_access", "write:jira-work"],
        )
        .unwrap();
    f.clock.advance(lapse(&f));
    let peer = f.peer(profiles::atlassian_3lo());
    match peer.access_token(&id).await {
        Err(Error::ReauthorizationRequired { reason, .. }) => {
            assert_ne!(
                reason,
                ReauthReason::RotatedTokenLost,
                "inside the leeway a retired token would have been accepted"
            );
        }
        other => panic!("{other:?}"),
    }
    gate.release();
    let _ = holder.await;
}
