//! The whole TokenStore conformance suite against `SqliteStore` on a real on-disk database,
//! in memory, and wrapped in `Sealed` (at-rest encryption must keep every promise of the store
//! it wraps).

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

mod sealed {
    use tokenkeeper_core::conformance::test_keyring as keyring;
    use tokenkeeper_core::sealed::Sealed;
    use tokenkeeper_sqlite::SqliteStore;

    tokenkeeper_core::conformance_tests!(|| async {
        let store = SqliteStore::open(super::common::fresh_db("sealed-conformance"))
            .await
            .expect("open a fresh database");
        Sealed::new(store, keyring())
    });
}

tokenkeeper_core::conformance_tests!(retention: |max_events: u64| async move {
    SqliteStore::builder(common::fresh_db("retention"))
        .event_retention(tokenkeeper_core::EventRetention::new().max_events(max_events))
        .open()
        .await
        .expect("open a fresh database")
});
