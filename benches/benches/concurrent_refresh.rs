//! Refreshing N = 100, 1,000, 10,000 expired installations on memory, SQLite (synchronous
//! NORMAL and the default FULL), Redis and PostgreSQL, beside two floors measured in the same
//! run: N raw reqwest refresh POSTs to the same kind of mock (64 in flight), and, per durable
//! store, the raw composite a refresh needs at least (one read, two conditional writes, one
//! POST, written directly against the driver: `tokenkeeper_benches::composite`).
//!
//! Rows per store: the default manager (at most `max_rotations_in_flight` = 8 rotating
//! refreshes in flight, the bound on what one crash can lose) with 1 and 10 concurrent callers
//! per installation, and the same store with the bound lifted (`_64_in_flight`: as many in
//! flight as the raw rows). Exactly N refreshes per round, checked outside the timing. At the
//! end it prints the table: throughput against raw POSTs and against the store's composite,
//! and allocations per refresh (process-wide, the mock's included: compare with the raw row).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use tokenkeeper::{TokenManager, core::Clock, core::SystemClock};
use tokenkeeper_benches::composite::Composite;
use tokenkeeper_benches::fleet::*;
use tokenkeeper_benches::{
    COUNTING, CountingAlloc, RatioTable, allocations, fan_out, grants, quick_mode, raw_refresh,
};
use tokenkeeper_mock_provider::MockProvider;

#[global_allocator]
static ALLOC: &CountingAlloc = &COUNTING;

/// What one bench row runs per round, and the table it reports to.
struct Rows<'a> {
    rt: &'a tokio::runtime::Runtime,
    table: &'a RatioTable,
}

impl Rows<'_> {
    /// A row whose round is `round()` (it returns when the round is done), timed and counted.
    fn row(
        &self,
        g: &mut BenchmarkGroup<'_, WallTime>,
        label: &str,
        n: usize,
        mut round: impl FnMut(&tokio::runtime::Runtime) -> Duration,
    ) {
        g.bench_with_input(BenchmarkId::new(label, n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let before = allocations();
                for _ in 0..iters {
                    total += round(self.rt);
                }
                let allocs = allocations() - before;
                self.table.record_allocs(label, n, total, iters, allocs);
                total
            })
        });
    }
}

/// N installations of a fresh mock: the mock, and their refresh tokens.
fn fresh_grants(rt: &tokio::runtime::Runtime, n: usize) -> (MockProvider, Arc<Mutex<Vec<String>>>) {
    rt.block_on(async {
        let mock = MockProvider::builder().start().await.unwrap();
        let tokens = grants(&mock, n, SystemClock.now()).await;
        let secrets = tokens
            .iter()
            .map(|t| t.refresh_token.as_ref().unwrap().secret().to_owned())
            .collect();
        (mock, Arc::new(Mutex::new(secrets)))
    })
}

/// One timed round over rotating credentials: `round` refreshes all of `current` (what the
/// last round left) and returns their successors, which replace them; the time of `round`.
fn rotate<T: Clone, F: std::future::Future<Output = Vec<T>>>(
    rt: &tokio::runtime::Runtime,
    current: &Mutex<Vec<T>>,
    round: impl FnOnce(Arc<Vec<T>>) -> F,
) -> Duration {
    let these = Arc::new(current.lock().unwrap().clone());
    let started = Instant::now();
    let next = rt.block_on(round(these));
    let took = started.elapsed();
    *current.lock().unwrap() = next;
    took
}

/// The raw POST floor: `n` refresh POSTs, 64 in flight.
fn raw_posts(rows: &Rows<'_>, g: &mut BenchmarkGroup<'_, WallTime>, n: usize) {
    let (mock, current) = fresh_grants(rows.rt, n);
    let http = reqwest::Client::new();
    rows.row(g, "raw_reqwest_post", n, |rt| {
        let (http, url) = (http.clone(), mock.token_url());
        rotate(rt, &current, |these| {
            fan_out(n, IN_FLIGHT, move |i| {
                let (http, url, these) = (http.clone(), url.clone(), these.clone());
                async move { raw_refresh(&http, &url, &these[i]).await }
            })
        })
    });
}

/// The OAuth client alone (no store, no manager), to separate HTTP costs from the rest.
fn client_only(rows: &Rows<'_>, g: &mut BenchmarkGroup<'_, WallTime>, n: usize) {
    let (mock, tokens) = rows.rt.block_on(async {
        let mock = MockProvider::builder().start().await.unwrap();
        let tokens = grants(&mock, n, SystemClock.now()).await;
        (mock, tokens)
    });
    let client =
        tokenkeeper::oauth::OAuthClient::new(consumer(&mock), Arc::new(SystemClock)).unwrap();
    let sets = Arc::new(Mutex::new(tokens));
    let ids = Arc::new(ids(n));
    rows.row(g, "oauth_client_only", n, |rt| {
        let (client, ids) = (client.clone(), ids.clone());
        rotate(rt, &sets, |these| {
            fan_out(n, IN_FLIGHT, move |i| {
                let (client, these, ids) = (client.clone(), these.clone(), ids.clone());
                async move { client.refresh(&ids[i], &these[i]).await.unwrap() }
            })
        })
    });
}

/// The store's raw composite floor, if it has one (memory's floor is the raw POST).
fn composite(rows: &Rows<'_>, g: &mut BenchmarkGroup<'_, WallTime>, backend: &Backend, n: usize) {
    let tag = tokenkeeper_testkit::dirs::unique_suffix();
    let store = match backend {
        Backend::Sqlite {
            path, synchronous, ..
        } => {
            let mode = format!("{synchronous:?}").to_uppercase();
            Composite::sqlite(&path.with_extension("composite.db"), &mode, n)
        }
        Backend::Redis { url, .. } => {
            rows.rt
                .block_on(Composite::redis(url, &format!("composite-{tag}"), n))
        }
        Backend::Postgres { url, .. } => {
            let schema = tokenkeeper_testkit::postgres::unique_schema("composite");
            rows.rt.block_on(Composite::postgres(url, &schema, n, 8))
        }
        _ => return,
    };
    let (mock, current) = fresh_grants(rows.rt, n);
    let (http, url) = (reqwest::Client::new(), mock.token_url());
    rows.row(g, &format!("{}_composite", label(backend)), n, |rt| {
        rotate(rt, &current, |these| {
            store.refresh_all(&http, &url, these, IN_FLIGHT)
        })
    });
}

/// The manager's rows on one store: the default bound with 1 and 10 callers, and the bound
/// lifted.
fn managed(rows: &Rows<'_>, g: &mut BenchmarkGroup<'_, WallTime>, backend: &Backend, n: usize) {
    let fleet = rows
        .rt
        .block_on(async { Fleet::new(backend.open().await, n).await });
    let unbounded = fleet.unbounded();
    let backend_label = label(backend);
    let fsync_bound = matches!(
        backend,
        Backend::Sqlite {
            synchronous: Synchronous::Full,
            ..
        }
    );
    // One figure of the fsync-bound store with many callers is enough.
    let callers: &[usize] = if fsync_bound { &[1] } else { &[1, 10] };
    let round = |manager: &TokenManager, callers: usize, rt: &tokio::runtime::Runtime| {
        fleet.expire_all();
        let before = fleet.refreshes();
        let started = Instant::now();
        rt.block_on(refresh_all_with(manager, &fleet, callers));
        let took = started.elapsed();
        let refreshed = fleet.refreshes() - before;
        assert_eq!(refreshed, n as u64, "exactly one refresh per installation");
        took
    };
    for &c in callers {
        let label = format!("{backend_label}_{c}_callers");
        rows.row(g, &label, n, |rt| round(&fleet.manager, c, rt));
    }
    let label = format!("{backend_label}_64_in_flight");
    rows.row(g, &label, n, |rt| round(&unbounded, 1, rt));
    assert_eq!(fleet.mock.counters().totals.reuse_detections, 0);
}

fn concurrent_refresh(c: &mut Criterion) {
    let rt = runtime();
    let sizes: &[usize] = if quick_mode() {
        &[100]
    } else {
        &[100, 1_000, 10_000]
    };
    let table = RatioTable::default();
    let rows = Rows {
        rt: &rt,
        table: &table,
    };
    let mut g = c.benchmark_group("concurrent_refresh");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));
    for &n in sizes {
        g.throughput(Throughput::Elements(n as u64));
        raw_posts(&rows, &mut g, n);
        client_only(&rows, &mut g, n);
        for backend in [
            Backend::Memory,
            fresh_sqlite(Synchronous::Normal),
            fresh_sqlite(Synchronous::Full),
            fresh_redis(),
            fresh_postgres(),
        ] {
            composite(&rows, &mut g, &backend, n);
            managed(&rows, &mut g, &backend, n);
        }
    }
    g.finish();
    table.print_with_floors("raw_reqwest_post", |label| {
        let store = ["sqlite_normal", "sqlite_full", "redis", "postgres"]
            .into_iter()
            .find(|s| label.starts_with(&format!("{s}_")))?;
        (!label.ends_with("_composite")).then(|| format!("{store}_composite"))
    });
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
