//! Short-lived access tokens: a token is never believed longer than the provider said (an
//! independent OpenID server issuing 5-second tokens had most of them served after they
//! expired), and a tiny or zero `expires_in` cannot turn every call into a refresh: the
//! minimum interval between refreshes holds them off, and callers are told so with a typed
//! error rather than served an expired token.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokenkeeper::{Error, profiles};
use tokenkeeper_memory::MemoryStore;
use tokenkeeper_mock_provider::{MockProfile, MockProvider};

async fn fixture_with_ttl(ttl: Duration) -> Fixture {
    let mock = MockProvider::builder()
        .profile(MockProfile::Google)
        .access_ttl(ttl)
        .start()
        .await
        .unwrap();
    Fixture::with_mock(
        mock,
        profiles::google(),
        Arc::new(MemoryStore::new()),
        |_| {},
    )
}

/// 5-second tokens: believed for 5 seconds (less the skew margin, a quarter of the
/// lifetime), so at 4 s the token is replaced, and never served at 6 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_second_tokens_are_never_served_after_they_expire() {
    let f = fixture_with_ttl(Duration::from_secs(5)).await;
    let id = f.install().await;
    let record = f.record(&id).await;
    assert_eq!(
        record.tokens().lifetime(),
        Duration::from_secs(5),
        "the provider's lifetime is believed"
    );
    let first = f.manager.access_token(&id).await.unwrap();
    f.advance(Duration::from_secs(4));
    let second = f.manager.access_token(&id).await.unwrap();
    assert_ne!(first, second, "a token in its last quarter is replaced");
    f.advance(Duration::from_secs(6));
    let third = f.manager.access_token(&id).await.unwrap();
    assert_ne!(second, third, "an expired token is never served");
    let now = tokenkeeper::core::Clock::now(&f.clock);
    assert!(f.record(&id).await.tokens().expires_at > now);
    assert_eq!(f.mock.counters().totals.refreshes, 2);
}

/// Tokens that live less than the minimum interval between refreshes (here one second
/// against three; `expires_in: 0` is the same case, unit tested in the reply parser): once
/// such a token expired, the next refresh waits for the interval. Meanwhile callers get
/// `RefreshTooSoon` (not the expired token, not a refresh per call), and `explain` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_shorter_than_the_refresh_interval_are_refreshed_once_per_interval() {
    let mock = MockProvider::builder()
        .profile(MockProfile::Google)
        .access_ttl(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let f = Fixture::with_mock(
        mock,
        profiles::google(),
        Arc::new(MemoryStore::new()),
        |p| p.min_refresh_interval = Duration::from_secs(3),
    );
    let id = f.install().await;
    f.advance(Duration::from_millis(1500));
    for _ in 0..5 {
        match f.manager.access_token(&id).await {
            Err(Error::RefreshTooSoon { retry_at, .. }) => {
                assert!(retry_at > tokenkeeper::core::Clock::now(&f.clock));
            }
            other => panic!("expected RefreshTooSoon, got {other:?}"),
        }
    }
    assert_eq!(f.mock.counters().totals.refreshes, 0, "no refresh storm");
    let text = f.manager.explain(&id).await.unwrap().to_string();
    assert!(text.contains("minimum interval"), "{text}");
    f.advance(Duration::from_millis(1500));
    f.manager
        .access_token(&id)
        .await
        .expect("refreshed once the interval passed");
    assert_eq!(f.mock.counters().totals.refreshes, 1);
}
