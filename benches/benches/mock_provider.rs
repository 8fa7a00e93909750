//! The mock provider under load: 10,000 refreshes across 10,000 grants with 64 in flight,
//! beside the raw primitive it is built on (the same number of trivial HTTP round trips to the
//! same server). Outside the timed loop it checks that the mock counted exactly one refresh
//! per grant per round and rejected none.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenkeeper_benches::{fan_out, grants, raw_refresh};
use tokenkeeper_mock_provider::{MockProfile, MockProvider};

const GRANTS: usize = 10_000;
const IN_FLIGHT: usize = 64;

fn mock_provider(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .expect("client");
    let mock = rt.block_on(async {
        MockProvider::builder()
            .profile(MockProfile::Bitbucket)
            .start()
            .await
            .expect("mock")
    });
    let tokens = Arc::new(Mutex::new(
        rt.block_on(grants(&mock, GRANTS, tokenkeeper::core::Timestamp::EPOCH))
            .into_iter()
            .map(|t| t.refresh_token.expect("refresh token").secret().to_owned())
            .collect::<Vec<_>>(),
    ));
    let token_url = mock.token_url();
    let clock_url = format!("{}/clock", mock.admin_url());
    let admin_token = mock.admin_token();
    mock.reset_counters();
    let mut rounds = 0u64;

    let mut group = c.benchmark_group("mock_provider");
    group.throughput(Throughput::Elements(GRANTS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));

    group.bench_function("refresh_10k_grants_64_in_flight", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let current = Arc::new(tokens.lock().expect("tokens").clone());
                let (client, url) = (client.clone(), token_url.clone());
                let started = Instant::now();
                let next = rt.block_on(fan_out(GRANTS, IN_FLIGHT, move |i| {
                    let (client, url, current) = (client.clone(), url.clone(), current.clone());
                    async move { raw_refresh(&client, &url, &current[i]).await }
                }));
                total += started.elapsed();
                *tokens.lock().expect("tokens") = next;
                rounds += 1;
            }
            total
        });
    });

    group.bench_function("raw_http_roundtrip_10k_64_in_flight", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (client, url, token) = (client.clone(), clock_url.clone(), admin_token.clone());
                let started = Instant::now();
                rt.block_on(fan_out(GRANTS, IN_FLIGHT, move |_| {
                    let (client, url, token) = (client.clone(), url.clone(), token.clone());
                    async move {
                        let r = client
                            .get(&url)
                            .bearer_auth(&token)
                            .send()
                            .await
                            .expect("GET");
                        assert!(r.status().is_success());
                        r.bytes().await.expect("body").len()
                    }
                }));
                total += started.elapsed();
            }
            total
        });
    });
    group.finish();

    let counters = mock.counters();
    assert_eq!(
        counters.totals.refreshes,
        rounds * GRANTS as u64,
        "the mock must count exactly one refresh per grant per round"
    );
    assert!(
        counters.grants.values().all(|g| g.refreshes == rounds),
        "a grant was refreshed more or less than once per round"
    );
    assert_eq!(counters.totals.rejected_refreshes, 0);
    assert_eq!(counters.totals.reuse_detections, 0);
}

criterion_group!(benches, mock_provider);
criterion_main!(benches);
