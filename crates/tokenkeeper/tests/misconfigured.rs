//! A misconfigured process (a stale client secret, a request the provider refuses as
//! malformed) never writes its own configuration's failure into shared records: healthy
//! processes on the same store keep refreshing (review finding E11). The failure stays in
//! the misconfigured process, as its consumer breaker.

mod common;

use std::time::Duration;

use common::*;
use tokenkeeper::{Error, core::StateKind, profiles};
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);

/// A process with a stale client secret is refused; a healthy process refreshes the same
/// installation at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_a_stale_secret_does_not_hold_up_healthy_ones() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    let stale = tokenkeeper::TokenManager::builder_shared(
        consumer_for(profiles::bitbucket(), &f.mock, "a-stale-secret"),
        f.store.clone(),
    )
    .clock(f.clock.clone())
    .build()
    .unwrap();
    match stale.access_token(&id).await {
        Err(Error::ConsumerCredentials { .. }) => {}
        other => panic!("the stale secret is refused: {other:?}"),
    }
    assert_ne!(f.record(&id).await.state().kind(), StateKind::Backoff);
    f.manager
        .access_token(&id)
        .await
        .expect("a healthy process refreshes");
    // The stale process fails fast from then on (its breaker), without asking the provider.
    let calls = f.mock.counters().totals.token_calls;
    match stale.force_refresh(&id).await {
        Err(Error::ConsumerCredentials { .. }) => {}
        other => panic!("the breaker answers: {other:?}"),
    }
    assert_eq!(f.mock.counters().totals.token_calls, calls);
}

/// A process whose requests the provider refuses as malformed (a profile with the wrong body
/// format, during a rolling deploy) leaves the installation to the healthy processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_does_not_hold_up_healthy_processes() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    f.advance(TWO_HOURS);
    let bad = f.peer(profiles::bitbucket());
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::ErrorReply {
            status: 400,
            error: "unsupported_grant_type".into(),
            description: "Unsupported grant type: None".into(),
        },
    )]);
    match bad.access_token(&id).await {
        Err(Error::Configuration { .. }) => {}
        other => panic!("the malformed request is refused: {other:?}"),
    }
    assert_ne!(f.record(&id).await.state().kind(), StateKind::Backoff);
    f.manager
        .access_token(&id)
        .await
        .expect("a healthy process refreshes");
}

/// A malformed request may be about one installation alone (an `invalid_request` for its
/// grant): it holds back that installation in this process, not the process's others (nor,
/// each process tripping in turn, the fleet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_holds_back_only_its_installation() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let (odd, other) = (f.install().await, f.install().await);
    f.advance(TWO_HOURS);
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::ErrorReply {
            status: 400,
            error: "unsupported_grant_type".into(),
            description: "Unsupported grant type: None".into(),
        },
    )]);
    assert!(matches!(
        f.manager.access_token(&odd).await,
        Err(Error::Configuration { .. })
    ));
    f.manager
        .access_token(&other)
        .await
        .expect("the process's other installations refresh");
    let calls = f.mock.counters().totals.token_calls;
    assert!(matches!(
        f.manager.access_token(&odd).await,
        Err(Error::Configuration { .. })
    ));
    assert_eq!(
        f.mock.counters().totals.token_calls,
        calls,
        "the odd one is held back here without asking again"
    );
}
