//! 1,000 concurrent callers (futures of one task) on one expired installation, and a single
//! caller, beside one raw refresh POST. Exactly one refresh per round.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokenkeeper::{core::Clock, core::SystemClock};
use tokenkeeper_benches::fleet::*;
use tokenkeeper_benches::{grants, raw_refresh};
use tokenkeeper_mock_provider::MockProvider;

fn single_flight(c: &mut Criterion) {
    let rt = runtime();
    let fleet = rt.block_on(async { Fleet::new(Backend::Memory.open().await, 1).await });
    let raw_mock = rt.block_on(async { MockProvider::builder().start().await.unwrap() });
    let raw_token = rt.block_on(grants(&raw_mock, 1, SystemClock.now()));
    let raw_current = Mutex::new(
        raw_token[0]
            .refresh_token
            .as_ref()
            .unwrap()
            .secret()
            .to_owned(),
    );
    let http = reqwest::Client::new();
    let mut g = c.benchmark_group("single_flight");
    g.bench_function("1000_callers_one_expired_installation", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fleet.expire_all();
                let before = fleet.refreshes();
                let started = Instant::now();
                rt.block_on(async {
                    // 1,000 concurrent callers as futures of one task (a request fan-out).
                    let id = &fleet.ids[0];
                    let calls = (0..1000).map(|_| fleet.manager.access_token(id));
                    for r in futures_util::future::join_all(calls).await {
                        r.unwrap();
                    }
                });
                total += started.elapsed();
                assert_eq!(fleet.refreshes() - before, 1, "exactly one refresh");
            }
            total
        })
    });
    // The same refresh with a single caller: separates the refresh path from the cost of
    // the 999 callers waiting on it.
    g.bench_function("1_caller_one_expired_installation", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fleet.expire_all();
                let before = fleet.refreshes();
                let started = Instant::now();
                rt.block_on(fleet.manager.access_token(&fleet.ids[0]))
                    .unwrap();
                total += started.elapsed();
                assert_eq!(fleet.refreshes() - before, 1, "exactly one refresh");
            }
            total
        })
    });
    g.bench_function("raw_reqwest_post_one_refresh", |b| {
        b.iter(|| {
            let token = raw_current.lock().unwrap().clone();
            let next = rt.block_on(raw_refresh(&http, &raw_mock.token_url(), &token));
            *raw_current.lock().unwrap() = next;
        })
    });
    g.finish();
}

criterion_group!(benches, single_flight);
criterion_main!(benches);
