//! Two OAuth consumers on one store (review finding 3): a manager never refreshes, leases,
//! condemns, revokes or re-authorizes an installation of another consumer. It answers a
//! typed error naming both consumers, calls no provider, and its background refresher never
//! sees foreign due entries (the due index is per consumer). Run on memory, SQLite and Redis.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokenkeeper::{Error, core::StateKind, core::TokenStore, profiles};
use tokenkeeper_mock_provider::{
    ConsumerSpec, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

const OTHER_ID: &str = "another-consumer-key";
const OTHER_SECRET: &str = "another-consumer-secret";

async fn two_consumers_on(store: Arc<dyn TokenStore>) {
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .consumer(ConsumerSpec::new(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET))
        .consumer(ConsumerSpec::new(OTHER_ID, OTHER_SECRET))
        .start()
        .await
        .unwrap();
    let clock = now_clock();
    let mine = manager_builder(
        consumer_for(profiles::bitbucket(), &mock, DEFAULT_CLIENT_SECRET),
        store.clone(),
    )
    .clock(clock.clone())
    .build()
    .unwrap();
    let theirs_consumer =
        tokenkeeper::ConsumerConfig::builder(pointed_at(profiles::bitbucket(), &mock))
            .client_id(OTHER_ID)
            .client_secret(OTHER_SECRET)
            .redirect_uri(REDIRECT)
            .state_key(common::state_key())
            .build()
            .unwrap();
    let theirs = manager_builder(theirs_consumer, store.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    // A manager of another provider with the same client id is another consumer too.
    let other_provider = manager_builder(
        consumer_for(profiles::atlassian_3lo(), &mock, DEFAULT_CLIENT_SECRET),
        store.clone(),
    )
    .clock(clock.clone())
    .build()
    .unwrap();
    let begun = mine.begin_authorization(None).unwrap();
    let (code, _) = browser(&begun.url).await;
    let id = mine
        .complete_authorization(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
        )
        .await
        .unwrap()
        .installation;
    clock.advance(Duration::from_secs(2 * 3600));
    mock.advance(Duration::from_secs(2 * 3600));
    mock.reset_counters();
    let before = store.get(&id).await.unwrap().unwrap();

    match theirs.access_token(&id).await {
        Err(e @ Error::ForeignConsumer { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&format!("bitbucket/{DEFAULT_CLIENT_ID}"))
                    && text.contains(&format!("bitbucket/{OTHER_ID}")),
                "{text}"
            );
        }
        other => panic!("expected ForeignConsumer, got {other:?}"),
    }
    assert!(matches!(
        theirs.force_refresh(&id).await,
        Err(Error::ForeignConsumer { .. })
    ));
    assert!(matches!(
        theirs.revoke(&id).await,
        Err(Error::ForeignConsumer { .. })
    ));
    match other_provider.access_token(&id).await {
        Err(e @ Error::ForeignConsumer { .. }) => {
            assert!(e.to_string().contains("atlassian-3lo/"), "{e}")
        }
        other => panic!("expected ForeignConsumer, got {other:?}"),
    }
    let elsewhere = other_provider.spawn_refresher_with(tokenkeeper::refresher::RefresherConfig {
        rate_per_second: None,
        max_idle: Duration::from_millis(50),
        ..tokenkeeper::refresher::RefresherConfig::default()
    });
    let refresher = theirs.spawn_refresher_with(tokenkeeper::refresher::RefresherConfig {
        rate_per_second: None,
        max_idle: Duration::from_millis(50),
        ..tokenkeeper::refresher::RefresherConfig::default()
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let counts = refresher.shutdown().await;
    let other_counts = elsewhere.shutdown().await;
    assert_eq!(
        (other_counts.attempted, other_counts.skipped),
        (0, 0),
        "another provider's refresher never sees the entry: {other_counts:?}"
    );
    assert!(
        counts.sweeps <= 20,
        "the refresher spun over a foreign entry: {counts:?}"
    );
    assert_eq!(
        (counts.attempted, counts.skipped),
        (0, 0),
        "the due index is per consumer: the foreign entry is never even seen: {counts:?}"
    );
    let c = mock.counters().totals;
    assert_eq!(
        c.token_calls, 0,
        "no provider call for another consumer's record: {c:?}"
    );
    assert_eq!(store.get(&id).await.unwrap().unwrap(), before, "untouched");

    // Its own manager refreshes it as usual.
    mine.access_token(&id).await.unwrap();
    assert_eq!(
        store.get(&id).await.unwrap().unwrap().state().kind(),
        StateKind::Active
    );
    assert_eq!(mock.counters().totals.refreshes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_on_memory() {
    two_consumers_on(Arc::new(tokenkeeper_memory::MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_on_sqlite() {
    let path = tokenkeeper_testkit::dirs::fresh_db("consumers");
    two_consumers_on(Arc::new(
        tokenkeeper_sqlite::SqliteStore::open(&path).await.unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_on_redis() {
    let store = tokenkeeper_redis::RedisStore::builder(tokenkeeper_testkit::redis::server_url())
        .prefix(tokenkeeper_testkit::redis::unique_prefix("consumers"))
        .connect()
        .await
        .unwrap();
    two_consumers_on(Arc::new(store)).await;
}

/// Review E2: a process with the same profile and client id but pointed at another
/// authorization server (a staging copy, a sandbox tenant, a regional endpoint) shares the
/// production store. Its token endpoint is part of the consumer's identity, so it sends no
/// production refresh token anywhere, condemns nothing, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_pointed_at_another_server_touches_nothing() {
    let store: Arc<dyn TokenStore> = Arc::new(tokenkeeper_memory::MemoryStore::new());
    let real = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    let elsewhere = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap();
    let clock = now_clock();
    let mine = manager_builder(
        consumer_for(profiles::bitbucket(), &real, DEFAULT_CLIENT_SECRET),
        store.clone(),
    )
    .clock(clock.clone())
    .build()
    .unwrap();
    let misconfigured = manager_builder(
        consumer_for(profiles::bitbucket(), &elsewhere, DEFAULT_CLIENT_SECRET),
        store.clone(),
    )
    .clock(clock.clone())
    .build()
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..12 {
        let begun = mine.begin_authorization(None).unwrap();
        let (code, _) = browser(&begun.url).await;
        let done = mine
            .complete_authorization(
                tokenkeeper::AuthorizationCode::new(code),
                &begun.state,
                &begun.binding,
            )
            .await
            .unwrap();
        ids.push(done.installation);
    }
    clock.advance(Duration::from_secs(2 * 3600));
    real.advance(Duration::from_secs(2 * 3600));
    elsewhere.advance(Duration::from_secs(2 * 3600));
    let before = store.get(&ids[0]).await.unwrap().unwrap();

    match misconfigured.access_token(&ids[0]).await {
        Err(e @ Error::ForeignConsumer { .. }) => {
            assert!(e.to_string().contains("token endpoint"), "{e}");
        }
        other => panic!("expected ForeignConsumer, got {other:?}"),
    }
    // Nor does it explain another consumer's installation as if it were its own (it would
    // call it healthy while refusing to serve it).
    assert!(matches!(
        misconfigured.explain(&ids[0]).await,
        Err(Error::ForeignConsumer { .. })
    ));
    let refresher = misconfigured.spawn_refresher_with(tokenkeeper::refresher::RefresherConfig {
        rate_per_second: None,
        max_idle: Duration::from_millis(50),
        ..tokenkeeper::refresher::RefresherConfig::default()
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let counts = refresher.shutdown().await;
    assert_eq!((counts.attempted, counts.skipped), (0, 0), "{counts:?}");
    let c = elsewhere.counters().totals;
    assert_eq!(
        c.token_calls, 0,
        "a production refresh token went elsewhere: {c:?}"
    );
    assert_eq!(
        store.get(&ids[0]).await.unwrap().unwrap(),
        before,
        "untouched"
    );
    for id in &ids {
        mine.access_token(id).await.unwrap();
    }
    assert_eq!(real.counters().totals.refreshes, ids.len() as u64);
}
