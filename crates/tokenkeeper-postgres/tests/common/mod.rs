//! The PostgreSQL tests use the test kit's server (a real PostgreSQL, started once per test
//! process unless `TOKENKEEPER_POSTGRES_URL` names one) and a fresh schema per store.
#![allow(dead_code)]

use tokenkeeper_postgres::PostgresStore;
pub use tokenkeeper_testkit::postgres::{INSTALL_HINT, server_url as url, unique_schema};

/// A fresh store (its own schema) on the shared server.
pub async fn fresh_store(tag: &str) -> PostgresStore {
    PostgresStore::builder(url())
        .schema(unique_schema(tag))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}: {INSTALL_HINT}"))
}
