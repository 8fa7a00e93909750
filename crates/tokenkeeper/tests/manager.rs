//! TokenManager over real HTTP to the mock provider: single flight, exact refresh counts,
//! expiry boundaries at ±1 ns, transient failures and the failure budget, terminal failures
//! with the provider's words, commit-then-drop with and without a reuse leeway, the 401 path,
//! import, revocation, events and the background refresher.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Fixture;
use tokenkeeper::{
    Error, core::FailureClass, core::State, core::StateKind, core::TokenStore,
    events::LocalEventKind, profiles, refresher::RefresherConfig,
};
use tokenkeeper_core::{BackoffCause, ReauthReason};
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};

const TWO_HOURS: Duration = Duration::from_secs(7200);

async fn bitbucket() -> Fixture {
    Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_callers_on_one_expired_installation_cause_one_refresh() {
    let f = bitbucket().await;
    let id = f.install().await;
    let first = f.manager.access_token(&id).await.unwrap();
    f.advance(TWO_HOURS);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (m, id) = (f.manager.clone(), id.clone());
        tasks.spawn(async move { m.access_token(&id).await });
    }
    let mut tokens = std::collections::HashSet::new();
    while let Some(r) = tasks.join_next().await {
        tokens.insert(r.unwrap().unwrap().secret().to_owned());
    }
    assert_eq!(tokens.len(), 1, "every caller gets the same new token");
    assert!(!tokens.contains(first.secret()));
    assert_eq!(f.mock.counters().totals.refreshes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_installations_with_ten_callers_each_cause_a_thousand_refreshes() {
    let f = bitbucket().await;
    let mut ids = Vec::new();
    for _ in 0..1000 {
        ids.push(f.install().await);
    }
    f.advance(TWO_HOURS);
    let mut tasks = tokio::task::JoinSet::new();
    for id in &ids {
        for _ in 0..10 {
            let (m, id) = (f.manager.clone(), id.clone());
            tasks.spawn(async move { m.access_token(&id).await.map(|_| ()) });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let c = f.mock.counters();
    assert_eq!(c.totals.refreshes, 1000);
    assert!(
        c.grants
            .values()
            .all(|g| g.refreshes == 1 && g.reuse_detections == 0)
    );
}

#[tokio::test]
async fn expiry_boundary_is_exact_to_the_nanosecond() {
    let f = bitbucket().await;
    let id = f.install().await;
    let record = f.record(&id).await;
    let stale_at = f.manager.policy().stale_at(record.tokens());
    let first = f.manager.access_token(&id).await.unwrap();
    // One nanosecond before stale: served from the cache, no refresh.
    f.clock
        .set(stale_at.saturating_sub(Duration::from_nanos(1)));
    assert_eq!(f.manager.access_token(&id).await.unwrap(), first);
    assert_eq!(f.mock.counters().totals.refresh_calls, 0);
    // Exactly at stale: refreshed.
    f.clock.set(stale_at);
    let second = f.manager.access_token(&id).await.unwrap();
    assert_ne!(second, first);
    assert_eq!(f.mock.counters().totals.refreshes, 1);
    // One nanosecond after: the new token, still one refresh.
    f.clock
        .set(stale_at.saturating_add(Duration::from_nanos(1)));
    assert_eq!(f.manager.access_token(&id).await.unwrap(), second);
    assert_eq!(f.mock.counters().totals.refreshes, 1);
}

#[tokio::test]
async fn transient_failures_keep_serving_the_valid_token_and_honour_retry_after() {
    let f = bitbucket().await;
    let id = f.install().await;
    let first = f.manager.access_token(&id).await.unwrap();
    let expires_at = f.record(&id).await.tokens().expires_at;
    // Inside the skew window: stale, but still valid.
    f.clock
        .set(expires_at.saturating_sub(Duration::from_secs(30)));
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::TooManyRequests {
            retry_after_secs: 120,
        },
    )]);
    let mut events = f.manager.subscribe();
    assert_eq!(
        f.manager.access_token(&id).await.unwrap(),
        first,
        "the valid token is served"
    );
    let record = f.record(&id).await;
    let State::Backoff { until, cause } = record.state().clone() else {
        panic!("expected backoff, got {:?}", record.state())
    };
    assert_eq!(cause, BackoffCause::Transient);
    assert!(
        until >= f.clock_now().saturating_add(Duration::from_secs(120)),
        "Retry-After honoured"
    );
    assert!(matches!(
        events.recv().await.unwrap().kind,
        LocalEventKind::Backoff { .. }
    ));
    // While backing off, no provider call, the old token still served.
    assert_eq!(f.manager.access_token(&id).await.unwrap(), first);
    let c = f.mock.counters().totals;
    assert_eq!(
        (c.token_calls, c.faults_injected),
        (1, 1),
        "the exchange, then one refused attempt"
    );
    // Past expiry and still backing off: a typed error saying when.
    f.clock.set(expires_at);
    match f.manager.access_token(&id).await {
        Err(e @ Error::TemporarilyUnavailable { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(id.as_str()) && text.contains("retried at"),
                "{text}"
            );
        }
        other => panic!("expected TemporarilyUnavailable, got {other:?}"),
    }
    // After the backoff the next call refreshes.
    f.clock.set(until);
    assert_ne!(f.manager.access_token(&id).await.unwrap(), first);
    assert!(
        f.record(&id).await.failures().is_none(),
        "success clears the streak"
    );
}

#[tokio::test]
async fn the_failure_budget_not_a_single_error_condemns_an_installation() {
    let f = bitbucket().await;
    let id = f.install().await;
    f.mock.set_faults(vec![FaultRule::probability(
        Endpoint::Token,
        1.0,
        Fault::ServerError {
            status: 503,
            html: true,
        },
    )]);
    let mut outcomes = Vec::new();
    for day in 0..6 {
        f.advance(Duration::from_secs(24 * 3600));
        let outcome = f.manager.access_token(&id).await;
        outcomes.push(matches!(
            outcome,
            Err(Error::ReauthorizationRequired { .. })
        ));
        if day < 3 {
            assert!(
                matches!(outcome, Err(Error::TemporarilyUnavailable { .. })),
                "day {day}: {outcome:?}"
            );
        }
    }
    assert!(
        outcomes.iter().any(|x| *x),
        "the budget must run out eventually: {outcomes:?}"
    );
    let record = f.record(&id).await;
    assert!(matches!(
        record.state(),
        State::ReauthorizationRequired {
            reason: ReauthReason::FailureBudgetExhausted,
            ..
        }
    ));
    let explanation = f.manager.explain(&id).await.unwrap().to_string();
    assert!(explanation.contains("failure budget"), "{explanation}");
}

#[tokio::test]
async fn a_scope_change_makes_every_installation_reauthorize_with_the_provider_text() {
    let f = bitbucket().await;
    let ids = [f.install().await, f.install().await, f.install().await];
    f.mock
        .set_consumer_scopes(
            tokenkeeper_mock_provider::DEFAULT_CLIENT_ID,
            &["repository", "webhook"],
        )
        .unwrap();
    f.advance(TWO_HOURS);
    let mut events = f.manager.subscribe();
    for id in &ids {
        match f.manager.access_token(id).await {
            Err(e @ Error::ReauthorizationRequired { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("Invalid refresh_token") && text.contains(id.as_str()),
                    "{text}"
                );
                assert!(e.needs_reauthorization());
            }
            other => panic!("expected ReauthorizationRequired, got {other:?}"),
        }
        let event = events.recv().await.unwrap();
        assert_eq!(&event.installation, id);
        assert!(matches!(
            event.kind,
            LocalEventKind::ReauthorizationRequired { .. }
        ));
    }
    let explanation = f.manager.explain(&ids[0]).await.unwrap();
    assert!(
        explanation.summary.contains("authorize the app again"),
        "{}",
        explanation.summary
    );
    assert!(
        explanation
            .to_string()
            .contains("invalid_request: Invalid refresh_token"),
        "{explanation}"
    );
    // Terminal: the next call fails without asking the provider.
    let calls = f.mock.counters().totals.refresh_calls;
    assert!(f.manager.access_token(&ids[0]).await.is_err());
    assert_eq!(f.mock.counters().totals.refresh_calls, calls);
    // A new authorization for the same installation brings it back.
    let begun = f.manager.begin_authorization(Some(ids[0].clone())).unwrap();
    let q: std::collections::HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
    let code = f
        .mock
        .authorize_code(
            tokenkeeper_mock_provider::DEFAULT_CLIENT_ID,
            Some(common::REDIRECT),
            Some((q["code_challenge"].as_str(), "S256")),
        )
        .unwrap();
    f.clock.advance(Duration::from_nanos(1));
    assert_eq!(
        f.manager
            .complete_authorization(
                tokenkeeper::AuthorizationCode::new(code),
                &begun.state,
                &begun.binding
            )
            .await
            .unwrap()
            .installation,
        ids[0]
    );
    assert_eq!(f.record(&ids[0]).await.state().kind(), StateKind::Active);
    f.manager.access_token(&ids[0]).await.unwrap();
}

#[tokio::test]
async fn commit_then_drop_recovers_inside_atlassians_leeway() {
    let f = Fixture::new(profiles::atlassian_3lo(), MockProfile::Atlassian3lo).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(3600));
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::CommitThenDrop,
    )]);
    assert!(matches!(
        f.manager.access_token(&id).await,
        Err(Error::TemporarilyUnavailable { .. })
    ));
    assert_eq!(
        f.mock.counters().grants[&0].rotations,
        1,
        "the provider rotated"
    );
    f.advance(Duration::from_secs(60));
    f.manager
        .access_token(&id)
        .await
        .expect("recovered with the previous token inside the leeway");
    let c = f.mock.counters();
    assert_eq!((c.totals.leeway_reuses, c.totals.reuse_detections), (1, 0));
    assert_eq!(f.record(&id).await.state().kind(), StateKind::Active);
}

#[tokio::test]
async fn commit_then_drop_without_leeway_ends_in_an_explained_reauthorization() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    let id = f.install().await;
    let other = f.install().await;
    f.advance(Duration::from_secs(28_800));
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::CommitThenDrop,
    )]);
    assert!(f.manager.access_token(&id).await.is_err());
    f.advance(Duration::from_secs(60));
    match f.manager.access_token(&id).await {
        Err(Error::ReauthorizationRequired { reason, .. }) => {
            assert_eq!(reason, ReauthReason::RotatedTokenLost)
        }
        other => panic!("expected ReauthorizationRequired, got {other:?}"),
    }
    let text = f.manager.explain(&id).await.unwrap().to_string();
    assert!(
        text.contains("reply was lost") && text.contains("no reuse of the previous token"),
        "{text}"
    );
    f.manager
        .access_token(&other)
        .await
        .expect("every other installation lives on");
}

#[tokio::test]
async fn a_401_from_the_api_refreshes_once_and_retries() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    let id = f.install().await;
    let peer = f.peer(profiles::github_app());
    let http = reqwest::Client::new();
    // This process caches the token; another process refreshes, which kills it at GitHub.
    let mine = f.manager.access_token(&id).await.unwrap();
    let theirs = peer.force_refresh(&id).await.unwrap();
    assert_ne!(mine, theirs);
    let response = f
        .manager
        .send_authorized(&id, http.get(f.mock.resource_url()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        f.mock.counters().totals.refreshes,
        1,
        "the peer's new token was reused"
    );
    // A real expiry at the provider (whose clock runs ahead), a minute after the token was
    // obtained here (`forced_refresh_min_interval`): one forced refresh, then success.
    f.mock.advance(Duration::from_secs(28_800));
    f.clock.advance(Duration::from_secs(60));
    let response = f
        .manager
        .send_authorized(&id, http.get(f.mock.resource_url()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(f.mock.counters().totals.refreshes, 2);
}

#[tokio::test]
async fn import_revoke_and_events() {
    let f = bitbucket().await;
    let source = f.install().await;
    let tokens = f.record(&source).await.tokens().clone();
    let imported = tokenkeeper::InstallationId::new("migrated/legacy-42").unwrap();
    let mut events = f.manager.subscribe();
    f.manager
        .import_installation(imported.clone(), tokens.clone())
        .await
        .unwrap();
    assert_eq!(events.recv().await.unwrap().kind, LocalEventKind::Imported);
    assert_eq!(
        f.manager.access_token(&imported).await.unwrap(),
        tokens.access_token
    );
    assert!(matches!(
        f.manager
            .import_installation(imported.clone(), tokens.clone())
            .await,
        Err(Error::Store { .. })
    ));
    let mut empty = tokens.clone();
    empty.access_token = tokenkeeper::AccessToken::new("");
    assert!(matches!(
        f.manager
            .import_installation(tokenkeeper::InstallationId::new("x").unwrap(), empty)
            .await,
        Err(Error::InvalidImport { .. })
    ));

    f.manager.revoke(&source).await.unwrap();
    assert_eq!(events.recv().await.unwrap().kind, LocalEventKind::Revoked);
    assert!(matches!(
        f.manager.access_token(&source).await,
        Err(Error::Revoked { .. })
    ));
    assert_eq!(
        f.mock.counters().grants[&0].revoked,
        Some(tokenkeeper_mock_provider::RevokedBy::Client),
        "revoked at the provider too"
    );
    let text = f.manager.explain(&source).await.unwrap().to_string();
    assert!(text.contains("Revoked by the application"), "{text}");
    assert!(matches!(
        f.manager
            .access_token(&tokenkeeper::InstallationId::new("nobody").unwrap())
            .await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_wrong_secret_trips_the_consumer_breaker_and_keeps_tokens() {
    let f = bitbucket().await;
    let ids = [f.install().await, f.install().await];
    f.mock.rotate_client_secret(
        tokenkeeper_mock_provider::DEFAULT_CLIENT_ID,
        "rotated-elsewhere",
    );
    f.advance(TWO_HOURS);
    match f.manager.access_token(&ids[0]).await {
        Err(e @ Error::ConsumerCredentials { .. }) => {
            assert!(e.to_string().contains("fix the client id/secret"))
        }
        other => panic!("expected ConsumerCredentials, got {other:?}"),
    }
    // The breaker answers for the second installation without a provider call.
    let calls = f.mock.counters().totals.token_calls;
    assert!(matches!(
        f.manager.access_token(&ids[1]).await,
        Err(Error::ConsumerCredentials { .. })
    ));
    assert_eq!(f.mock.counters().totals.token_calls, calls);
    for id in &ids {
        let r = f.record(id).await;
        assert!(
            !r.state().is_terminal(),
            "tokens are never condemned for a consumer problem"
        );
    }
    let e = f.manager.explain(&ids[0]).await.unwrap();
    assert!(e.summary.contains("client credentials"), "{}", e.summary);
    assert_eq!(
        e.process_breaker.map(|(_, d)| d.class),
        Some(FailureClass::ConsumerCredentialsInvalid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_refresher_brings_due_installations_current() {
    let f = bitbucket().await;
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(f.install().await);
    }
    f.advance(Duration::from_secs(6400)); // past refresh-ahead, before expiry
    let handle = f.manager.spawn_refresher_with(RefresherConfig {
        concurrency: 8,
        rate_per_second: None,
        page_size: 30,
        max_idle: Duration::from_millis(20),
        ..RefresherConfig::default()
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while f.mock.counters().totals.refreshes < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refresher too slow: {:?}",
            f.mock.counters().totals
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = handle.shutdown().await;
    assert_eq!(
        f.mock.counters().totals.refreshes,
        100,
        "exactly one refresh each"
    );
    assert!(stats.succeeded >= 100);
    for id in &ids {
        let r = f.record(id).await;
        assert_eq!(r.state().kind(), StateKind::Active);
        assert!(r.due_at().unwrap() > f.clock_now());
    }
}

trait ClockNow {
    fn clock_now(&self) -> tokenkeeper::core::Timestamp;
}

impl ClockNow for Fixture {
    fn clock_now(&self) -> tokenkeeper::core::Timestamp {
        tokenkeeper::core::Clock::now(&self.clock)
    }
}

#[allow(dead_code)]
fn assert_store_is_shared(_: &Arc<dyn TokenStore>) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_mid_refresh_cancels_nothing() {
    let f = bitbucket().await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    let before = f.record(&id).await.tokens().refresh_token.clone();
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::Latency {
            min_ms: 300,
            max_ms: 300,
        },
    )]);
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), f.manager.access_token(&id)).await;
    assert!(
        gave_up.is_err(),
        "the caller gave up while the provider was answering"
    );
    // The refresh finishes without its caller and writes the rotated token.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while f.record(&id).await.tokens().refresh_token == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned refresh never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.record(&id).await.state().kind(), StateKind::Active);
    f.manager.access_token(&id).await.unwrap();
    let c = f.mock.counters().totals;
    assert_eq!(
        (c.refreshes, c.rejected_refreshes),
        (1, 0),
        "one refresh, nothing lost"
    );
}

/// Found by the deterministic simulator: dropping a `RefresherHandle` (documented as "leaves
/// it running") closed its stop channel, and the refresher's wait then woke at once, forever:
/// a busy loop that burns a core (and, on virtual time, stops time). The refresher must keep
/// running quietly: an hour of virtual time passes, and it still refreshes what falls due.
#[test]
fn a_dropped_refresher_handle_leaves_it_running_without_spinning() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let consumer = tokenkeeper::ConsumerConfig::builder(tokenkeeper::profiles::bitbucket())
                .client_id("k")
                .client_secret("s")
                .redirect_uri("https://app.example/cb")
                .build()
                .unwrap();
            let manager = tokenkeeper::TokenManager::builder(
                consumer,
                tokenkeeper_memory::MemoryStore::new(),
            )
            .build()
            .unwrap();
            drop(manager.spawn_refresher());
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("an hour of virtual time passes: the refresher does not spin");
}
