//! `TokenManager`: the refresh engine. Always a valid token for an installation, one refresh
//! per installation across the whole fleet, rotated tokens written before they are used, and a
//! recorded reason for every state change.
//!
//! ```
//! use tokenkeeper::{ConsumerConfig, TokenManager, profiles, stores::MemoryStore};
//!
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let consumer = ConsumerConfig::builder(profiles::bitbucket())
//!     .client_id("key")
//!     .client_secret("secret")
//!     .redirect_uri("https://app.example.com/oauth/callback")
//!     .build()?;
//! let manager = TokenManager::builder(consumer, MemoryStore::new()).build()?;
//! # let _ = manager;
//! # Ok(())
//! # }
//! ```

mod builder;
mod cache;
mod engine;
mod events;
mod explain;
mod flight;
mod install;
mod metrics;
mod policy;
mod refresher;
mod unsaved;

use std::sync::Arc;

use tokenkeeper_core::{AccessToken, Event, InstallationId, State, TokenStore};
use tokio::sync::broadcast;

pub use events::{EventStream, EventsError};
pub use events::{LocalEvent, LocalEventKind};
pub use explain::{Explanation, Health};
pub use flight::decide::Mode;
/// The refresh protocol's pure decision steps, for the model checker (`tokenkeeper-model`,
/// feature `__model`).
#[cfg(feature = "__model")]
pub use flight::decide::{
    Context as DecideContext, Decision, decide, refresh_token_deadline, rejection_reason,
    unpresentable,
};
pub use flight::guard::MassRejectionGuard;
#[cfg(feature = "__model")]
pub use flight::plan::{Failure, Plan, Rules, plan_failure, retired_past_leeway};
#[cfg(feature = "__model")]
pub use flight::retry::is_own_write;
#[cfg(feature = "__model")]
pub use flight::writes::{
    ResultConflict, ResultWrite, Safeguard, SettleConflict, holds_own_lease, may_send,
    settle_conflict, settle_next, silent, switch_off,
};
pub use install::InstallError;
pub use policy::RefreshPolicy;
pub use refresher::{RefresherConfig, RefresherCounts, RefresherHandle};
pub use unsaved::{UnsavedFileError, UnsavedRestore, UnsavedTokens};

pub use builder::TokenManagerBuilder;
pub(crate) use engine::Engine;
use flight::single;

use crate::error::Error;
use crate::oauth::ConsumerConfig;
use crate::oauth::{OAuthClient, Revocation};

/// Keeps every installation of one consumer supplied with valid tokens. Cheap to clone.
///
/// The one type most applications use: build it over a store, send users through
/// [`begin_authorization`](Self::begin_authorization) and
/// [`complete_authorization`](Self::complete_authorization), then call
/// [`access_token`](Self::access_token) (or [`send_authorized`](Self::send_authorized))
/// whenever you call the provider's API, and run [`spawn_refresher`](Self::spawn_refresher)
/// in the background. [`explain`](Self::explain) says what state an installation is in and
/// what to do about it.
#[derive(Clone)]
pub struct TokenManager {
    pub(crate) engine: Arc<Engine>,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("consumer", self.engine.client.consumer())
            .field("store", &self.engine.store)
            .field("policy", &self.engine.policy)
            .finish_non_exhaustive()
    }
}

impl TokenManager {
    /// A builder for `consumer`'s installations kept in `store`.
    pub fn builder(consumer: ConsumerConfig, store: impl TokenStore) -> TokenManagerBuilder {
        Self::builder_shared(consumer, Arc::new(store))
    }

    /// A builder over a store shared with other code (an `Arc` you keep a clone of).
    pub fn builder_shared(
        consumer: ConsumerConfig,
        store: Arc<dyn TokenStore>,
    ) -> TokenManagerBuilder {
        TokenManagerBuilder::new(consumer, store)
    }

    /// The OAuth client (the consumer's configuration, the shared HTTP client).
    pub fn client(&self) -> &OAuthClient {
        &self.engine.client
    }

    /// The store the installations live in.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.engine.store
    }

    /// The refresh policy in force.
    pub fn policy(&self) -> &RefreshPolicy {
        &self.engine.policy
    }

    /// A valid access token for `id`. From the in-process cache when fresh (no store I/O);
    /// otherwise through one refresh flight per installation (one per fleet, through the
    /// store's lease).
    ///
    /// # Errors
    ///
    /// - [`Error::NotFound`]: no such installation in the store.
    /// - [`Error::ReauthorizationRequired`] / [`Error::Revoked`]: only a new authorization
    ///   helps; the reason says why.
    /// - [`Error::TemporarilyUnavailable`]: the refresh failed temporarily and the token has
    ///   expired; a retry is scheduled.
    /// - [`Error::ConsumerCredentials`] / [`Error::Configuration`]: the consumer's credentials
    ///   or the provider profile are wrong; the installation's tokens are kept.
    /// - [`Error::Busy`]: another process holds the refresh lease longer than `peer_wait`, or
    ///   this process's own refresh takes longer than `caller_wait` (it goes on).
    /// - [`Error::Store`]: the store failed.
    /// - [`Error::LeaseLost`]: the record changed under this process's lease before it
    ///   recorded a failure (a takeover, a revocation, a re-authorization).
    /// - [`Error::ShuttingDown`]: [`shutdown`](Self::shutdown) was called and a refresh was
    ///   needed.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(manager: tokenkeeper::TokenManager, id: tokenkeeper::InstallationId)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// match manager.access_token(&id).await {
    ///     Ok(token) => println!("call the API with a token of {} bytes", token.secret().len()),
    ///     Err(e) if e.needs_reauthorization() => println!("ask the user to install again: {e}"),
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn access_token(&self, id: &InstallationId) -> Result<AccessToken, Error> {
        if let Some(token) = self.cached_token(id) {
            self.engine.cache_counters.count(true);
            return Ok(token);
        }
        self.engine.cache_counters.count(false);
        self.refresh(id, Mode::OnDemand).await
    }

    /// The cached access token, if it is still fresh: the synchronous hot path of
    /// [`TokenManager::access_token`], without ever refreshing.
    pub fn cached_token(&self, id: &InstallationId) -> Option<AccessToken> {
        self.engine.cache.fresh(id, self.engine.clock.now())
    }

    /// Refreshes now, unless another caller already replaced the current access token.
    ///
    /// # Errors
    ///
    /// As [`access_token`](Self::access_token).
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(manager: tokenkeeper::TokenManager, id: tokenkeeper::InstallationId)
    /// # -> Result<(), tokenkeeper::Error> {
    /// // The consumer's scopes changed on the provider's side: get tokens with the new scopes.
    /// let token = manager.force_refresh(&id).await?;
    /// # let _ = token;
    /// # Ok(()) }
    /// ```
    pub async fn force_refresh(&self, id: &InstallationId) -> Result<AccessToken, Error> {
        let current = self.engine.load(id).await?.tokens().access_token.clone();
        self.refresh_rejected(id, current, false).await
    }

    /// Refreshes because `rejected` must be replaced (the API refused it when
    /// `unauthorized`); a flight already in progress may answer with that same token, so a
    /// second, forced flight follows in that case.
    async fn refresh_rejected(
        &self,
        id: &InstallationId,
        rejected: AccessToken,
        unauthorized: bool,
    ) -> Result<AccessToken, Error> {
        self.engine.cache.forget(id, None);
        let forced = || Mode::Forced {
            rejected: rejected.clone(),
            unauthorized,
        };
        for _ in 0..2 {
            let token = self.refresh(id, forced()).await?;
            if token != rejected {
                return Ok(token);
            }
        }
        self.refresh(id, forced()).await
    }

    /// Forgets the cached token (call after the API answered 401); the next `access_token`
    /// re-reads the store.
    pub fn invalidate(&self, id: &InstallationId) {
        self.engine.cache.forget(id, None);
    }

    /// Joins (or leads) the installation's flight, for at most `RefreshPolicy::caller_wait`.
    /// The leader drives the refresh inline; if it is dropped (or gives up), the refresh
    /// finishes in a spawned task, so a caller that stops waiting cancels nothing.
    pub(crate) async fn refresh(
        &self,
        id: &InstallationId,
        mode: Mode,
    ) -> Result<AccessToken, Error> {
        let flight = async {
            let rx = match self.engine.flights.join(id) {
                single::Joined::Follower(rx) => rx,
                single::Joined::Leader(landing, rx) => {
                    let (engine, flight_id) = (self.engine.clone(), id.clone());
                    single::Detachable::new(async move {
                        // A flight that ended between this caller's cache miss and its join
                        // may have cached a fresh token: no second store read for it.
                        let cached = matches!(mode, Mode::OnDemand)
                            .then(|| engine.cache.fresh(&flight_id, engine.clock.now()))
                            .flatten();
                        let outcome = match cached {
                            Some(token) => Ok(token),
                            None => {
                                events::ensure_watch(&engine).await;
                                flight::run(&engine, &flight_id, &mode).await
                            }
                        };
                        landing.land(outcome);
                    })
                    .await;
                    rx
                }
            };
            single::wait(id, rx).await
        };
        // A caller waits at most `caller_wait`; a leader that gives up hands the flight to a
        // task (Detachable), so the refresh still lands for the next caller.
        let waited = self.engine.policy.caller_wait;
        tokio::time::timeout(waited, flight)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Busy {
                    id: id.clone(),
                    holder: format!("this process ({})", self.engine.process_tag),
                    waited,
                })
            })
    }

    /// Sends `request` with the installation's bearer token; on a 401 refreshes once (unless
    /// another caller already did) and retries once. Requests with a streaming body cannot be
    /// retried and return the 401.
    ///
    /// # Errors
    ///
    /// As [`access_token`](Self::access_token), and [`Error::Http`] when the request itself
    /// fails (its URL removed from the error). An HTTP error status is not an error: the
    /// response is returned.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(manager: tokenkeeper::TokenManager, id: tokenkeeper::InstallationId)
    /// # -> Result<(), tokenkeeper::Error> {
    /// let request = manager.client().http().get("https://api.bitbucket.org/2.0/user");
    /// let response = manager.send_authorized(&id, request).await?;
    /// println!("HTTP {}", response.status());
    /// # Ok(()) }
    /// ```
    pub async fn send_authorized(
        &self,
        id: &InstallationId,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let token = self.access_token(id).await?;
        let retry = request.try_clone();
        let http = |e: reqwest::Error| Error::Http {
            id: id.clone(),
            source: Arc::new(e.without_url()),
        };
        let response = request
            .bearer_auth(token.secret())
            .send()
            .await
            .map_err(http)?;
        if response.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(retry) = retry else {
            return Ok(response);
        };
        tracing::info!(installation = %id, "the API rejected the access token; refreshing once");
        let fresh = self.refresh_rejected(id, token, true).await?;
        retry.bearer_auth(fresh.secret()).send().await.map_err(http)
    }

    /// Revokes an installation: marked `Revoked` in the store first (so nothing uses it), then
    /// its refresh token is revoked at the provider when the profile has an endpoint. A
    /// provider failure is returned; the installation stays revoked.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`], [`Error::Revoked`] (already revoked), [`Error::Store`], and
    /// [`Error::Provider`] when the provider's revocation endpoint failed (the installation is
    /// revoked here all the same).
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(manager: tokenkeeper::TokenManager, id: tokenkeeper::InstallationId)
    /// # -> Result<(), tokenkeeper::Error> {
    /// // The customer uninstalled the app.
    /// match manager.revoke(&id).await? {
    ///     tokenkeeper::oauth::Revocation::Revoked => println!("revoked here and at the provider"),
    ///     _ => println!("revoked here; the provider has no revocation endpoint"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn revoke(&self, id: &InstallationId) -> Result<Revocation, Error> {
        let revoked = self
            .engine
            .update(id, |current, now| {
                self.engine.owns(current)?;
                if let State::Revoked { at } = current.state() {
                    return Err(Error::Revoked {
                        id: id.clone(),
                        at: *at,
                    });
                }
                current
                    .apply(Event::Revoked, now)
                    .map_err(|e| Error::transition(id, e))
            })
            .await?;
        self.engine.cache.forget(id, Some(&revoked));
        self.engine.emit(id, LocalEventKind::Revoked);
        self.engine
            .client
            .revoke_tokens(Some(id), revoked.tokens())
            .await
            .map_err(|e| Error::Provider {
                id: id.clone(),
                source: Arc::new(e),
            })
    }

    /// What tokenkeeper knows about `id` and what to do about it: the state with its reason,
    /// a plain-language summary, a machine-readable [`Health`], and the recent history.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`], [`Error::ForeignConsumer`] and [`Error::Store`].
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(manager: tokenkeeper::TokenManager, id: tokenkeeper::InstallationId)
    /// # -> Result<(), tokenkeeper::Error> {
    /// let explained = manager.explain(&id).await?;
    /// if let Some(reason) = explained.reauthorization_reason() {
    ///     println!("email the customer: {}", reason.describe());
    /// }
    /// println!("{explained}"); // state, summary, tokens' metadata, recent history
    /// # Ok(()) }
    /// ```
    pub async fn explain(&self, id: &InstallationId) -> Result<Explanation, Error> {
        let record = self.engine.load(id).await?;
        // Another consumer's record is not judged by this consumer's policy and profile.
        self.engine.owns(&record)?;
        let now = self.engine.clock.now();
        Ok(Explanation::of(
            &record,
            now,
            &self.engine.policy,
            self.engine.client.consumer().profile(),
        )
        .with_breaker(self.engine.breaker_open(id, now)))
    }

    /// Lifecycle events of this process from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LocalEvent> {
        self.engine.events.subscribe()
    }

    /// Starts the background refresher with the default pacing.
    pub fn spawn_refresher(&self) -> RefresherHandle {
        self.spawn_refresher_with(RefresherConfig::default())
    }

    /// Starts the background refresher.
    pub fn spawn_refresher_with(&self, config: RefresherConfig) -> RefresherHandle {
        refresher::spawn(self.clone(), config)
    }

    /// Puts back tokens an earlier flight handed to the unsaved-tokens sink: they land while
    /// the stored record still holds the refresh token that flight presented (no peer has
    /// rotated since), reviving it if a peer condemned it on that token.
    ///
    /// # Errors
    ///
    /// [`Error::Transition`] when the stored record no longer holds that refresh token (a peer
    /// refreshed or the installation was re-authorized since: these tokens are obsolete),
    /// [`Error::NotFound`] and [`Error::Store`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// # fn build(consumer: tokenkeeper::ConsumerConfig, store: tokenkeeper::stores::MemoryStore)
    /// # -> Result<(), tokenkeeper::oauth::ConfigError> {
    /// let kept = Arc::new(Mutex::new(Vec::new()));
    /// let manager = tokenkeeper::TokenManager::builder(consumer, store)
    ///     .on_unsaved_tokens({
    ///         let kept = kept.clone();
    ///         move |unsaved| kept.lock().unwrap().push(unsaved)
    ///     })
    ///     .build()?;
    /// // Later, once the store works again:
    /// # async fn later(manager: tokenkeeper::TokenManager, kept: Arc<Mutex<Vec<tokenkeeper::unsaved::UnsavedTokens>>>) {
    /// for unsaved in kept.lock().unwrap().drain(..).collect::<Vec<_>>() {
    ///     if let Err(e) = manager.restore_unsaved(unsaved).await {
    ///         eprintln!("{e}");
    ///     }
    /// }
    /// # }
    /// # let _ = manager;
    /// # Ok(()) }
    /// ```
    pub async fn restore_unsaved(&self, unsaved: UnsavedTokens) -> Result<(), Error> {
        self.engine.restore_one(unsaved).await
    }

    /// Puts back tokens the default unsaved-tokens sink wrote to `path` (opening it with the
    /// encryption keyring when it is sealed); see [`restore_unsaved`](Self::restore_unsaved).
    /// [`restore_unsaved_files`](Self::restore_unsaved_files) does this for every file of the
    /// manager's directory and deletes what it restored.
    ///
    /// # Errors
    ///
    /// [`Error::UnsavedFile`] when the file cannot be read or opened, and the errors of
    /// [`restore_unsaved`](Self::restore_unsaved).
    pub async fn restore_unsaved_file(
        &self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<(), Error> {
        let unsaved = unsaved::read_file(path.as_ref(), &self.engine.seal)
            .map_err(|e| Error::UnsavedFile(Arc::new(e)))?;
        self.restore_unsaved(unsaved).await
    }

    /// Puts back every result the unsaved-tokens place holds (the files of its directory, or
    /// what an ephemeral store's manager held in memory), oldest first, deletes each file that
    /// landed, and moves the obsolete ones (the installation holds other tokens: newer ones,
    /// a new grant, a revocation) to the directory's `obsolete/` folder. A manager does this by
    /// itself when it is built inside a Tokio runtime, and again before a flight presents a
    /// refresh token whenever the place holds something (so a result held through a store
    /// outage lands before the retired token could be presented); calling it is optional. Files that cannot be read with this manager's keyring,
    /// and results the store would not take yet, are kept and counted.
    ///
    /// # Errors
    ///
    /// None so far: every failure is counted in [`UnsavedRestore::kept`] and logged (a
    /// result whose installation this store does not hold is kept too: the directory may
    /// serve several stores).
    pub async fn restore_unsaved_files(&self) -> Result<UnsavedRestore, Error> {
        Ok(self.engine.restore_all().await)
    }

    /// Stops starting refreshes and waits for every refresh in progress to record its result,
    /// so a deploy never abandons rotated tokens between the provider's reply and the store;
    /// likewise for authorization callbacks exchanging their code (one that arrives later is
    /// refused with `InstallError::ShuttingDown`, its code unspent).
    /// A store write that fails meanwhile is retried for `RefreshPolicy::shutdown_grace`
    /// (default 5 s, a store failover) before the tokens go to the unsaved-tokens place.
    /// Call it before the runtime stops (after `RefresherHandle::shutdown`). Afterwards,
    /// calls that would need a refresh fail with [`Error::ShuttingDown`]; cached tokens are
    /// still served.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(manager: tokenkeeper::TokenManager) {
    /// let refresher = manager.spawn_refresher();
    /// // ... serve until the deploy's SIGTERM ...
    /// refresher.shutdown().await;
    /// manager.shutdown().await; // every refresh in flight has recorded its result
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        self.engine.in_flight.drain().await;
    }

    /// How many installations have a usable token cached in this process.
    pub fn cached_installations(&self) -> usize {
        self.engine.cache.len()
    }
}
