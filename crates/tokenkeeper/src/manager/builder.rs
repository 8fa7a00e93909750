//! [`TokenManagerBuilder`]: the store, the clock, the policy, the HTTP client, encryption
//! and where unsaved tokens go, checked once at `build`.

use std::sync::Arc;

use tokenkeeper_core::{Clock, SystemClock, TokenStore};

use super::engine::{Engine, EngineParts};
use super::unsaved::{self, UnsavedRestore, UnsavedTokens};
use super::{RefreshPolicy, TokenManager};
use crate::oauth::OAuthClient;
use crate::oauth::{ConfigError, ConsumerConfig};

/// Configures a [`TokenManager`].
pub struct TokenManagerBuilder {
    consumer: ConsumerConfig,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    policy: RefreshPolicy,
    http: Option<reqwest::Client>,
    event_capacity: usize,
    unsaved: Option<unsaved::UnsavedSink>,
    unsaved_dir: Option<std::path::PathBuf>,
    seal: unsaved::Seal,
    #[cfg(feature = "__sim")]
    transport: Option<Arc<dyn crate::oauth::TokenTransport>>,
}

impl std::fmt::Debug for TokenManagerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManagerBuilder")
            .field("consumer", &self.consumer)
            .field("store", &self.store)
            .field("policy", &self.policy)
            .field("event_capacity", &self.event_capacity)
            .field("on_unsaved_tokens", &self.unsaved.is_some())
            .field("unsaved_tokens_dir", &self.unsaved_dir)
            .finish_non_exhaustive()
    }
}

impl TokenManagerBuilder {
    /// The defaults: the consumer's policy, the system clock, a new HTTP client, and the
    /// store's own place for unsaved tokens.
    pub(super) fn new(consumer: ConsumerConfig, store: Arc<dyn TokenStore>) -> Self {
        Self {
            policy: RefreshPolicy::for_consumer(&consumer),
            consumer,
            store,
            clock: Arc::new(SystemClock),
            http: None,
            event_capacity: 1024,
            unsaved: None,
            unsaved_dir: None,
            seal: unsaved::Seal::None,
            #[cfg(feature = "__sim")]
            transport: None,
        }
    }

    /// The clock (default: the system clock). Tests use a [`tokenkeeper_core::ManualClock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Adjusts the refresh policy, starting from the consumer's defaults
    /// ([`RefreshPolicy::for_consumer`]); `build` validates the result. The one way to set
    /// policy values.
    pub fn tune(mut self, f: impl FnOnce(&mut RefreshPolicy)) -> Self {
        f(&mut self.policy);
        self
    }

    /// Seals every token before it reaches the store (feature `encryption`): a leaked
    /// database or Redis dump holds no usable token. Every process sharing the store needs the
    /// same keyring.
    /// The same keyring seals the files of the default unsaved-tokens sink.
    ///
    /// A token found unsealed in the store is refused (`StoreError::Corrupt`, naming the
    /// installation): see [`Sealed`](tokenkeeper_core::sealed::Sealed) for what sealing
    /// protects against and what it does not.
    #[cfg(feature = "encryption")]
    pub fn encryption(mut self, keyring: tokenkeeper_core::sealed::Keyring) -> Self {
        self.seal = unsaved::Seal::Keyring(Arc::new(keyring.clone()));
        self.store = Arc::new(tokenkeeper_core::sealed::Sealed::new(self.store, keyring));
        self
    }

    /// [`encryption`](Self::encryption) for the migration of a store written before
    /// encryption was enabled: plaintext tokens are served (and sealed by the next write)
    /// instead of refused. Run `Sealed::reseal` over the store, then build without this:
    /// while it is on, anyone able to write to the store can plant a token.
    #[cfg(feature = "encryption")]
    pub fn encryption_migrating_plaintext(
        mut self,
        keyring: tokenkeeper_core::sealed::Keyring,
    ) -> Self {
        self.seal = unsaved::Seal::Keyring(Arc::new(keyring.clone()));
        self.store = Arc::new(
            tokenkeeper_core::sealed::Sealed::new(self.store, keyring)
                .allow_plaintext_migration(true),
        );
        self
    }

    /// Uses an existing `reqwest::Client` for API calls (`send_authorized`). Token requests
    /// keep tokenkeeper's own client (no redirects, no retries, hard deadline), whatever this
    /// client does: see [`OAuthClient::with_http_client`].
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// Not a stable API: token requests go through `transport` instead of the network (the
    /// deterministic simulator in `tests/simulation`; feature `__sim`).
    #[doc(hidden)]
    #[cfg(feature = "__sim")]
    pub fn token_transport(mut self, transport: Arc<dyn crate::oauth::TokenTransport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The directory where rotated tokens the store would not take are written, one file
    /// each (created owner-only, files 0600, sealed with the [`encryption`](Self::encryption)
    /// keyring when there is one). It must survive restarts (a persistent volume, not `/tmp`)
    /// and be this user's alone: `build` refuses a symbolic link, a directory other users can
    /// enter, one another user owns, or one in a parent other users may rename entries of
    /// (group/world writable without the sticky bit). A manager restores what it finds there when it starts
    /// ([`TokenManager::restore_unsaved_files`]).
    ///
    /// Without it (and without [`on_unsaved_tokens`](Self::on_unsaved_tokens)) the store
    /// decides: SQLite keeps them in `<database>.unsaved` beside its file, the memory store in
    /// memory; a network store (Redis, PostgreSQL) has no durable place to offer, so `build`
    /// asks for one.
    pub fn unsaved_tokens_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.unsaved_dir = Some(dir.into());
        self
    }

    /// Where rotated tokens go when the store will not take them within
    /// `RefreshPolicy::result_write_patience`, instead of a directory. Without it they are
    /// written to a file of their own in [`unsaved_tokens_dir`](Self::unsaved_tokens_dir) (or
    /// the directory the store offers: SQLite's `<database>.unsaved`; the memory store holds
    /// them in memory), sealed with the [`encryption`](Self::encryption) keyring when there is
    /// one, logged at error level, and restored by the next manager that starts there
    /// ([`TokenManager::restore_unsaved_files`]). The callback runs on Tokio's blocking pool.
    /// A custom sink keeps
    /// them its own way (they are the installation's only live refresh token) and gives them
    /// back with [`TokenManager::restore_unsaved`].
    pub fn on_unsaved_tokens(
        mut self,
        sink: impl Fn(UnsavedTokens) + Send + Sync + 'static,
    ) -> Self {
        self.unsaved = Some(Arc::new(sink));
        self
    }

    /// How many lifecycle events a slow subscriber may lag behind (default 1024).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Validates the policy against the consumer and builds the manager.
    ///
    /// # Errors
    ///
    /// [`ConfigError::OutOfRange`] naming the policy field that breaks a rule
    /// ([`RefreshPolicy::validate`]), and [`ConfigError::HttpClient`] if the TLS backend
    /// cannot be initialised.
    pub fn build(self) -> Result<TokenManager, ConfigError> {
        self.policy.validate(&self.consumer)?;
        let unsaved = unsaved::Place::choose(
            self.unsaved,
            self.unsaved_dir,
            self.store.unsaved_tokens_home(),
        )?;
        #[cfg_attr(not(feature = "__sim"), allow(unused_mut))]
        let mut client = match self.http {
            Some(http) => OAuthClient::with_http_client(self.consumer, self.clock.clone(), http)?,
            None => OAuthClient::new(self.consumer, self.clock.clone())?,
        };
        #[cfg(feature = "__sim")]
        if let Some(transport) = self.transport {
            client = client.with_token_transport(transport);
        }
        let engine = Engine::new(EngineParts {
            client,
            store: self.store,
            clock: self.clock,
            policy: self.policy,
            unsaved,
            seal: self.seal,
            event_capacity: self.event_capacity,
        });
        let manager = TokenManager {
            engine: Arc::new(engine),
        };
        restore_at_start(&manager);
        Ok(manager)
    }
}

/// What an earlier process left in the unsaved-tokens directory is put back now, when a
/// runtime is there to do it; flights wait for it before taking a lease (their stored token
/// may be the retired one).
fn restore_at_start(manager: &TokenManager) {
    if !manager.engine.unsaved.has_files() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    manager.engine.restored.send_replace(false);
    let m = manager.clone();
    runtime.spawn(async move {
        if let Ok(report) = m.restore_unsaved_files().await
            && report != UnsavedRestore::default()
        {
            tracing::warn!(?report, "restored what the unsaved-tokens directory held");
        }
    });
}
