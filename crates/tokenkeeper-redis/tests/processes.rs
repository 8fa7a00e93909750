//! Four OS processes sharing one Redis race compare-and-swap on 100 records: no lost update,
//! no error; and a racer SIGKILLed mid-write leaves events and records in step. The children
//! are this test binary re-invoked with `TK_REDIS_CHILD` set to the store's location
//! (`URL|PREFIX`), running `child_process_entry` (which does nothing in a normal test run).

mod common;

use tokenkeeper_redis::RedisStore;

tokenkeeper_testkit::process_race_tests!(
    child_env: "TK_REDIS_CHILD",
    fresh: |tag: &str| format!("{}|{}", common::url(), common::unique_prefix(tag)),
    open: |location: String| async move {
        let (url, prefix) = location.split_once('|').expect("URL|PREFIX");
        RedisStore::builder(url).prefix(prefix).connect().await.unwrap()
    },
);
