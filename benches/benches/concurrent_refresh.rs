//! Refreshing N = 100, 1,000, 10,000 expired installations with 1 and 10 concurrent callers
//! each, on memory, SQLite (synchronous NORMAL and the default FULL) and Redis, beside N raw
//! reqwest refresh POSTs to the same kind of mock, 64 installations in flight on both sides,
//! and the OAuth client alone. Exactly N refreshes per round, checked outside the timing. At
//! the end it prints the table of throughput ratios.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokenkeeper::{core::Clock, core::SystemClock};
use tokenkeeper_benches::fleet::*;
use tokenkeeper_benches::{RatioTable, fan_out, grants, quick_mode, raw_refresh};
use tokenkeeper_mock_provider::MockProvider;

fn concurrent_refresh(c: &mut Criterion) {
    let rt = runtime();
    let sizes: &[usize] = if quick_mode() {
        &[100]
    } else {
        &[100, 1_000, 10_000]
    };
    let table = RatioTable::default();
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
                let label = "raw_reqwest_post";
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
                table.record(label, n, total, iters);
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
            tokenkeeper::oauth::OAuthClient::new(consumer(&own_mock), Arc::new(SystemClock))
                .unwrap();
        let sets = Arc::new(Mutex::new(own_tokens));
        g.bench_with_input(BenchmarkId::new("oauth_client_only", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let label = "oauth_client_only";
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
                table.record(label, n, total, iters);
                total
            })
        });
        for backend in [
            Backend::Memory,
            fresh_sqlite(Synchronous::Normal),
            fresh_sqlite(Synchronous::Full),
            fresh_redis(),
            fresh_postgres(),
        ] {
            let fleet = rt.block_on(async { Fleet::new(backend.open().await, n).await });
            let backend_label = label(&backend);
            for callers in [1usize, 10] {
                let fsync_bound = matches!(
                    backend,
                    Backend::Sqlite {
                        synchronous: Synchronous::Full,
                        ..
                    }
                );
                if fsync_bound && callers == 10 {
                    continue; // one figure is enough
                }
                g.bench_with_input(
                    BenchmarkId::new(format!("{backend_label}_{callers}_callers"), n),
                    &n,
                    |b, &n| {
                        b.iter_custom(|iters| {
                            let label = format!("{backend_label}_{callers}_callers");
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
                            table.record(&label, n, total, iters);
                            total
                        })
                    },
                );
            }
            assert_eq!(fleet.mock.counters().totals.reuse_detections, 0);
        }
    }
    g.finish();
    table.print("raw_reqwest_post");
}

/// A row's label: the backend's name, SQLite's with its synchronous mode (`sqlite_normal`,
/// `sqlite_full`), as the rows have always been named.
fn label(backend: &Backend) -> String {
    match backend {
        Backend::Sqlite { synchronous, .. } => match synchronous {
            Synchronous::Normal => "sqlite_normal".into(),
            Synchronous::Full => "sqlite_full".into(),
            other => panic!("no row label for SQLite with synchronous {other:?}"),
        },
        other => other.name().into(),
    }
}

criterion_group!(benches, concurrent_refresh);
criterion_main!(benches);
