//! The whole TokenStore conformance suite against `MemoryStore`.

use tokenkeeper_memory::MemoryStore;

tokenkeeper_core::conformance_tests!(|| async { MemoryStore::new() });
