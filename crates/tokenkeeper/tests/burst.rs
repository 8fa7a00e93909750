//! A burst of due installations on one process is spread over the fleet (issue 25, "one crash
//! can cost many installations"): on a rotating provider without a reuse leeway a process holds
//! at most `max_rotations_in_flight` refresh leases at once, and the flights over the bound
//! wait without a lease, so its peers take the next installations instead of waiting behind
//! it. One crash then costs at most that bound.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokenkeeper::core::{ListFilter, StateKind, TokenStore};
use tokenkeeper::refresher::RefresherConfig;
use tokenkeeper::{InstallationId, profiles};
use tokenkeeper_mock_provider::{Endpoint, Fault, FaultRule, MockProfile};

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);

/// The most refresh leases each process (a lease holder's tag, before its `:`) held at once,
/// sampled every few milliseconds until `done`.
async fn sample_leases(
    store: Arc<dyn TokenStore>,
    done: tokio::sync::watch::Receiver<bool>,
) -> HashMap<String, usize> {
    let mut most: HashMap<String, usize> = HashMap::new();
    while !*done.borrow() {
        let page = store
            .list(ListFilter::in_state(StateKind::Refreshing), None, 1000)
            .await
            .unwrap();
        let mut now: HashMap<String, usize> = HashMap::new();
        for entry in page.entries {
            let Ok(Some(record)) = store.get(&entry.id).await else {
                continue;
            };
            if let Some(lease) = record.state().lease() {
                let holder = lease.holder.to_string();
                let tag = holder.split(':').next().unwrap_or_default().to_owned();
                *now.entry(tag).or_default() += 1;
            }
        }
        for (tag, n) in now {
            let m = most.entry(tag).or_default();
            *m = (*m).max(n);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_on_one_process_is_shared_with_its_peers() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let mut ids: Vec<InstallationId> = Vec::new();
    for _ in 0..40 {
        ids.push(f.install().await);
    }
    f.advance(TWO_HOURS);
    f.mock.set_faults(vec![FaultRule::probability(
        Endpoint::Token,
        1.0,
        Fault::SlowReply { ms: 300 },
    )]);
    let bound = f.manager.policy().max_rotations_in_flight.unwrap();
    let (done, watching) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample_leases(f.store.clone(), watching));
    // Every installation's callers arrive at one process at once.
    let burst: Vec<_> = ids
        .iter()
        .map(|id| {
            let (m, id) = (f.manager.clone(), id.clone());
            tokio::spawn(async move { m.access_token(&id).await })
        })
        .collect();
    // A peer's refresher sweeps the same due index meanwhile.
    let peer = f.peer(profiles::bitbucket());
    let refresher = peer.spawn_refresher_with(RefresherConfig {
        rate_per_second: None,
        max_idle: Duration::from_millis(50),
        state_count_every: None,
        ..RefresherConfig::default()
    });
    for call in burst {
        call.await.unwrap().expect("every caller gets a token");
    }
    let peer_counts = refresher.shutdown().await;
    done.send(true).unwrap();
    let most = sampler.await.unwrap();
    let c = f.mock.counters().totals;
    assert_eq!((c.rotations, c.reuse_detections), (40, 0), "{c:?}");
    assert!(
        most.values().all(|n| *n <= bound),
        "a process held more than {bound} leases at once: {most:?}"
    );
    let holders: HashSet<_> = most.keys().collect();
    assert!(
        holders.len() >= 2 && peer_counts.succeeded > 0,
        "the peer took none of the burst: {most:?}, {peer_counts:?}"
    );
    println!(
        "a burst of 40 due installations on one process: at most {:?} leases per process at once; the peer refreshed {}",
        most.values().max(),
        peer_counts.succeeded
    );
}

/// A flight that waited for its place among the rotating refreshes decides again on the read
/// it made before waiting (issue 27: one store read per refresh): the lease's compare-and-swap
/// catches anything a peer wrote meanwhile. Ten installations due at once with one place: ten
/// reads, not one plus two per waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_that_waited_for_its_place_does_not_read_again() {
    let (store, reads) =
        tokenkeeper_testkit::wrappers::ReadStore::reading(tokenkeeper_memory::MemoryStore::new());
    let f = Fixture::tuned(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
        |p| p.max_rotations_in_flight = Some(1),
    )
    .await;
    let mut ids: Vec<InstallationId> = Vec::new();
    for _ in 0..10 {
        ids.push(f.install().await);
    }
    f.advance(TWO_HOURS);
    let before = reads.reads();
    let refreshes = f.mock.counters().totals.refreshes;
    let mut calls = tokio::task::JoinSet::new();
    for id in ids {
        let manager = f.manager.clone();
        calls.spawn(async move { manager.access_token(&id).await });
    }
    while let Some(call) = calls.join_next().await {
        call.unwrap().unwrap();
    }
    assert_eq!(f.mock.counters().totals.refreshes - refreshes, 10);
    assert_eq!(reads.reads() - before, 10, "store reads for ten refreshes");
}

/// Review of the change above: a decision that writes nothing (serve the still-valid token,
/// fail) is never made on the read from before the wait. Three installations due at once with
/// one place: B's refresh is slow and holds the place, A's is refused `invalid_client` (the
/// consumer breaker opens), X waits behind both; meanwhile a peer revokes X. X's caller is told
/// `Revoked`, not served X's old access token from the read before the revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_that_waited_serves_nothing_from_its_first_read() {
    let f = Fixture::tuned_in_memory(profiles::bitbucket(), MockProfile::Bitbucket, |p| {
        p.max_rotations_in_flight = Some(1)
    })
    .await;
    let (b, a, x) = (f.install().await, f.install().await, f.install().await);
    // Stale in the cache, still valid at the provider for two more seconds.
    f.advance(TWO_HOURS - Duration::from_secs(2));
    f.mock.set_faults(vec![
        FaultRule::next(
            Endpoint::Token,
            1,
            Fault::Latency {
                min_ms: 600,
                max_ms: 600,
            },
        ),
        FaultRule::next(
            Endpoint::Token,
            1,
            Fault::ErrorReply {
                status: 401,
                error: "invalid_client".into(),
                description: "the client secret was rotated".into(),
            },
        ),
    ]);
    let call = |id: InstallationId| {
        let manager = f.manager.clone();
        tokio::spawn(async move { manager.access_token(&id).await })
    };
    let on_b = call(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let on_a = call(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let on_x = call(x.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.peer(profiles::bitbucket()).revoke(&x).await.unwrap();
    assert!(on_b.await.unwrap().is_ok());
    // A's refresh was refused; its still-valid token is served while the breaker is open.
    assert!(on_a.await.unwrap().is_ok());
    match on_x.await.unwrap() {
        Err(tokenkeeper::Error::Revoked { .. }) => {}
        other => panic!("X, revoked while its flight waited, answered {other:?}"),
    }
}
