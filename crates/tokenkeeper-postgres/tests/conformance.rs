//! The whole TokenStore conformance suite against `PostgresStore` on a real PostgreSQL server,
//! one fresh schema per case.

mod common;

tokenkeeper_core::conformance_tests!(|| async { common::fresh_store("conformance").await });

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_respect_retention() {
    let store = tokenkeeper_postgres::PostgresStore::builder(common::url())
        .schema(common::unique_schema("retention"))
        .event_retention(tokenkeeper_core::EventRetention::new().max_events(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", common::INSTALL_HINT));
    tokenkeeper_core::conformance::events_respect_retention(std::sync::Arc::new(store)).await;
}
