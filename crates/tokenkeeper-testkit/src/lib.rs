//! Test and benchmark scaffolding shared by tokenkeeper's crates (`publish = false`).
//!
//! Nothing here is product: it starts real servers for integration tests ([`redis`],
//! [`postgres`]) on ports no parallel test process shares ([`ports`]), makes throwaway
//! directories ([`dirs`]), re-runs the test binary as a child process ([`child`]), runs
//! multi-process compare-and-swap races ([`race`]), wraps stores to inject failures and
//! pauses ([`wrappers`]) and stands in for a failover address that moves from one server to
//! another ([`proxy`]); it also makes private certificate authorities for the TLS tests
//! ([`tls`]). With the `stores` feature, `backend::Backend` is the typed choice of a store
//! (memory, SQLite, Redis, Redis Cluster, PostgreSQL) for the facade's tests and the benches.
//! Production crates never depend on it; their tests and the benches do, as a path-only
//! dev-dependency.

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

#[cfg(feature = "stores")]
pub mod backend;
pub mod child;
pub mod dirs;
pub mod ports;
pub mod postgres;
pub mod proxy;
pub mod race;
pub mod redis;
pub mod tls;
pub mod wrappers;
