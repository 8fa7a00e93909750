//! `RedisStore` on a real Redis Cluster: the whole conformance suite on three primaries (every
//! script in one slot, `due` and `list` asked shard by shard), and a failover: a primary killed
//! while writes go on, its replica promoted, and every write the store acknowledged after the
//! replica acknowledged it (`WAIT 1`) still there afterwards.
#![cfg(feature = "cluster")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{CasOutcome, InstallationId, StoreError, TokenStore};
use tokenkeeper_redis::RedisStore;
use tokenkeeper_testkit::redis::{Cluster, cluster_urls, unique_prefix};

async fn cluster_store(tag: &str) -> RedisStore {
    RedisStore::cluster_builder(cluster_urls())
        .prefix(unique_prefix(tag))
        .connect()
        .await
        .unwrap()
}

mod conformance {
    tokenkeeper_core::conformance_tests!(|| async { super::cluster_store("conformance").await });
}

#[tokio::test]
async fn the_keys_of_an_installation_share_a_slot_and_installations_spread() {
    let store = cluster_store("slots").await;
    let ids: Vec<InstallationId> = (0..64)
        .map(|n| InstallationId::new(format!("spread-{n}")).unwrap())
        .collect();
    for id in &ids {
        store.create(&sample_record(id, T0)).await.unwrap();
    }
    let page = store
        .due(
            tokenkeeper_core::conformance::CONSUMER,
            T0.saturating_add(Duration::from_secs(1 << 30)),
            None,
            100,
        )
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 64, "due reads every shard");
    // Keys on more than one primary: count distinct slots of the record keys.
    let slots: std::collections::HashSet<_> = ids
        .iter()
        .map(|id| {
            let key = store.record_key(id);
            let port = cluster_urls()[0]
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            tokenkeeper_testkit::redis::cli(port, &["cluster", "keyslot", &key])
        })
        .collect();
    assert!(
        slots.len() > 1,
        "installations spread over slots: {slots:?}"
    );
}

/// Writers keep swapping 50 records with `WAIT 1` while the primary of one of them is killed;
/// the replica takes over. Every write acknowledged with `Ok(Swapped)` is in the store
/// afterwards (a later version, or that one), and the store works again once the cluster is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_run_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(3, 1);
    let store = Arc::new(
        RedisStore::cluster_builder(cluster.urls())
            .prefix(unique_prefix("failover"))
            .wait_for_replicas(1, Duration::from_millis(500))
            .operation_timeout(Duration::from_secs(3))
            .connect()
            .await
            .unwrap(),
    );
    let ids: Vec<InstallationId> = (0..50)
        .map(|n| InstallationId::new(format!("failover-{n}")).unwrap())
        .collect();
    for id in &ids {
        store.create(&sample_record(id, T0)).await.unwrap();
    }
    let acknowledged: Arc<std::sync::Mutex<HashMap<InstallationId, u64>>> = Arc::default();
    let stop = Instant::now() + Duration::from_secs(12);
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (store, ids, acknowledged) = (store.clone(), ids.clone(), acknowledged.clone());
        writers.spawn(async move {
            let (mut ok, mut unavailable) = (0u64, 0u64);
            let mut n = w;
            while Instant::now() < stop {
                n = (n + 7) % ids.len();
                let id = &ids[n];
                let Ok(Some(current)) = store.get(id).await else {
                    unavailable += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let next = tokenkeeper_testkit::race::takeover(&current, &format!("w{w}"));
                match store.compare_and_swap(&next, current.version()).await {
                    Ok(CasOutcome::Swapped) => {
                        ok += 1;
                        let mut acked = acknowledged.lock().unwrap();
                        let v = acked.entry(id.clone()).or_default();
                        *v = (*v).max(next.version());
                    }
                    Ok(_) => {}
                    Err(StoreError::Unavailable { .. }) => {
                        unavailable += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("writer {w}: {e}"),
                }
            }
            (ok, unavailable)
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim = cluster.primary_ports()[0];
    cluster.kill(victim);
    let (mut ok, mut unavailable) = (0, 0);
    while let Some(r) = writers.join_next().await {
        let (o, u) = r.unwrap();
        ok += o;
        unavailable += u;
    }
    cluster.wait_failover(victim, 3);
    let primaries = cluster.primary_ports();
    assert_eq!(primaries.len(), 3, "a replica took over: {primaries:?}");
    assert!(!primaries.contains(&victim));
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut lost = Vec::new();
    for id in &ids {
        let stored = loop {
            match store.get(id).await {
                Ok(found) => break found.unwrap(),
                Err(StoreError::Unavailable { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        if let Some(&v) = acknowledged.get(id)
            && stored.version() < v
        {
            lost.push((id.clone(), v, stored.version()));
        }
    }
    println!(
        "cluster failover: {ok} acknowledged swaps, {unavailable} unavailable during the failover, {} lost",
        lost.len()
    );
    assert!(ok > 100, "the writers made progress: {ok}");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

/// The durability check reads every node of a cluster: one node without `appendfsync always`
/// is a gap (it could own a slot, or be promoted), and `Require` refuses the cluster.
#[tokio::test]
async fn the_durability_check_reads_every_node() {
    use tokenkeeper_redis::{ConnectError, DurabilityCheck, DurabilityGap};
    let cluster = Cluster::start(3, 0);
    let ports = cluster.ports();
    for port in &ports {
        tokenkeeper_testkit::redis::cli(*port, &["config", "set", "appendfsync", "always"]);
    }
    let durable = RedisStore::cluster_builder(cluster.urls())
        .prefix(unique_prefix("durable"))
        .durability_check(DurabilityCheck::Require)
        .connect()
        .await
        .expect("every node durable");
    assert!(durable.durability_gaps().is_empty());
    // One node, the last, lazy: whichever node answers the connection, the gap is seen.
    tokenkeeper_testkit::redis::cli(ports[2], &["config", "set", "appendfsync", "everysec"]);
    match RedisStore::cluster_builder(cluster.urls())
        .prefix(unique_prefix("lazy"))
        .durability_check(DurabilityCheck::Require)
        .connect()
        .await
    {
        Err(ConnectError::NotDurable { gaps, .. }) => {
            assert_eq!(gaps, vec![DurabilityGap::LazyFsync("everysec".into())]);
        }
        other => panic!("expected NotDurable, got {other:?}"),
    }
}
