//! The whole TokenStore conformance suite against `SqliteStore` on a real on-disk database.

mod common;

use tokenkeeper_sqlite::SqliteStore;

tokenkeeper_core::conformance_tests!(|| async {
    SqliteStore::open(common::fresh_db("conformance"))
        .await
        .expect("open a fresh database")
});

mod in_memory {
    use tokenkeeper_sqlite::SqliteStore;

    tokenkeeper_core::conformance_tests!(|| async {
        SqliteStore::in_memory().await.expect("open in memory")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_respect_retention() {
    let store = SqliteStore::builder(common::fresh_db("retention"))
        .event_retention(tokenkeeper_core::EventRetention::new().max_events(5))
        .open()
        .await
        .expect("open a fresh database");
    tokenkeeper_core::conformance::events_respect_retention(std::sync::Arc::new(store)).await;
}
