//! PostgresStore beside the raw tokio-postgres statements it wraps, on the same pool, in one
//! run: `get` vs the same prepared `SELECT`, and `compare_and_swap` vs the same prepared
//! conditional `UPDATE` with the same parameters. The store adds pooling through its own
//! timeout wrapper, encoding, decoding and validation.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokenkeeper_benches::{bump, postgres_url, time_cas};
use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{InstallationId, Timestamp, TokenStore};
use tokenkeeper_postgres::PostgresStore;
use tokenkeeper_postgres::bench_support::{cas_sql, get_sql, pool};

fn postgres_ops(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store = rt
        .block_on(
            PostgresStore::builder(postgres_url())
                .schema(tokenkeeper_testkit::postgres::unique_schema("bench"))
                .connect(),
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
    });
    let mut g = c.benchmark_group("postgres_ops");

    let mut k = 0usize;
    g.bench_function("get/tokenkeeper", |b| {
        b.iter(|| {
            k = (k + 7) % n;
            rt.block_on(store.get(&ids[k])).unwrap().unwrap()
        })
    });
    g.bench_function("get/raw_tokio_postgres", |b| {
        b.iter(|| {
            k = (k + 7) % n;
            rt.block_on(async {
                let client = pool(&store).get().await.unwrap();
                let stmt = client.prepare_cached(get_sql(&store)).await.unwrap();
                let row = client.query_one(&stmt, &[&ids[k].as_str()]).await.unwrap();
                row.get::<_, Vec<u8>>(2)
            })
        })
    });

    let cas_id = &ids[1];
    g.bench_function("cas/tokenkeeper", |b| {
        b.iter_custom(|iters| time_cas(&rt, &store, cas_id, iters))
    });
    g.bench_function("cas/raw_tokio_postgres_UPDATE", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let current = rt.block_on(store.get(cas_id)).unwrap().unwrap();
                let next = bump(&current);
                // The same parameters the store binds, prepared before the clock starts.
                let bytes = next.encode();
                let version = next.version() as i64;
                let expected = current.version() as i64;
                let due = next.due_at().map(Timestamp::unix_nanos);
                let holder = next.state().lease().map(|l| l.holder.as_str().to_owned());
                let under = next.written_under().map(|h| h.as_str().to_owned());
                let started = Instant::now();
                let changed = rt.block_on(async {
                    let client = pool(&store).get().await.unwrap();
                    let stmt = client.prepare_cached(cas_sql(&store)).await.unwrap();
                    client
                        .execute(
                            &stmt,
                            &[
                                &cas_id.as_str(),
                                &next.consumer(),
                                &version,
                                &next.state().kind().as_str(),
                                &due,
                                &holder,
                                &bytes,
                                &expected,
                                &under,
                            ],
                        )
                        .await
                        .unwrap()
                });
                total += started.elapsed();
                assert_eq!(changed, 1);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, postgres_ops);
criterion_main!(benches);
