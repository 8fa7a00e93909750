//! Admin endpoints for tests: change a consumer's scopes (revokes its grants), revoke one grant,
//! rotate a client secret, move the provider clock, set the fault plan, read and reset counters.
//!
//! They answer only to loopback peers that present the per-run admin token
//! (`Authorization: Bearer`, printed at start-up and given by `MockProvider::admin_token`): a
//! loopback check alone is passed by anything that forwards traffic on the host (a proxy, a
//! port-forward, DNS rebinding from a browser), and a token in a header also stops cross-site
//! requests.

use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::faults::FaultPlan;
use crate::http::Shared;
use crate::provider::{Counters, RevokedBy};

pub(crate) fn router(shared: Shared) -> Router<Shared> {
    Router::new()
        .route("/consumers/{client_id}/scopes", post(set_scopes))
        .route("/consumers/{client_id}/secret", post(rotate_secret))
        .route("/grants/revoke", post(revoke_grant))
        .route("/clock", get(clock))
        .route("/clock/advance", post(advance))
        .route("/faults", get(get_faults).put(set_faults))
        .route("/counters", get(counters))
        .route("/counters/reset", post(reset_counters))
        .layer(middleware::from_fn_with_state(shared, admitted))
}

async fn admitted(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !peer.ip().to_canonical().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "admin endpoints answer loopback peers only",
        )
            .into_response();
    }
    let token = shared.lock().admin_token.clone();
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token.is_empty() || !presented.is_some_and(|p| same_secret(p, &token)) {
        return (
            StatusCode::UNAUTHORIZED,
            "admin endpoints need the admin token the mock printed at start-up (Authorization: Bearer ...)",
        )
            .into_response();
    }
    next.run(req).await
}

/// Compares two secrets in time that depends on their lengths only (review I1): the admin
/// token must not be guessable byte by byte from response times.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[derive(Deserialize)]
struct ScopesBody {
    scopes: Vec<String>,
}

async fn set_scopes(
    State(shared): State<Shared>,
    Path(client_id): Path<String>,
    Json(body): Json<ScopesBody>,
) -> Response {
    match shared.lock().set_scopes(&client_id, body.scopes) {
        Some(n) => Json(json!({"revoked_grants": n})).into_response(),
        None => (StatusCode::NOT_FOUND, "unknown client_id").into_response(),
    }
}

#[derive(Deserialize)]
struct SecretBody {
    client_secret: String,
}

async fn rotate_secret(
    State(shared): State<Shared>,
    Path(client_id): Path<String>,
    Json(body): Json<SecretBody>,
) -> Response {
    if shared.lock().rotate_secret(&client_id, body.client_secret) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (StatusCode::NOT_FOUND, "unknown client_id").into_response()
    }
}

#[derive(Deserialize)]
struct RevokeBody {
    grant: Option<u64>,
    token: Option<String>,
}

async fn revoke_grant(State(shared): State<Shared>, Json(body): Json<RevokeBody>) -> Response {
    let mut p = shared.lock();
    let grant = body
        .grant
        .or_else(|| body.token.as_deref().and_then(|t| p.grant_of(t)));
    match grant {
        Some(g) if p.revoke_grant(g, RevokedBy::Admin) => Json(json!({"grant": g})).into_response(),
        _ => (StatusCode::NOT_FOUND, "no such grant").into_response(),
    }
}

fn now_json(shared: &Shared) -> Json<serde_json::Value> {
    let now = shared.lock().now_system();
    let secs = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    Json(json!({"now_unix_secs": secs}))
}

async fn clock(State(shared): State<Shared>) -> Json<serde_json::Value> {
    now_json(&shared)
}

#[derive(Deserialize)]
struct AdvanceBody {
    seconds: u64,
}

async fn advance(
    State(shared): State<Shared>,
    Json(body): Json<AdvanceBody>,
) -> Json<serde_json::Value> {
    shared.lock().advance(Duration::from_secs(body.seconds));
    now_json(&shared)
}

async fn get_faults(State(shared): State<Shared>) -> Json<FaultPlan> {
    Json(shared.lock().faults.clone())
}

async fn set_faults(State(shared): State<Shared>, Json(plan): Json<FaultPlan>) -> StatusCode {
    shared.lock().faults = plan;
    StatusCode::NO_CONTENT
}

async fn counters(State(shared): State<Shared>) -> Json<Counters> {
    Json(shared.lock().counters())
}

async fn reset_counters(State(shared): State<Shared>) -> StatusCode {
    shared.lock().reset_counters();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_match_only_whole() {
        assert!(same_secret("s3cret-token", "s3cret-token"));
        assert!(!same_secret("s3cret-token", "s3cret-tokeN"));
        assert!(!same_secret("s3cret-token", "s3cret-toke"));
        assert!(!same_secret("", "s3cret-token"));
    }
}
