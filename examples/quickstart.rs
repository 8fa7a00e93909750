//! The quickstart: the scenario tokenkeeper exists for, in a few seconds, with nothing to
//! install. A local mock of Bitbucket Cloud runs in-process; tokens live in a SQLite file in a
//! temporary directory that is removed at the end.
//!
//! Run it with `cargo run --example quickstart`.

use std::time::Duration;

use tokenkeeper::stores::SqliteStore;
use tokenkeeper::{
    ConsumerConfig, Error, InstallationId, TokenManager, core::Clock, core::ManualClock,
    core::SystemClock, core::TokenStore, profiles,
};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

/// The example's world: a provider, a manager, and one clock for both.
struct World {
    mock: MockProvider,
    clock: ManualClock,
    manager: TokenManager,
}

impl World {
    /// Moves the provider's clock and ours forward together.
    fn pass(&self, hours: u64) {
        let d = Duration::from_secs(hours * 3600);
        self.mock.advance(d);
        self.clock.advance(d);
    }

    /// One installation: the user approves at the provider (automatic at the mock), the
    /// callback completes the flow.
    async fn install(&self) -> Fallible<InstallationId> {
        let begun = self.manager.begin_authorization(None)?;
        let query: std::collections::HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
        let challenge = query.get("code_challenge").map(|c| (c.as_str(), "S256"));
        let code = self.mock.authorize_code(
            DEFAULT_CLIENT_ID,
            Some("http://127.0.0.1/callback"),
            challenge,
        )?;
        Ok(self
            .manager
            .complete_authorization(
                tokenkeeper::AuthorizationCode::new(code),
                &begun.state,
                &begun.binding,
            )
            .await?
            .installation)
    }

    async fn api_status(&self, id: &InstallationId) -> Fallible<u16> {
        let http = reqwest::Client::new();
        let reply = self
            .manager
            .send_authorized(id, http.get(self.mock.resource_url()))
            .await?;
        Ok(reply.status().as_u16())
    }

    fn refreshes(&self) -> u64 {
        self.mock.counters().totals.refreshes
    }
}

#[tokio::main]
async fn main() -> Fallible<()> {
    let dir = std::env::temp_dir().join(format!("tokenkeeper-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let outcome = run(&dir).await;
    std::fs::remove_dir_all(&dir)?;
    outcome
}

async fn run(dir: &std::path::Path) -> Fallible<()> {
    println!("tokenkeeper quickstart: one Bitbucket consumer, installed three times\n");
    let world = World::start(dir).await?;
    let ids = install_three_times(&world).await?;
    expire_then_call_concurrently(&world, &ids).await?;
    refresh_transparently(&world, &ids).await?;
    refresh_one_leaving_the_others_valid(&world, &ids).await?;
    change_scopes_requiring_reauthorization(&world, &ids).await?;
    // A graceful stop: every refresh in flight records its result before the process exits.
    world.manager.shutdown().await;
    println!(
        "\nDone: every installation's lifecycle was explicit, concurrency-safe and explained."
    );
    Ok(())
}

impl World {
    /// Starts the mock provider and a manager over a SQLite file in `dir`.
    async fn start(dir: &std::path::Path) -> Fallible<World> {
        let mock = MockProvider::builder()
            .profile(MockProfile::Bitbucket)
            .start()
            .await?;
        let url = |s: String| reqwest::Url::parse(&s);
        let profile = profiles::bitbucket()
            .with_endpoints(
                url(mock.authorize_url())?,
                url(mock.token_url())?,
                Some(url(mock.revoke_url())?),
            )
            .with_identity_endpoint(url(mock.resource_url())?);
        let consumer = ConsumerConfig::builder(profile)
            .client_id(DEFAULT_CLIENT_ID)
            .client_secret(DEFAULT_CLIENT_SECRET)
            .redirect_uri("http://127.0.0.1/callback")
            // One process here; a fleet loads one shared key: StateKey::from_base64(1, &secret).
            .state_key(tokenkeeper::StateKey::generate(1)?)
            .build()?;
        let store = SqliteStore::open(dir.join("tokens.db")).await?;
        let clock = ManualClock::new(SystemClock.now());
        let manager = TokenManager::builder(consumer, store)
            .clock(clock.clone())
            .build()?;
        println!(
            "  mock provider (Bitbucket, rotating refresh tokens) at {}",
            mock.base_url()
        );
        println!(
            "  token store: SQLite file {}\n",
            dir.join("tokens.db").display()
        );
        Ok(World {
            mock,
            clock,
            manager,
        })
    }
}

/// Step 1: three installations, each with its own token pair.
async fn install_three_times(world: &World) -> Fallible<Vec<InstallationId>> {
    println!("1. The consumer is installed three times in the same account:");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = world.install().await?;
        println!("   installation {id}: its own access/refresh token pair");
        ids.push(id);
    }
    Ok(ids)
}

/// Step 2: after the access tokens expire, 300 concurrent calls cause one refresh per
/// installation.
async fn expire_then_call_concurrently(world: &World, ids: &[InstallationId]) -> Fallible<()> {
    println!("\n2. Two hours pass (access tokens expire), then 300 concurrent access_token calls:");
    world.pass(2);
    let mut calls = tokio::task::JoinSet::new();
    for id in ids {
        for _ in 0..100 {
            let (m, id) = (world.manager.clone(), id.clone());
            calls.spawn(async move { m.access_token(&id).await });
        }
    }
    let mut ok = 0;
    while let Some(result) = calls.join_next().await {
        result??;
        ok += 1;
    }
    println!(
        "   {ok} calls answered; refreshes at the provider: {} (one per installation)",
        world.refreshes()
    );
    Ok(())
}

/// Step 3: later refreshes happen inside `access_token`, the rotated refresh token stored.
async fn refresh_transparently(world: &World, ids: &[InstallationId]) -> Fallible<()> {
    println!(
        "\n3. Two more hours pass: tokens refresh transparently, rotated refresh tokens are persisted first:"
    );
    world.pass(2);
    for id in ids {
        let before = world.manager.store().get(id).await?.ok_or("missing")?;
        world.manager.access_token(id).await?;
        let after = world.manager.store().get(id).await?.ok_or("missing")?;
        let rotated = before.tokens().refresh_token != after.tokens().refresh_token;
        println!(
            "   {id}: refresh token rotated: {rotated}; stored record version {} -> {}",
            before.version(),
            after.version()
        );
    }
    println!("   refreshes at the provider so far: {}", world.refreshes());
    Ok(())
}

/// Step 4: each installation's grant is its own token family.
async fn refresh_one_leaving_the_others_valid(
    world: &World,
    ids: &[InstallationId],
) -> Fallible<()> {
    println!("\n4. Refreshing one installation leaves the other two valid:");
    world.manager.force_refresh(&ids[0]).await?;
    for id in &ids[1..] {
        println!("   {id}: API answers {}", world.api_status(id).await?);
    }
    Ok(())
}

/// Step 5: a scope change revokes every token; the next call asks for a new authorization,
/// and `explain` says why.
async fn change_scopes_requiring_reauthorization(
    world: &World,
    ids: &[InstallationId],
) -> Fallible<()> {
    println!(
        "\n5. The consumer's scopes change at the provider (this revokes every token it issued):"
    );
    world
        .mock
        .set_consumer_scopes(DEFAULT_CLIENT_ID, &["repository", "account", "pullrequest"]);
    world.pass(2);
    match world.manager.access_token(&ids[1]).await {
        Err(e @ Error::ReauthorizationRequired { .. }) => {
            println!("   access_token failed as it should:\n   {e}")
        }
        other => return Err(format!("expected a re-authorization error, got {other:?}").into()),
    }
    println!("\n   explain({}):", ids[1]);
    for line in world.manager.explain(&ids[1]).await?.to_string().lines() {
        println!("   {line}");
    }
    Ok(())
}
