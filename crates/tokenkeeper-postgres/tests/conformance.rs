//! The whole TokenStore conformance suite against `PostgresStore` on a real PostgreSQL server,
//! one fresh schema per case.

mod common;

tokenkeeper_core::conformance_tests!(|| async { common::fresh_store("conformance").await });
