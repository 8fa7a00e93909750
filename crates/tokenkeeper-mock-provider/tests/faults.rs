//! Every fault kind over real HTTP, including commit-then-drop, and seeded replay of
//! probabilistic plans.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::Value;
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Endpoint, Fault, FaultRule, MockProfile, MockProvider,
};

async fn raw_refresh(mock: &MockProvider, token: &str) -> reqwest::Result<reqwest::Response> {
    client()
        .post(mock.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", token)])
        .send()
        .await
}

/// Sends a refresh under `fault` and returns the reply (or transport error text).
async fn under(fault: Fault) -> (MockProvider, Value, Reply) {
    under_profile(MockProfile::Bitbucket, fault).await
}

type Reply = Result<(StatusCode, reqwest::header::HeaderMap, Vec<u8>), String>;

async fn under_profile(profile: MockProfile, fault: Fault) -> (MockProvider, Value, Reply) {
    let mock = start(profile).await;
    let g = new_grant(&mock).await;
    mock.set_faults(vec![FaultRule::next(Endpoint::Token, 1, fault)]);
    let out = match raw_refresh(&mock, &s(&g, "refresh_token")).await {
        Ok(r) => {
            let status = r.status();
            let headers = r.headers().clone();
            match r.bytes().await {
                Ok(b) => Ok((status, headers, b.to_vec())),
                Err(e) => Err(format!("body: {e}")),
            }
        }
        Err(e) => Err(format!("send: {e}")),
    };
    (mock, g, out)
}

#[tokio::test]
async fn server_errors_with_html_or_json_bodies_commit_nothing() {
    for (status, html) in [(500, false), (502, true), (503, true), (503, false)] {
        let (mock, g, out) = under(Fault::ServerError { status, html }).await;
        let (got, headers, body) = out.unwrap();
        assert_eq!(got.as_u16(), status);
        let ctype = headers["content-type"].to_str().unwrap();
        assert_eq!(ctype.starts_with("text/html"), html, "{ctype}");
        assert_eq!(String::from_utf8_lossy(&body).starts_with("<html>"), html);
        assert_eq!(
            refresh(&mock, &s(&g, "refresh_token")).await.0,
            StatusCode::OK,
            "nothing rotated"
        );
        assert_eq!(mock.counters().totals.faults_injected, 1);
    }
}

#[tokio::test]
async fn too_many_requests_carries_retry_after() {
    let (mock, g, out) = under(Fault::TooManyRequests {
        retry_after_secs: 42,
    })
    .await;
    let (status, headers, _) = out.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "42");
    assert_eq!(
        refresh(&mock, &s(&g, "refresh_token")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn latency_delays_then_answers_normally() {
    let mock = start(MockProfile::Bitbucket).await;
    let g = new_grant(&mock).await;
    mock.set_faults(vec![FaultRule::next(
        Endpoint::Token,
        1,
        Fault::Latency {
            min_ms: 300,
            max_ms: 300,
        },
    )]);
    let started = Instant::now();
    let (status, _) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the delay was applied"
    );
    // A client with a shorter timeout sees a timeout.
    mock.set_faults(vec![FaultRule::next(
        Endpoint::Resource,
        1,
        Fault::Latency {
            min_ms: 2000,
            max_ms: 2000,
        },
    )]);
    let err = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap()
        .get(mock.resource_url())
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
}

#[tokio::test]
async fn connection_reset_is_a_transport_error_and_commits_nothing() {
    let (mock, g, out) = under(Fault::ConnectionReset).await;
    assert!(out.is_err(), "{out:?}");
    assert_eq!(
        refresh(&mock, &s(&g, "refresh_token")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        mock.counters().totals.refresh_calls,
        1,
        "the reset request never reached the grant"
    );
}

#[tokio::test]
async fn malformed_json_and_error_in_200_commit_nothing() {
    let (mock, g, out) = under(Fault::MalformedJson).await;
    let (status, _, body) = out.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    assert_eq!(
        refresh(&mock, &s(&g, "refresh_token")).await.0,
        StatusCode::OK
    );

    let (mock, g, out) = under(Fault::ErrorIn200).await;
    let (status, _, body) = out.unwrap();
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    assert_eq!(
        refresh(&mock, &s(&g, "refresh_token")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn missing_fields_commit_and_drop_the_fields() {
    let (mock, g, out) = under(Fault::MissingFields {
        fields: vec!["expires_in".into(), "token_type".into()],
    })
    .await;
    let (status, _, body) = out.unwrap();
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body.get("expires_in").is_none() && body.get("token_type").is_none());
    // The grant was committed: the new refresh token works, the old one is retired.
    assert_eq!(
        refresh(&mock, &s(&body, "refresh_token")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        refresh(&mock, &s(&g, "refresh_token")).await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn oversized_bodies_are_sent_whole() {
    let (mock, g, out) = under(Fault::OversizedBody {
        bytes: 10 * 1024 * 1024,
    })
    .await;
    let (status, _, body) = out.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.len() >= 10 * 1024 * 1024 - 2);
    assert_eq!(
        refresh(&mock, &s(&g, "refresh_token")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn commit_then_drop_leaves_the_provider_holding_a_token_the_client_never_saw() {
    let (mock, g, out) = under(Fault::CommitThenDrop).await;
    assert!(out.is_err(), "the client must not get a reply: {out:?}");
    let c = mock.counters();
    assert_eq!(
        c.grants[&0].rotations, 1,
        "the provider rotated the refresh token"
    );
    // Bitbucket has no leeway: the token the client still holds is retired.
    let (status, body) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(mock.counters().grants[&0].reuse_detections, 1);

    // With Atlassian's leeway, the previous token recovers the installation.
    let (mock, g, out) = under_profile(MockProfile::Atlassian3lo, Fault::CommitThenDrop).await;
    assert!(out.is_err(), "{out:?}");
    assert_eq!(mock.counters().grants[&0].rotations, 1);
    let (status, _) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mock.counters().grants[&0].leeway_reuses, 1);
}

#[tokio::test]
async fn probabilistic_faults_replay_with_the_same_seed() {
    async fn outcomes(seed: u64) -> Vec<u16> {
        let mock = MockProvider::builder().seed(seed).start().await.unwrap();
        mock.set_faults(vec![FaultRule::probability(
            Endpoint::Resource,
            0.5,
            Fault::ServerError {
                status: 503,
                html: false,
            },
        )]);
        let mut out = Vec::new();
        for _ in 0..40 {
            let r = client().get(mock.resource_url()).send().await.unwrap();
            out.push(r.status().as_u16());
        }
        out
    }
    let a = outcomes(7).await;
    assert_eq!(a, outcomes(7).await, "same seed, same faults");
    assert!(a.contains(&503) && a.contains(&401), "{a:?}");
    assert_ne!(a, outcomes(8).await);
}

#[tokio::test]
async fn faults_target_only_their_endpoint() {
    let mock = start(MockProfile::Bitbucket).await;
    mock.set_faults(vec![FaultRule::next(
        Endpoint::Resource,
        5,
        Fault::ConnectionReset,
    )]);
    let g = new_grant(&mock).await;
    assert_eq!(
        refresh(&mock, &s(&g, "refresh_token")).await.0,
        StatusCode::OK
    );
    assert!(client().get(mock.resource_url()).send().await.is_err());
}
