//! The whole TokenStore conformance suite against `MemoryStore`, and against
//! `Sealed<MemoryStore>` (at-rest encryption must keep every promise of the store it wraps).

use tokenkeeper_memory::MemoryStore;

tokenkeeper_core::conformance_tests!(|| async { MemoryStore::new() });

tokenkeeper_core::conformance_tests!(retention: |max_events: u64| async move {
    MemoryStore::with_event_retention(tokenkeeper_core::EventRetention::new().max_events(max_events))
});

mod sealed {
    use tokenkeeper_core::conformance::test_keyring as keyring;
    use tokenkeeper_core::sealed::Sealed;
    use tokenkeeper_memory::MemoryStore;

    tokenkeeper_core::conformance_tests!(|| async { Sealed::new(MemoryStore::new(), keyring()) });
}
