//! Four OS processes sharing one Redis race compare-and-swap on 100 records: no lost update,
//! no error. The children are this test binary re-invoked with `TK_REDIS_CHILD` set, running
//! `child_process_entry` (which does nothing in a normal test run).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use tokenkeeper_redis::RedisStore;
use tokenkeeper_testkit::race::{RaceReport, race_ids, race_worker, seed_race, verify_race};

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
            let me = format!("pid-{}", std::process::id());
            let report = race_worker(&store, &race_ids(100), Duration::from_secs(3), &me).await;
            println!("{}", report.to_line());
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
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "child_process_entry",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &prefix)
                .env("TK_REDIS_URL", &url)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut reports = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a child failed");
        let text = String::from_utf8(out.stdout).unwrap();
        reports
            .push(RaceReport::from_output(&text).unwrap_or_else(|| panic!("no report in {text}")));
    }
    verify_race(&store, &ids, &reports).await;
}
