//! The background refresher in a fleet: an entry it cannot act on (a corrupt record) never
//! makes it spin, and processes share the due work instead of repeating it: two processes'
//! refreshers over one SQLite file or one Redis each take a share of the due installations,
//! with exactly one refresh per installation between them. (How fleet throughput grows with
//! processes is measured, not asserted: `benches/refresher_sweep.rs`, `refresher_processes`.)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Fixture, consumer_for, manager_builder};
use tokenkeeper::{core::TokenStore, profiles, refresher::RefresherConfig};
use tokenkeeper_core::conformance::sample_tokens;
use tokenkeeper_core::{InstallationId, Record, Timestamp};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_SECRET, MockProfile};

/// Review finding 16a: a corrupt record due in the past. Before, every sweep found it due
/// again and swept every 5 ms (hundreds of sweeps a second); now it rests for `max_idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_due_record_does_not_make_the_refresher_spin() {
    let path = tokenkeeper_testkit::dirs::fresh_db("spin");
    let store: Arc<dyn TokenStore> =
        Arc::new(tokenkeeper_sqlite::SqliteStore::open(&path).await.unwrap());
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store.clone()).await;
    let consumer = f.manager.client().consumer().name();
    let id = InstallationId::new("corrupt").unwrap();
    let past = Timestamp::from_unix_secs(1);
    store
        .create(&Record::new(
            id.clone(),
            consumer,
            sample_tokens("corrupt", past),
            past,
            past,
        ))
        .await
        .unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE installations SET record = ?1 WHERE id = 'corrupt'",
            [b"{not a record".to_vec()],
        )
        .unwrap();
    let refresher = f.manager.spawn_refresher_with(RefresherConfig {
        rate_per_second: None,
        max_idle: Duration::from_secs(5),
        ..RefresherConfig::default()
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = refresher.shutdown().await;
    assert!(counts.sweeps <= 2, "the refresher spun: {counts:?}");
    assert_eq!(counts.skipped, 1, "{counts:?}");
    assert_eq!(f.mock.counters().totals.token_calls, 0);
}

/// Review finding 16b: each refresher walks the due index in its own order and skips what a
/// peer has just leased or refreshed, so two rate-limited processes each do a share of the
/// work; between them every installation is refreshed exactly once.
async fn two_processes_share_the_due_work(backend: Backend) {
    let f = Fixture::with_store(
        profiles::bitbucket(),
        MockProfile::Bitbucket,
        backend.open().await,
    )
    .await;
    const N: u64 = 60;
    for _ in 0..N {
        f.install().await;
    }
    let process = |store| {
        manager_builder(
            consumer_for(profiles::bitbucket(), &f.mock, DEFAULT_CLIENT_SECRET),
            store,
        )
        .clock(f.clock.clone())
        .build()
        .unwrap()
    };
    let (a, b) = (process(backend.open().await), process(backend.open().await));
    let backend = backend.name();
    f.advance(Duration::from_secs(7200));
    f.mock.reset_counters();
    let config = RefresherConfig {
        concurrency: 4,
        rate_per_second: Some(20),
        page_size: 25,
        max_idle: Duration::from_millis(50),
        ..RefresherConfig::default()
    };
    let (ra, rb) = (
        a.spawn_refresher_with(config.clone()),
        b.spawn_refresher_with(config),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.mock.counters().totals.refreshes < N {
        assert!(
            Instant::now() < deadline,
            "{backend}: the fleet fell behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ca, cb) = (ra.shutdown().await, rb.shutdown().await);
    let c = f.mock.counters().totals;
    assert_eq!(
        (c.refreshes, c.rejected_refreshes, c.reuse_detections),
        (N, 0, 0),
        "{backend}: exactly one refresh each: {c:?}"
    );
    // Each took a real share (a refresher alone at 20/s would have needed 3 s for all 60).
    for (name, counts) in [("a", ca), ("b", cb)] {
        assert!(
            counts.attempted >= N / 5,
            "{backend}: process {name} did not share the work: {ca:?} {cb:?}"
        );
    }
    assert!(
        ca.attempted + cb.attempted <= N + N / 5,
        "{backend}: processes repeated each other's work: {ca:?} {cb:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_processes_share_the_due_work() {
    two_processes_share_the_due_work(Backend::fresh_sqlite("share")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_processes_share_the_due_work() {
    two_processes_share_the_due_work(Backend::fresh_redis("share")).await;
}

/// Review finding 10: a caller that joins a flight the refresher leads, while another
/// process holds a live lease and the stored token has expired, must never get that expired
/// token: it waits for the peer (here a silent one, taken over after a lease TTL) and gets a
/// fresh token, or `Busy`. The refresher's flight read the record just before the other
/// process leased it, and is paused there while the caller joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_joining_a_refresher_flight_never_gets_an_expired_token() {
    let (store, reads) =
        tokenkeeper_testkit::wrappers::ReadStore::reading(tokenkeeper_memory::MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(store);
    let f = Fixture::with_store(profiles::bitbucket(), MockProfile::Bitbucket, store.clone()).await;
    let id = f.install().await;
    let expired = f.record(&id).await.tokens().access_token.clone();
    f.advance(Duration::from_secs(7200));
    // The refresher checks the entry (read 1), then its flight reads it (read 2) and is
    // held right after.
    reads.hold_nth(2);
    let refresher = f.manager.spawn_refresher_with(common::fast_refresher());
    reads.held().await;
    // Meanwhile another process takes the lease (and will never write again).
    let now = tokenkeeper::core::Clock::now(&f.clock);
    let record = f.record(&id).await;
    let leased = tokenkeeper_core::conformance::lease(
        &record,
        "other-process",
        now.saturating_add(Duration::from_secs(60)),
        now,
    );
    store
        .compare_and_swap(&leased, record.version())
        .await
        .unwrap();
    let caller = {
        let (m, id) = (f.manager.clone(), id.clone());
        tokio::spawn(async move { m.access_token(&id).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    reads.release();
    match caller.await.unwrap() {
        Ok(token) => assert_ne!(token, expired, "an expired token was served"),
        Err(tokenkeeper::Error::Busy { .. }) => {}
        Err(e) => panic!("{e}"),
    }
    refresher.shutdown().await;
}

/// Review finding 19: the first due time of a new authorization or an import goes through
/// the policy: with `proactive = false` it is the keep-alive time, not the refresh-ahead time.
#[tokio::test]
async fn the_first_due_time_follows_the_policy() {
    let f = Fixture::tuned_in_memory(profiles::bitbucket(), MockProfile::Bitbucket, |p| {
        p.proactive = false
    })
    .await;
    let keep_alive = f.manager.policy().keep_alive.unwrap();
    let installed = f.install().await;
    let r = f.record(&installed).await;
    assert_eq!(
        r.due_at(),
        Some(r.refresh_token_last_used().saturating_add(keep_alive))
    );
    let imported = InstallationId::new("imported").unwrap();
    let now = tokenkeeper::core::Clock::now(&f.clock);
    let mut tokens = sample_tokens("imported", now);
    tokens.expires_at = now.saturating_add(Duration::from_secs(7200));
    f.manager
        .import_installation(imported.clone(), tokens)
        .await
        .unwrap();
    let r = f.record(&imported).await;
    assert_eq!(r.due_at(), Some(now.saturating_add(keep_alive)));
}
