//! # tokenkeeper
//!
//! Keeps OAuth 2.0 tokens alive for applications installed many times: one OAuth consumer,
//! many installations, each with its own access/refresh token pair and its own explicit,
//! concurrency-safe lifecycle.
//!
//! Start with [`TokenManager`]: build it over a store, send users through the authorization
//! flow, and ask it for an access token whenever you call the provider's API. It refreshes
//! each installation once across your whole fleet, writes rotated refresh tokens before
//! anyone uses them, and records a reason for every state change ([`TokenManager::explain`]).
//!
//! ```
//! use tokenkeeper::{ConsumerConfig, TokenManager, profiles, stores::MemoryStore};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let consumer = ConsumerConfig::builder(profiles::bitbucket())
//!     .client_id("key")
//!     .client_secret("secret")
//!     .redirect_uri("https://app.example.com/oauth/callback")
//!     // 32 random bytes shared by every process; here a fresh one, for one process.
//!     .state_key(tokenkeeper::StateKey::generate(1)?)
//!     .build()?;
//! let manager = TokenManager::builder(consumer, MemoryStore::new()).build()?;
//!
//! // 1. Set the flow's cookie and send the user to the provider.
//! let begun = manager.begin_authorization(None)?;
//! let set_cookie = begun.set_cookie_header(); // the flow's browser binding
//! println!("Set-Cookie: [the flow's cookie]; redirect the browser to {}", begun.url);
//! # let _ = set_cookie;
//! // 2. In the callback handler, with the query's code and state and the Cookie header:
//! //    let state = AuthorizationState::new(state);
//! //    let binding = BrowserBinding::from_cookie_header(cookies, &state)?;
//! //    manager.complete_authorization(AuthorizationCode::new(code), &state, &binding).await?
//! // 3. Whenever you call the API: manager.access_token(&installation).await?
//! // 4. In the background: let refresher = manager.spawn_refresher();
//! # Ok(())
//! # }
//! ```
//!
//! ## Where things are
//!
//! The root holds the happy path: [`TokenManager`] and its builder, [`ConsumerConfig`],
//! [`ProviderProfile`] and the [`profiles`], [`StateKey`], the callback's values
//! ([`AuthorizationCode`], [`AuthorizationState`], [`BrowserBinding`]), [`InstallationId`],
//! [`AccessToken`], [`Explanation`] and [`Error`]. Everything else has one path:
//!
//! - [`oauth`]: the provider side: the token endpoint client ([`oauth::OAuthClient`]), the
//!   authorization flow's results and errors, profile details. It never stores anything.
//! - [`policy`]: how the engine refreshes ([`policy::RefreshPolicy`]).
//! - [`events`]: this process's events and the fleet's event log.
//! - [`refresher`]: the background refresher.
//! - [`unsaved`]: rotated tokens the store would not take.
//! - [`stores`]: the storage backends compiled in by cargo feature: `memory` (default),
//!   `sqlite`, `redis` (and `redis-tls` for `rediss://`, `redis-cluster` for Redis Cluster),
//!   `postgres`.
//! - [`core`]: the model (records, states, tokens, time), the pure state machine and the
//!   `TokenStore` trait, for writing your own store; `core::sealed` for at-rest encryption.
//! - [`_documentation::design`]: how it all works and why.
//!
//! ## Features
//!
//! `memory` (default), `sqlite`, `redis`, `redis-tls`, `redis-cluster`, `postgres`, and
//! `encryption` (at-rest sealing of tokens in any store, `core::sealed::Sealed`).

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod manager;
pub mod oauth;

pub use error::Error;

// The happy path: what an application names to build a manager, run the authorization flow
// and get tokens. Everything else has one path, in the modules below.
pub use manager::{Explanation, Health, InstallError, TokenManager, TokenManagerBuilder};
pub use oauth::binding::{AuthorizationCode, AuthorizationState, BrowserBinding};
pub use oauth::config::{ConsumerConfig, ConsumerConfigBuilder};
pub use oauth::keys::StateKey;
pub use oauth::profile::ProviderProfile;
pub use tokenkeeper_core::{AccessToken, InstallationId};

/// The HTTP client the facade is built on: `TokenManagerBuilder::http_client` and
/// `TokenManager::send_authorized` take its types (and `reqwest::Url` is the URL type the
/// API takes).
pub use reqwest;

/// The core crate: the model (records, states, tokens, time), the pure state machine and the
/// `TokenStore` contract, for writing your own store; `core::sealed` holds at-rest
/// encryption (feature `encryption`).
pub use tokenkeeper_core as core;

/// What the engine tells the application: events of this process, and the fleet's event log.
pub mod events {
    pub use crate::manager::{EventStream, EventsError, LocalEvent, LocalEventKind};
}

/// The background refresher ([`TokenManager::spawn_refresher`](crate::TokenManager::spawn_refresher)).
pub mod refresher {
    pub use crate::manager::{RefresherConfig, RefresherCounts, RefresherHandle};
}

/// How the engine refreshes: timing, leases, backoff, budgets and guards
/// ([`TokenManagerBuilder::tune`](crate::TokenManagerBuilder::tune)).
pub mod policy {
    pub use crate::manager::{MassRejectionGuard, RefreshPolicy};
}

/// Rotated tokens the store would not take, and their restore
/// ([`TokenManagerBuilder::on_unsaved_tokens`](crate::TokenManagerBuilder::on_unsaved_tokens)).
pub mod unsaved {
    pub use crate::manager::{UnsavedFileError, UnsavedRestore, UnsavedTokens};
}

/// Not a stable API: the refresh protocol's pure steps (the decision step, the failure plan
/// and the choice of a rejection's reason), exported so the model checker in
/// `tokenkeeper-model` runs the very code the engine runs (feature `__model`).
#[doc(hidden)]
#[cfg(feature = "__model")]
pub mod __protocol {
    pub use crate::manager::{
        DecideContext as Context, Decision, Failure, Mode, Plan, ResultConflict, ResultWrite,
        Rules, Safeguard, SettleConflict, decide, holds_own_lease, is_own_write, may_send,
        plan_failure, refresh_token_deadline, rejection_reason, retired_past_leeway,
        settle_conflict, settle_next, silent, switch_off, unpresentable,
    };
}
/// Not a stable API: entry points for the fuzz targets (`fuzz/`) into parsers that are not
/// public, each checking its own properties and panicking when one breaks (feature `__fuzz`).
#[doc(hidden)]
#[cfg(feature = "__fuzz")]
pub mod __fuzz {
    pub use crate::oauth::state::fuzz_decode as state;
}

/// Provider presets.
pub mod profiles {
    pub use crate::oauth::profile::{
        atlassian_3lo, bitbucket, bitbucket_legacy, github_app, google,
    };
}

/// The storage backends compiled in by feature.
pub mod stores {
    #[cfg(feature = "memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
    pub use tokenkeeper_memory::MemoryStore;
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub use tokenkeeper_postgres::{PostgresStore, PostgresStoreBuilder};
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub use tokenkeeper_redis::{RedisStore, RedisStoreBuilder};
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub use tokenkeeper_sqlite::{SqliteStore, SqliteStoreBuilder, Synchronous};
}

/// Documents that ship with the code.
pub mod _documentation {
    /// The design document: crates and layers, the record and its states, the transitions,
    /// the store contract, the refresh protocol, error classification, the authorization flow
    /// and the provider facts. (`docs/design.md` in the repository.)
    #[doc = include_str!("../../../docs/design.md")]
    pub mod design {}
}

/// The README's code compiles (and stays true): it is a doctest of this crate.
#[doc(hidden)]
#[cfg(all(doctest, feature = "sqlite"))]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
