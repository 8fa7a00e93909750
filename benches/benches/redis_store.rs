//! RedisStore beside the raw redis-rs commands it wraps, in one run: `get` vs a raw `GET` of
//! the same key, and `compare_and_swap` vs a raw `EVALSHA` of the same script with the same
//! keys and arguments. The store adds encoding, decoding and validation.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokenkeeper_benches::redis_url;
use tokenkeeper_benches::{bump, time_cas};
use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{InstallationId, TokenStore};
use tokenkeeper_redis::RedisStore;
use tokenkeeper_redis::bench_support::{cas_args, cas_script, script_keys};

fn redis_ops(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = redis_url();
    let prefix = format!("bench-{}", std::process::id());
    let store = rt
        .block_on(RedisStore::builder(&url).prefix(&prefix).connect())
        .unwrap();
    let mut raw = rt
        .block_on(
            redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection(),
        )
        .unwrap();
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

criterion_group!(benches, redis_ops);
criterion_main!(benches);
