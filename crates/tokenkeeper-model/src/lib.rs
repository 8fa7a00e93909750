//! A model of tokenkeeper's refresh protocol, checked exhaustively with
//! [stateright](https://docs.rs/stateright).
//!
//! Processes share one store holding one installation and refresh it against a provider that
//! rotates the refresh token on every use and, on a retired token, either issues a new one
//! (inside a reuse leeway) or detects reuse and revokes the grant; the user may revoke the
//! grant, and it may have an absolute lifetime. Processes take, renew and watch leases, send
//! token requests, lose replies, get a 5xx after the provider committed, crash, pause (are
//! simply not scheduled while time passes) and run with skewed wall clocks; the provider may
//! handle a request after its client gave up on it; the store may refuse a write or apply it
//! and report a failure.
//!
//! The model does not re-implement the protocol's rules: every record change is the engine's
//! real [`tokenkeeper_core::transition`]; every choice of what to do next is the engine's
//! real decision step ([`tokenkeeper::__protocol::decide`]); the checks before presenting a
//! token, the response to every failure (the refusal's reason, the failure budget, the retry
//! inside a reuse leeway) and the recognition of the engine's own applied writes are the
//! engine's real pure functions ([`tokenkeeper::__protocol::plan_failure`] and its
//! neighbours); the write sequences are the engine's (`ResultWrite` for a result, with its
//! late landing; `settle_next` and `settle_conflict` for a failure), and so is the lease
//! timing (`may_send`, the send window; `silent`, the takeover threshold). What the model adds
//! is the I/O around them: the store, the provider and time.
//!
//! [`Mutation`]s remove one safeguard, and the checker must then find a counterexample. The
//! engine's own safeguards (the recognition of one's own write, the presented-token check of a
//! late result, the send window, the silence threshold) are switched off inside the engine's
//! code (`tokenkeeper::__protocol::switch_off`, feature `__model` only), so what is shown to
//! matter is that code; the fence, the lease and write-before-use are removed around it.

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

mod model;
mod process;
mod provider;
mod record;
mod steps;
mod store;

pub use model::{Action, Config, Mutation, ProtocolModel, State};
pub use process::{Flight, Phase, Process, Quiet};
pub use provider::{Answer, Death, Provider};
pub use record::Rec;
pub use store::Fault;
