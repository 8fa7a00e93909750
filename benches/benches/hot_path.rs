//! `access_token` on a fresh installation (a cache hit), 100,000 installations loaded, beside
//! a `RwLock<HashMap>` lookup of the same shape, with and without the freshness check every
//! token cache needs (1,000 lookups per iteration).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenkeeper::{core::Clock, core::SystemClock};
use tokenkeeper_benches::fleet::*;
use tokenkeeper_benches::quick_mode;
use tokenkeeper_mock_provider::MockProvider;

use std::collections::HashMap;
use std::sync::RwLock;

use tokenkeeper::{
    AccessToken, InstallationId, TokenManager, core::RefreshToken, core::Timestamp, core::TokenSet,
};

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

criterion_group!(benches, hot_path);
criterion_main!(benches);
