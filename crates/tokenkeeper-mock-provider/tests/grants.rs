//! Grants over real HTTP, for every profile: authorization code (with and without PKCE),
//! refresh with each profile's rotation rules, client credentials, client authentication,
//! body encodings, the resource endpoint and RFC 7009 revocation.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::json;
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, s256_challenge,
};

#[tokio::test]
async fn every_profile_issues_independent_grants_and_refreshes_one_without_touching_others() {
    for profile in MockProfile::ALL {
        let mock = start(profile).await;
        let grants = [
            new_grant(&mock).await,
            new_grant(&mock).await,
            new_grant(&mock).await,
        ];
        let tokens: Vec<String> = grants.iter().map(|g| s(g, "access_token")).collect();
        assert_eq!(
            tokens
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3,
            "{profile}: each authorization gets its own tokens"
        );
        let (status, refreshed) = refresh(&mock, &s(&grants[0], "refresh_token")).await;
        assert_eq!(status, StatusCode::OK, "{profile}: {refreshed}");
        assert_ne!(s(&refreshed, "access_token"), tokens[0]);
        for g in &grants[1..] {
            let (status, _) = resource(&mock, &s(g, "access_token")).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "{profile}: other installations stay valid"
            );
            let (status, body) = refresh(&mock, &s(g, "refresh_token")).await;
            assert_eq!(status, StatusCode::OK, "{profile}: {body}");
        }
        let c = mock.counters();
        assert_eq!(c.totals.code_exchanges, 3);
        assert_eq!(c.grants.len(), 3);
        assert!(
            c.grants
                .values()
                .all(|g| g.refreshes == 1 && g.reuse_detections == 0)
        );
    }
}

#[tokio::test]
async fn success_bodies_follow_each_profile() {
    let mock = start(MockProfile::BitbucketLegacy).await;
    let g = new_grant(&mock).await;
    assert_eq!(g["scopes"], json!("repository account"));
    assert_eq!(g["expires_in"], json!(7200));
    assert_eq!(g["token_type"], json!("bearer"));
    assert_eq!(g["state"], json!("authorization_code"));
    let (_, r) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert_eq!(r["state"], json!("refresh_token"));
    assert_eq!(
        r["refresh_token"], g["refresh_token"],
        "legacy: same refresh token back"
    );

    let mock = start(MockProfile::Bitbucket).await;
    let g = new_grant(&mock).await;
    assert_eq!(g["scope"], json!("repository account"));
    assert!(g.get("scopes").is_none());
    let (_, r) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert_ne!(
        r["refresh_token"], g["refresh_token"],
        "rotating: new refresh token"
    );

    let mock = start(MockProfile::Atlassian3lo).await;
    let g = new_grant(&mock).await;
    assert_eq!(g["expires_in"], json!(3600));
    assert_eq!(g["token_type"], json!("Bearer"));

    let mock = start(MockProfile::GithubApp).await;
    let g = new_grant(&mock).await;
    assert_eq!(g["expires_in"], json!(28800));
    assert_eq!(g["refresh_token_expires_in"], json!(15_897_600));

    let mock = start(MockProfile::Google).await;
    let g = new_grant(&mock).await;
    let (_, r) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert!(
        r.get("refresh_token").is_none(),
        "google omits refresh_token on refresh: {r}"
    );
    let (status, _) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "google refresh tokens are long-lived"
    );
}

#[tokio::test]
async fn codes_are_single_use_and_bound_to_their_consumer_and_redirect() {
    let mock = start(MockProfile::Bitbucket).await;
    let code = authorize(&mock, &[]).await;
    let (status, _) = exchange(&mock, &code).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = exchange(&mock, &code).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_pair(&body),
        (
            "invalid_grant".into(),
            "The specified code is not valid.".into()
        )
    );
    assert_eq!(mock.counters().totals.code_reuses, 1);

    let code = authorize(&mock, &[]).await;
    let (status, _) = token_form(
        &mock,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://127.0.0.1/elsewhere"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "redirect_uri must match");

    let (status, _) = token_form(
        &mock,
        &[("grant_type", "authorization_code"), ("code", "nope")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // An expired code (10 minutes on the provider clock).
    let code = authorize(&mock, &[]).await;
    mock.advance(Duration::from_secs(601));
    let (status, _) = exchange(&mock, &code).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn authorize_validates_client_redirect_and_pkce() {
    let mock = start(MockProfile::Bitbucket).await;
    let get = |q: Vec<(&'static str, String)>| {
        let url = mock.authorize_url();
        async move { client().get(url).query(&q).send().await.unwrap() }
    };
    let base = |extra: &[(&'static str, &str)]| {
        let mut q = vec![
            ("client_id", DEFAULT_CLIENT_ID.to_owned()),
            ("response_type", "code".to_owned()),
            ("redirect_uri", REDIRECT.to_owned()),
        ];
        for (k, v) in extra {
            q.retain(|(key, _)| key != k);
            q.push((k, (*v).to_owned()));
        }
        q
    };
    let r = get(base(&[("client_id", "unknown")])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        json!("invalid_client")
    );
    let r = get(base(&[("redirect_uri", "https://evil.example/cb")])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = get(base(&[("response_type", "token")])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = get(base(&[
        ("code_challenge", "short"),
        ("code_challenge_method", "S256"),
    ]))
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "malformed challenge");
    let challenge = s256_challenge(&"v".repeat(43));
    let r = get(base(&[
        ("code_challenge", &challenge),
        ("code_challenge_method", "S512"),
    ]))
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "unknown method");
    let r = get(base(&[("state", "bad\u{7}state")])).await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "control characters in state"
    );
}

#[tokio::test]
async fn pkce_s256_and_plain_are_verified() {
    let mock = start(MockProfile::Atlassian3lo).await;
    let verifier = "a-verifier-with-enough-entropy-0123456789abcdefghij";
    let challenge = s256_challenge(verifier);
    let exchange_with = |code: String, verifier: Option<&'static str>| {
        let mock = &mock;
        async move {
            let mut form = vec![
                ("grant_type", "authorization_code".to_owned()),
                ("code", code),
                ("redirect_uri", REDIRECT.to_owned()),
            ];
            if let Some(v) = verifier {
                form.push(("code_verifier", v.to_owned()));
            }
            let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            token_form(mock, &form).await
        }
    };
    let pkce = [
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let code = authorize(&mock, &pkce).await;
    let (status, body) = exchange_with(
        code,
        Some("a-verifier-with-enough-entropy-0123456789abcdefghij"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let code = authorize(&mock, &pkce).await;
    let (status, body) = exchange_with(
        code.clone(),
        Some("the-wrong-verifier-with-enough-entropy-0123456789"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], json!("invalid_grant"));
    let (status, _) = exchange_with(
        code,
        Some("a-verifier-with-enough-entropy-0123456789abcdefghij"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a failed verification burns the code"
    );

    let code = authorize(&mock, &pkce).await;
    let (status, _) = exchange_with(code, None).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a missing verifier is refused"
    );

    // Review I1: a verifier for a code issued without a challenge is refused (RFC 9700
    // §4.8.2), so a PKCE downgrade cannot pass the suite.
    let code = authorize(&mock, &[]).await;
    let (status, body) = exchange_with(
        code,
        Some("a-verifier-with-enough-entropy-0123456789abcdefghij"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], json!("invalid_grant"));

    let plain = [
        (
            "code_challenge",
            "a-verifier-with-enough-entropy-0123456789abcdefghij",
        ),
        ("code_challenge_method", "plain"),
    ];
    let code = authorize(&mock, &plain).await;
    let (status, _) = exchange_with(
        code,
        Some("a-verifier-with-enough-entropy-0123456789abcdefghij"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn client_authentication_by_basic_or_form_and_exact_error_bodies() {
    let expected = [
        (
            MockProfile::BitbucketLegacy,
            400,
            "unauthorized_client",
            "Invalid OAuth client credentials",
        ),
        (
            MockProfile::Bitbucket,
            400,
            "unauthorized_client",
            "Invalid OAuth client credentials",
        ),
        (
            MockProfile::Atlassian3lo,
            401,
            "access_denied",
            "Unauthorized",
        ),
        (
            MockProfile::GithubApp,
            200,
            "incorrect_client_credentials",
            "The client_id and/or client_secret passed are incorrect.",
        ),
        (MockProfile::Google, 401, "invalid_client", "Unauthorized"),
    ];
    for (profile, status, error, description) in expected {
        let mock = start(profile).await;
        let g = new_grant(&mock).await;
        let rt = s(&g, "refresh_token");
        // Form-field client authentication works.
        let r = client()
            .post(mock.token_url())
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt.as_str()),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{profile}");
        let fresh: serde_json::Value = r.json().await.unwrap();
        let rt = fresh["refresh_token"].as_str().map_or(rt, str::to_owned);
        // A wrong secret is refused with the profile's exact body.
        let (got, body) = token_form_as(
            &mock,
            DEFAULT_CLIENT_ID,
            "wrong",
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
        )
        .await;
        assert_eq!(got.as_u16(), status, "{profile}: {body}");
        assert_eq!(
            error_pair(&body),
            (error.into(), description.into()),
            "{profile}"
        );
        // No credentials at all.
        let r = client()
            .post(mock.token_url())
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{profile}");
        assert_eq!(mock.counters().totals.client_auth_failures, 2);
        // The refused requests touched nothing: the refresh token still works.
        let (ok, body) = refresh(&mock, &rt).await;
        assert_eq!(ok, StatusCode::OK, "{profile}: {body}");
    }
}

#[tokio::test]
async fn json_bodies_are_refused_by_bitbucket_and_accepted_by_atlassian() {
    let mock = start(MockProfile::Bitbucket).await;
    let g = new_grant(&mock).await;
    let r = client()
        .post(mock.token_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .json(&json!({"grant_type": "refresh_token", "refresh_token": g["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        error_pair(&body),
        (
            "invalid_grant".into(),
            "Unsupported grant type: None".into()
        )
    );

    let mock = start(MockProfile::Atlassian3lo).await;
    let g = new_grant(&mock).await;
    let r = client()
        .post(mock.token_url())
        .json(&json!({
            "grant_type": "refresh_token",
            "refresh_token": g["refresh_token"],
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn grant_types_missing_unknown_and_client_credentials() {
    let mock = start(MockProfile::Bitbucket).await;
    let (status, body) = token_form(&mock, &[("code", "x")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error_description"],
        json!("Unsupported grant type: None")
    );
    let (status, _) = token_form(&mock, &[("grant_type", "password")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = token_form(&mock, &[("grant_type", "client_credentials")]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("refresh_token").is_none());
    assert_eq!(body["state"], json!("client_credentials"));
    let (status, _) = resource(&mock, &s(&body, "access_token")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mock.counters().totals.client_credentials, 1);
}

#[tokio::test]
async fn bitbucket_rotation_rejects_retired_tokens_and_counts_reuse() {
    let mock = start(MockProfile::Bitbucket).await;
    let g = new_grant(&mock).await;
    let old = s(&g, "refresh_token");
    let (_, r1) = refresh(&mock, &old).await;
    let (status, body) = refresh(&mock, &old).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_pair(&body),
        ("invalid_request".into(), "Invalid refresh_token".into())
    );
    let (status, _) = refresh(&mock, &s(&r1, "refresh_token")).await;
    assert_eq!(status, StatusCode::OK, "no family revocation on Bitbucket");
    let c = mock.counters();
    let grant = &c.grants[&0];
    assert_eq!(
        (
            grant.refreshes,
            grant.rotations,
            grant.rejected,
            grant.reuse_detections
        ),
        (2, 2, 1, 1)
    );
    let (status, body) = refresh(&mock, "never-issued").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error_description"], json!("Invalid refresh_token"));
}

#[tokio::test]
async fn bitbucket_refresh_tokens_expire_unused_after_the_inactivity_period() {
    let mock = start(MockProfile::Bitbucket).await;
    let a = new_grant(&mock).await;
    let b = new_grant(&mock).await;
    mock.advance(Duration::from_secs(89 * 24 * 3600));
    let (status, kept_alive) = refresh(&mock, &s(&a, "refresh_token")).await;
    assert_eq!(status, StatusCode::OK, "used inside 90 days");
    mock.advance(Duration::from_secs(2 * 24 * 3600));
    let (status, body) = refresh(&mock, &s(&b, "refresh_token")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_pair(&body),
        ("invalid_grant".into(), "Invalid refresh_token".into())
    );
    let (status, _) = refresh(&mock, &s(&kept_alive, "refresh_token")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the kept-alive installation lives on"
    );
}

#[tokio::test]
async fn atlassian_leeway_then_reuse_detection_revokes_the_family() {
    let mock = start(MockProfile::Atlassian3lo).await;
    let g = new_grant(&mock).await;
    let other = new_grant(&mock).await;
    let r0 = s(&g, "refresh_token");
    let (_, first) = refresh(&mock, &r0).await;
    mock.advance(Duration::from_secs(300));
    let (status, again) = refresh(&mock, &r0).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the previous token works inside the 10-minute leeway"
    );
    mock.advance(Duration::from_secs(301));
    let (status, body) = refresh(&mock, &r0).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        error_pair(&body),
        (
            "invalid_grant".into(),
            "Unknown or invalid refresh token.".into()
        )
    );
    for token in [s(&first, "refresh_token"), s(&again, "refresh_token")] {
        let (status, _) = refresh(&mock, &token).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "reuse revoked the whole family"
        );
    }
    let (status, _) = resource(&mock, &s(&again, "access_token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = refresh(&mock, &s(&other, "refresh_token")).await;
    assert_eq!(status, StatusCode::OK, "other grants are untouched");
    let c = mock.counters();
    assert_eq!(c.grants[&0].leeway_reuses, 1);
    assert_eq!(c.grants[&0].reuse_detections, 1);
    assert_eq!(c.totals.reuse_detections, 1);
}

#[tokio::test]
async fn github_old_tokens_die_on_use_and_errors_come_with_200() {
    let mock = start(MockProfile::GithubApp).await;
    let g = new_grant(&mock).await;
    let (status, _) = resource(&mock, &s(&g, "access_token")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, r1) = refresh(&mock, &s(&g, "refresh_token")).await;
    let (status, _) = resource(&mock, &s(&g, "access_token")).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the old access token died with the refresh"
    );
    let (status, _) = resource(&mock, &s(&r1, "access_token")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = refresh(&mock, &s(&g, "refresh_token")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "GitHub reports token errors with 200"
    );
    assert_eq!(
        error_pair(&body),
        (
            "bad_refresh_token".into(),
            "The refresh token passed is incorrect or expired.".into()
        )
    );
}

#[tokio::test]
async fn resource_endpoint_reports_expiry_like_bitbucket() {
    let mock = start(MockProfile::Bitbucket).await;
    let g = new_grant(&mock).await;
    let access = s(&g, "access_token");
    let (status, body) = resource(&mock, &access).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["grant"], json!(0));
    mock.advance(Duration::from_secs(7200));
    let (status, body) = resource(&mock, &access).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        json!({"type": "error", "error": {"message": "Access token expired."}})
    );
    let (status, body) = resource(&mock, "garbage").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_ne!(body["error"]["message"], json!("Access token expired."));
    let r = client().get(mock.resource_url()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no bearer token");
    assert_eq!(mock.counters().totals.resource_unauthorized, 3);
}

#[tokio::test]
async fn rfc7009_revocation_of_a_refresh_token_revokes_its_grant_only() {
    let mock = start(MockProfile::Bitbucket).await;
    let a = new_grant(&mock).await;
    let b = new_grant(&mock).await;
    let revoke = |token: String| {
        let url = mock.revoke_url();
        async move {
            client()
                .post(url)
                .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
                .form(&[
                    ("token", token.as_str()),
                    ("token_type_hint", "refresh_token"),
                ])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(revoke(s(&a, "refresh_token")).await, StatusCode::OK);
    assert_eq!(
        revoke("unknown-token".into()).await,
        StatusCode::OK,
        "unknown tokens are fine"
    );
    let (status, _) = refresh(&mock, &s(&a, "refresh_token")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = resource(&mock, &s(&a, "access_token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = refresh(&mock, &s(&b, "refresh_token")).await;
    assert_eq!(status, StatusCode::OK);
    let r = client()
        .post(mock.revoke_url())
        .basic_auth(DEFAULT_CLIENT_ID, Some("wrong"))
        .form(&[("token", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "revocation needs client auth"
    );
}
