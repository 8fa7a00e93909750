//! A fleet of processes sharing one Redis: this program starts a mock provider with 5-second
//! access tokens, authorizes 20 installations into Redis, then runs 3 worker processes (itself,
//! re-invoked) that ask for tokens as fast as they like for 10 seconds. The provider's counters
//! show one refresh per installation per token lifetime and no reuse of a retired token.
//!
//! Start Redis first (Debian: `apt-get install redis-server`, then `redis-server --port 6379`)
//! and run `cargo run --example redis_fleet -- redis://127.0.0.1:6379`
//! (or set `TOKENKEEPER_REDIS_URL`).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenkeeper::stores::RedisStore;
use tokenkeeper::{ConsumerConfig, InstallationId, TokenManager, core::TokenStore, profiles};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

const INSTALLATIONS: usize = 20;
const WORKERS: usize = 3;
const RUN_FOR: Duration = Duration::from_secs(10);

fn ids() -> Vec<InstallationId> {
    (0..INSTALLATIONS)
        .map(|n| InstallationId::new(format!("fleet-example-{n:02}")).expect("valid id"))
        .collect()
}

async fn manager(redis: &str, prefix: &str, mock_base: &str) -> Fallible<TokenManager> {
    let url = |p: &str| reqwest::Url::parse(&format!("{mock_base}{p}"));
    let profile = profiles::bitbucket()
        .with_endpoints(
            url(tokenkeeper_mock_provider::paths::AUTHORIZE)?,
            url(tokenkeeper_mock_provider::paths::TOKEN)?,
            None,
        )
        .with_identity_endpoint(url(tokenkeeper_mock_provider::paths::RESOURCE)?);
    // Every process of a fleet shares one state key (from your secret store in production).
    static STATE_KEY: std::sync::OnceLock<tokenkeeper::StateKey> = std::sync::OnceLock::new();
    let key = match STATE_KEY.get() {
        Some(key) => key.clone(),
        None => STATE_KEY
            .get_or_init(|| tokenkeeper::StateKey::generate(1).expect("OS random"))
            .clone(),
    };
    let consumer = ConsumerConfig::builder(profile)
        .client_id(DEFAULT_CLIENT_ID)
        .client_secret(DEFAULT_CLIENT_SECRET)
        .redirect_uri("http://127.0.0.1/callback")
        .state_key(key)
        .build()?;
    let store: Arc<dyn TokenStore> =
        Arc::new(RedisStore::builder(redis).prefix(prefix).connect().await?);
    // Redis cannot offer a durable place for rotated tokens it would not take (during an
    // outage), so the manager asks for one: a private directory on a persistent volume in
    // production (`TK_UNSAVED_DIR`), here one under target/.
    let unsaved = std::env::var_os("TK_UNSAVED_DIR").map_or_else(
        || "target/redis-fleet-unsaved".into(),
        std::path::PathBuf::from,
    );
    Ok(TokenManager::builder_shared(consumer, store)
        .unsaved_tokens_dir(unsaved)
        .build()?)
}

#[tokio::main]
async fn main() -> Fallible<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        return worker(&args[2], &args[3], &args[4]).await;
    }
    let redis = args
        .get(1)
        .cloned()
        .or_else(|| std::env::var("TOKENKEEPER_REDIS_URL").ok())
        .ok_or("give the Redis URL: cargo run --example redis_fleet -- redis://127.0.0.1:6379 (start one with `redis-server --port 6379`)")?;
    let prefix = format!("tokenkeeper-fleet-example-{}", std::process::id());
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .access_ttl(Duration::from_secs(5))
        .start()
        .await?;
    let admin = manager(&redis, &prefix, &mock.base_url()).await?;
    authorize_all(&admin, &mock).await?;
    println!(
        "{INSTALLATIONS} installations in Redis (prefix {prefix}); starting {WORKERS} worker processes for {RUN_FOR:?}"
    );
    run_workers(&redis, &prefix, &mock.base_url())?;
    check_no_retired_token_was_used(&mock)?;
    delete_all(&admin).await
}

/// Authorizes every installation (the user's approval is automatic at the mock).
async fn authorize_all(admin: &TokenManager, mock: &MockProvider) -> Fallible<()> {
    for id in ids() {
        let begun = admin.begin_authorization(Some(id))?;
        let q: std::collections::HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
        let challenge = q.get("code_challenge").map(|c| (c.as_str(), "S256"));
        let code = mock.authorize_code(
            DEFAULT_CLIENT_ID,
            Some("http://127.0.0.1/callback"),
            challenge,
        )?;
        admin
            .complete_authorization(
                tokenkeeper::AuthorizationCode::new(code),
                &begun.state,
                &begun.binding,
            )
            .await?;
    }
    Ok(())
}

/// Runs the worker processes (this program, re-invoked) and waits for each to succeed.
fn run_workers(redis: &str, prefix: &str, mock_base: &str) -> Fallible<()> {
    let me = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..WORKERS {
        children.push(
            Command::new(&me)
                .args(["--worker", redis, prefix, mock_base])
                .stdout(Stdio::inherit())
                .spawn()?,
        );
    }
    for mut child in children {
        if !child.wait()?.success() {
            return Err("a worker failed".into());
        }
    }
    Ok(())
}

/// Prints the provider's counters, and fails if any refresh reused a retired token or was
/// rejected.
fn check_no_retired_token_was_used(mock: &MockProvider) -> Fallible<()> {
    let c = mock.counters();
    let per_installation: Vec<u64> = c.grants.values().map(|g| g.refreshes).collect();
    println!(
        "provider saw {} refreshes ({}..={} per installation over {RUN_FOR:?} of 5-second tokens), {} reuse detections, {} rejected",
        c.totals.refreshes,
        per_installation.iter().min().unwrap_or(&0),
        per_installation.iter().max().unwrap_or(&0),
        c.totals.reuse_detections,
        c.totals.rejected_refreshes
    );
    if c.totals.reuse_detections != 0 || c.totals.rejected_refreshes != 0 {
        return Err("a retired refresh token was used".into());
    }
    Ok(())
}

/// Removes the example's installations from Redis.
async fn delete_all(admin: &TokenManager) -> Fallible<()> {
    for id in ids() {
        admin
            .store()
            .delete(
                &id,
                admin.store().get(&id).await?.map_or(0, |r| r.version()),
            )
            .await?;
    }
    Ok(())
}

async fn worker(redis: &str, prefix: &str, mock_base: &str) -> Fallible<()> {
    let manager = manager(redis, prefix, mock_base).await?;
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed() < RUN_FOR {
        for id in ids() {
            manager.access_token(&id).await?;
            calls += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "worker {}: {calls} access_token calls, all answered",
        std::process::id()
    );
    Ok(())
}
