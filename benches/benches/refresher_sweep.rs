//! The background refresher bringing 10,000 due installations current (64 concurrent, no rate
//! limit) beside 10,000 raw refresh POSTs at the same concurrency. Exactly one refresh per
//! installation per round.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokenkeeper::RefresherConfig;
use tokenkeeper_benches::fleet::*;
use tokenkeeper_benches::quick_mode;

fn refresher_sweep(c: &mut Criterion) {
    let rt = runtime();
    let n = if quick_mode() { 500 } else { 10_000 };
    let fleet = rt.block_on(async { Fleet::new(store_for("memory").await, n).await });
    let mut g = c.benchmark_group("refresher_sweep");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::new("refresher_64_concurrent", n), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fleet.expire_all();
                let before = fleet.refreshes();
                let started = Instant::now();
                rt.block_on(async {
                    let handle = fleet.manager.spawn_refresher_with(RefresherConfig {
                        concurrency: IN_FLIGHT,
                        rate_per_second: None,
                        page_size: 1000,
                        max_idle: Duration::from_millis(5),
                    });
                    while fleet.refreshes() - before < n as u64 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    handle.shutdown().await;
                });
                total += started.elapsed();
                assert_eq!(
                    fleet.refreshes() - before,
                    n as u64,
                    "exactly one refresh per installation"
                );
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, refresher_sweep);
criterion_main!(benches);
