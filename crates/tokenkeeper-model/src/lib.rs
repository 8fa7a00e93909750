//! A model of tokenkeeper's refresh protocol, checked exhaustively with
//! [stateright](https://docs.rs/stateright).
//!
//! Processes share one store holding one installation and refresh it against a provider that
//! rotates the refresh token on every use and, on a retired token, either re-issues the
//! current tokens (inside a reuse leeway) or detects reuse and revokes the grant. Processes
//! take, renew and watch leases, send token requests, lose replies, crash, pause (are simply
//! not scheduled while time passes) and run with skewed wall clocks. The model does not
//! re-implement the protocol's rules: every record change is the engine's real
//! [`tokenkeeper_core::transition`], every choice of what to do next is the engine's real
//! decision step ([`tokenkeeper::__protocol::decide`]), and every condemnation's reason is
//! the engine's real [`tokenkeeper::__protocol::rejection_reason`]. What the model adds is the
//! I/O around them: the store's compare-and-swap, the provider, time, and the lease-timing
//! rules of `manager/lease.rs` (send only while the lease outlasts the request; renew every
//! third of the TTL; take over after a TTL of watched silence).
//!
//! [`Mutation`]s remove one safeguard from the model's use of the real code (the fence check,
//! the lease, write-before-use), and the checker must then find a counterexample.

mod model;
mod process;
mod provider;
mod record;

pub use model::{Config, Mutation, ProtocolModel, State};
pub use process::{Flight, Phase, Process};
pub use provider::Provider;
pub use record::Rec;
