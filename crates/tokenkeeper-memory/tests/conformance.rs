//! The whole TokenStore conformance suite against `MemoryStore`, and against
//! `Sealed<MemoryStore>` (at-rest encryption must keep every promise of the store it wraps).

use tokenkeeper_memory::MemoryStore;

tokenkeeper_core::conformance_tests!(|| async { MemoryStore::new() });

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_respect_retention() {
    let store =
        MemoryStore::with_event_retention(tokenkeeper_core::EventRetention::new().max_events(5));
    tokenkeeper_core::conformance::events_respect_retention(std::sync::Arc::new(store)).await;
}

mod sealed {
    use tokenkeeper_core::conformance::test_keyring as keyring;
    use tokenkeeper_core::sealed::Sealed;
    use tokenkeeper_memory::MemoryStore;

    tokenkeeper_core::conformance_tests!(|| async { Sealed::new(MemoryStore::new(), keyring()) });
}
