//! Four OS processes sharing one PostgreSQL schema race compare-and-swap on 100 records: no
//! lost update, no error; and a racer SIGKILLed mid-write leaves events and records in step.
//! The children are this test binary re-invoked with `TK_PG_CHILD` set to the store's
//! location (`URL|SCHEMA`), running `child_process_entry` (which does nothing in a normal test
//! run).

mod common;

use tokenkeeper_postgres::PostgresStore;

tokenkeeper_testkit::process_race_tests!(
    child_env: "TK_PG_CHILD",
    fresh: |tag: &str| format!("{}|{}", common::url(), common::unique_schema(tag)),
    open: |location: String| async move {
        let (url, schema) = location.split_once('|').expect("URL|SCHEMA");
        PostgresStore::builder(url).schema(schema).connect().await.unwrap()
    },
);
