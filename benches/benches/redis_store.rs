//! RedisStore beside the raw redis-rs commands it wraps, in one run: `get` vs a raw `GET` of
//! the same key, and `compare_and_swap` vs a raw `EVALSHA` of the same script with the same
//! keys and arguments. The store adds encoding, decoding and validation.
//!
//! `redis_scans`: the reads that run by default over many installations (review E10), each
//! beside its raw primitive: a `list` page of 500 merged from 16 shards vs one `ZRANGEBYLEX`
//! of 500 ids, and `count_states` (a `ZCARD` per index) vs counting by paging `list`, as the
//! refresher's gauge did before. The bytes each moves per returned item are printed.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokenkeeper_benches::redis_url;
use tokenkeeper_benches::{bump, redis_bytes_of, time_cas};
use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{InstallationId, ListFilter, TokenStore};
use tokenkeeper_redis::RedisStore;
use tokenkeeper_redis::bench_support::{cas_args, cas_script, script_keys};

/// A one-worker runtime, a store under a prefix of this process (returned), and a raw
/// connection to the same server.
fn setup(
    tag: &str,
) -> (
    tokio::runtime::Runtime,
    RedisStore,
    redis::aio::MultiplexedConnection,
    String,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = redis_url();
    let prefix = format!("{tag}-{}", std::process::id());
    let store = rt
        .block_on(RedisStore::builder(&url).prefix(&prefix).connect())
        .unwrap();
    let raw = rt
        .block_on(
            redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection(),
        )
        .unwrap();
    (rt, store, raw, prefix)
}

fn redis_ops(c: &mut Criterion) {
    let (rt, store, mut raw, _) = setup("bench");
    let n = 1_000;
    let ids: Vec<InstallationId> = (0..n)
        .map(|i| InstallationId::new(format!("inst-{i:05}")).unwrap())
        .collect();
    rt.block_on(async {
        for i in &ids {
            store.create(&sample_record(i, T0)).await.unwrap();
        }
        // Load the script so the raw EVALSHA finds it.
        let _sha: String = cas_script()
            .prepare_invoke()
            .load_async(&mut raw)
            .await
            .unwrap();
    });
    let keys: Vec<String> = ids.iter().map(|i| store.record_key(i)).collect();
    let mut g = c.benchmark_group("redis_ops");

    let mut k = 0usize;
    g.bench_function("get/tokenkeeper", |b| {
        b.iter(|| {
            k = (k + 7) % n;
            rt.block_on(store.get(&ids[k])).unwrap().unwrap()
        })
    });
    g.bench_function("get/raw_redis_GET", |b| {
        b.iter(|| {
            k = (k + 7) % n;
            let v: Vec<u8> = rt
                .block_on(redis::cmd("GET").arg(&keys[k]).query_async(&mut raw))
                .unwrap();
            v
        })
    });

    let cas_id = &ids[1];
    g.bench_function("cas/tokenkeeper", |b| {
        b.iter_custom(|iters| time_cas(&rt, &store, cas_id, iters))
    });
    let script_keys = script_keys(&store, cas_id, tokenkeeper_core::conformance::CONSUMER);
    let sha = cas_script().get_hash().to_owned();
    g.bench_function("cas/raw_redis_EVALSHA", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let current = rt.block_on(store.get(cas_id)).unwrap().unwrap();
                let next = bump(&current);
                let args = cas_args(&next, current.version());
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(&sha)
                    .arg(script_keys.len())
                    .arg(&script_keys)
                    .arg(&args);
                let started = Instant::now();
                let out: i64 = rt.block_on(cmd.query_async(&mut raw)).unwrap();
                total += started.elapsed();
                assert_eq!(out, 1);
            }
            total
        })
    });
    g.finish();
}

fn redis_scans(c: &mut Criterion) {
    let (rt, store, mut raw, prefix) = setup("bench-scans");
    let n = 4_000;
    rt.block_on(tokenkeeper_benches::fan_out(n, 16, {
        let store = store.clone();
        move |i| {
            let store = store.clone();
            async move {
                let id = InstallationId::new(format!("scan-{i:05}")).unwrap();
                store.create(&sample_record(&id, T0)).await.unwrap();
            }
        }
    }));
    let page = 500;
    let list = || store.list(ListFilter::all(), None, page);
    let (bytes, listed) = rt.block_on(redis_bytes_of(&mut raw, list()));
    let listed = listed.unwrap().entries.len();
    println!(
        "redis_scans: a list page moved {bytes} bytes for {listed} ids ({:.1} per id)",
        bytes as f64 / listed as f64
    );
    let (bytes, _) = rt.block_on(redis_bytes_of(&mut raw, store.count_states(u64::MAX)));
    println!("redis_scans: count_states moved {bytes} bytes for {n} installations");
    let (bytes, _) = rt.block_on(redis_bytes_of(&mut raw, count_by_listing(&store)));
    println!("redis_scans: counting by paging list moved {bytes} bytes for {n} installations");
    let mut g = c.benchmark_group("redis_scans");
    g.bench_function("list_page_500/tokenkeeper", |b| {
        b.iter(|| rt.block_on(list()).unwrap().entries.len())
    });
    // The primitive: one sorted set of 500 ids like the store's, read in one command.
    let index = format!("{prefix}:raw-index");
    let mut zadd = redis::cmd("ZADD");
    zadd.arg(&index);
    for i in 0..page {
        zadd.arg(0).arg(format!("scan-{i:05}"));
    }
    let _: usize = rt.block_on(zadd.query_async(&mut raw)).unwrap();
    g.bench_function("list_page_500/raw_ZRANGEBYLEX_500", |b| {
        b.iter(|| {
            let ids: Vec<Vec<u8>> = rt
                .block_on(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg("-")
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(page)
                        .query_async(&mut raw),
                )
                .unwrap();
            assert_eq!(ids.len(), page);
            ids.len()
        })
    });
    g.bench_function("count_states/tokenkeeper", |b| {
        b.iter(|| rt.block_on(store.count_states(u64::MAX)).unwrap())
    });
    g.bench_function("count_states/by_paging_list", |b| {
        b.iter(|| rt.block_on(count_by_listing(&store)))
    });
    g.finish();
}

/// Counts every state by paging `list` (1,000 per page): the gauge's way before review E10.
async fn count_by_listing(store: &RedisStore) -> u64 {
    let mut total = 0;
    for state in tokenkeeper_core::StateKind::ALL {
        let mut after: Option<InstallationId> = None;
        loop {
            let page = store
                .list(ListFilter::in_state(state), after.as_ref(), 1000)
                .await
                .unwrap();
            total += page.entries.len() as u64;
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    total
}

criterion_group!(benches, redis_ops, redis_scans);
criterion_main!(benches);
