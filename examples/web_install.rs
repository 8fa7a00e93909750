//! A small web app with an "Install" button: the real authorization flow against the mock
//! provider, then a list of installations with their states and what `explain` says.
//!
//! `cargo run --example web_install` and open the printed URL. `-- --self-test` clicks through
//! the flow with an HTTP client and exits (the test suite runs that).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tokenkeeper::stores::MemoryStore;
use tokenkeeper::{
    Clock, ConsumerConfig, ListFilter, ManualClock, SystemClock, TokenManager, profiles,
};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Clone)]
struct App {
    manager: TokenManager,
    mock: std::sync::Arc<MockProvider>,
    clock: ManualClock,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn index(State(app): State<App>) -> Response {
    let page = match app.manager.store().list(ListFilter::all(), None, 500).await {
        Ok(page) => page,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let mut rows = String::new();
    for entry in page.entries {
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
    Html(format!(
        r#"<!doctype html><html><head><title>tokenkeeper: installations</title></head><body>
<h1>Installations of the Bitbucket consumer</h1>
<form action="/install" method="get"><button type="submit">Install</button></form>
<form action="/time" method="post"><button type="submit">Let 2 hours pass</button></form>
<form action="/scopes" method="post"><button type="submit">Change the consumer's scopes</button></form>
<table border="1"><tr><th>installation</th><th>state</th><th>explain</th></tr>{rows}</table>
</body></html>"#
    ))
    .into_response()
}

async fn install(State(app): State<App>) -> Response {
    match app.manager.begin_authorization(None) {
        Ok(begun) => Redirect::to(begun.url.as_str()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn callback(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (Some(code), Some(state)) = (q.get("code"), q.get("state")) else {
        return (StatusCode::BAD_REQUEST, "the callback needs code and state").into_response();
    };
    match app
        .manager
        .complete_authorization(code.as_str(), state)
        .await
    {
        Ok(_) => Redirect::to("/").into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
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

#[tokio::main]
async fn main() -> Fallible<()> {
    let self_test = std::env::args().any(|a| a == "--self-test");
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await?;
    let url = |s: String| reqwest::Url::parse(&s);
    let profile = profiles::bitbucket().with_endpoints(
        url(mock.authorize_url())?,
        url(mock.token_url())?,
        None,
    );
    let consumer = ConsumerConfig::builder(profile)
        .client_id(DEFAULT_CLIENT_ID)
        .client_secret(DEFAULT_CLIENT_SECRET)
        .redirect_uri(format!("{base}/callback"))
        .build()?;
    let clock = ManualClock::new(SystemClock.now());
    let manager = TokenManager::builder(consumer, MemoryStore::new())
        .clock(clock.clone())
        .build()?;
    let app = App {
        manager,
        mock: std::sync::Arc::new(mock),
        clock,
    };
    let router = Router::new()
        .route("/", get(index))
        .route("/install", get(install))
        .route("/callback", get(callback))
        .route("/time", post(pass_time))
        .route("/scopes", post(change_scopes))
        .with_state(app.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    println!("open {base}/ and press Install (Ctrl-C to stop)");
    if self_test {
        let browser = reqwest::Client::builder().build()?; // follows redirects like a browser
        for _ in 0..3 {
            let page = browser
                .get(format!("{base}/install"))
                .send()
                .await?
                .text()
                .await?;
            if !page.contains("Healthy") {
                return Err(format!(
                    "the install flow did not land on a healthy installation:\n{page}"
                )
                .into());
            }
        }
        browser.post(format!("{base}/scopes")).send().await?;
        let page = browser
            .post(format!("{base}/time"))
            .send()
            .await?
            .text()
            .await?;
        let needing = page.matches("reauthorization_required").count();
        println!(
            "self-test: 3 installs through the browser flow, {needing} need re-authorization after the scope change"
        );
        if needing != 3 {
            return Err(page.into());
        }
        server.abort();
        return Ok(());
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
