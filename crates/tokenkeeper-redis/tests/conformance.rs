//! The whole TokenStore conformance suite against `RedisStore` on a real redis-server.

mod common;

tokenkeeper_core::conformance_tests!(|| common::fresh_store("conformance"));

mod one_shard {
    use super::common;
    use tokenkeeper_redis::RedisStore;

    // The same contract with every installation in one shard (a single hash tag).
    tokenkeeper_core::conformance_tests!(|| async {
        RedisStore::builder(common::url())
            .prefix(common::unique_prefix("one-shard"))
            .index_shards(1)
            .connect()
            .await
            .unwrap()
    });
}
