//! The OAuth half of the facade: everything that speaks to the provider and nothing that
//! stores. Provider profiles ([`ProviderProfile`](crate::ProviderProfile), `profiles::*`), the validated consumer
//! configuration ([`ConsumerConfig`]), the token endpoint client ([`OAuthClient`]), parsing of
//! the provider's replies, the signed `state` codec and the authorization flow.
//!
//! The client hands tokens back; it never writes a record. Persisting them is the lifecycle
//! engine's job ([`crate::TokenManager`]), so there is one place that knows the state machine
//! and the store.

mod authorize;
pub(crate) mod binding;
mod client;
pub(crate) mod config;
mod error;
mod identity;
pub(crate) mod keys;
pub(crate) mod profile;
mod response;
pub(crate) mod state;
mod transport;

pub use authorize::{AuthorizationRequest, AuthorizationWarning, Completed, Grant};
// At the crate root only (the happy path): the consumer, the state key, the profile and the
// callback's three values.
pub use client::{CodeGrant, OAuthClient, Revocation};
pub use config::ClientSecret;
pub use config::ConfigError;
pub use error::{AuthorizationError, ErrorKind, OAuthError, Operation};
pub use keys::MIN_STATE_KEY_BYTES;
pub use profile::{BodyEncoding, ClientAuth, ErrorMap, ErrorRule, IdentityCheck, Rotation, Timing};
pub use response::{MAX_LIFETIME, RawResponse, parse_retry_after, parse_token_response};
#[cfg(not(feature = "__sim"))]
#[allow(unused_imports)] // named by the builder's field only with `__sim`
pub(crate) use transport::TokenTransport;
#[doc(hidden)]
#[cfg(feature = "__sim")]
pub use transport::{TokenTransport, TransportFailure, TransportReply};

// What the manager uses beyond the public surface above: it reaches the OAuth half through
// this list only, never through its files. (The root re-exports its happy-path types from
// `binding`, `config`, `keys` and `profile`, which stay crate-visible for that alone.)
pub(crate) use authorize::{VerifiedState, check_issuer, consumer_name, plausible_code};
pub(crate) use binding::{AuthorizationCode, AuthorizationState, BrowserBinding};
pub(crate) use client::DEADLINE_GRACE;
pub(crate) use config::ConsumerConfig;
pub(crate) use identity::Probe;
pub(crate) use state::{Expect, Purpose};
