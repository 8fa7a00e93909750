//! The refresh engine under load, each figure beside the raw primitive it is built on
//! (DESIGN.md §11), with the mock provider's counters checked outside the timed sections:
//!
//! - `hot_path`: `access_token` on a fresh installation (cache hit), 100,000 installations
//!   loaded, vs a `RwLock<HashMap>` lookup of the same shape (1,000 lookups per iteration).
//! - `concurrent_refresh`: N = 100, 1,000, 10,000 expired installations, 1 and 10 concurrent
//!   callers each, on memory, SQLite (synchronous NORMAL and the default FULL) and Redis, vs N
//!   raw reqwest refresh POSTs; 64
//!   installations in flight on both sides. Exactly N refreshes per round.
//! - `single_flight`: 1,000 concurrent callers (futures of one task) on one expired
//!   installation vs one raw refresh POST.
//! - `refresher_sweep`: the background refresher bringing 10,000 due installations current vs
//!   10,000 raw POSTs at the same concurrency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokenkeeper::{
    AccessToken, Clock, ConsumerConfig, InstallationId, ManualClock, RefreshToken, RefresherConfig,
    SystemClock, Timestamp, TokenManager, TokenSet, TokenStore, profiles,
};
use tokenkeeper_benches::{fan_out, grants, quick_mode, raw_refresh, redis_url};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProvider, Profile};

const IN_FLIGHT: usize = 64;
const TWO_HOURS: Duration = Duration::from_secs(7200);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ids(n: usize) -> Vec<InstallationId> {
    (0..n)
        .map(|i| InstallationId::new(format!("bench-{i:06}")).unwrap())
        .collect()
}

/// A consumer on the mock.
fn consumer(mock: &MockProvider) -> ConsumerConfig {
    let url = |s: String| reqwest::Url::parse(&s).unwrap();
    ConsumerConfig::builder(profiles::bitbucket().with_endpoints(
        url(mock.authorize_url()),
        url(mock.token_url()),
        None,
    ))
    .client_id(DEFAULT_CLIENT_ID)
    .client_secret(DEFAULT_CLIENT_SECRET)
    .redirect_uri("http://127.0.0.1/callback")
    .build()
    .unwrap()
}

/// A manager over `store` with `n` imported installations on a fresh mock.
struct Fleet {
    mock: MockProvider,
    clock: ManualClock,
    manager: TokenManager,
    ids: Vec<InstallationId>,
}

impl Fleet {
    async fn new(store: Arc<dyn TokenStore>, n: usize) -> Fleet {
        let mock = MockProvider::builder()
            .profile(Profile::Bitbucket)
            .start()
            .await
            .unwrap();
        let clock = ManualClock::new(SystemClock.now());
        let manager = TokenManager::builder_shared(consumer(&mock), store)
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

    fn expire_all(&self) {
        self.clock.advance(TWO_HOURS);
        self.mock.advance(TWO_HOURS);
    }

    fn refreshes(&self) -> u64 {
        self.mock.counters().totals.refreshes
    }
}

fn hot_path(c: &mut Criterion) {
    let rt = runtime();
    let n = if quick_mode() { 10_000 } else { 100_000 };
    let now = SystemClock.now();
    let (manager, ids) = rt.block_on(async {
        // No provider call happens on this path; the mock only makes the consumer valid.
        let mock = MockProvider::builder().start().await.unwrap();
        let manager =
            TokenManager::builder(consumer(&mock), tokenkeeper::stores::MemoryStore::new())
                .build()
                .unwrap();
        let ids = ids(n);
        for (i, id) in ids.iter().enumerate() {
            let t = TokenSet::bearer(
                AccessToken::new(format!("access-token-{i:06}-0123456789abcdef")),
                Some(RefreshToken::new(format!("refresh-{i}"))),
                now,
                now.saturating_add(TWO_HOURS),
            );
            manager.import_installation(id.clone(), t).await.unwrap();
            manager.access_token(id).await.unwrap(); // warm the cache
        }
        (manager, ids)
    });
    let raw: RwLock<HashMap<InstallationId, (AccessToken, Timestamp)>> = RwLock::new(
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let token = AccessToken::new(format!("access-token-{i:06}-0123456789abcdef"));
                (id.clone(), (token, now.saturating_add(TWO_HOURS)))
            })
            .collect(),
    );
    let clock = SystemClock;
    let probe: Vec<InstallationId> = (0..1000).map(|k| ids[(k * 7919) % n].clone()).collect();
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(probe.len() as u64));
    g.bench_function("access_token_cache_hit_x1000", |b| {
        b.to_async(&rt).iter(|| async {
            let mut total = 0;
            for id in &probe {
                total += manager.access_token(id).await.unwrap().secret().len();
            }
            total
        })
    });
    g.bench_function("raw_rwlock_hashmap_lookup_x1000", |b| {
        b.to_async(&rt).iter(|| async {
            let mut total = 0;
            for id in &probe {
                let token = raw.read().unwrap().get(id).map(|(t, _)| t.clone()).unwrap();
                total += token.secret().len();
            }
            total
        })
    });
    // The same lookup with the freshness check any token cache needs (a clock read and a
    // comparison), which `access_token` makes on every call.
    g.bench_function("raw_rwlock_hashmap_lookup_with_expiry_check_x1000", |b| {
        b.to_async(&rt).iter(|| async {
            let mut total = 0;
            for id in &probe {
                let now = clock.now();
                let token = raw
                    .read()
                    .unwrap()
                    .get(id)
                    .filter(|(_, stale_at)| now < *stale_at)
                    .map(|(t, _)| t.clone())
                    .unwrap();
                total += token.secret().len();
            }
            total
        })
    });
    g.finish();
    assert_eq!(
        manager.cached_installations(),
        n,
        "every installation stays cached"
    );
}

async fn store_for(backend: &str) -> Arc<dyn TokenStore> {
    match backend {
        "memory" => Arc::new(tokenkeeper::stores::MemoryStore::new()),
        "sqlite" => {
            let dir =
                tokenkeeper_benches::data_dir().join(format!("refresh-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Arc::new(
                tokenkeeper::stores::SqliteStore::open(dir.join("tokens.db"))
                    .await
                    .unwrap(),
            )
        }
        _ => Arc::new(
            tokenkeeper::stores::RedisStore::builder(redis_url())
                .prefix(format!(
                    "bench-refresh-{}-{}",
                    std::process::id(),
                    fastrand_suffix()
                ))
                .connect()
                .await
                .unwrap(),
        ),
    }
}

fn fastrand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Refreshes every expired installation with `callers` concurrent calls each, 64 at a time.
async fn refresh_all(fleet: &Fleet, callers: usize) {
    let manager = fleet.manager.clone();
    let ids = Arc::new(fleet.ids.clone());
    fan_out(ids.len(), IN_FLIGHT, move |i| {
        let (manager, ids) = (manager.clone(), ids.clone());
        async move {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..callers {
                let (m, id) = (manager.clone(), ids[i].clone());
                calls.spawn(async move { m.access_token(&id).await });
            }
            while let Some(r) = calls.join_next().await {
                r.unwrap().unwrap();
            }
        }
    })
    .await;
}

fn concurrent_refresh(c: &mut Criterion) {
    let rt = runtime();
    let sizes: &[usize] = if quick_mode() {
        &[100]
    } else {
        &[100, 1_000, 10_000]
    };
    let mut g = c.benchmark_group("concurrent_refresh");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));
    for &n in sizes {
        g.throughput(Throughput::Elements(n as u64));
        // The raw baseline: n refresh POSTs, 64 in flight.
        let (mock, tokens) = rt.block_on(async {
            let mock = MockProvider::builder().start().await.unwrap();
            let tokens = grants(&mock, n, SystemClock.now()).await;
            (mock, tokens)
        });
        let http = reqwest::Client::new();
        let current = Arc::new(Mutex::new(
            tokens
                .iter()
                .map(|t| t.refresh_token.as_ref().unwrap().secret().to_owned())
                .collect::<Vec<_>>(),
        ));
        g.bench_with_input(BenchmarkId::new("raw_reqwest_post", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let these = Arc::new(current.lock().unwrap().clone());
                    let (http, url) = (http.clone(), mock.token_url());
                    let started = Instant::now();
                    let next = rt.block_on(fan_out(n, IN_FLIGHT, move |i| {
                        let (http, url, these) = (http.clone(), url.clone(), these.clone());
                        async move { raw_refresh(&http, &url, &these[i]).await }
                    }));
                    total += started.elapsed();
                    *current.lock().unwrap() = next;
                }
                total
            })
        });
        // The OAuth client alone (no store, no manager), to separate HTTP costs from the rest.
        let (own_mock, own_tokens) = rt.block_on(async {
            let mock = MockProvider::builder().start().await.unwrap();
            let tokens = grants(&mock, n, SystemClock.now()).await;
            (mock, tokens)
        });
        let client =
            tokenkeeper::OAuthClient::new(consumer(&own_mock), Arc::new(SystemClock)).unwrap();
        let sets = Arc::new(Mutex::new(own_tokens));
        g.bench_with_input(BenchmarkId::new("oauth_client_only", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let these = Arc::new(sets.lock().unwrap().clone());
                    let client = client.clone();
                    let ids = Arc::new(ids(n));
                    let started = Instant::now();
                    let next = rt.block_on(fan_out(n, IN_FLIGHT, move |i| {
                        let (client, these, ids) = (client.clone(), these.clone(), ids.clone());
                        async move { client.refresh(&ids[i], &these[i]).await.unwrap() }
                    }));
                    total += started.elapsed();
                    *sets.lock().unwrap() = next;
                }
                total
            })
        });
        for backend in ["memory", "sqlite_normal", "sqlite_full", "redis"] {
            let fleet = rt.block_on(async { Fleet::new(store_for(backend).await, n).await });
            for callers in [1usize, 10] {
                if backend == "sqlite_full" && callers == 10 {
                    continue; // fsync-bound: one figure is enough
                }
                g.bench_with_input(
                    BenchmarkId::new(format!("{backend}_{callers}_callers"), n),
                    &n,
                    |b, &n| {
                        b.iter_custom(|iters| {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                fleet.expire_all();
                                let before = fleet.refreshes();
                                let started = Instant::now();
                                rt.block_on(refresh_all(&fleet, callers));
                                total += started.elapsed();
                                assert_eq!(
                                    fleet.refreshes() - before,
                                    n as u64,
                                    "exactly one refresh per installation"
                                );
                            }
                            total
                        })
                    },
                );
            }
            assert_eq!(fleet.mock.counters().totals.reuse_detections, 0);
        }
    }
    g.finish();
}

fn single_flight(c: &mut Criterion) {
    let rt = runtime();
    let fleet = rt.block_on(async { Fleet::new(store_for("memory").await, 1).await });
    let raw_mock = rt.block_on(async { MockProvider::builder().start().await.unwrap() });
    let raw_token = rt.block_on(grants(&raw_mock, 1, SystemClock.now()));
    let raw_current = Mutex::new(
        raw_token[0]
            .refresh_token
            .as_ref()
            .unwrap()
            .secret()
            .to_owned(),
    );
    let http = reqwest::Client::new();
    let mut g = c.benchmark_group("single_flight");
    g.bench_function("1000_callers_one_expired_installation", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fleet.expire_all();
                let before = fleet.refreshes();
                let started = Instant::now();
                rt.block_on(async {
                    // 1,000 concurrent callers as futures of one task (a request fan-out).
                    let id = &fleet.ids[0];
                    let calls = (0..1000).map(|_| fleet.manager.access_token(id));
                    for r in futures_util::future::join_all(calls).await {
                        r.unwrap();
                    }
                });
                total += started.elapsed();
                assert_eq!(fleet.refreshes() - before, 1, "exactly one refresh");
            }
            total
        })
    });
    // The same refresh with a single caller: separates the refresh path from the cost of
    // the 999 callers waiting on it.
    g.bench_function("1_caller_one_expired_installation", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fleet.expire_all();
                let before = fleet.refreshes();
                let started = Instant::now();
                rt.block_on(fleet.manager.access_token(&fleet.ids[0]))
                    .unwrap();
                total += started.elapsed();
                assert_eq!(fleet.refreshes() - before, 1, "exactly one refresh");
            }
            total
        })
    });
    g.bench_function("raw_reqwest_post_one_refresh", |b| {
        b.iter(|| {
            let token = raw_current.lock().unwrap().clone();
            let next = rt.block_on(raw_refresh(&http, &raw_mock.token_url(), &token));
            *raw_current.lock().unwrap() = next;
        })
    });
    g.finish();
}

fn refresher_sweep(c: &mut Criterion) {
    let rt = runtime();
    let n = if quick_mode() { 500 } else { 10_000 };
    let fleet = rt.block_on(async { Fleet::new(store_for("memory").await, n).await });
    let mut g = c.benchmark_group("refresher_sweep");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("refresher_64_concurrent", n), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fleet.expire_all();
                let before = fleet.refreshes();
                let started = Instant::now();
                rt.block_on(async {
                    let handle = fleet.manager.spawn_refresher_with(RefresherConfig {
                        concurrency: IN_FLIGHT,
                        rate_per_second: None,
                        page_size: 1000,
                        max_idle: Duration::from_millis(5),
                    });
                    while fleet.refreshes() - before < n as u64 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    handle.shutdown().await;
                });
                total += started.elapsed();
                assert_eq!(
                    fleet.refreshes() - before,
                    n as u64,
                    "exactly one refresh per installation"
                );
            }
            total
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    hot_path,
    single_flight,
    concurrent_refresh,
    refresher_sweep
);
criterion_main!(benches);
