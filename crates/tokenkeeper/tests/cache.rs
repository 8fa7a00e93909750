//! The access-token cache across processes: another process's revocation, re-authorization
//! or condemnation stops this process serving the old token within
//! `RefreshPolicy::cache_revalidate` even with the event watcher off (two managers on one SQLite file and on one Redis, each
//! with its own store handle), at one store read per installation per bound; no revoke/cache
//! race; a bounded cache the background refresher does not fill; and a 401 that forces at
//! most one refresh per `forced_refresh_min_interval`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Fixture, consumer_for};
use tokenkeeper::{
    Error, TokenManager, core::ManualClock, core::SystemClock, core::TokenStore, profiles,
};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_SECRET, Endpoint, Fault, FaultRule, MockProfile};
use tokenkeeper_testkit::wrappers::{ReadCounter, ReadStore};

const BOUND: Duration = Duration::from_secs(30);

/// A Bitbucket fixture on the store of `backend` (a fresh one).
async fn fixture_on(backend: &Backend) -> Fixture {
    let store = backend.open().await;
    // The event watcher off: these tests pin the `cache_revalidate` bound, the one that
    // holds when the event log cannot be read (`fleet_events.rs` tests the watcher).
    Fixture::tuned(profiles::bitbucket(), MockProfile::Bitbucket, store, |p| {
        p.event_poll = Duration::ZERO;
    })
    .await
}

/// A second process: its own store handle, the fixture's mock, consumer and clock.
fn other_process(f: &Fixture, store: Arc<dyn TokenStore>, clock: ManualClock) -> TokenManager {
    common::manager_builder(
        consumer_for(profiles::bitbucket(), &f.mock, DEFAULT_CLIENT_SECRET),
        store,
    )
    .clock(clock)
    .build()
    .unwrap()
}

/// Process A caches a token; process B revokes, re-authorizes or condemns the installation.
/// A serves its cached token until the bound (exactly: at +29.999 s) and never after it.
async fn another_process_is_seen_within_the_bound(backend: Backend) {
    let f = fixture_on(&backend).await;
    let b = other_process(&f, backend.open().await, f.clock.clone());
    let backend = backend.name();

    // Revocation.
    let id = f.install().await;
    let cached = f.manager.access_token(&id).await.unwrap();
    b.revoke(&id).await.unwrap();
    f.advance(BOUND - Duration::from_millis(1));
    assert_eq!(
        f.manager.access_token(&id).await.unwrap(),
        cached,
        "within the bound"
    );
    f.advance(Duration::from_millis(1));
    assert!(
        matches!(
            f.manager.access_token(&id).await,
            Err(Error::Revoked { .. })
        ),
        "{backend}: a revoked token served past the bound"
    );

    // Condemnation (the provider refused the grant in B's hands).
    let id = f.install().await;
    let cached = f.manager.access_token(&id).await.unwrap();
    f.mock.revoke_grant_of(cached.secret()).unwrap();
    // Old enough for a forced refresh (`forced_refresh_min_interval`).
    f.advance(Duration::from_secs(60));
    assert!(
        b.force_refresh(&id)
            .await
            .unwrap_err()
            .needs_reauthorization()
    );
    f.advance(BOUND);
    assert!(
        f.manager
            .access_token(&id)
            .await
            .unwrap_err()
            .needs_reauthorization(),
        "{backend}: a condemned token served past the bound"
    );

    // Re-authorization of the same installation by B (a new grant): A moves to it.
    let id = f.install().await;
    let old = f.manager.access_token(&id).await.unwrap();
    f.advance(Duration::from_secs(1));
    common::authorize_with(&b, &f.mock, Some(id.clone())).await;
    let new = b.access_token(&id).await.unwrap();
    assert_ne!(old, new);
    f.advance(BOUND);
    assert_eq!(
        f.manager.access_token(&id).await.unwrap(),
        new,
        "{backend}: the previous grant's token served past the bound"
    );
}

#[tokio::test]
async fn sqlite_another_process_is_seen_within_the_bound() {
    another_process_is_seen_within_the_bound(Backend::fresh_sqlite("cache")).await;
}

#[tokio::test]
async fn redis_another_process_is_seen_within_the_bound() {
    another_process_is_seen_within_the_bound(Backend::fresh_redis("cache")).await;
}

/// The same bound on real time: process B revokes while process A's callers keep asking
/// every 5 ms; A's last served token is at most one bound (here 400 ms) after the revocation.
async fn staleness_measured_on_real_time(backend: Backend) -> Duration {
    let f = fixture_on(&backend).await;
    let id = f.install().await;
    let bound = Duration::from_millis(400);
    let real = |store| {
        common::manager_builder(
            consumer_for(profiles::bitbucket(), &f.mock, DEFAULT_CLIENT_SECRET),
            store,
        )
        .clock(SystemClock)
        .tune(|p| p.cache_revalidate = bound)
        .build()
        .unwrap()
    };
    let (a, b) = (real(backend.open().await), real(backend.open().await));
    let backend = backend.name();
    a.access_token(&id).await.unwrap();
    b.revoke(&id).await.unwrap();
    let revoked = Instant::now();
    let mut last_served = revoked;
    loop {
        match a.access_token(&id).await {
            Ok(_) => last_served = Instant::now(),
            Err(Error::Revoked { .. }) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(
            revoked.elapsed() < bound * 10,
            "{backend}: never saw the revocation"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stale = last_served - revoked;
    assert!(
        stale <= bound,
        "{backend}: served {stale:?} after the revocation"
    );
    println!(
        "{backend}: revoked token last served {stale:?} after the revocation (bound {bound:?})"
    );
    stale
}

#[tokio::test]
async fn sqlite_staleness_measured_on_real_time() {
    staleness_measured_on_real_time(Backend::fresh_sqlite("cache")).await;
}

#[tokio::test]
async fn redis_staleness_measured_on_real_time() {
    staleness_measured_on_real_time(Backend::fresh_redis("cache")).await;
}

async fn counted() -> (Fixture, Arc<ReadCounter>) {
    let (store, reads) = ReadStore::reading(tokenkeeper_memory::MemoryStore::new());
    let f = Fixture::with_store(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        Arc::new(store),
    )
    .await;
    (f, reads)
}

/// The hot path reads nothing; once the bound has passed, a hundred concurrent callers of
/// one installation cause exactly one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_store_read_per_installation_per_bound() {
    let (f, store) = counted().await;
    let id = f.install().await;
    f.manager.access_token(&id).await.unwrap();
    let before = store.reads();
    for _ in 0..10_000 {
        f.manager.access_token(&id).await.unwrap();
    }
    assert_eq!(store.reads(), before, "hot path: no store I/O");
    f.advance(BOUND);
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (m, id) = (f.manager.clone(), id.clone());
        callers.spawn(async move { m.access_token(&id).await.unwrap() });
    }
    while let Some(r) = callers.join_next().await {
        r.unwrap();
    }
    assert_eq!(store.reads(), before + 1);
}

/// Finding 18: a flight read the record, then the installation was revoked in this very
/// process before the flight cached what it read: the revoked token is never cached.
#[tokio::test]
async fn a_flight_that_read_before_a_revocation_does_not_cache_the_revoked_token() {
    let (f, store) = counted().await;
    let id = f.install().await;
    store.hold_next();
    let flight = {
        let (m, id) = (f.manager.clone(), id.clone());
        tokio::spawn(async move { m.access_token(&id).await })
    };
    store.held().await;
    f.manager.revoke(&id).await.unwrap();
    store.release();
    let _ = flight.await.unwrap();
    assert!(
        matches!(
            f.manager.access_token(&id).await,
            Err(Error::Revoked { .. })
        ),
        "the revoked token was cached by the slow flight"
    );
    assert_eq!(f.manager.cached_installations(), 0);
}

/// Finding 17: the refresher refreshes installations nobody asked for without caching them;
/// callers' installations are cached up to the capacity, least recently used out first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_bounded_and_the_refresher_does_not_fill_it() {
    let f = Fixture::tuned_in_memory(profiles::bitbucket(), MockProfile::Bitbucket, |p| {
        p.cache_capacity = 50
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(f.install().await);
    }
    f.advance(Duration::from_secs(7200));
    let refresher = f.manager.spawn_refresher_with(common::fast_refresher());
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.mock.counters().totals.refreshes < 200 {
        assert!(Instant::now() < deadline, "the refresher fell behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refresher.shutdown().await;
    assert_eq!(
        f.manager.cached_installations(),
        0,
        "the refresher filled the cache"
    );
    for id in &ids {
        f.manager.access_token(id).await.unwrap();
    }
    let cached = f.manager.cached_installations();
    assert!((1..=50).contains(&cached), "{cached} cached");
    assert!(
        f.manager.cached_token(&ids[199]).is_some(),
        "the latest is cached"
    );
    assert!(
        f.manager.cached_token(&ids[0]).is_none(),
        "the oldest was evicted"
    );
}

/// Finding 15: an API that answers 401 to a fresh token (wrong scope for that endpoint, a
/// gateway) gets at most one refresh per minimum interval, not one per call.
#[tokio::test]
async fn a_401_storm_forces_at_most_one_refresh_per_interval() {
    let f = Fixture::new(profiles::bitbucket(), MockProfile::Bitbucket).await;
    let id = f.install().await;
    f.advance(Duration::from_secs(120));
    f.mock.set_faults(vec![FaultRule::next(
        Endpoint::Resource,
        21,
        Fault::ServerError {
            status: 401,
            html: false,
        },
    )]);
    let url = f.mock.resource_url();
    let call = || async {
        f.manager
            .send_authorized(&id, f.manager.client().http().get(&url))
            .await
            .unwrap()
            .status()
    };
    for _ in 0..10 {
        assert_eq!(call().await, 401);
    }
    assert_eq!(
        f.mock.counters().totals.refreshes,
        1,
        "one forced refresh, not ten"
    );
    // The next 401 comes after the interval: one more refresh, and the retry goes through.
    f.advance(Duration::from_secs(60));
    assert_eq!(call().await, 200);
    assert_eq!(
        f.mock.counters().totals.refreshes,
        2,
        "one more after the interval"
    );
}

/// Review of the cache: `invalidate` (or a 401 on a young token) must not stop the same
/// record from being cached again once it is re-read: one read, then the hot path again.
#[tokio::test]
async fn after_invalidate_one_read_puts_the_token_back_in_the_cache() {
    let (f, store) = counted().await;
    let id = f.install().await;
    f.manager.access_token(&id).await.unwrap();
    f.manager.invalidate(&id);
    f.advance(Duration::from_millis(1));
    let before = store.reads();
    for _ in 0..100 {
        f.manager.access_token(&id).await.unwrap();
    }
    assert_eq!(store.reads(), before + 1);
}

/// Review E13: the bound is also kept on monotonic time. A host clock stepped back an hour
/// (NTP) right after a token was cached used to stretch the bound by that hour: another
/// process's revocation went unseen for an hour and 30 s.
#[tokio::test]
async fn a_clock_stepped_back_does_not_stretch_the_bound() {
    let backend = Backend::fresh_sqlite("cache");
    let f = fixture_on(&backend).await;
    let id = f.install().await;
    let bound = Duration::from_millis(300);
    let clock = ManualClock::new(tokenkeeper::core::Clock::now(&f.clock));
    let a = common::manager_builder(
        consumer_for(profiles::bitbucket(), &f.mock, DEFAULT_CLIENT_SECRET),
        backend.open().await,
    )
    .clock(clock.clone())
    .tune(|p| {
        p.cache_revalidate = bound;
        p.event_poll = Duration::ZERO;
    })
    .build()
    .unwrap();
    a.access_token(&id).await.unwrap();
    f.manager.revoke(&id).await.unwrap();
    clock.set(tokenkeeper::core::Clock::now(&clock).saturating_sub(Duration::from_secs(3600)));
    tokio::time::sleep(bound + Duration::from_millis(100)).await;
    match a.access_token(&id).await {
        Err(Error::Revoked { .. }) => {}
        other => panic!("served past the bound after a clock step back: {other:?}"),
    }
}
