//! The refresh engine under adversity (issue "zero lost, zero reused"): a store that fails
//! between the provider's rotation and the write, a holder paused past its lease while a peer
//! takes over, peers whose clocks disagree, and a condemnation the store would not record.
//! Every test runs the real manager against the mock provider over HTTP; the oracle is the
//! provider's counters and the stored record.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokenkeeper::core::EventKind;
use tokenkeeper::{
    Error, InstallationId, core::ReauthReason, core::StateKind, events::LocalEventKind, profiles,
};
use tokenkeeper_memory::MemoryStore;
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};
use tokenkeeper_testkit::wrappers::{FaultKind, FaultTarget, FlakyStore, GatedStore};

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);

/// A caller asking for `id`'s token in its own task (so the test can act while it waits).
fn spawn_access_token(
    manager: &tokenkeeper::TokenManager,
    id: &InstallationId,
) -> tokio::task::JoinHandle<Result<tokenkeeper::AccessToken, Error>> {
    let (m, id) = (manager.clone(), id.clone());
    tokio::spawn(async move { m.access_token(&id).await })
}

/// A bitbucket fixture whose store holds the first `Refreshed` write at a gate (a holder
/// paused between the provider's reply and its write), with one installation due.
async fn gated_bitbucket() -> (
    Fixture,
    Arc<tokenkeeper_testkit::wrappers::Gate>,
    InstallationId,
) {
    let (f, gate) = gated_bitbucket_fixture().await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    (f, gate, id)
}

/// A bitbucket fixture whose store holds the first `Refreshed` write at a gate.
async fn gated_bitbucket_fixture() -> (Fixture, Arc<tokenkeeper_testkit::wrappers::Gate>) {
    let (store, gate) = GatedStore::gated(MemoryStore::new(), EventKind::Refreshed);
    let f = Fixture::with_store(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
    )
    .await;
    (f, gate)
}

/// How far the wall clock must move for a lease taken now to lapse by its written expiry.
fn lapse(f: &Fixture) -> Duration {
    let p = f.manager.policy();
    p.lease_ttl + p.lease_margin + Duration::from_secs(1)
}

/// Waits (real time, bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Finding 1a: the store is unreachable for longer than half the lease right after the
/// provider rotated the refresh token. The rotated token must still be written once the
/// store is back, not discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_after_the_rotation_loses_nothing() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let f = Fixture::tuned(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
        |p| {
            p.lease_margin = Duration::from_secs(1);
            p.lease_ttl = Duration::from_secs(4);
            p.peer_wait = Duration::from_secs(5);
        },
    )
    .await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Unavailable,
    );
    let caller = spawn_access_token(&f.manager, &id);
    until("the provider's rotation", || {
        f.mock.counters().totals.rotations == 1
    })
    .await;
    // Longer than half the lease (2 s), shorter than the lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    switch.heal();
    let token = caller
        .await
        .unwrap()
        .expect("the rotated tokens are written and served");
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::Active);
    assert_eq!(record.tokens().access_token, token);
    assert!(switch.injected() > 0);
    // The stored refresh token is the rotated one: the next refresh works.
    f.advance(TWO_HOURS);
    f.manager.access_token(&id).await.unwrap();
    let c = f.mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (2, 0), "{c:?}");
}

/// Finding 1c: the holder is paused between the provider's reply and its write, past its
/// lease; a peer takes the lease over, presents the retired token (the inherent window on a
/// provider without leeway) and condemns the installation as `RotatedTokenLost`. When the
/// paused holder resumes, its result still holds the only live refresh token: it must revive
/// the installation, not be discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_late_result_revives_the_installation() {
    let (f, gate, id) = gated_bitbucket().await;
    let holder = spawn_access_token(&f.manager, &id);
    gate.held().await;
    // The holder's lease lapses (by its written expiry) while it is paused.
    f.clock.advance(lapse(&f));
    let peer = f.peer(profiles::bitbucket());
    match peer.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RotatedTokenLost,
            ..
        }) => {}
        other => panic!("the peer presents the retired token and is refused: {other:?}"),
    }
    gate.release();
    let token = holder.await.unwrap().expect("the late result is applied");
    let record = f.record(&id).await;
    assert_eq!(record.state().kind(), StateKind::Active, "revived");
    assert_eq!(record.tokens().access_token, token);
    assert_eq!(peer.access_token(&id).await.unwrap(), token);
    let c = f.mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (1, 1), "{c:?}");
    let explained = f.manager.explain(&id).await.unwrap();
    assert!(explained.is_healthy(), "{explained}");
}

/// Finding 6: a peer whose clock runs two minutes ahead refreshed last; this process's
/// fresher result must not be refused for looking older by its wall clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_clock_ahead_does_not_make_newer_tokens_look_stale() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    let id = f.install().await;
    let ahead = tokenkeeper::core::ManualClock::new(
        tokenkeeper::core::Clock::now(&f.clock).saturating_add(Duration::from_secs(120)),
    );
    let peer = f.peer_with_clock(profiles::github_app(), ahead);
    let first = peer.force_refresh(&id).await.unwrap();
    let second = f
        .manager
        .force_refresh(&id)
        .await
        .expect("versions order writes, not wall clocks");
    assert_ne!(first, second);
    assert_eq!(f.record(&id).await.tokens().access_token, second);
    let c = f.mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (2, 0), "{c:?}");
}

/// Finding 14: the provider refused the grant, but the store would not record the
/// condemnation. The caller must hear that it was not recorded, and subscribers must not be
/// told the installation needs re-authorization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condemnation_the_store_refused_is_not_announced() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let f = Fixture::with_store(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
    )
    .await;
    let id = f.install().await;
    let current = f.record(&id).await.tokens().access_token.clone();
    f.mock.revoke_grant_of(current.secret()).unwrap();
    f.advance(TWO_HOURS);
    let mut events = f.manager.subscribe();
    switch.fail(
        FaultTarget::WritesOf(EventKind::RefreshRejected),
        FaultKind::Backend,
    );
    match f.manager.access_token(&id).await {
        Err(Error::Store { .. }) => {}
        other => panic!("the unrecorded condemnation is reported as a store failure: {other:?}"),
    }
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event.kind, LocalEventKind::ReauthorizationRequired { .. }),
            "announced a condemnation that was not recorded: {event:?}"
        );
    }
    assert_ne!(
        f.record(&id).await.state().kind(),
        StateKind::ReauthorizationRequired
    );
    // Once the store takes writes again, the next attempt (a takeover of the lapsed lease)
    // records and announces a condemnation. Its reason is the truth: the grant was revoked.
    // This process's own earlier flight held that lease and was refused (nothing rotated),
    // so the takeover is no evidence of a lost rotation.
    switch.heal();
    f.advance(lapse(&f));
    match f.manager.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RefreshTokenRejected,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.record(&id).await.state().kind(),
        StateKind::ReauthorizationRequired
    );
    let announced = std::iter::from_fn(|| events.try_recv().ok())
        .any(|e| matches!(e.kind, LocalEventKind::ReauthorizationRequired { .. }));
    assert!(announced, "the recorded condemnation is announced");
}

/// A manager of the test's own making on `store` (set up by `configure`), against a fresh
/// bitbucket mock, with one installation authorized through the real flow and both clocks
/// moved two hours on, so the next `access_token` refreshes.
struct Own {
    mock: tokenkeeper_mock_provider::MockProvider,
    clock: tokenkeeper::core::ManualClock,
    manager: tokenkeeper::TokenManager,
    id: InstallationId,
}

async fn own_manager(
    store: impl tokenkeeper::core::TokenStore,
    configure: impl FnOnce(tokenkeeper::TokenManagerBuilder) -> tokenkeeper::TokenManagerBuilder,
) -> Own {
    let mock = tokenkeeper_mock_provider::MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    let clock = now_clock();
    let consumer = consumer_for(
        profiles::bitbucket(),
        &mock,
        tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET,
    );
    let builder = tokenkeeper::TokenManager::builder(consumer, store).clock(clock.clone());
    let manager = configure(builder).build().unwrap();
    let begun = manager.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    let id = manager
        .complete_authorization(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
        )
        .await
        .unwrap()
        .installation;
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    Own {
        mock,
        clock,
        manager,
        id,
    }
}

/// Two hours later the installation refreshes again from what the store holds: two rotations
/// in all, no retired token presented.
async fn refreshes_again_cleanly(
    mock: &tokenkeeper_mock_provider::MockProvider,
    clock: &tokenkeeper::core::ManualClock,
    manager: &tokenkeeper::TokenManager,
    id: &InstallationId,
) {
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    manager.access_token(id).await.unwrap();
    let c = mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (2, 0), "{c:?}");
}

/// The store refuses the rotated tokens for longer than `result_write_patience`: they go to
/// the unsaved-tokens sink (not dropped), and `restore_unsaved` puts them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_the_store_refuses_reach_the_sink_and_can_be_restored() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let Own {
        mock,
        clock,
        manager,
        id,
    } = own_manager(store, |b| {
        let kept = kept.clone();
        b.tune(|p| p.result_write_patience = Duration::from_millis(500))
            .on_unsaved_tokens(move |unsaved| kept.lock().unwrap().push(unsaved))
    })
    .await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Backend,
    );
    assert!(matches!(
        manager.access_token(&id).await,
        Err(Error::Store { .. })
    ));
    let unsaved = kept.lock().unwrap().pop().expect("handed to the sink");
    assert_eq!(unsaved.installation, id);
    assert!(!format!("{unsaved:?}").contains(unsaved.tokens.access_token.secret()));
    switch.heal();
    manager.restore_unsaved(unsaved.clone()).await.unwrap();
    let token = manager.access_token(&id).await.unwrap();
    assert_eq!(token, unsaved.tokens.access_token);
    // Restoring twice is refused: the stored refresh token is no longer the presented one.
    assert!(matches!(
        manager.restore_unsaved(unsaved).await,
        Err(Error::Transition { .. })
    ));
    refreshes_again_cleanly(&mock, &clock, &manager, &id).await;
}

/// `shutdown` waits for a refresh between the provider's reply and its write (finding S1):
/// the provider answers after 300 ms, shutdown is called while it is answering, and when
/// shutdown returns the rotated tokens are stored. No new refresh starts afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_refreshes_in_flight() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let (id, other) = (f.install().await, f.install().await);
    let before = f.record(&id).await.tokens().refresh_token.clone();
    f.advance(TWO_HOURS);
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::Latency {
            min_ms: 300,
            max_ms: 300,
        },
    )]);
    let caller = spawn_access_token(&f.manager, &id);
    until("the refresh to reach the provider", || {
        f.mock.counters().totals.refresh_calls == 1
    })
    .await;
    f.manager.shutdown().await;
    let stored = f.record(&id).await;
    assert_eq!(stored.state().kind(), StateKind::Active);
    assert_ne!(
        stored.tokens().refresh_token,
        before,
        "written before shutdown returned"
    );
    caller.await.unwrap().unwrap();
    assert!(matches!(
        f.manager.access_token(&other).await,
        Err(Error::ShuttingDown { .. })
    ));
}

/// Finding 7 / S3: a user-supplied client that follows redirects must not re-send a refresh.
/// The token endpoint answers 307 to the real one; tokenkeeper's own token client does not
/// follow it, so the refresh token reaches the provider zero times, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_user_client_never_resends_a_refresh() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mock = tokenkeeper_mock_provider::MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    // A token endpoint that redirects every request to the mock's, with 307 (body re-sent).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirector = format!("http://{}/token", listener.local_addr().unwrap());
    let target = mock.token_url();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = conn.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    let profile = pointed_at(profiles::bitbucket(), &mock).with_endpoints(
        tokenkeeper::reqwest::Url::parse(&mock.authorize_url()).unwrap(),
        tokenkeeper::reqwest::Url::parse(&redirector).unwrap(),
        None,
    );
    let follows = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(5))
        .build()
        .unwrap();
    let clock = now_clock();
    let store: Arc<dyn tokenkeeper::core::TokenStore> = Arc::new(MemoryStore::new());
    // Install through a plain manager (the code exchange goes to the mock directly).
    let installer = manager_builder(
        consumer_for(
            profiles::bitbucket(),
            &mock,
            tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET,
        ),
        store.clone(),
    )
    .clock(clock.clone())
    .build()
    .unwrap();
    let begun = installer.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    let id = installer
        .complete_authorization(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
        )
        .await
        .unwrap()
        .installation;
    let consumer = tokenkeeper::ConsumerConfig::builder(profile)
        .client_id(tokenkeeper_mock_provider::DEFAULT_CLIENT_ID)
        .client_secret(tokenkeeper_mock_provider::DEFAULT_CLIENT_SECRET)
        .redirect_uri(REDIRECT)
        .state_key(common::state_key())
        .build()
        .unwrap();
    let manager = manager_builder(consumer, store.clone())
        .clock(clock.clone())
        .http_client(follows)
        .build()
        .unwrap();
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    mock.reset_counters();
    let outcome = manager.access_token(&id).await;
    assert!(
        outcome.is_err(),
        "a redirect is not a token reply: {outcome:?}"
    );
    let c = mock.counters().totals;
    assert_eq!(c.token_calls, 0, "the redirect was not followed: {c:?}");
    // The installation is intact: the real endpoint still refreshes it.
    assert!(!store.get(&id).await.unwrap().unwrap().state().is_terminal());
}

/// The provider rotates and the reply is lost (commit-then-drop); 5 s later the next attempt
/// is rate-limited with `Retry-After: retry_after_secs`. Both calls fail.
async fn lose_a_rotation_then_get_rate_limited(
    f: &Fixture,
    id: &InstallationId,
    retry_after_secs: u64,
) {
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::CommitThenDrop,
    )]);
    assert!(f.manager.access_token(id).await.is_err());
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::TooManyRequests { retry_after_secs },
    )]);
    f.advance(Duration::from_secs(5));
    assert!(f.manager.access_token(id).await.is_err());
}

/// Finding 11: after an attempt that may have rotated the token (commit-then-drop), a
/// provider with a reuse leeway is retried inside the leeway whatever `Retry-After` says. Here
/// the second attempt meets a 429 asking for an hour; the third must still come within the
/// 10-minute leeway, present the previous token once more, and recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leeway_provider_is_retried_inside_its_leeway_whatever_retry_after_says() {
    let f = Fixture::new(profiles::atlassian_3lo(), MockProfile::Atlassian3lo).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(3600));
    lose_a_rotation_then_get_rate_limited(&f, &id, 3600).await;
    let due = f.record(&id).await.due_at().unwrap();
    let first = tokenkeeper::core::Clock::now(&f.clock).saturating_sub(Duration::from_secs(5));
    assert!(
        due <= first.saturating_add(Duration::from_secs(5 * 60)),
        "the retry is scheduled within half the leeway, not after Retry-After: due {due}"
    );
    // The refresher (or a caller) retries when due: inside the leeway, it recovers.
    f.advance(due.duration_since(tokenkeeper::core::Clock::now(&f.clock)));
    f.manager
        .access_token(&id)
        .await
        .expect("recovered inside the leeway");
    let c = f.mock.counters().totals;
    assert_eq!((c.leeway_reuses, c.reuse_detections), (1, 0), "{c:?}");
}

/// Finding 11, the other side: once the leeway has passed since an attempt that may have
/// rotated the token, presenting the previous token would only trigger the provider's reuse
/// detection (revoking the whole family). The installation ends `RotatedTokenLost` without
/// that presentation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_leeway_the_retired_token_is_not_presented() {
    let f = Fixture::new(profiles::atlassian_3lo(), MockProfile::Atlassian3lo).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(3600));
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::CommitThenDrop,
    )]);
    assert!(f.manager.access_token(&id).await.is_err());
    let calls = f.mock.counters().totals.refresh_calls;
    // The process was down (or the store unreachable) for 11 minutes.
    f.advance(Duration::from_secs(11 * 60));
    match f.manager.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RotatedTokenLost,
            ..
        }) => {}
        other => panic!("expected RotatedTokenLost, got {other:?}"),
    }
    let c = f.mock.counters().totals;
    assert_eq!(
        c.refresh_calls, calls,
        "the retired token was not presented"
    );
    assert_eq!(c.reuse_detections, 0, "{c:?}");
}

/// Finding 13: a 5xx that arrives after the provider committed the rotation counts as a
/// possibly lost reply, even when a later attempt failed differently; a rotating provider's
/// rejection afterwards is then `RotatedTokenLost`, not "the user revoked the app".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_possibly_committed_attempt_is_remembered() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(28_800));
    lose_a_rotation_then_get_rate_limited(&f, &id, 10).await;
    f.advance(Duration::from_secs(20));
    match f.manager.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RotatedTokenLost,
            ..
        }) => {}
        other => panic!("expected RotatedTokenLost, got {other:?}"),
    }
}

/// Fencing: a holder paused between the provider's reply and its write must not write over
/// what happened meanwhile. Here the application revokes the installation while the holder is
/// paused; when it resumes, its (stale) result is dropped and the installation stays revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_result_never_overwrites_a_revocation() {
    let (f, gate, id) = gated_bitbucket().await;
    let holder = spawn_access_token(&f.manager, &id);
    gate.held().await;
    f.peer(profiles::bitbucket()).revoke(&id).await.unwrap();
    gate.release();
    assert!(
        holder.await.unwrap().is_err(),
        "a revoked installation serves nothing"
    );
    assert_eq!(f.record(&id).await.state().kind(), StateKind::Revoked);
}

/// Fencing, the other case: the user re-authorized (a new grant) while a holder of the old
/// grant's refresh was paused; the new grant's tokens must survive the holder's late write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_result_never_overwrites_a_new_grant() {
    let (f, gate, id) = gated_bitbucket().await;
    let holder = spawn_access_token(&f.manager, &id);
    gate.held().await;
    // A new authorization of the same installation, completed by another process.
    let peer = f.peer(profiles::bitbucket());
    let begun = peer.begin_authorization(Some(id.clone())).unwrap();
    let (code, _) = browser(&begun.url).await;
    peer.complete_authorization(
        tokenkeeper::AuthorizationCode::new(code),
        &begun.state,
        &begun.binding,
    )
    .await
    .unwrap();
    let granted = f.record(&id).await.tokens().clone();
    gate.release();
    let served = holder.await.unwrap().unwrap();
    assert_eq!(
        served, granted.access_token,
        "the new grant's token is served"
    );
    assert_eq!(
        f.record(&id).await.tokens(),
        &granted,
        "the new grant survived"
    );
}

/// Finding 7: a caller never waits without bound. The store will not take the rotated
/// tokens for a while; the caller gets `Busy` after `caller_wait`, the refresh goes on in
/// the background and its result is there for the next caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_wait_a_bounded_time_and_the_refresh_lands_anyway() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let f = Fixture::tuned(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
        |p| p.caller_wait = Duration::from_millis(500),
    )
    .await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Unavailable,
    );
    let started = std::time::Instant::now();
    match f.manager.access_token(&id).await {
        Err(Error::Busy { waited, .. }) => assert_eq!(waited, Duration::from_millis(500)),
        other => panic!("expected Busy, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    switch.heal();
    until("the background refresh to land", || {
        f.manager.cached_token(&id).is_some()
    })
    .await;
    f.manager.access_token(&id).await.unwrap();
    let c = f.mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (1, 0), "{c:?}");
}

/// Finding 7: one stuck refresh never stalls the refresher's other work. X's result write is
/// held (a store stuck on that one row); Y falls due meanwhile and is refreshed all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_refresh_does_not_stall_the_refresher() {
    let (f, gate) = gated_bitbucket_fixture().await;
    let x = f.install().await;
    f.advance(TWO_HOURS);
    let y = f.install().await;
    let refresher = f
        .manager
        .spawn_refresher_with(tokenkeeper::refresher::RefresherConfig {
            rate_per_second: None,
            max_idle: Duration::from_millis(100),
            ..tokenkeeper::refresher::RefresherConfig::default()
        });
    gate.held().await;
    let x_before = f.record(&x).await.tokens().refresh_token.clone();
    let y_before = f.record(&y).await.tokens().refresh_token.clone();
    f.advance(TWO_HOURS);
    until("Y's refresh while X is stuck", || {
        f.mock.counters().totals.rotations >= 2
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while f.record(&y).await.tokens().refresh_token == y_before {
        assert!(std::time::Instant::now() < deadline, "Y was never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.release();
    // The refresher does not cache what it refreshes: watch the store.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while f.record(&x).await.tokens().refresh_token == x_before {
        assert!(
            std::time::Instant::now() < deadline,
            "X's refresh never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refresher.shutdown().await;
}

/// The default unsaved-tokens sink: a file of its own per result, in an owner-only
/// directory, sealed with the manager's keyring when it has one; restore_unsaved_file puts
/// the tokens back.
async fn unsaved_tokens_reach_a_file(sealed: bool) {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let dir = tokenkeeper_testkit::dirs::fresh_dir("unsaved").join("kept");
    #[cfg(not(feature = "encryption"))]
    assert!(!sealed);
    let Own {
        mock,
        clock,
        manager,
        id,
    } = own_manager(store, |b| {
        #[allow(unused_mut)] // reassigned only with the encryption feature
        let mut b = b
            .tune(|p| p.result_write_patience = Duration::from_millis(300))
            .unsaved_tokens_dir(&dir);
        #[cfg(feature = "encryption")]
        if sealed {
            b = b.encryption(
                tokenkeeper::core::sealed::Keyring::new(
                    "k1",
                    &std::array::from_fn::<u8, 32, _>(|i| (i as u8).wrapping_mul(37) ^ 0x5a),
                )
                .unwrap(),
            );
        }
        b
    })
    .await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Backend,
    );
    assert!(manager.access_token(&id).await.is_err());
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one file per unsaved result");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(text.contains("refresh_token"), !sealed, "sealed: {sealed}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files[0]), 0o600);
        assert_eq!(mode(&dir), 0o700);
    }
    switch.heal();
    manager.restore_unsaved_file(&files[0]).await.unwrap();
    manager.access_token(&id).await.unwrap();
    refreshes_again_cleanly(&mock, &clock, &manager, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsaved_tokens_reach_an_owner_only_file_by_default() {
    unsaved_tokens_reach_a_file(false).await;
}

#[cfg(feature = "encryption")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsaved_tokens_are_sealed_with_the_managers_keyring() {
    unsaved_tokens_reach_a_file(true).await;
}

/// Review E3/N5: a manager with a keyring restores only sealed files. An unsealed file in its
/// directory (left by a process without the keyring, or planted by someone who may write
/// there) is refused and kept, never landed: its tokens would replace the installation's.
#[cfg(feature = "encryption")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsealed_file_is_refused_by_a_manager_with_a_keyring() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let dir = tokenkeeper_testkit::dirs::fresh_dir("unsaved-unsealed").join("kept");
    let Own {
        manager, id, mock, ..
    } = own_manager(store, |b| {
        b.tune(|p| p.result_write_patience = Duration::from_millis(300))
            .unsaved_tokens_dir(&dir)
    })
    .await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Backend,
    );
    assert!(manager.access_token(&id).await.is_err());
    assert_eq!(mock.counters().totals.rotations, 1, "the provider rotated");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // A manager with the keyring over another directory, into which that file is put.
    switch.heal();
    let other = tokenkeeper_testkit::dirs::fresh_dir("unsaved-sealed").join("kept");
    let key = std::array::from_fn::<u8, 32, _>(|i| (i as u8).wrapping_mul(37) ^ 0x5a);
    let sealed = tokenkeeper::TokenManager::builder_shared(
        manager.client().consumer().clone(),
        manager.store().clone(),
    )
    .encryption(tokenkeeper::core::sealed::Keyring::new("k1", &key).unwrap())
    .unsaved_tokens_dir(&other)
    .build()
    .unwrap();
    let planted = other.join(file.file_name().unwrap());
    std::fs::copy(&file, &planted).unwrap();
    match sealed.restore_unsaved_file(&planted).await {
        Err(tokenkeeper::Error::UnsavedFile(e)) => {
            assert!(e.to_string().contains("not sealed"), "{e}");
        }
        other => panic!("an unsealed file must be refused, got {other:?}"),
    }
    let report = sealed.restore_unsaved_files().await.unwrap();
    assert_eq!((report.restored, report.kept), (0, 1), "{report:?}");
    assert!(planted.exists(), "the refused file is left in place");
}

/// Review A3, corrected by review E3: shutting down while the store refuses the rotated
/// tokens does not wait out `result_write_patience` (the orchestrator would kill the process
/// first), but it does not give up at the first error either: it retries for
/// `shutdown_grace` (a store failover takes seconds), then hands the tokens to the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_store_down_retries_for_its_grace_then_sinks() {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let Own {
        mock, manager, id, ..
    } = own_manager(store, |b| {
        let kept = kept.clone();
        b.tune(|p| p.shutdown_grace = Duration::from_secs(1))
            .on_unsaved_tokens(move |unsaved| kept.lock().unwrap().push(unsaved))
    })
    .await;
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Unavailable,
    );
    let caller = spawn_access_token(&manager, &id);
    until("the rotation", || mock.counters().totals.rotations == 1).await;
    let started = std::time::Instant::now();
    manager.shutdown().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "shutdown gave up before its grace: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "shutdown waited {waited:?}"
    );
    assert_eq!(
        kept.lock().unwrap().len(),
        1,
        "the rotated tokens were kept"
    );
    assert!(caller.await.unwrap().is_err());
}

/// Review A6: a revocation that races a refresh in flight. The late result cannot land on a
/// revoked record, and its new tokens (live at the provider, stored nowhere) are revoked
/// too, so the grant does not survive the revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_racing_a_revocation_is_revoked_too() {
    let (f, gate, id) = gated_bitbucket().await;
    let holder = spawn_access_token(&f.manager, &id);
    gate.held().await;
    f.peer(profiles::bitbucket()).revoke(&id).await.unwrap();
    let revocations = f.mock.counters().totals.revocations;
    gate.release();
    assert!(holder.await.unwrap().is_err());
    assert_eq!(
        f.mock.counters().totals.revocations,
        revocations + 1,
        "the orphaned new tokens were revoked at the provider"
    );
}

/// Finding 6 (the rest): a rotating provider's 2xx reply that carries no refresh token keeps
/// the previous one (nothing else exists), but the record says so: the history entry of that
/// refresh carries the anomaly and `explain` names it, before the next refresh is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotating_reply_without_a_refresh_token_is_flagged_on_the_record() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::MissingFields {
            fields: vec!["refresh_token".into()],
        },
    )]);
    f.manager
        .access_token(&id)
        .await
        .expect("the access token of the reply is served");
    let record = f.record(&id).await;
    let last = record.history().last().unwrap();
    assert_eq!(last.event, EventKind::Refreshed);
    let anomaly = last
        .error
        .as_ref()
        .expect("the refresh entry carries the anomaly");
    assert!(
        anomaly
            .description
            .as_deref()
            .is_some_and(|d| d.contains("no new refresh token")),
        "{anomaly:?}"
    );
    let text = f.manager.explain(&id).await.unwrap().to_string();
    assert!(text.contains("irregular"), "{text}");
    assert!(text.contains("no new refresh token"), "{text}");
}
