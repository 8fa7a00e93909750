//! Helpers shared by the mock provider's HTTP tests: a reqwest client that does not follow
//! redirects, the authorization round trip over HTTP, and token requests in each encoding.
#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::Value;
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

pub const REDIRECT: &str = "http://127.0.0.1/callback";

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub async fn start(profile: MockProfile) -> MockProvider {
    MockProvider::builder()
        .profile(profile)
        .start()
        .await
        .unwrap()
}

/// GET authorize over HTTP and return the code from the redirect.
pub async fn authorize(mock: &MockProvider, extra: &[(&str, &str)]) -> String {
    let mut query = vec![
        ("client_id", DEFAULT_CLIENT_ID),
        ("response_type", "code"),
        ("redirect_uri", REDIRECT),
        ("state", "st-123"),
    ];
    query.extend_from_slice(extra);
    let r = client()
        .get(mock.authorize_url())
        .query(&query)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND, "{:?}", r.text().await);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(REDIRECT), "{location}");
    let url = reqwest::Url::parse(&location).unwrap();
    let pairs: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(pairs.get("state").map(String::as_str), Some("st-123"));
    pairs["code"].clone()
}

/// POST a form to the token endpoint with HTTP Basic client authentication.
pub async fn token_form(mock: &MockProvider, form: &[(&str, &str)]) -> (StatusCode, Value) {
    token_form_as(mock, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, form).await
}

pub async fn token_form_as(
    mock: &MockProvider,
    id: &str,
    secret: &str,
    form: &[(&str, &str)],
) -> (StatusCode, Value) {
    let r = client()
        .post(mock.token_url())
        .basic_auth(id, Some(secret))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

pub async fn exchange(mock: &MockProvider, code: &str) -> (StatusCode, Value) {
    token_form(
        mock,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await
}

/// A fresh grant: authorize + exchange; returns the success body.
pub async fn new_grant(mock: &MockProvider) -> Value {
    let code = authorize(mock, &[]).await;
    let (status, body) = exchange(mock, &code).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

pub async fn refresh(mock: &MockProvider, refresh_token: &str) -> (StatusCode, Value) {
    token_form(
        mock,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

pub fn s(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
        .to_owned()
}

/// GET the resource endpoint with a bearer token.
pub async fn resource(mock: &MockProvider, access: &str) -> (StatusCode, Value) {
    let r = client()
        .get(mock.resource_url())
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

pub fn error_pair(v: &Value) -> (String, String) {
    (s(v, "error"), s(v, "error_description"))
}
