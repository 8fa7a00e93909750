//! Four OS processes sharing one Redis race compare-and-swap on 100 records: no lost update,
//! no error. The children are this test binary re-invoked with `TK_REDIS_CHILD` set, running
//! `child_process_entry` (which does nothing in a normal test run).

mod common;

use tokenkeeper_redis::RedisStore;
use tokenkeeper_testkit::race::{
    race_child, race_ids, run_race_children, run_race_children_killing_one, seed_race,
    verify_events, verify_race,
};

const CHILD_ENV: &str = "TK_REDIS_CHILD";

/// Not a test on its own: the body of the child processes the race spawns.
#[test]
fn child_process_entry() {
    let Ok(prefix) = std::env::var(CHILD_ENV) else {
        return;
    };
    let url = std::env::var("TK_REDIS_URL").unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let store = RedisStore::builder(url)
                .prefix(prefix)
                .connect()
                .await
                .unwrap();
            race_child(&store).await;
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_race_cas_without_lost_updates() {
    let url = common::url();
    let prefix = common::unique_prefix("race");
    let store = RedisStore::builder(&url)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap();
    let ids = race_ids(100);
    seed_race(&store, &ids).await;
    let reports = run_race_children(4, &[(CHILD_ENV, &prefix), ("TK_REDIS_URL", &url)]);
    verify_race(&store, &ids, &reports).await;
}

/// A racer SIGKILLed mid-race (mid-write as likely as not) leaves no write without its event
/// and no event without its write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_racer_killed_mid_write_leaves_events_and_records_in_step() {
    let url = common::url();
    let prefix = common::unique_prefix("killed");
    let store = RedisStore::builder(&url)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap();
    let ids = race_ids(100);
    seed_race(&store, &ids).await;
    let survivors = run_race_children_killing_one(
        3,
        &[(CHILD_ENV, &prefix), ("TK_REDIS_URL", &url)],
        std::time::Duration::from_millis(1500),
    );
    let checked = verify_events(&store, &ids).await;
    let swaps: u64 = survivors.iter().map(|r| r.swaps).sum();
    assert!(
        checked as u64 >= ids.len() as u64 + swaps,
        "fewer events than the survivors' swaps"
    );
    eprintln!("{checked} events match the records after a SIGKILL mid-race");
}
