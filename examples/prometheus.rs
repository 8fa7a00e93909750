//! prometheus: tokenkeeper's metrics (the table in the README, "Metrics") served at
//! `/metrics` by `metrics-exporter-prometheus`, for a live demo fleet: a mock Bitbucket
//! (rotating refresh tokens) whose access tokens live 60 s (the shortest lifetime tokenkeeper
//! believes), 200 installations in SQLite, the background refresher, callers asking for
//! tokens, then some revoked grants and a burst of provider 503s. The provider's and the
//! fleet's clocks run 8 times faster than real time, so a token is refreshed every ~6 s.
//!
//! ```text
//! cargo run --example prometheus                  # until Ctrl-C; scrape the printed URL
//! cargo run --example prometheus -- --self-test   # 20 s run, scraped and checked
//! cargo run --example prometheus -- --self-test --csv docs/metrics-run.csv
//! ```
//!
//! The self-test scrapes `/metrics` over HTTP twice a second while the fleet runs and checks
//! the scraped counters against what the mock provider counted (successful refreshes, refused
//! ones) and what the callers counted (cache hits + misses), and that the installations gauge
//! adds up to the fleet. `--csv` keeps the scraped series; `docs/plot_metrics.py` draws
//! `docs/metrics-run.png` from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokenkeeper::stores::SqliteStore;
use tokenkeeper::{
    InstallationId, TokenManager, core::Clock, core::ManualClock, core::SystemClock,
    core::TokenStore, refresher::RefresherConfig,
};
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile, MockProvider};

#[path = "support.rs"]
mod support;

use support::Fallible;

const INSTALLATIONS: usize = 200;
const STATES: [&str; 5] = [
    "active",
    "refreshing",
    "backoff",
    "reauthorization_required",
    "revoked",
];

/// Serves the recorder's text at `/metrics` on a free loopback port.
async fn serve(handle: PrometheusHandle) -> Fallible<String> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep();
                handle.render()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/metrics", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// Sums the samples of `name` whose labels include every `(key, value)` of `with`.
fn sum(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && with
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        // A fold from +0.0: `sum` of nothing is -0.0.
        .fold(0.0, |a, b| a + b)
}

/// How far the fleet's clock moves every [`TICK`].
const STEP: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(250);

/// The demo fleet: provider, store, manager, refresher, callers.
struct Fleet {
    mock: Arc<MockProvider>,
    clock: ManualClock,
    manager: TokenManager,
    ids: Vec<InstallationId>,
    calls: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Fleet {
    async fn start(dir: &Path) -> Fallible<Self> {
        let mock = MockProvider::builder()
            .profile(MockProfile::Bitbucket)
            .access_ttl(Duration::from_secs(60))
            .start()
            .await?;
        let consumer = support::mock_consumer(&mock)?;
        let store = SqliteStore::builder(dir.join("tokens.db"))
            .synchronous(tokenkeeper::stores::Synchronous::Normal)
            .open()
            .await?;
        let clock = ManualClock::new(SystemClock.now());
        let manager = TokenManager::builder(consumer, store)
            .clock(clock.clone())
            .tune(|p| {
                p.backoff_base = Duration::from_millis(500);
                p.backoff_max = Duration::from_secs(2);
                // The fleet keeps going through the 503 burst and the revocations.
                p.mass_rejection = None;
            })
            .build()?;
        let mut ids = Vec::with_capacity(INSTALLATIONS);
        for _ in 0..INSTALLATIONS {
            ids.push(support::install(&manager, &mock).await?);
        }
        Ok(Self {
            mock: Arc::new(mock),
            clock,
            manager,
            ids,
            calls: Arc::default(),
            stop: Arc::default(),
        })
    }

    /// Moves the provider's and the fleet's clocks together, [`STEP`] every [`TICK`].
    fn spawn_time(&self) {
        let (mock, clock, stop) = (self.mock.clone(), self.clock.clone(), self.stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(TICK).await;
                mock.advance(STEP);
                clock.advance(STEP);
            }
        });
    }

    /// Four callers asking for random installations' tokens, as an application's requests.
    fn spawn_callers(&self) -> tokio::task::JoinSet<()> {
        let mut callers = tokio::task::JoinSet::new();
        for n in 0..4u64 {
            let (manager, ids) = (self.manager.clone(), self.ids.clone());
            let (calls, stop) = (self.calls.clone(), self.stop.clone());
            callers.spawn(async move {
                let mut seed = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                while !stop.load(Ordering::Relaxed) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let id = &ids[(seed % ids.len() as u64) as usize];
                    let _ = manager.access_token(id).await;
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
            });
        }
        callers
    }

    /// The provider revokes `n` grants (their next refresh is refused).
    async fn revoke_grants(&self, n: usize) -> Fallible<()> {
        for id in self.ids.iter().take(n) {
            let record = self.manager.store().get(id).await?.ok_or("missing")?;
            self.mock
                .revoke_grant_of(record.tokens().access_token.secret())
                .ok_or("unknown grant")?;
        }
        Ok(())
    }
}

/// One scrape, reduced to the series the chart and the checks use.
#[derive(Debug, Clone, Default)]
struct Sample {
    at: f64,
    refreshed: f64,
    failed: f64,
    lag: f64,
    states: [f64; 5],
    hits: f64,
    misses: f64,
}

fn sample(text: &str, at: f64) -> Sample {
    let mut states = [0.0; 5];
    for (n, state) in STATES.iter().enumerate() {
        states[n] = sum(text, "tokenkeeper_installations", &[("state", state)]);
    }
    Sample {
        at,
        refreshed: sum(text, "tokenkeeper_refreshes_total", &[("outcome", "ok")]),
        failed: sum(
            text,
            "tokenkeeper_refreshes_total",
            &[("outcome", "failed")],
        ),
        lag: sum(text, "tokenkeeper_refresher_lag_seconds", &[]),
        states,
        hits: sum(text, "tokenkeeper_cache_hits_total", &[]),
        misses: sum(text, "tokenkeeper_cache_misses_total", &[]),
    }
}

fn write_csv(path: &Path, samples: &[Sample]) -> Fallible<()> {
    let mut out = String::from(
        "seconds,refreshes_ok,refreshes_failed,refresher_lag_seconds,active,refreshing,backoff,reauthorization_required,revoked,cache_hits,cache_misses\n",
    );
    for s in samples {
        out.push_str(&format!(
            "{:.2},{},{},{:.3},{},{},{},{},{},{},{}\n",
            s.at,
            s.refreshed,
            s.failed,
            s.lag,
            s.states[0],
            s.states[1],
            s.states[2],
            s.states[3],
            s.states[4],
            s.hits,
            s.misses
        ));
    }
    std::fs::write(path, out)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Fallible<()> {
    let args: Vec<String> = std::env::args().collect();
    let self_test = args.iter().any(|a| a == "--self-test");
    let csv: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--csv")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("tokenkeeper_refresh_duration_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )?
        .install_recorder()?;
    let url = serve(handle).await?;
    let dir = std::env::temp_dir().join(format!("tokenkeeper-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let outcome = run(&dir, &url, self_test, csv.as_deref()).await;
    std::fs::remove_dir_all(&dir)?;
    outcome
}

async fn run(dir: &Path, url: &str, self_test: bool, csv: Option<&Path>) -> Fallible<()> {
    let fleet = Fleet::start(dir).await?;
    fleet.mock.reset_counters();
    let refresher = fleet.manager.spawn_refresher_with(RefresherConfig {
        state_count_every: Some(Duration::from_millis(500)),
        max_idle: Duration::from_millis(250),
        ..RefresherConfig::default()
    });
    let mut callers = fleet.spawn_callers();
    fleet.spawn_time();
    println!("tokenkeeper metrics of a {INSTALLATIONS}-installation demo fleet at {url}");
    if !self_test {
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut samples = scrape_through_the_script(&fleet, &http, url, started).await?;
    fleet.stop.store(true, Ordering::Relaxed);
    while callers.join_next().await.is_some() {}
    refresher.shutdown().await;
    fleet.manager.shutdown().await;
    // One more sweep's worth of counting happened before the shutdown; read the final state.
    let text = http.get(url).send().await?.text().await?;
    let last = sample(&text, started.elapsed().as_secs_f64());
    samples.push(last.clone());
    if let Some(csv) = csv {
        write_csv(csv, &samples)?;
    }
    check(&fleet, &text, &last)?;
    report(&fleet, &text, &last, samples.len());
    Ok(())
}

/// Scrapes `url` every half second for 20 s while the script plays: grants revoked at 6 s,
/// a burst of 503s from the token endpoint from 11 s to 14 s.
async fn scrape_through_the_script(
    fleet: &Fleet,
    http: &reqwest::Client,
    url: &str,
    started: Instant,
) -> Fallible<Vec<Sample>> {
    let mut samples = Vec::new();
    let (mut revoked, mut faulty, mut healed) = (false, false, false);
    while started.elapsed() < Duration::from_secs(20) {
        let text = http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let at = started.elapsed().as_secs_f64();
        samples.push(sample(&text, at));
        if at > 6.0 && !revoked {
            revoked = true;
            fleet.revoke_grants(10).await?;
        }
        if at > 11.0 && !faulty {
            faulty = true;
            fleet.mock.set_faults(vec![FaultRule::probability(
                Endpoint::Token,
                0.4,
                Fault::ServerError {
                    status: 503,
                    html: true,
                },
            )]);
        }
        if at > 14.0 && !healed {
            healed = true;
            fleet.mock.set_faults(Vec::new());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(samples)
}

/// The self-test's one-line summary.
fn report(fleet: &Fleet, text: &str, last: &Sample, scrapes: usize) {
    let rate = last.refreshed / last.at;
    println!(
        "prometheus self-test: {} scrapes; {} refreshes ({rate:.1}/s) and {} refused match the mock provider; {} failed transiently during the 503 burst; {} cache hits + {} misses = {} calls; installations by state add up to {INSTALLATIONS}",
        scrapes,
        last.refreshed,
        sum(
            text,
            "tokenkeeper_refreshes_total",
            &[("class", "refresh_token_rejected")]
        ),
        sum(
            text,
            "tokenkeeper_refreshes_total",
            &[("class", "transient")]
        ),
        last.hits,
        last.misses,
        fleet.calls.load(Ordering::Relaxed),
    );
}

/// The scraped counters against the mock provider's and the callers' own counts.
fn check(fleet: &Fleet, text: &str, last: &Sample) -> Fallible<()> {
    let totals = fleet.mock.counters().totals;
    let mut wrong = Vec::new();
    if last.refreshed != totals.refreshes as f64 {
        wrong.push(format!(
            "refreshes ok {} vs the mock's {}",
            last.refreshed, totals.refreshes
        ));
    }
    let refused = sum(
        text,
        "tokenkeeper_refreshes_total",
        &[("class", "refresh_token_rejected")],
    );
    if refused != totals.rejected_refreshes as f64 {
        wrong.push(format!(
            "refused {refused} vs the mock's {}",
            totals.rejected_refreshes
        ));
    }
    let calls = fleet.calls.load(Ordering::Relaxed) as f64;
    if last.hits + last.misses != calls {
        wrong.push(format!(
            "cache hits {} + misses {} vs {calls} calls",
            last.hits, last.misses
        ));
    }
    if last.states.iter().sum::<f64>() != INSTALLATIONS as f64 {
        wrong.push(format!("installations by state {:?}", last.states));
    }
    let checks = [
        (totals.refreshes > 0, "no refresh happened"),
        (refused >= 10.0, "the revoked grants were not refused"),
        (
            sum(
                text,
                "tokenkeeper_backoffs_total",
                &[("cause", "transient")],
            ) > 0.0,
            "the 503 burst caused no backoff",
        ),
        (
            sum(text, "tokenkeeper_reauthorizations_required_total", &[]) >= 10.0,
            "the revoked grants were not condemned",
        ),
        (
            sum(text, "tokenkeeper_refresh_duration_seconds_count", &[]) > 0.0,
            "no refresh latency recorded",
        ),
    ];
    wrong.extend(
        checks
            .iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, what)| what.to_string()),
    );
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!("scraped metrics disagree: {}", wrong.join("; ")).into())
    }
}
