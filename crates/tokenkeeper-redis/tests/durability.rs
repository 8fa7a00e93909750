//! Redis durability made explicit, against real redis-servers: the connect-time check of
//! persistence and eviction settings (warn or refuse), what a crash does to acknowledged
//! writes with and without `appendfsync always`, and `WAIT` for replicas after writes that
//! store new tokens.

use std::time::Duration;

use tokenkeeper_core::conformance::{T0, lease, sample_record};
use tokenkeeper_core::{CasOutcome, Event, InstallationId, Record, StoreError, TokenStore};
use tokenkeeper_redis::{
    ConnectError, DurabilityCheck, DurabilityGap, RedisStore, RedisStoreBuilder,
};
use tokenkeeper_testkit::redis::{Server, free_port};

fn at(secs: u64) -> tokenkeeper_core::Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

/// A record whose last write stored new tokens (a refresh), one version after `leased`.
fn refreshed(leased: &Record, tag: &str) -> Record {
    leased
        .apply(
            Event::Refreshed {
                fence: leased.version(),
                tokens: tokenkeeper_core::conformance::sample_tokens(tag, at(2)),
                refresh_at: at(3600),
                anomaly: None,
            },
            at(2),
        )
        .unwrap()
}

async fn connect(url: &str, check: DurabilityCheck) -> Result<RedisStore, ConnectError> {
    RedisStore::builder(url)
        .durability_check(check)
        .connect()
        .await
}

/// Reads `id`, riding out the server's start-up (LOADING, refused connections).
async fn read_back(store: &RedisStore, id: &InstallationId) -> Option<Record> {
    for _ in 0..100 {
        match store.get(id).await {
            Ok(found) => return found,
            Err(StoreError::Unavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the restarted server never answered");
}

/// Leases `created` (already stored at version 1) and writes its refresh under the lease;
/// returns the refreshed record.
async fn lease_and_refresh(store: &RedisStore, created: &Record) -> Record {
    let leased = lease(created, "h", at(60), at(1));
    assert_eq!(
        store.compare_and_swap(&leased, 1).await.unwrap(),
        CasOutcome::Swapped
    );
    let next = refreshed(&leased, "rotated");
    assert_eq!(
        store.compare_and_swap(&next, 2).await.unwrap(),
        CasOutcome::Swapped,
        "the refresh is acknowledged"
    );
    next
}

/// Writes a refresh, crashes the server, restarts it, and says whether the refresh survived.
async fn refresh_survives_a_crash(server: &mut Server, store: &RedisStore) -> bool {
    let id = InstallationId::new("crash-1").unwrap();
    let created = sample_record(&id, at(0));
    store.create(&created).await.unwrap();
    let next = lease_and_refresh(store, &created).await;
    server.crash_and_restart();
    read_back(store, &id).await.is_some_and(|r| r == next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_append_only_file_the_check_warns_and_a_crash_loses_the_refresh() {
    let mut server = Server::start_on(free_port(), &[]);
    let store = connect(&server.url(), DurabilityCheck::Warn).await.unwrap();
    assert!(
        store
            .durability_gaps()
            .contains(&DurabilityGap::AppendOnlyOff),
        "{:?}",
        store.durability_gaps()
    );
    match connect(&server.url(), DurabilityCheck::Require).await {
        Err(e @ ConnectError::NotDurable { .. }) => {
            assert!(e.to_string().contains("appendonly yes"), "{e}");
        }
        other => panic!("expected NotDurable, got {other:?}"),
    }
    assert!(
        !refresh_survives_a_crash(&mut server, &store).await,
        "what the check warns about is real: the acknowledged refresh is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_always_a_crash_loses_nothing_acknowledged() {
    let mut server = Server::start_on(
        free_port(),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let store = connect(&server.url(), DurabilityCheck::Require)
        .await
        .expect("a durable server passes the check");
    assert!(store.durability_gaps().is_empty());
    assert!(refresh_survives_a_crash(&mut server, &store).await);
}

/// A raw connection to `primary`, once its replica has synced and acknowledges writes.
async fn synced_primary(primary: &Server) -> redis::aio::MultiplexedConnection {
    let mut raw = redis::Client::open(primary.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut acked = 0;
    for _ in 0..100 {
        let _: () = redis::cmd("SET")
            .arg("sync-probe")
            .arg(1)
            .query_async(&mut raw)
            .await
            .unwrap();
        acked = redis::cmd("WAIT")
            .arg(1)
            .arg(100)
            .query_async(&mut raw)
            .await
            .unwrap();
        if acked == 1 {
            break;
        }
    }
    assert_eq!(acked, 1, "the replica never synced");
    raw
}

/// A primary started with `args`, a replica of it, a store on the primary whose writes wait
/// `wait` for that replica (`tune` sets the rest), and a raw connection to the primary once
/// the replica has synced.
async fn replicated(
    args: &[&str],
    wait: Duration,
    tune: impl FnOnce(RedisStoreBuilder) -> RedisStoreBuilder,
) -> (
    Server,
    Server,
    RedisStore,
    redis::aio::MultiplexedConnection,
) {
    let primary = Server::start_on(free_port(), args);
    let primary_port = primary.port.to_string();
    let replica = Server::start_on(free_port(), &["--replicaof", "127.0.0.1", &primary_port]);
    let builder = RedisStore::builder(primary.url())
        .durability_check(DurabilityCheck::Skip)
        .wait_for_replicas(1, wait);
    let store = tune(builder).connect().await.unwrap();
    let raw = synced_primary(&primary).await;
    (primary, replica, store, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_waits_for_replicas() {
    let (_primary, replica, store, mut raw) =
        replicated(&[], Duration::from_millis(500), |b| b).await;
    // The server forgets its scripts (a restart, a failover to a replica, `SCRIPT FLUSH`):
    // the write and its `WAIT` travel in one pipeline, and a script the server does not know
    // is loaded and the pipeline sent again.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    let id = InstallationId::new("replicated").unwrap();
    let created = sample_record(&id, at(0));
    store
        .create(&created)
        .await
        .expect("acknowledged by the replica");
    // The same write resent (a client that lost the reply sends it again): it finds its own
    // first run and reports it done, not `AlreadyExists`.
    store
        .create(&created)
        .await
        .expect("a resent create of the same record");
    let mut other = sample_record(&id, at(1));
    other = other.with_account(Some("someone else".into()));
    assert!(matches!(
        store.create(&other).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let next = lease_and_refresh(&store, &created).await;
    // Without its replica, no write is reported as done: not new tokens, and not a lease
    // either (a lease lost in a failover would let a peer refresh while its holder's request
    // is in flight). The primary applied it all the same.
    drop(replica);
    let leased = lease(&next, "h2", at(120), at(61));
    match store.compare_and_swap(&leased, 3).await {
        Err(e @ StoreError::Unavailable { .. }) => {
            assert!(e.to_string().contains("replicas"), "{e}");
        }
        other => panic!("expected Unavailable without the replica, got {other:?}"),
    }
    let again = refreshed(&leased, "rotated-again");
    match store.compare_and_swap(&again, 4).await {
        Err(e @ StoreError::Unavailable { .. }) => {
            assert!(e.to_string().contains("replicas"), "{e}");
        }
        other => panic!("expected Unavailable without the replica, got {other:?}"),
    }
}

/// Waits until the server holds a client blocked (a `WAIT` no replica will answer).
async fn until_a_client_blocks(raw: &mut redis::aio::MultiplexedConnection) {
    for _ in 0..200 {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query_async(raw)
            .await
            .unwrap();
        if info.lines().any(|l| {
            l.strip_prefix("blocked_clients:")
                .is_some_and(|n| n.trim() != "0")
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the write never waited for its replica");
}

/// Review E9: `WAIT` blocks the connection it runs on. A write waiting for a replica that is
/// gone must not hold up the process's reads: they answer while the write still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_queue_behind_a_write_waiting_for_replicas() {
    let (_primary, replica, store, mut raw) = replicated(&[], Duration::from_secs(30), |b| b).await;
    let id = InstallationId::new("waits").unwrap();
    let created = sample_record(&id, at(0));
    store
        .create(&created)
        .await
        .expect("acknowledged by the replica");
    drop(replica);
    let leased = lease(&created, "h1", at(120), at(61));
    let writer = store.clone();
    let write = tokio::spawn(async move { writer.compare_and_swap(&leased, 1).await });
    // The write's `WAIT` is blocked on the server (no replica will acknowledge it).
    until_a_client_blocks(&mut raw).await;
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let (store, id) = (store.clone(), id.clone());
            tokio::spawn(async move { store.get(&id).await })
        })
        .collect();
    for read in reads {
        let read = read
            .await
            .unwrap()
            .expect("a read while a write waits for replicas");
        assert_eq!(read.map(|r| r.version()), Some(1));
    }
    assert!(
        !write.is_finished(),
        "the reads were answered only after the write's WAIT ended: they queued behind it"
    );
    write.abort();
}

/// The connections kept for writes that wait for replicas sit idle while the process only
/// reads; when the server restarts meanwhile, the write after it still goes through: a
/// connection idle a while is pinged first (a read, sent again once the connection is back),
/// so the write is not the one that finds it dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_server_restarted_goes_through() {
    let (mut primary, _replica, store, _) = replicated(
        &["--appendonly", "yes", "--appendfsync", "always"],
        Duration::from_secs(5),
        |b| b,
    )
    .await;
    let id = InstallationId::new("restarted").unwrap();
    let created = sample_record(&id, at(0));
    store
        .create(&created)
        .await
        .expect("acknowledged by the replica");
    primary.crash_and_restart();
    drop(synced_primary(&primary).await);
    // Idle past the store's check (250 ms), as the pool's connections are after a pause.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leased = lease(&created, "h1", at(120), at(61));
    assert_eq!(
        store
            .compare_and_swap(&leased, 1)
            .await
            .expect("the write after the restart"),
        CasOutcome::Swapped
    );
    assert_eq!(store.get(&id).await.unwrap(), Some(leased));
}

/// A write that finds every connection for replica-waiting writes busy waits at most the
/// operation timeout for one and then fails unsent: `Unavailable`, and the store does not
/// hold it (so the engine's read-back tells the truth: not applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_finds_no_free_connection_is_not_sent() {
    let (_primary, replica, store, mut raw) = replicated(&[], Duration::from_secs(30), |b| {
        b.replica_wait_connections(1)
            .operation_timeout(Duration::from_secs(1))
    })
    .await;
    let (a, b) = (
        InstallationId::new("first").unwrap(),
        InstallationId::new("second").unwrap(),
    );
    store.create(&sample_record(&a, at(0))).await.unwrap();
    store.create(&sample_record(&b, at(0))).await.unwrap();
    drop(replica);
    let first = lease(&sample_record(&a, at(0)), "h1", at(120), at(61));
    let writer = store.clone();
    let blocked = tokio::spawn(async move { writer.compare_and_swap(&first, 1).await });
    until_a_client_blocks(&mut raw).await;
    let second = lease(&sample_record(&b, at(0)), "h1", at(120), at(61));
    match store.compare_and_swap(&second, 1).await {
        Err(e @ StoreError::Unavailable { .. }) => {
            assert!(e.to_string().contains("not sent"), "{e}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(
        store.get(&b).await.unwrap().unwrap().version(),
        1,
        "it was not sent"
    );
    blocked.abort();
}
