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
