//! `access_token` on a fresh installation (a cache hit), 100,000 installations loaded, beside
//! the same lookup with the freshness check every token cache needs (a clock read and a
//! comparison) on a `RwLock<HashMap>`, on `quick_cache`'s sync cache and on `papaya`'s
//! concurrent map: 1,000 lookups per iteration, from 1 task and from 2 and 8 tasks at once.
//! It ends with the table of time ratios and allocations per lookup (counted by a global
//! allocator; a hit is meant to allocate nothing).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenkeeper::{
    AccessToken, InstallationId, TokenManager, core::Clock, core::RefreshToken, core::SystemClock,
    core::Timestamp, core::TokenSet,
};
use tokenkeeper_benches::fleet::*;
use tokenkeeper_benches::{COUNTING, CountingAlloc, RatioTable, allocations, quick_mode};
use tokenkeeper_mock_provider::MockProvider;

#[global_allocator]
static ALLOC: &CountingAlloc = &COUNTING;

type Entry = (AccessToken, Timestamp);

/// The same entries in every cache under comparison.
struct Caches {
    rwlock: RwLock<HashMap<InstallationId, Entry>>,
    quick: quick_cache::sync::Cache<InstallationId, Entry>,
    papaya: papaya::HashMap<InstallationId, Entry>,
}

fn token(i: usize) -> AccessToken {
    AccessToken::new(format!("access-token-{i:06}-0123456789abcdef"))
}

/// A manager with `ids` imported and their tokens cached.
fn manager(rt: &tokio::runtime::Runtime, ids: &[InstallationId], now: Timestamp) -> TokenManager {
    rt.block_on(async {
        // No provider call happens on this path; the mock only makes the consumer valid.
        let mock = MockProvider::builder().start().await.unwrap();
        let manager =
            TokenManager::builder(consumer(&mock), tokenkeeper::stores::MemoryStore::new())
                .build()
                .unwrap();
        for (i, id) in ids.iter().enumerate() {
            let t = TokenSet::bearer(
                token(i),
                Some(RefreshToken::new(format!("refresh-{i}"))),
                now,
                now.saturating_add(TWO_HOURS),
            );
            manager.import_installation(id.clone(), t).await.unwrap();
            manager.access_token(id).await.unwrap(); // warm the cache
        }
        manager
    })
}

fn caches(ids: &[InstallationId], now: Timestamp) -> Caches {
    let entry = |i: usize| (token(i), now.saturating_add(TWO_HOURS));
    // Twice the entries: quick_cache's bound is approximate, and a miss would end the bench.
    let quick = quick_cache::sync::Cache::new(2 * ids.len());
    let papaya = papaya::HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        quick.insert(id.clone(), entry(i));
        papaya.pin().insert(id.clone(), entry(i));
    }
    Caches {
        rwlock: RwLock::new(
            ids.iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), entry(i)))
                .collect(),
        ),
        quick,
        papaya,
    }
}

/// One lookup in each way under comparison: the token's length, so nothing is optimised away.
#[derive(Clone, Copy)]
enum Way {
    AccessToken,
    RwLock,
    RwLockNoExpiry,
    QuickCache,
    Papaya,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::AccessToken => "access_token_cache_hit",
            Way::RwLock => "raw_rwlock_hashmap_lookup_with_expiry_check",
            Way::RwLockNoExpiry => "raw_rwlock_hashmap_lookup",
            Way::QuickCache => "quick_cache_get_with_expiry_check",
            Way::Papaya => "papaya_get_with_expiry_check",
        }
    }

    async fn lookup(self, manager: &TokenManager, c: &Caches, id: &InstallationId) -> usize {
        let fresh = |e: &Entry, now: Timestamp| (now < e.1).then(|| e.0.clone());
        let token = match self {
            Way::AccessToken => Some(manager.access_token(id).await.unwrap()),
            Way::RwLock => {
                let now = SystemClock.now();
                c.rwlock.read().unwrap().get(id).and_then(|e| fresh(e, now))
            }
            Way::RwLockNoExpiry => c.rwlock.read().unwrap().get(id).map(|e| e.0.clone()),
            Way::QuickCache => {
                let now = SystemClock.now();
                c.quick.get(id).and_then(|e| fresh(&e, now))
            }
            Way::Papaya => {
                let now = SystemClock.now();
                c.papaya.pin().get(id).and_then(|e| fresh(e, now))
            }
        };
        token.expect("a hit").secret().len()
    }
}

/// Everything a row's tasks share.
struct Shared {
    manager: TokenManager,
    caches: Caches,
    probe: Vec<InstallationId>,
}

/// `tasks` tasks at once, each making the 1,000 lookups; the time until all are done.
fn run(rt: &tokio::runtime::Runtime, shared: &Arc<Shared>, way: Way, tasks: usize) -> Duration {
    let lookups = async |shared: &Shared| {
        let mut total = 0;
        for id in &shared.probe {
            total += way.lookup(&shared.manager, &shared.caches, id).await;
        }
        total
    };
    let started = Instant::now();
    if tasks == 1 {
        // On the calling thread, as the rows always were: no task hand-off in the figure.
        assert!(rt.block_on(lookups(shared)) > 0);
        return started.elapsed();
    }
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let shared = shared.clone();
            set.spawn(async move {
                let mut total = 0;
                for id in &shared.probe {
                    total += way.lookup(&shared.manager, &shared.caches, id).await;
                }
                total
            });
        }
        while let Some(done) = set.join_next().await {
            assert!(done.unwrap() > 0);
        }
    });
    started.elapsed()
}

fn hot_path(c: &mut Criterion) {
    let rt = runtime();
    let n = if quick_mode() { 10_000 } else { 100_000 };
    let now = SystemClock.now();
    let ids = ids(n);
    let shared = Arc::new(Shared {
        manager: manager(&rt, &ids, now),
        caches: caches(&ids, now),
        probe: (0..1000).map(|k| ids[(k * 7919) % n].clone()).collect(),
    });
    let table = RatioTable::default();
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1000));
    let ways = [
        Way::AccessToken,
        Way::RwLockNoExpiry,
        Way::RwLock,
        Way::QuickCache,
        Way::Papaya,
    ];
    for tasks in [1usize, 2, 8] {
        for way in ways {
            if tasks > 1 && matches!(way, Way::RwLockNoExpiry) {
                continue;
            }
            let label = match tasks {
                1 => format!("{}_x1000", way.name()),
                t => format!("{}_x1000_{t}_tasks", way.name()),
            };
            g.bench_function(&label, |b| {
                b.iter_custom(|iters| {
                    let before = allocations();
                    let took = (0..iters).map(|_| run(&rt, &shared, way, tasks)).sum();
                    // Per lookup: the table divides by iterations and by this "N".
                    let allocs = allocations() - before;
                    table.record_allocs(&label, 1000 * tasks, took, iters, allocs);
                    took
                })
            });
        }
    }
    g.finish();
    assert_eq!(
        shared.manager.cached_installations(),
        n,
        "every installation stays cached"
    );
    println!(
        "\nFloor of each row: the RwLock<HashMap> lookup with the same expiry check, same tasks."
    );
    table.print_with_floors("-", |label| {
        let tasks = label.rsplit_once("_x1000").map_or("", |(_, t)| t);
        (!label.starts_with("raw_rwlock_hashmap_lookup_with"))
            .then(|| format!("raw_rwlock_hashmap_lookup_with_expiry_check_x1000{tasks}"))
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
