//! # tokenkeeper
//!
//! Keeps OAuth 2.0 tokens alive for applications installed many times: one OAuth consumer,
//! many installations, each with its own access/refresh token pair and its own explicit,
//! concurrency-safe lifecycle.
//!
//! This facade crate speaks OAuth to the provider over reqwest ([`OAuthClient`]) and re-exports
//! the storage backends chosen by cargo feature: `memory` (default), `sqlite`, `redis`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tokenkeeper::{ConsumerConfig, OAuthClient, SystemClock, profiles};
//!
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let consumer = ConsumerConfig::builder(profiles::bitbucket())
//!     .client_id("key")
//!     .client_secret(std::env::var("BITBUCKET_SECRET")?)
//!     .redirect_uri("https://app.example.com/oauth/callback")
//!     .build()?;
//! let client = OAuthClient::new(consumer, Arc::new(SystemClock))?;
//! let begun = client.begin_authorization(None)?;
//! println!("send the user to {}", begun.url);
//! # Ok(())
//! # }
//! ```

mod authorization;
mod client;
mod config;
mod error;
mod manager;
mod profile;
mod response;

pub use authorization::{AuthorizationError, AuthorizationRequest, Completed};
pub use client::{OAuthClient, Revocation};
pub use config::{ClientSecret, ConfigError, ConsumerConfig, ConsumerConfigBuilder};
pub use error::{ErrorKind, OAuthError, Operation};
pub use manager::{
    Error, Explanation, LifecycleEvent, LifecycleEventKind, RefreshPolicy, RefresherConfig,
    RefresherHandle, RefresherStats, TokenManager, TokenManagerBuilder,
};
pub use profile::{
    BodyEncoding, ClientAuth, ErrorMap, ErrorRule, ProviderProfile, Rotation, Timing,
};
pub use response::{MAX_LIFETIME, RawResponse, parse_retry_after, parse_token_response};

pub use tokenkeeper_core::{
    AccessToken, BackoffCause, Clock, ErrorDetail, FailureClass, HistoryEntry, InstallationId,
    ListEntry, ListFilter, ManualClock, ReauthReason, Record, RefreshToken, Scopes, State,
    StateKind, StoreError, SystemClock, Timestamp, TokenSet, TokenStore,
};

/// The core crate: the model, the pure state machine and the `TokenStore` contract, for
/// writing your own store.
pub use tokenkeeper_core as core;

/// At-rest encryption (feature `encryption`): seal tokens in any store.
#[cfg(feature = "encryption")]
pub use tokenkeeper_core::sealed::{KeyId, Keyring, ResealReport, SealError, Sealed};

/// Provider presets.
pub mod profiles {
    pub use crate::profile::{atlassian_3lo, bitbucket, bitbucket_legacy, github_app, google};
}

/// The storage backends compiled in by feature.
pub mod stores {
    #[cfg(feature = "memory")]
    pub use tokenkeeper_memory::MemoryStore;
    #[cfg(feature = "redis")]
    pub use tokenkeeper_redis::{RedisStore, RedisStoreBuilder};
    #[cfg(feature = "sqlite")]
    pub use tokenkeeper_sqlite::{SqliteStore, SqliteStoreBuilder};
}

/// The README's code compiles (and stays true): it is a doctest of this crate.
#[cfg(all(doctest, feature = "sqlite"))]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
