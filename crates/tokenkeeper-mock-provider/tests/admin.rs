//! The admin API over real HTTP: scope changes revoke every grant of one consumer (and only
//! that consumer), single-grant revocation, client secret rotation, the provider clock, the
//! fault plan and the counters.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokenkeeper_mock_provider::{
    ConsumerSpec, Counters, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

async fn admin(
    mock: &MockProvider,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, String) {
    let mut req = client()
        .request(method, format!("{}{path}", mock.admin_url()))
        .bearer_auth(mock.admin_token());
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn counters(mock: &MockProvider) -> Counters {
    let (status, text) = admin(mock, reqwest::Method::GET, "/counters", None).await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn scope_change_revokes_every_grant_of_that_consumer_only() {
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .consumer(ConsumerSpec::new(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET))
        .consumer(ConsumerSpec::new("second-app", "second-secret"))
        .start()
        .await
        .unwrap();
    let mine = [new_grant(&mock).await, new_grant(&mock).await];
    // A grant of the second consumer.
    let code = mock.authorize_code("second-app", None, None).unwrap();
    let (status, theirs) = token_form_as(
        &mock,
        "second-app",
        "second-secret",
        &[("grant_type", "authorization_code"), ("code", &code)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let (status, text) = admin(
        &mock,
        reqwest::Method::POST,
        &format!("/consumers/{DEFAULT_CLIENT_ID}/scopes"),
        Some(json!({"scopes": ["repository", "account", "pullrequest"]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"revoked_grants": 2})
    );

    for g in &mine {
        let (status, body) = refresh(&mock, &s(g, "refresh_token")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            error_pair(&body),
            ("invalid_request".into(), "Invalid refresh_token".into())
        );
        let (status, _) = resource(&mock, &s(g, "access_token")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = token_form_as(
        &mock,
        "second-app",
        "second-secret",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &s(&theirs, "refresh_token")),
        ],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the second consumer's grant lives on: {body}"
    );
    // A new authorization after the change gets the new scopes.
    let fresh = new_grant(&mock).await;
    assert_eq!(fresh["scope"], json!("repository account pullrequest"));
    let c = counters(&mock).await;
    assert_eq!(
        c.grants[&0].revoked,
        Some(tokenkeeper_mock_provider::RevokedBy::ScopeChange)
    );
    assert_eq!(c.grants[&2].revoked, None);
    let (status, _) = admin(
        &mock,
        reqwest::Method::POST,
        "/consumers/nobody/scopes",
        Some(json!({"scopes": []})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn revoke_one_grant_by_id_or_token() {
    let mock = start(MockProfile::Bitbucket).await;
    let a = new_grant(&mock).await;
    let b = new_grant(&mock).await;
    let c = new_grant(&mock).await;
    let (status, _) = admin(
        &mock,
        reqwest::Method::POST,
        "/grants/revoke",
        Some(json!({"grant": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = admin(
        &mock,
        reqwest::Method::POST,
        "/grants/revoke",
        Some(json!({"token": s(&b, "access_token")})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"grant": 1})
    );
    for g in [&a, &b] {
        assert_eq!(
            refresh(&mock, &s(g, "refresh_token")).await.0,
            StatusCode::BAD_REQUEST
        );
    }
    assert_eq!(
        refresh(&mock, &s(&c, "refresh_token")).await.0,
        StatusCode::OK
    );
    let (status, _) = admin(
        &mock,
        reqwest::Method::POST,
        "/grants/revoke",
        Some(json!({"grant": 99})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn rotating_the_client_secret_refuses_the_old_one() {
    let mock = start(MockProfile::Bitbucket).await;
    let g = new_grant(&mock).await;
    let (status, _) = admin(
        &mock,
        reqwest::Method::POST,
        &format!("/consumers/{DEFAULT_CLIENT_ID}/secret"),
        Some(json!({"client_secret": "new-secret"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], json!("unauthorized_client"));
    let (status, _) = token_form_as(
        &mock,
        DEFAULT_CLIENT_ID,
        "new-secret",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &s(&g, "refresh_token")),
        ],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the installation's tokens survived the secret rotation"
    );
}

#[tokio::test]
async fn advancing_the_clock_expires_access_tokens() {
    let mock = start(MockProfile::Bitbucket).await;
    let g = new_grant(&mock).await;
    let (_, before) = admin(&mock, reqwest::Method::GET, "/clock", None).await;
    let before: f64 = serde_json::from_str::<Value>(&before).unwrap()["now_unix_secs"]
        .as_f64()
        .unwrap();
    let (status, after) = admin(
        &mock,
        reqwest::Method::POST,
        "/clock/advance",
        Some(json!({"seconds": 7199})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let after: f64 = serde_json::from_str::<Value>(&after).unwrap()["now_unix_secs"]
        .as_f64()
        .unwrap();
    assert!(after - before >= 7199.0, "{before} -> {after}");
    assert_eq!(
        resource(&mock, &s(&g, "access_token")).await.0,
        StatusCode::OK
    );
    admin(
        &mock,
        reqwest::Method::POST,
        "/clock/advance",
        Some(json!({"seconds": 1})),
    )
    .await;
    let (status, body) = resource(&mock, &s(&g, "access_token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["message"], json!("Access token expired."));
}

#[tokio::test]
async fn fault_plan_round_trips_and_counters_reset() {
    let mock = start(MockProfile::Bitbucket).await;
    let g = new_grant(&mock).await;
    let plan = json!([
        {"endpoint": "token", "fault": {"kind": "server_error", "status": 503, "html": true}, "trigger": {"kind": "next", "count": 1}},
        {"endpoint": "resource", "fault": {"kind": "too_many_requests", "retry_after_secs": 7}, "trigger": {"kind": "probability", "p": 0.0}}
    ]);
    let (status, _) = admin(&mock, reqwest::Method::PUT, "/faults", Some(plan.clone())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, text) = admin(&mock, reqwest::Method::GET, "/faults", None).await;
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), plan);
    let r = client()
        .post(mock.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &s(&g, "refresh_token")),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The "next 1" rule is used up and removed; the probability-0 rule stays and never fires.
    let (_, text) = admin(&mock, reqwest::Method::GET, "/faults", None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&text)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        refresh(&mock, &s(&g, "refresh_token")).await.0,
        StatusCode::OK
    );
    let c = counters(&mock).await;
    assert_eq!(c.totals.faults_injected, 1);
    assert_eq!(c.grants[&0].refreshes, 1);
    let (status, _) = admin(&mock, reqwest::Method::POST, "/counters/reset", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let c = counters(&mock).await;
    assert_eq!(c.totals, Default::default());
    assert_eq!(c.grants[&0].refreshes, 0);
    assert_eq!(c.grants[&0].consumer, DEFAULT_CLIENT_ID);
}

/// Security review M7: the admin API needs the per-run admin token even from loopback (a
/// forwarded or rebound request, a cross-site POST carry none), and the mock refuses to bind
/// an address others can reach unless told it may.
#[tokio::test]
async fn the_admin_api_needs_the_run_token_and_the_mock_binds_loopback_only() {
    let mock = MockProvider::builder().start().await.unwrap();
    let url = format!("{}/counters/reset", mock.admin_url());
    let bare = client().post(&url).send().await.unwrap();
    assert_eq!(bare.status(), StatusCode::UNAUTHORIZED);
    let wrong = client()
        .post(&url)
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let other = MockProvider::builder().start().await.unwrap();
    assert_ne!(mock.admin_token(), other.admin_token(), "random per run");
    assert_eq!(mock.admin_token().len(), 64);
    let right = client()
        .post(&url)
        .bearer_auth(mock.admin_token())
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::NO_CONTENT);

    let public = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let err = MockProvider::builder()
        .addr(public)
        .start()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(err.to_string().contains("--insecure-public"), "{err}");
    MockProvider::builder()
        .addr(public)
        .insecure_public(true)
        .start()
        .await
        .unwrap();
}
