//! The background refresher bringing 10,000 due installations current (64 concurrent, no rate
//! limit) beside 10,000 raw refresh POSTs at the same concurrency. Exactly one refresh per
//! installation per round.
//!
//! `refresher_processes`: 1, 2 and 4 application processes (managers of one consumer, each
//! with its own store connection and its own refresher rate-limited to 100 refreshes/s) share
//! one SQLite file or one Redis; the time to bring 400 due installations current should fall
//! by about the number of processes (fleet throughput grows with processes), still with
//! exactly one refresh per installation. The primitive beside it is one process's limit:
//! 400 / 100 per second = 4 s.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokenkeeper::{refresher::RefresherConfig, refresher::RefresherHandle};
use tokenkeeper_benches::fleet::*;
use tokenkeeper_benches::quick_mode;

/// Times `iters` rounds: expire every installation, start the refreshers `start` returns,
/// wait until each installation was refreshed, stop them. Checks (untimed) that every round
/// refreshed each installation exactly once.
fn rounds(
    rt: &tokio::runtime::Runtime,
    fleet: &Fleet,
    iters: u64,
    start: impl Fn() -> Vec<RefresherHandle>,
) -> Duration {
    let n = fleet.ids.len() as u64;
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        fleet.expire_all();
        let before = fleet.refreshes();
        let started = Instant::now();
        rt.block_on(async {
            let handles = start();
            while fleet.refreshes() - before < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for h in handles {
                h.shutdown().await;
            }
        });
        total += started.elapsed();
        assert_eq!(
            fleet.refreshes() - before,
            n,
            "exactly one refresh per installation"
        );
    }
    total
}

fn refresher_sweep(c: &mut Criterion) {
    let rt = runtime();
    let n = if quick_mode() { 500 } else { 10_000 };
    let fleet = rt.block_on(async { Fleet::new(Backend::Memory.open().await, n).await });
    let mut g = c.benchmark_group("refresher_sweep");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("refresher_64_concurrent", n), |b| {
        b.iter_custom(|iters| {
            rounds(&rt, &fleet, iters, || {
                vec![fleet.manager.spawn_refresher_with(RefresherConfig {
                    concurrency: IN_FLIGHT,
                    rate_per_second: None,
                    page_size: 1000,
                    max_idle: Duration::from_millis(5),
                    // Measured as before the state count existed.
                    state_count_every: None,
                    ..RefresherConfig::default()
                })]
            })
        })
    });
    g.finish();
}

fn refresher_processes(c: &mut Criterion) {
    let rt = runtime();
    let n = if quick_mode() { 40 } else { 400 };
    let mut g = c.benchmark_group("refresher_processes");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    for backend in [fresh_sqlite(Synchronous::Full), fresh_redis()] {
        let fleet = rt.block_on(async { Fleet::new(backend.open().await, n).await });
        for processes in [1usize, 2, 4] {
            let members: Vec<_> = rt.block_on(async {
                let mut members = Vec::new();
                for _ in 0..processes {
                    members.push(fleet.member(backend.open().await));
                }
                members
            });
            let id = BenchmarkId::new(format!("{}_100_per_s_each", backend.name()), processes);
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    rounds(&rt, &fleet, iters, || {
                        members
                            .iter()
                            .map(|m| {
                                m.spawn_refresher_with(RefresherConfig {
                                    concurrency: 16,
                                    rate_per_second: Some(100),
                                    page_size: 100,
                                    max_idle: Duration::from_millis(20),
                                    state_count_every: None,
                                    ..RefresherConfig::default()
                                })
                            })
                            .collect()
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, refresher_sweep, refresher_processes);
criterion_main!(benches);
