//! A small web app with an "Install" button: the real authorization flow against the mock
//! provider (which shows a consent page), bound to the browser that pressed the button, then a
//! list of installations with their states and what `explain` says.
//!
//! `cargo run --example web_install` and open the printed URL. `-- --self-test` walks through
//! the flow with an HTTP client and exits (the test suite runs that); the end-to-end test in
//! headless Chromium is `examples/tests/web_install_browser.rs`.
//!
//! The browser binding: `/install` answers with a redirect to the provider and a cookie
//!
//! ```text
//! Set-Cookie: __Host-tkflow-<hash of the state>=<binding>; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age=600
//! ```
//!
//! which only this browser sends back (`SameSite=Lax` lets it ride the provider's top-level
//! redirect; browsers honour `Secure` and `__Host-` on `http://127.0.0.1` too). The callback
//! finds it in the request's `Cookie` header and hands it to `complete_authorization` with
//! the query's `code` and `state`; a callback URL replayed from another browser finds no
//! cookie of that flow, and is refused.
//!
//! Every callback with a valid state and its cookie costs a store write and a request to the
//! provider under the application's client id, and anyone can get both from `/install`: so
//! the callback is rate limited per client address (review N8; here 10 a minute, answered
//! `429 Too Many Requests` beyond). Behind a proxy, key it on the address the proxy reports.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tokenkeeper::stores::MemoryStore;
use tokenkeeper::{
    AuthorizationCode, AuthorizationState, BrowserBinding, ConsumerConfig, StateKey, TokenManager,
    core::Clock, core::ListFilter, core::ManualClock, core::SystemClock, profiles,
};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Where the provider sends the browser back.
const CALLBACK: &str = "/callback";

/// Callbacks allowed per client address and minute.
const CALLBACKS_PER_MINUTE: u32 = 10;

#[derive(Clone)]
struct App {
    manager: TokenManager,
    mock: Arc<MockProvider>,
    clock: ManualClock,
    callbacks: Arc<Mutex<HashMap<IpAddr, (Instant, u32)>>>,
}

impl App {
    /// Counts a callback from `ip` in its current minute; false once over the limit.
    fn allow_callback(&self, ip: IpAddr) -> bool {
        let mut seen = self
            .callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        // Forget minutes that ended, so the table stays as small as the live clients.
        seen.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(60));
        let (_, count) = seen.entry(ip).or_insert((now, 0));
        *count += 1;
        *count <= CALLBACKS_PER_MINUTE
    }
}

/// The running app: its address, the provider and the manager behind it.
#[derive(Debug)]
pub struct WebApp {
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// The mock provider the app installs against.
    pub mock: Arc<MockProvider>,
    /// The app's token manager.
    pub manager: TokenManager,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for WebApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html><html><head><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 8px}} #error{{color:#a00}}</style>
</head><body>{body}</body></html>"#
    )
}

async fn index(State(app): State<App>) -> Response {
    let page_of = match app.manager.store().list(ListFilter::all(), None, 500).await {
        Ok(page) => page,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let mut rows = String::new();
    for entry in page_of.entries {
        let summary = match app.manager.explain(&entry.id).await {
            Ok(e) => e.summary,
            Err(e) => e.to_string(),
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(entry.id.as_str()),
            entry.state,
            escape(&summary)
        ));
    }
    Html(page(
        "tokenkeeper: installations",
        &format!(
            r#"<h1>Installations of the Bitbucket consumer</h1>
<p><a id="install" href="/install">Install</a></p>
<form action="/time" method="post"><button type="submit">Let 2 hours pass</button></form>
<form action="/scopes" method="post"><button type="submit">Change the consumer's scopes</button></form>
<table border="1"><tr><th>installation</th><th>state</th><th>explain</th></tr>{rows}</table>"#
        ),
    ))
    .into_response()
}

/// Begins a flow: the provider's URL, and the binding in a cookie only this browser holds.
async fn install(State(app): State<App>) -> Response {
    match app.manager.begin_authorization(None) {
        Ok(begun) => (
            [(header::SET_COOKIE, begun.set_cookie_header())],
            Redirect::to(begun.url.as_str()),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The request's cookies, as one `Cookie` header value.
fn cookies(headers: &HeaderMap) -> String {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ")
}

fn refused(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Html(page(
            "tokenkeeper: installation refused",
            &format!(
                r#"<h1>Installation refused</h1><p id="error">{}</p><p><a href="/">Back</a></p>"#,
                escape(message)
            ),
        )),
    )
        .into_response()
}

async fn callback(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !app.allow_callback(peer.ip()) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "60")],
            "too many callbacks from this address; try again in a minute",
        )
            .into_response();
    }
    if let Some(error) = q.get("error") {
        return refused(&format!("the provider says: {error}"));
    }
    let (Some(code), Some(state)) = (q.get("code"), q.get("state")) else {
        return refused("the callback needs code and state");
    };
    let state = AuthorizationState::new(state.as_str());
    let binding = match BrowserBinding::from_cookie_header(&cookies(&headers), &state) {
        Ok(binding) => binding,
        Err(e) => return refused(&e.to_string()),
    };
    // `iss` (RFC 9207), when the provider sends it: a response from another authorization
    // server than this consumer's is refused (the mix-up defence).
    let iss = q.get("iss").map(String::as_str);
    let done = match app
        .manager
        .complete_authorization_with_issuer(
            AuthorizationCode::new(code.as_str()),
            &state,
            &binding,
            iss,
        )
        .await
    {
        Ok(done) => done,
        Err(e) => return refused(&e.to_string()),
    };
    let (kind, summary) = match app.manager.explain(&done.installation).await {
        Ok(e) => (e.state.kind().as_str().to_owned(), e.summary),
        Err(e) => ("unknown".to_owned(), e.to_string()),
    };
    (
        [(header::SET_COOKIE, state.clear_cookie_header())],
        Html(page(
            "tokenkeeper: installed",
            &format!(
                r#"<h1>Installed</h1>
<p>Installation <code id="installation">{}</code> is <b id="state">{}</b>{}.</p>
<p>Provider account: <code id="account">{}</code></p>
<p id="explain">{}</p><p><a href="/">All installations</a></p>"#,
                escape(done.installation.as_str()),
                escape(&kind),
                if done.replayed {
                    " (a repeated callback)"
                } else {
                    ""
                },
                escape(done.account.as_deref().unwrap_or("not read")),
                escape(&summary)
            ),
        )),
    )
        .into_response()
}

async fn pass_time(State(app): State<App>) -> Redirect {
    app.mock.advance(Duration::from_secs(7200));
    app.clock.advance(Duration::from_secs(7200));
    // Touch every installation so the page shows what happened.
    if let Ok(page) = app.manager.store().list(ListFilter::all(), None, 500).await {
        for entry in page.entries {
            let _ = app.manager.access_token(&entry.id).await;
        }
    }
    Redirect::to("/")
}

async fn change_scopes(State(app): State<App>) -> Redirect {
    app.mock
        .set_consumer_scopes(DEFAULT_CLIENT_ID, &["repository", "account", "webhook"]);
    Redirect::to("/")
}

/// Starts the mock provider (with its consent page) and the app, both on loopback.
pub async fn start() -> Fallible<WebApp> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .consent_page(true)
        .start()
        .await?;
    let url = |s: String| reqwest::Url::parse(&s);
    let profile = profiles::bitbucket()
        .with_endpoints(url(mock.authorize_url())?, url(mock.token_url())?, None)
        .with_identity_endpoint(url(mock.resource_url())?);
    let consumer = ConsumerConfig::builder(profile)
        .client_id(DEFAULT_CLIENT_ID)
        .client_secret(DEFAULT_CLIENT_SECRET)
        .redirect_uri(format!("{base}{CALLBACK}"))
        // One process; a fleet loads one shared key from its secret store.
        .state_key(StateKey::generate(1)?)
        .build()?;
    let clock = ManualClock::new(SystemClock.now());
    let manager = TokenManager::builder(consumer, MemoryStore::new())
        .clock(clock.clone())
        .build()?;
    let mock = Arc::new(mock);
    let app = App {
        manager: manager.clone(),
        mock: mock.clone(),
        clock,
        callbacks: Arc::default(),
    };
    let router = Router::new()
        .route("/", get(index))
        .route("/install", get(install))
        .route(CALLBACK, get(callback))
        .route("/time", post(pass_time))
        .route("/scopes", post(change_scopes))
        .with_state(app);
    let server = tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        let _ = axum::serve(listener, service).await;
    });
    Ok(WebApp {
        base,
        mock,
        manager,
        server,
    })
}

/// One install as a browser without a cookie store does it: `/install` (keeping the cookie),
/// the provider's consent (approved as `account`), the callback with the cookie. Returns the
/// callback URL and the final page.
pub async fn install_with_http(app: &WebApp, account: &str) -> Fallible<(String, String)> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let begun = http.get(format!("{}/install", app.base)).send().await?;
    let cookie = begun
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or("no flow cookie")?
        .to_owned();
    let authorize = reqwest::Url::parse(
        begun
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or("no redirect to the provider")?,
    )?;
    // The consent page's form, submitted.
    let mut form: Vec<(String, String)> = authorize.query_pairs().into_owned().collect();
    form.push(("account".into(), account.into()));
    let approved = http
        .post(app.mock.authorize_url())
        .form(&form)
        .send()
        .await?;
    let callback = approved
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or("the provider did not redirect back")?
        .to_owned();
    let landed = http
        .get(&callback)
        .header(header::COOKIE, cookie)
        .send()
        .await?
        .text()
        .await?;
    Ok((callback, landed))
}

async fn self_test(app: &WebApp) -> Fallible<()> {
    let http = reqwest::Client::new();
    let mut callbacks = Vec::new();
    for _ in 0..3 {
        let (callback, page) = install_with_http(app, "mock-user").await?;
        if !page.contains("id=\"state\">active") {
            return Err(
                format!("the install flow did not land on an installation:\n{page}").into(),
            );
        }
        callbacks.push(callback);
    }
    // Another browser (no cookie) replays a callback URL: refused, nothing exchanged.
    let exchanges = app.mock.counters().totals.code_exchanges;
    let replay = http.get(&callbacks[0]).send().await?;
    let status = replay.status();
    let text = replay.text().await?;
    if status != StatusCode::BAD_REQUEST || !text.contains("holds no cookie of this authorization")
    {
        return Err(format!("a replayed callback was not refused ({status}):\n{text}").into());
    }
    if app.mock.counters().totals.code_exchanges != exchanges {
        return Err("a replayed callback reached the provider".into());
    }
    // A script hammering the callback (4 callbacks so far this minute): refused with 429
    // past the limit, and none of it reaches the provider.
    let mut limited = 0;
    for n in 0..CALLBACKS_PER_MINUTE {
        let junk = http
            .get(format!("{}{CALLBACK}?code=junk{n}&state=junk", app.base))
            .send()
            .await?;
        limited += usize::from(junk.status() == StatusCode::TOO_MANY_REQUESTS);
    }
    if limited != 4 || app.mock.counters().totals.code_exchanges != exchanges {
        return Err(format!("the callback was not rate limited: {limited} of 10 refused").into());
    }
    http.post(format!("{}/scopes", app.base)).send().await?;
    let page = http
        .post(format!("{}/time", app.base))
        .send()
        .await?
        .text()
        .await?;
    let needing = page.matches("reauthorization_required").count();
    println!(
        "self-test: 3 installs through the cookie-bound flow, a replayed callback refused, callbacks past {CALLBACKS_PER_MINUTE} a minute refused with 429, {needing} need re-authorization after the scope change"
    );
    if needing != 3 {
        return Err(page.into());
    }
    Ok(())
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Fallible<()> {
    let app = start().await?;
    println!("open {}/ and press Install (Ctrl-C to stop)", app.base);
    if std::env::args().any(|a| a == "--self-test") {
        return self_test(&app).await;
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
