//! A cache hit allocates nothing (the metrics module promises it, issue 27 asks for it): the
//! allocations of 1,000 `access_token` hits, counted by this test binary's global allocator,
//! are none without a metrics recorder, and with a Prometheus recorder exactly what the
//! recorder spends on 1,000 increments of one series. One test per binary run (nextest
//! gives it a process of its own), so no other test's allocations are counted.

mod common;

use std::alloc::System;

use common::*;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokenkeeper::profiles;
use tokenkeeper_mock_provider::MockProfile;

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations made by 1,000 hits on warm installations (on this thread only: the runtime is
/// current-thread and nothing else runs).
async fn allocations_per_1000_hits(fx: &Fixture, ids: &[tokenkeeper::InstallationId]) -> usize {
    for id in ids {
        fx.manager.access_token(id).await.unwrap(); // warm
    }
    let region = Region::new(ALLOC);
    let mut total = 0;
    for k in 0..1000 {
        total += fx
            .manager
            .access_token(&ids[k % ids.len()])
            .await
            .unwrap()
            .secret()
            .len();
    }
    let stats = region.change();
    assert!(total > 0);
    stats.allocations + stats.reallocations
}

#[tokio::test(flavor = "current_thread")]
async fn a_cache_hit_allocates_nothing_with_or_without_a_recorder() {
    let fx = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(fx.install().await);
    }
    assert_eq!(
        allocations_per_1000_hits(&fx, &ids).await,
        0,
        "allocations in 1,000 cache hits, no recorder"
    );
    // With a recorder, each increment costs what that recorder's lookup of the series costs
    // (the Prometheus recorder's own allocations): a hit adds nothing to it.
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    fx.manager.access_token(&ids[0]).await.unwrap();
    let key = metrics::Key::from_parts(
        "tokenkeeper_cache_hits_total",
        vec![metrics::Label::new("consumer", "x")],
    );
    let meta = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
    metrics::with_recorder(|r| r.register_counter(&key, &meta)).increment(1);
    let region = Region::new(ALLOC);
    for _ in 0..1000 {
        metrics::with_recorder(|r| r.register_counter(&key, &meta)).increment(1);
    }
    let recorders_own = region.change().allocations;
    assert_eq!(
        allocations_per_1000_hits(&fx, &ids).await,
        recorders_own,
        "allocations in 1,000 cache hits with a Prometheus recorder, beside 1,000 increments of one series"
    );
}
