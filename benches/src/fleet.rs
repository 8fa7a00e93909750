//! The fleet the refresh benchmarks drive: a mock provider, a manager on a manual clock, and
//! installations imported from real grants, plus the helpers the four refresh benches share.

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::{
    ConsumerConfig, InstallationId, TokenManager, core::Clock, core::ManualClock,
    core::SystemClock, core::TokenStore, profiles,
};
use tokenkeeper_mock_provider::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

use crate::{data_dir, fan_out, grants, postgres_url, redis_url};

/// Installations refreshed at once on both sides of every comparison.
pub const IN_FLIGHT: usize = 64;
/// The Bitbucket access token lifetime.
pub const TWO_HOURS: Duration = Duration::from_secs(7200);

/// A multi-threaded runtime for one bench.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `n` installation ids.
pub fn ids(n: usize) -> Vec<InstallationId> {
    (0..n)
        .map(|i| InstallationId::new(format!("bench-{i:06}")).unwrap())
        .collect()
}

/// A Bitbucket consumer pointed at the mock.
pub fn consumer(mock: &MockProvider) -> ConsumerConfig {
    let url = |s: String| reqwest::Url::parse(&s).unwrap();
    ConsumerConfig::builder(
        profiles::bitbucket()
            .with_endpoints(url(mock.authorize_url()), url(mock.token_url()), None)
            .with_identity_endpoint(url(mock.resource_url())),
    )
    .client_id(DEFAULT_CLIENT_ID)
    .client_secret(DEFAULT_CLIENT_SECRET)
    .redirect_uri("http://127.0.0.1/callback")
    .build()
    .unwrap()
}

/// A manager over `store` with `n` imported installations on a fresh mock.
#[derive(Debug)]
pub struct Fleet {
    /// The provider.
    pub mock: MockProvider,
    /// The manager's clock.
    pub clock: ManualClock,
    /// The manager.
    pub manager: TokenManager,
    /// The installations.
    pub ids: Vec<InstallationId>,
}

impl Fleet {
    /// `n` installations on a fresh mock, imported into `store`.
    pub async fn new(store: Arc<dyn TokenStore>, n: usize) -> Fleet {
        let mock = MockProvider::builder()
            .profile(MockProfile::Bitbucket)
            .start()
            .await
            .unwrap();
        let clock = ManualClock::new(SystemClock.now());
        let manager = TokenManager::builder_shared(consumer(&mock), store)
            .unsaved_tokens_dir(tokenkeeper_testkit::dirs::fresh_dir("bench-unsaved").join("kept"))
            .clock(clock.clone())
            .tune(|p| p.jitter_percent = 0)
            .build()
            .unwrap();
        let ids = ids(n);
        let tokens = grants(&mock, n, clock.now()).await;
        for (id, t) in ids.iter().zip(tokens) {
            manager.import_installation(id.clone(), t).await.unwrap();
        }
        mock.reset_counters();
        Fleet {
            mock,
            clock,
            manager,
            ids,
        }
    }

    /// Moves both clocks past every access token's expiry.
    pub fn expire_all(&self) {
        self.clock.advance(TWO_HOURS);
        self.mock.advance(TWO_HOURS);
    }

    /// Another manager of the same consumer on `store` (its own handle to the fleet's
    /// store), the same mock and clock: what another process of the application is.
    pub fn member(&self, store: Arc<dyn TokenStore>) -> TokenManager {
        TokenManager::builder_shared(consumer(&self.mock), store)
            .unsaved_tokens_dir(tokenkeeper_testkit::dirs::fresh_dir("bench-unsaved").join("kept"))
            .clock(self.clock.clone())
            .tune(|p| p.jitter_percent = 0)
            .build()
            .unwrap()
    }

    /// Another manager on the fleet's own store with the bound on rotating refreshes in flight
    /// lifted (`max_rotations_in_flight = None`): as many refreshes in flight as its callers
    /// ask for, the concurrency of the raw rows.
    pub fn unbounded(&self) -> TokenManager {
        TokenManager::builder_shared(consumer(&self.mock), self.manager.store().clone())
            .unsaved_tokens_dir(tokenkeeper_testkit::dirs::fresh_dir("bench-unsaved").join("kept"))
            .clock(self.clock.clone())
            .tune(|p| {
                p.jitter_percent = 0;
                p.max_rotations_in_flight = None;
            })
            .build()
            .unwrap()
    }

    /// Successful refreshes the mock has seen.
    pub fn refreshes(&self) -> u64 {
        self.mock.counters().totals.refreshes
    }
}

/// The typed choice of a store; [`Backend::open`] gives a handle of its own, as another
/// process would open it.
pub use tokenkeeper_testkit::backend::{Backend, Synchronous};

/// A fresh SQLite file under the bench data dir (on disk, not in a temporary file system:
/// synchronous `Full` pays its fsync here).
pub fn fresh_sqlite(synchronous: Synchronous) -> Backend {
    // (pid, a counter, the time: two made in one instant are two files.)
    let dir = data_dir().join(format!(
        "refresh-{}",
        tokenkeeper_testkit::dirs::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    Backend::Sqlite {
        path: dir.join("tokens.db"),
        synchronous,
    }
}

/// A fresh key prefix on the benchmarks' redis-server.
pub fn fresh_redis() -> Backend {
    Backend::Redis {
        url: redis_url(),
        prefix: format!(
            "bench-refresh-{}",
            tokenkeeper_testkit::dirs::unique_suffix()
        ),
        wait_for_replica: false,
    }
}

/// A fresh schema on the benchmarks' PostgreSQL server.
pub fn fresh_postgres() -> Backend {
    Backend::Postgres {
        url: postgres_url(),
        schema: tokenkeeper_testkit::postgres::unique_schema("bench"),
    }
}

/// Refreshes every expired installation with `callers` concurrent calls each (futures of one
/// task, like the raw side's requests), 64 installations at a time.
pub async fn refresh_all(fleet: &Fleet, callers: usize) {
    refresh_all_with(&fleet.manager, fleet, callers).await;
}

/// [`refresh_all`] through `manager` (one of the fleet's, e.g. [`Fleet::unbounded`]).
pub async fn refresh_all_with(manager: &TokenManager, fleet: &Fleet, callers: usize) {
    let manager = manager.clone();
    let ids = Arc::new(fleet.ids.clone());
    fan_out(ids.len(), IN_FLIGHT, move |i| {
        let (manager, ids) = (manager.clone(), ids.clone());
        async move {
            // Concurrent callers as futures of the worker's task, as the raw POSTs are.
            let calls = (0..callers).map(|_| manager.access_token(&ids[i]));
            for r in futures_util::future::join_all(calls).await {
                r.unwrap();
            }
        }
    })
    .await;
}
