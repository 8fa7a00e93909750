//! The whole TokenStore conformance suite against `PostgresStore` on a real PostgreSQL server,
//! one fresh schema per case.

mod common;

tokenkeeper_core::conformance_tests!(|| async { common::fresh_store("conformance").await });

tokenkeeper_core::conformance_tests!(retention: |max_events: u64| async move {
    tokenkeeper_postgres::PostgresStore::builder(common::url())
        .schema(common::unique_schema("retention"))
        .event_retention(tokenkeeper_core::EventRetention::new().max_events(max_events))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", common::INSTALL_HINT))
});
