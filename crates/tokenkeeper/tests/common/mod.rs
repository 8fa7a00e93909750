//! Shared set-up for the facade's HTTP tests: a mock provider per profile, a consumer pointed
//! at it, and the browser leg of the authorization flow done with reqwest.
#![allow(dead_code)]

use std::sync::Arc;

use tokenkeeper::{
    ConsumerConfig, ProviderProfile, core::Clock, core::ManualClock, core::SystemClock,
    core::Timestamp, core::TokenStore, oauth::Completed, oauth::OAuthClient, profiles,
};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

/// The typed choice of a store: `Backend::fresh_sqlite(tag)`, `Backend::fresh_redis(tag)`, …,
/// and `backend.open()` for a handle of its own, as another process would open it.
#[allow(unused_imports)] // (each test binary compiles this module; not all pick a store)
pub use tokenkeeper_testkit::backend::Backend;

pub const REDIRECT: &str = "http://127.0.0.1/callback";

/// A refresher that sweeps every 20 ms without a rate limit.
pub fn fast_refresher() -> tokenkeeper::refresher::RefresherConfig {
    tokenkeeper::refresher::RefresherConfig {
        concurrency: 8,
        rate_per_second: None,
        page_size: 30,
        max_idle: std::time::Duration::from_millis(20),
        ..tokenkeeper::refresher::RefresherConfig::default()
    }
}

/// Every (our preset, mock behaviour) pair.
pub fn all_profiles() -> Vec<(ProviderProfile, MockProfile)> {
    vec![
        (profiles::bitbucket(), MockProfile::Bitbucket),
        (profiles::bitbucket_legacy(), MockProfile::BitbucketLegacy),
        (profiles::atlassian_3lo(), MockProfile::Atlassian3lo),
        (profiles::github_app(), MockProfile::GithubApp),
        (profiles::google(), MockProfile::Google),
    ]
}

/// The profile with its endpoints on the mock (which serves every profile on one set of
/// paths; its resource endpoint reports the account in every provider's spelling).
pub fn pointed_at(profile: ProviderProfile, mock: &MockProvider) -> ProviderProfile {
    pointed_at_base(profile, &mock.base_url())
}

/// [`pointed_at`] the mock serving at `base` (e.g. in a child process that has its URL).
pub fn pointed_at_base(profile: ProviderProfile, base: &str) -> ProviderProfile {
    use tokenkeeper_mock_provider::paths;
    let url = |p: &str| reqwest::Url::parse(&format!("{base}{p}")).unwrap();
    profile
        .with_endpoints(
            url(paths::AUTHORIZE),
            url(paths::TOKEN),
            Some(url(paths::REVOKE)),
        )
        .with_identity_endpoint(url(paths::RESOURCE))
}

/// `TokenManager::builder_shared` with a fresh private directory for unsaved tokens (a
/// network store has no durable place to offer, and a manager without one is refused).
pub fn manager_builder(
    consumer: ConsumerConfig,
    store: Arc<dyn TokenStore>,
) -> tokenkeeper::TokenManagerBuilder {
    tokenkeeper::TokenManager::builder_shared(consumer, store)
        .unsaved_tokens_dir(tokenkeeper_testkit::dirs::fresh_dir("unsaved").join("kept"))
}

/// The state key every consumer of the tests shares (so a peer completes what another began).
pub fn state_key() -> tokenkeeper::StateKey {
    tokenkeeper::StateKey::from_base64(1, "rSLUhHQ6QkaLk9T44u6Ng6cp1q76DbrAvtw+/5/kT/I=").unwrap()
}

pub fn consumer_for(profile: ProviderProfile, mock: &MockProvider, secret: &str) -> ConsumerConfig {
    consumer_at(profile, &mock.base_url(), secret)
}

/// [`consumer_for`] the mock serving at `base`.
pub fn consumer_at(profile: ProviderProfile, base: &str, secret: &str) -> ConsumerConfig {
    ConsumerConfig::builder(pointed_at_base(profile, base))
        .client_id(DEFAULT_CLIENT_ID)
        .client_secret(secret)
        .redirect_uri(REDIRECT)
        .state_key(state_key())
        .http_timeout(std::time::Duration::from_secs(2))
        .connect_timeout(std::time::Duration::from_secs(1))
        .build()
        .unwrap()
}

pub fn client_for(profile: ProviderProfile, mock: &MockProvider) -> OAuthClient {
    OAuthClient::new(
        consumer_for(profile, mock, DEFAULT_CLIENT_SECRET),
        Arc::new(SystemClock),
    )
    .unwrap()
}

pub fn manual_client(
    profile: ProviderProfile,
    mock: &MockProvider,
    clock: &ManualClock,
) -> OAuthClient {
    OAuthClient::new(
        consumer_for(profile, mock, DEFAULT_CLIENT_SECRET),
        Arc::new(clock.clone()) as Arc<dyn Clock>,
    )
    .unwrap()
}

pub fn now_clock() -> ManualClock {
    ManualClock::new(SystemClock.now())
}

/// Follows the authorization URL like a browser would and returns `(code, state)` from the
/// redirect to the callback.
pub async fn browser(url: &reqwest::Url) -> (String, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(url.clone()).send().await.unwrap();
    assert_eq!(r.status(), 302, "authorize: {:?}", r.text().await);
    let location = reqwest::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(REDIRECT), "{location}");
    let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    (q["code"].clone(), q["state"].clone())
}

/// Runs the whole authorization flow through a manager of `client`'s consumer on `store`
/// and returns the new installation.
pub async fn install(client: &OAuthClient, store: Arc<dyn TokenStore>) -> Completed {
    let manager = manager_builder(client.consumer().clone(), store)
        .build()
        .unwrap();
    let begun = manager.begin_authorization(None).unwrap();
    let (code, state) = browser(&begun.url).await;
    assert_eq!(state, begun.state.as_str());
    let done = manager
        .complete_authorization(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
        )
        .await
        .unwrap();
    assert_eq!(done.installation, begun.installation);
    done
}

pub fn ts(secs: i64) -> Timestamp {
    Timestamp::from_unix_secs(secs)
}

/// A manager on a mock provider with a manual clock; `advance` moves both clocks.
pub struct Fixture {
    pub mock: MockProvider,
    pub clock: ManualClock,
    pub manager: tokenkeeper::TokenManager,
    pub store: Arc<dyn TokenStore>,
}

impl Fixture {
    pub async fn new(profile: ProviderProfile, kind: MockProfile) -> Fixture {
        Self::with_store(
            profile,
            kind,
            Arc::new(tokenkeeper_memory::MemoryStore::new()),
        )
        .await
    }

    pub async fn with_store(
        profile: ProviderProfile,
        kind: MockProfile,
        store: Arc<dyn TokenStore>,
    ) -> Fixture {
        Self::tuned(profile, kind, store, |_| {}).await
    }

    /// A fixture whose policy `tune` adjusts after the tests' defaults (no jitter, 1 s
    /// backoff).
    pub async fn tuned(
        profile: ProviderProfile,
        kind: MockProfile,
        store: Arc<dyn TokenStore>,
        tune: impl FnOnce(&mut tokenkeeper::policy::RefreshPolicy),
    ) -> Fixture {
        let mock = MockProvider::builder().profile(kind).start().await.unwrap();
        Self::with_mock(mock, profile, store, tune)
    }

    /// [`Fixture::tuned`] on a fresh memory store.
    pub async fn tuned_in_memory(
        profile: ProviderProfile,
        kind: MockProfile,
        tune: impl FnOnce(&mut tokenkeeper::policy::RefreshPolicy),
    ) -> Fixture {
        Self::tuned(
            profile,
            kind,
            Arc::new(tokenkeeper_memory::MemoryStore::new()),
            tune,
        )
        .await
    }

    /// A fixture on a mock the test built (e.g. with other expiry rules).
    pub fn with_mock(
        mock: MockProvider,
        profile: ProviderProfile,
        store: Arc<dyn TokenStore>,
        tune: impl FnOnce(&mut tokenkeeper::policy::RefreshPolicy),
    ) -> Fixture {
        let clock = now_clock();
        let manager = manager_builder(
            consumer_for(profile, &mock, DEFAULT_CLIENT_SECRET),
            store.clone(),
        )
        .clock(clock.clone())
        .tune(|p| {
            p.jitter_percent = 0;
            p.backoff_base = std::time::Duration::from_secs(1);
            tune(p);
        })
        .build()
        .unwrap();
        Fixture {
            mock,
            clock,
            manager,
            store,
        }
    }

    /// Another manager (as if in another process) on the same store, mock and clock.
    pub fn peer(&self, profile: ProviderProfile) -> tokenkeeper::TokenManager {
        manager_builder(
            consumer_for(profile, &self.mock, DEFAULT_CLIENT_SECRET),
            self.store.clone(),
        )
        .clock(self.clock.clone())
        .build()
        .unwrap()
    }

    /// Another manager on the same store, mock and clock whose policy `tune` adjusts (after
    /// the same defaults as [`Fixture::tuned`]).
    pub fn peer_tuned(
        &self,
        profile: ProviderProfile,
        tune: impl FnOnce(&mut tokenkeeper::policy::RefreshPolicy),
    ) -> tokenkeeper::TokenManager {
        manager_builder(
            consumer_for(profile, &self.mock, DEFAULT_CLIENT_SECRET),
            self.store.clone(),
        )
        .clock(self.clock.clone())
        .tune(|p| {
            p.jitter_percent = 0;
            p.backoff_base = std::time::Duration::from_secs(1);
            tune(p);
        })
        .build()
        .unwrap()
    }

    /// Another manager on the same store and mock whose clock is `clock` (e.g. skewed).
    pub fn peer_with_clock(
        &self,
        profile: ProviderProfile,
        clock: ManualClock,
    ) -> tokenkeeper::TokenManager {
        manager_builder(
            consumer_for(profile, &self.mock, DEFAULT_CLIENT_SECRET),
            self.store.clone(),
        )
        .clock(clock)
        .build()
        .unwrap()
    }

    pub fn advance(&self, d: std::time::Duration) {
        self.clock.advance(d);
        self.mock.advance(d);
    }

    /// A new installation: browser leg in-process at the mock, code exchange over HTTP.
    pub async fn install(&self) -> tokenkeeper::InstallationId {
        authorize_with(&self.manager, &self.mock, None)
            .await
            .installation
    }

    pub async fn record(&self, id: &tokenkeeper::InstallationId) -> tokenkeeper::core::Record {
        self.store.get(id).await.unwrap().unwrap()
    }
}

/// One authorization through `manager` (a new installation, or `Some(id)` again), the
/// browser leg done at `mock` in process (approved by its default account), the code
/// exchanged over HTTP.
pub async fn authorize_with(
    manager: &tokenkeeper::TokenManager,
    mock: &MockProvider,
    id: Option<tokenkeeper::InstallationId>,
) -> Completed {
    let begun = manager.begin_authorization(id).unwrap();
    let q: std::collections::HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
    let challenge = q.get("code_challenge").map(|c| (c.as_str(), "S256"));
    let code = mock
        .authorize_code(DEFAULT_CLIENT_ID, Some(REDIRECT), challenge)
        .unwrap();
    manager
        .complete_authorization(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
        )
        .await
        .unwrap()
}
