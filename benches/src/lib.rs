//! Shared helpers for the benchmarks: bounded-concurrency fan-out and grant setup against the
//! mock provider. Benchmarks live in `benches/`; this library keeps them short.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokenkeeper_mock_provider::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProvider};

/// Runs `job(i)` for every `i` in `0..n` with at most `in_flight` running at once, and returns
/// the results in index order.
pub async fn fan_out<T, F, Fut>(n: usize, in_flight: usize, job: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let next = next.clone();
        let job = job.clone();
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                out.push((i, job(i).await));
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(part) = workers.join_next().await {
        all.extend(part.expect("benchmark worker panicked"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

/// One refresh POST to the mock with HTTP Basic client authentication; returns the new refresh
/// token (or the old one on non-rotating profiles). Panics on anything but success: a bench
/// that silently measures errors measures nothing.
pub async fn raw_refresh(client: &reqwest::Client, token_url: &str, refresh_token: &str) -> String {
    let reply = client
        .post(token_url)
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ])
        .send()
        .await
        .expect("refresh POST");
    assert!(
        reply.status().is_success(),
        "refresh failed: {}",
        reply.status()
    );
    let body: serde_json::Value = reply.json().await.expect("refresh body");
    body["refresh_token"]
        .as_str()
        .unwrap_or(refresh_token)
        .to_owned()
}

/// Creates `n` independent grants at the mock (authorize without HTTP, exchange over HTTP,
/// 64 in flight) and returns their tokens as obtained at `now`.
pub async fn grants(
    mock: &MockProvider,
    n: usize,
    now: tokenkeeper::core::Timestamp,
) -> Vec<tokenkeeper::core::TokenSet> {
    let http = reqwest::Client::new();
    let codes: Arc<Vec<String>> = Arc::new(
        (0..n)
            .map(|_| {
                mock.authorize_code(DEFAULT_CLIENT_ID, None, None)
                    .expect("authorize")
            })
            .collect(),
    );
    let url = mock.token_url();
    let lifetime = mock.rules().access_ttl;
    fan_out(n, 64, move |i| {
        let (http, url, codes) = (http.clone(), url.clone(), codes.clone());
        async move {
            let body: serde_json::Value = http
                .post(&url)
                .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", codes[i].as_str()),
                ])
                .send()
                .await
                .expect("code exchange")
                .json()
                .await
                .expect("exchange body");
            tokenkeeper::core::TokenSet::bearer(
                tokenkeeper::AccessToken::new(body["access_token"].as_str().expect("access token")),
                Some(tokenkeeper::core::RefreshToken::new(
                    body["refresh_token"].as_str().expect("refresh token"),
                )),
                now,
                now.saturating_add(lifetime),
            )
        }
    })
    .await
}

/// True when criterion runs each benchmark once (`cargo bench -- --test`), so setup can
/// shrink to keep the test suite fast.
pub fn quick_mode() -> bool {
    std::env::args().any(|a| a == "--test")
}

/// A persistent directory for benchmark data under the target dir.
pub fn data_dir() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data");
    std::fs::create_dir_all(&dir).expect("bench data dir");
    dir
}

/// A redis-server for the benchmarks: `TOKENKEEPER_REDIS_URL` when set, otherwise one started
/// on a free loopback port that dies with this process.
pub fn redis_url() -> String {
    tokenkeeper_testkit::redis::server_url()
}

/// The PostgreSQL server the benchmarks use (`TOKENKEEPER_POSTGRES_URL`, or one started here).
pub fn postgres_url() -> String {
    tokenkeeper_testkit::postgres::server_url()
}

pub mod composite;
pub mod fleet;

/// The global allocator of a bench that counts allocations (`stats_alloc`'s instrumented
/// system allocator): a bench installs it with
/// `#[global_allocator] static A: &CountingAlloc = &COUNTING;` and reads [`allocations`]. The
/// count is process-wide (the mock provider runs in the bench's process too), so a figure is
/// read beside its raw primitive's, counted the same way.
pub type CountingAlloc = stats_alloc::StatsAlloc<std::alloc::System>;

/// The instance to install.
pub static COUNTING: CountingAlloc = stats_alloc::StatsAlloc::system();

/// Allocations (and reallocations) so far in this process, if [`COUNTING`] is the global
/// allocator (0 otherwise).
pub fn allocations() -> u64 {
    let s = COUNTING.stats();
    (s.allocations + s.reallocations) as u64
}

/// One row of a [`RatioTable`]: time and allocations over all recorded runs.
#[derive(Debug, Default, Clone, Copy)]
struct Row {
    total: std::time::Duration,
    iters: u64,
    allocations: u64,
}

/// Mean times of the runs of one bench, printed at its end as a table of throughput ratios
/// against a baseline measured in the same run and, where a row names one, against its own
/// floor (the raw composite of its store), with allocations per element.
#[derive(Debug, Default)]
pub struct RatioTable {
    rows: std::sync::Mutex<std::collections::BTreeMap<(String, usize), Row>>,
}

impl RatioTable {
    /// Adds `iters` runs of `label` at size `n` that took `total`.
    pub fn record(&self, label: &str, n: usize, total: std::time::Duration, iters: u64) {
        self.record_allocs(label, n, total, iters, 0);
    }

    /// [`record`](Self::record), with the allocations the runs made.
    pub fn record_allocs(
        &self,
        label: &str,
        n: usize,
        total: std::time::Duration,
        iters: u64,
        allocations: u64,
    ) {
        let mut rows = self.rows.lock().expect("table lock");
        let row = rows.entry((label.to_owned(), n)).or_default();
        row.total += total;
        row.iters += iters;
        row.allocations += allocations;
    }

    /// Prints `| figure | N | mean | throughput vs baseline | vs floor | allocations |` for
    /// every row; `floor_of(label)` names the row a row is also compared with, if any.
    pub fn print_with_floors(&self, baseline: &str, floor_of: impl Fn(&str) -> Option<String>) {
        let rows = self.rows.lock().expect("table lock");
        let mean = |r: &Row| r.total.as_secs_f64() / r.iters.max(1) as f64;
        let ratio = |of: &Row, to: Option<&Row>| {
            to.map(|t| format!("{:.2}", mean(t) / mean(of)))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "\n| figure | N | mean time | throughput vs {baseline} | throughput vs its floor | allocations per element |\n|---|---|---|---|---|---|"
        );
        for ((label, n), row) in rows.iter() {
            let base = rows.get(&(baseline.to_owned(), *n));
            let floor = floor_of(label).and_then(|f| rows.get(&(f, *n)));
            let allocs = match row.allocations {
                0 => "-".to_owned(),
                a => format!("{:.0}", a as f64 / (row.iters.max(1) as f64 * *n as f64)),
            };
            println!(
                "| {label} | {n} | {:.2} ms | {} | {} | {allocs} |",
                mean(row) * 1000.0,
                ratio(row, base),
                ratio(row, floor),
            );
        }
    }

    /// Prints `| figure | N | mean time | throughput vs baseline |` for every row.
    pub fn print(&self, baseline: &str) {
        self.print_with_floors(baseline, |_| None);
    }
}

/// The next version of a record for write benchmarks: a lapsed-lease takeover, the cheapest
/// valid transition.
pub fn bump(r: &tokenkeeper_core::Record) -> tokenkeeper_core::Record {
    use tokenkeeper_core::Clock as _;
    let now = tokenkeeper_core::SystemClock.now();
    r.apply(
        tokenkeeper_core::Event::LeaseAcquired {
            holder: tokenkeeper_core::LeaseHolder::new("bench"),
            until: now,
        },
        now,
    )
    .expect("a lapsed lease can always be retaken")
}

/// Times `store.compare_and_swap` alone, `iters` times on `id`: the read and the next record
/// are made outside the clock. Panics unless every swap lands.
pub fn time_cas(
    rt: &tokio::runtime::Runtime,
    store: &dyn tokenkeeper_core::TokenStore,
    id: &tokenkeeper_core::InstallationId,
    iters: u64,
) -> std::time::Duration {
    let mut total = std::time::Duration::ZERO;
    for _ in 0..iters {
        let current = rt.block_on(store.get(id)).unwrap().unwrap();
        let next = bump(&current);
        let started = std::time::Instant::now();
        let out = rt
            .block_on(store.compare_and_swap(&next, current.version()))
            .unwrap();
        total += started.elapsed();
        assert_eq!(out, tokenkeeper_core::CasOutcome::Swapped);
    }
    total
}

/// The bytes a Redis server sent while `op` ran (its `total_net_output_bytes`, less what the
/// `INFO` calls around it cost), and `op`'s result: what a read moves over the wire.
pub async fn redis_bytes_of<T>(
    raw: &mut redis::aio::MultiplexedConnection,
    op: impl Future<Output = T>,
) -> (u64, T) {
    async fn sent(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(raw)
            .await
            .expect("INFO stats");
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats names total_net_output_bytes")
    }
    let a = sent(raw).await;
    let b = sent(raw).await;
    let result = op.await;
    let c = sent(raw).await;
    ((c - b).saturating_sub(b - a), result)
}
