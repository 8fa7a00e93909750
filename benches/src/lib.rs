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

pub mod fleet;

/// Mean times of the runs of one bench, printed at its end as a table of throughput ratios
/// against a baseline measured in the same run.
#[derive(Debug, Default)]
pub struct RatioTable {
    rows: std::sync::Mutex<std::collections::BTreeMap<(String, usize), (std::time::Duration, u64)>>,
}

impl RatioTable {
    /// Adds `iters` runs of `label` at size `n` that took `total`.
    pub fn record(&self, label: &str, n: usize, total: std::time::Duration, iters: u64) {
        let mut rows = self.rows.lock().expect("table lock");
        let row = rows.entry((label.to_owned(), n)).or_default();
        row.0 += total;
        row.1 += iters;
    }

    /// Prints `| figure | N | mean | throughput vs baseline |` for every row.
    pub fn print(&self, baseline: &str) {
        let rows = self.rows.lock().expect("table lock");
        let mean = |d: std::time::Duration, n: u64| d.as_secs_f64() / n.max(1) as f64;
        println!("\n| figure | N | mean time | throughput vs {baseline} |\n|---|---|---|---|");
        for ((label, n), (total, iters)) in rows.iter() {
            let ours = mean(*total, *iters);
            let ratio = rows
                .get(&(baseline.to_owned(), *n))
                .map(|(t, i)| format!("{:.2}", mean(*t, *i) / ours))
                .unwrap_or_else(|| "-".into());
            println!("| {label} | {n} | {:.2} ms | {ratio} |", ours * 1000.0);
        }
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
