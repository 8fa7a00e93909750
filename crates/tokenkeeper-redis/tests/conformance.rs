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

tokenkeeper_core::conformance_tests!(retention: |max_events: u64| async move {
    tokenkeeper_redis::RedisStore::builder(common::url())
        .prefix(common::unique_prefix("retention"))
        // The bound is split among the 16 shards: `max_events` per shard, as the case expects
        // of the one shard its installation lives in.
        .event_retention(tokenkeeper_core::EventRetention::new().max_events(max_events * 16))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", common::INSTALL_HINT))
});
