//! The HTTP face of the provider: axum routes for authorize, token, revoke and the resource
//! endpoint, request parsing (form or JSON bodies, HTTP Basic or body client authentication),
//! and the fault plan applied before and after the provider logic runs.
//!
//! Requests are logged with method, path and status only: query strings and bodies carry codes,
//! tokens and secrets, so they never reach the log.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::faults::{Endpoint, Fault};
use crate::profile::ErrorBody;
use crate::provider::{AuthorizeRequest, Provider, ResourceOutcome};

/// The provider behind a mutex, shared by handlers and the test handle.
#[derive(Debug, Clone)]
pub(crate) struct Shared(Arc<Mutex<Provider>>);

impl Shared {
    pub(crate) fn new(provider: Provider) -> Self {
        Self(Arc::new(Mutex::new(provider)))
    }

    /// Locks the provider. Handlers never hold it across an `.await`.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Provider> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Paths of the provider's endpoints.
pub mod paths {
    /// Authorization endpoint.
    pub const AUTHORIZE: &str = "/site/oauth2/authorize";
    /// Token endpoint.
    pub const TOKEN: &str = "/site/oauth2/access_token";
    /// RFC 7009 revocation endpoint.
    pub const REVOKE: &str = "/site/oauth2/revoke";
    /// A resource endpoint that checks the bearer token.
    pub const RESOURCE: &str = "/2.0/user";
    /// Admin endpoints (loopback peers with the admin token only).
    pub const ADMIN: &str = "/admin";
}

pub(crate) fn router(shared: Shared) -> Router {
    Router::new()
        .route(paths::AUTHORIZE, get(authorize).post(approve))
        .route(paths::TOKEN, post(token))
        .route(paths::REVOKE, post(revoke))
        .route(paths::RESOURCE, get(resource))
        .nest(paths::ADMIN, crate::admin::router(shared.clone()))
        .layer(middleware::from_fn(log_request))
        .with_state(shared)
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    tracing::info!(
        %method,
        %path,
        status = response.status().as_u16(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "mock provider request"
    );
    response
}

/// A body that fails on its first poll: hyper aborts the connection, so the client sees a
/// reset or a truncated reply.
struct DroppedBody;

impl http_body::Body for DroppedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "mock provider: connection dropped by fault injection",
        ))))
    }
}

fn dropped_connection() -> Response {
    Response::new(Body::new(DroppedBody))
}

fn json_response(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn error_response(e: &ErrorBody) -> Response {
    json_response(
        e.status,
        json!({"error": e.error, "error_description": e.description}),
    )
}

/// Picks the fault for this call and plays the ones that replace the reply. Returns the fault
/// that still has to act after the provider logic ran (missing fields, commit-then-drop).
async fn prelude(shared: &Shared, endpoint: Endpoint) -> Result<Option<Fault>, Response> {
    let (fault, delay) = pick_fault(shared, endpoint);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
        return Ok(None);
    }
    let Some(fault) = fault else {
        return Ok(None);
    };
    match replacement_reply(&fault) {
        Some(reply) => Err(reply),
        None => Ok(Some(fault)),
    }
}

/// The fault planned for this call on `endpoint` (counted when there is one), and the delay
/// it adds when it is a latency fault.
fn pick_fault(shared: &Shared, endpoint: Endpoint) -> (Option<Fault>, Option<Duration>) {
    let mut p = shared.lock();
    let provider = &mut *p;
    let fault = provider.faults.pick(endpoint, &mut provider.rng);
    if fault.is_some() {
        provider.totals.faults_injected += 1;
    }
    let delay = match &fault {
        Some(Fault::Latency { min_ms, max_ms }) => {
            let (lo, hi) = ((*min_ms).min(*max_ms), (*min_ms).max(*max_ms));
            Some(Duration::from_millis(provider.rng.u64(lo..=hi)))
        }
        _ => None,
    };
    (fault, delay)
}

/// The reply `fault` puts in place of the provider's; `None` when it acts after the provider
/// logic ran.
fn replacement_reply(fault: &Fault) -> Option<Response> {
    let reply = match *fault {
        Fault::ServerError { status, html: true } => html_error_page(status),
        Fault::ServerError {
            status,
            html: false,
        } => json_response(
            status,
            json!({"type": "error", "error": {"message": "Something went wrong"}}),
        ),
        Fault::TooManyRequests { retry_after_secs } => {
            let mut r = json_response(
                429,
                json!({"type": "error", "error": {"message": "Rate limit for this resource has been exceeded"}}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            r
        }
        Fault::ConnectionReset => dropped_connection(),
        Fault::MalformedJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"access_token\": \"trunc",
        )
            .into_response(),
        Fault::ErrorIn200 => json_response(
            200,
            json!({"error": "temporarily_unavailable", "error_description": "The service is temporarily unavailable, try again later."}),
        ),
        Fault::ErrorReply {
            status,
            ref error,
            ref description,
        } => json_response(
            status,
            json!({"error": error, "error_description": description}),
        ),
        Fault::OversizedBody { bytes } => oversized_body(bytes),
        _ => return None,
    };
    Some(reply)
}

/// A proxy's HTML error page with `status`.
fn html_error_page(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let page = format!(
        "<html><head><title>{status}</title></head><body><h1>{status}</h1><p>The server encountered a temporary error.</p></body></html>"
    );
    (status, [(header::CONTENT_TYPE, "text/html")], page).into_response()
}

/// A 200 JSON body of about `bytes` bytes.
fn oversized_body(bytes: usize) -> Response {
    let mut body = String::with_capacity(bytes + 64);
    body.push_str("{\"access_token\":\"x\",\"padding\":\"");
    while body.len() + 2 < bytes {
        body.push('a');
    }
    body.push_str("\"}");
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Client credentials from `Authorization: Basic`.
fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Request parameters from a form body, or from a JSON object where the profile accepts one.
/// A JSON body where only forms are accepted yields no parameters, which is how Bitbucket
/// comes to answer "Unsupported grant type: None".
fn body_params(headers: &HeaderMap, body: &[u8], accepts_json: bool) -> HashMap<String, String> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !is_json {
        return form_urlencoded::parse(body).into_owned().collect();
    }
    if !accepts_json {
        return HashMap::new();
    }
    match serde_json::from_slice::<Map<String, Value>>(body) {
        Ok(map) => map
            .into_iter()
            .filter_map(|(k, v)| match v {
                Value::String(s) => Some((k, s)),
                Value::Number(n) => Some((k, n.to_string())),
                Value::Bool(b) => Some((k, b.to_string())),
                _ => None,
            })
            .collect(),
        Err(_) => HashMap::new(),
    }
}

type ClientCall<T> =
    fn(&mut Provider, &HashMap<String, String>, Option<(String, String)>) -> Result<T, ErrorBody>;

/// A client-authenticated POST (token, revoke): faults first, then the provider logic under the
/// lock, then the fault that acts on the reply (commit-then-drop drops it whole).
async fn client_post<T>(
    shared: &Shared,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &[u8],
    call: ClientCall<T>,
    reply: impl FnOnce(T, Option<Fault>) -> Response,
) -> Response {
    let after = match prelude(shared, endpoint).await {
        Ok(after) => after,
        Err(response) => return response,
    };
    let result = {
        let mut p = shared.lock();
        let params = body_params(headers, body, p.rules.accepts_json);
        call(&mut p, &params, basic_auth(headers))
    };
    match (result, after) {
        (Ok(_), Some(Fault::CommitThenDrop)) => dropped_connection(),
        (
            Ok(_),
            Some(Fault::CommitThenServerError {
                status,
                retry_after_secs,
            }),
        ) => {
            let mut r = json_response(
                status,
                json!({"type": "error", "error": {"message": "Bad gateway"}}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            r
        }
        (Ok(value), Some(Fault::SlowReply { ms })) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            reply(value, None)
        }
        (Ok(value), after) => reply(value, after),
        (Err(e), _) => error_response(&e),
    }
}

async fn token(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    client_post(
        &shared,
        Endpoint::Token,
        &headers,
        &body,
        Provider::token_request,
        |mut reply, after| {
            if let Some(Fault::MissingFields { fields }) = after {
                for f in &fields {
                    reply.remove(f);
                }
            }
            json_response(200, Value::Object(reply))
        },
    )
    .await
}

async fn revoke(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    client_post(
        &shared,
        Endpoint::Revoke,
        &headers,
        &body,
        Provider::revoke_token,
        |(), _| StatusCode::OK.into_response(),
    )
    .await
}

/// Escapes text for an HTML attribute or element.
fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

async fn authorize(
    State(shared): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(response) = prelude(&shared, Endpoint::Authorize).await {
        return response;
    }
    if shared.lock().consent_page {
        // The consent page posts the same parameters back, with the account that approves.
        let mut fields = String::new();
        let mut keys: Vec<_> = query.keys().filter(|k| k.as_str() != "account").collect();
        keys.sort();
        for k in keys {
            fields.push_str(&format!(
                r#"<input type="hidden" name="{}" value="{}">"#,
                html_escape(k),
                html_escape(&query[k])
            ));
        }
        let client = html_escape(query.get("client_id").map_or("", String::as_str));
        let scope = html_escape(query.get("scope").map_or("", String::as_str));
        let page = format!(
            r#"<!doctype html><html><head><title>Mock provider: authorize</title></head><body>
<h1>Authorize {client}?</h1><p>TEST DOUBLE: no real account is involved.</p>
<p>It asks for: <code>{scope}</code></p>
<form method="post" action="{action}">{fields}
<label>Approve as account <input name="account" id="account" value="{default}"></label>
<button type="submit" id="approve">Approve</button></form></body></html>"#,
            action = paths::AUTHORIZE,
            default = crate::provider::DEFAULT_ACCOUNT,
        );
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page,
        )
            .into_response();
    }
    grant_code(&shared, &query)
}

/// The consent page's "Approve": the authorization parameters as a form.
async fn approve(State(shared): State<Shared>, body: Bytes) -> Response {
    if let Err(response) = prelude(&shared, Endpoint::Authorize).await {
        return response;
    }
    let query: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    grant_code(&shared, &query)
}

/// Issues a code and redirects to the client's callback, or explains the refusal.
fn grant_code(shared: &Shared, query: &HashMap<String, String>) -> Response {
    let req = AuthorizeRequest {
        client_id: query.get("client_id").cloned(),
        response_type: query.get("response_type").cloned(),
        redirect_uri: query.get("redirect_uri").cloned(),
        state: query.get("state").cloned(),
        code_challenge: query.get("code_challenge").cloned(),
        code_challenge_method: query.get("code_challenge_method").cloned(),
        account: query.get("account").cloned(),
    };
    let result = shared.lock().authorize(&req);
    match result {
        Ok((redirect, code)) => {
            let mut params = form_urlencoded::Serializer::new(String::new());
            params.append_pair("code", &code);
            if let Some(state) = &req.state {
                params.append_pair("state", state);
            }
            let sep = if redirect.contains('?') { '&' } else { '?' };
            let location = format!("{redirect}{sep}{}", params.finish());
            match HeaderValue::from_str(&location) {
                Ok(v) => (StatusCode::FOUND, [(header::LOCATION, v)]).into_response(),
                Err(_) => json_response(
                    400,
                    json!({"error": "invalid_request", "error_description": "redirect_uri is not a valid header value"}),
                ),
            }
        }
        Err(e) => json_response(
            400,
            json!({"error": e.error, "error_description": e.description}),
        ),
    }
}

async fn resource(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(response) = prelude(&shared, Endpoint::Resource).await {
        return response;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    let (outcome, account) = {
        let mut provider = shared.lock();
        let outcome = provider.check_access(bearer.as_deref());
        let account = match outcome {
            ResourceOutcome::Ok(Some(grant)) => provider.account_of(grant),
            _ => None,
        };
        (outcome, account)
    };
    match outcome {
        // The account in each provider's spelling: Bitbucket `uuid`, Atlassian `account_id`,
        // GitHub numeric `id`, OpenID `sub`.
        ResourceOutcome::Ok(grant) => {
            let account = account.unwrap_or_else(|| crate::provider::DEFAULT_ACCOUNT.to_owned());
            let numeric = account.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            }) >> 12;
            json_response(
                200,
                json!({"type": "user", "username": account, "uuid": format!("{{{account}}}"),
                       "account_id": account, "id": numeric, "sub": account, "grant": grant}),
            )
        }
        ResourceOutcome::Expired => json_response(
            401,
            json!({"type": "error", "error": {"message": "Access token expired."}}),
        ),
        ResourceOutcome::Invalid => json_response(
            401,
            json!({"type": "error", "error": {"message": "Token is invalid or not supported for this endpoint."}}),
        ),
    }
}
