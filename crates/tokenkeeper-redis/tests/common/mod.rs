//! The Redis tests use the crate's own test support (a real redis-server) plus a fresh store
//! per test under a unique key prefix.
#![allow(dead_code)]

use tokenkeeper_redis::RedisStore;
pub use tokenkeeper_testkit::redis::{INSTALL_HINT, server_url as url, unique_prefix};

/// A fresh store (unique prefix) on the shared server.
pub async fn fresh_store(tag: &str) -> RedisStore {
    RedisStore::builder(url())
        .prefix(unique_prefix(tag))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}: {INSTALL_HINT}"))
}
