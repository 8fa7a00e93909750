//! A 5xx that arrives after the request was sent: a gateway or CDN may answer 502/503/504
//! after the origin committed the rotation. For a rotating provider that answer is evidence
//! that the presented refresh token may be retired (review finding E4): the retry stays
//! inside the provider's reuse leeway whatever `Retry-After` says, and a refusal afterwards
//! is a lost rotation, never "the user revoked the app".

mod common;

use std::time::Duration;

use common::*;
use tokenkeeper::{Error, core::Clock, core::ReauthReason, core::StateKind, profiles};
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};

fn commit_then_503(retry_after_secs: u64) -> Vec<FaultRule> {
    vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::CommitThenServerError {
            status: 503,
            retry_after_secs,
        },
    )]
}

/// Atlassian rotates R0→R1, then its gateway answers `503 Retry-After: 900`. The retry comes
/// inside the 10-minute reuse leeway (not after 15 minutes, when presenting R0 would trip
/// reuse detection and revoke the grant) and recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_after_a_committed_rotation_is_retried_inside_the_leeway() {
    let f = Fixture::new(profiles::atlassian_3lo(), MockProfile::Atlassian3lo).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(3600));
    f.mock.set_faults(commit_then_503(900));
    assert!(f.manager.access_token(&id).await.is_err());
    let failed_at = f.clock.now();
    let due = f.record(&id).await.due_at().unwrap();
    assert!(
        due <= failed_at.saturating_add(Duration::from_secs(5 * 60)),
        "the retry is scheduled within half the leeway, not after Retry-After: due {due}"
    );
    f.advance(due.duration_since(f.clock.now()));
    f.manager
        .access_token(&id)
        .await
        .expect("recovered inside the leeway");
    let c = f.mock.counters().totals;
    assert_eq!((c.leeway_reuses, c.reuse_detections), (1, 0), "{c:?}");
}

/// GitHub rotates without a leeway: after a 5xx that followed a committed rotation, the
/// retired token is refused. That refusal is a lost rotation, not a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_a_5xx_that_committed_is_a_lost_rotation() {
    let f = Fixture::new(profiles::github_app(), MockProfile::GithubApp).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(28_800));
    f.mock.set_faults(commit_then_503(10));
    assert!(f.manager.access_token(&id).await.is_err());
    f.advance(Duration::from_secs(20));
    match f.manager.access_token(&id).await {
        Err(Error::ReauthorizationRequired {
            reason: ReauthReason::RotatedTokenLost,
            ..
        }) => {}
        other => panic!("expected RotatedTokenLost, got {other:?}"),
    }
    let text = f.manager.explain(&id).await.unwrap().to_string();
    assert!(!text.contains("revoked the app"), "{text}");
}

/// A provider outage (503s, nothing committed) longer than Atlassian's leeway. Each 5xx is
/// remembered as a possible commit, so while the leeway of the first one lasts the retries
/// come inside it whatever `Retry-After` asks; past it, presenting the token again is the
/// better bet (a 5xx rarely follows a commit, and not presenting would condemn every
/// installation an outage touched), so the installation is not condemned and refreshes
/// once the provider is back, without reuse detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_longer_than_the_leeway_is_retried_inside_it_then_survives() {
    let f = Fixture::new(profiles::atlassian_3lo(), MockProfile::Atlassian3lo).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(3600));
    f.mock.set_faults(vec![FaultRule::probability(
        Endpoint::Token,
        1.0,
        Fault::ServerError {
            status: 503,
            html: false,
        },
    )]);
    let started = f.clock.now();
    let _ = f.manager.access_token(&id).await;
    let record = f.record(&id).await;
    let since = record.failures().and_then(|s| s.server_error_since);
    assert_eq!(since, Some(started), "the 5xx is remembered");
    assert!(
        record.due_at().unwrap() <= started.saturating_add(Duration::from_secs(5 * 60)),
        "retried inside the leeway"
    );
    for _ in 0..12 {
        f.advance(Duration::from_secs(60));
        let _ = f.manager.access_token(&id).await;
        let record = f.record(&id).await;
        assert_ne!(record.state().kind(), StateKind::ReauthorizationRequired);
    }
    f.mock.set_faults(Vec::new());
    f.advance(Duration::from_secs(3600));
    f.manager
        .access_token(&id)
        .await
        .expect("refreshes once the provider is back");
    assert_eq!(f.mock.counters().totals.reuse_detections, 0);
}
