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

mod cache;
mod claim;
mod decide;
mod events;
mod explain;
mod fleet;
mod flight;
mod guard;
mod install;
mod lease;
mod metrics;
mod plan;
mod policy;
mod refresh;
mod refresher;
mod restore;
mod retry;
mod unsaved;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use tokenkeeper_core::{
    AccessToken, CasOutcome, Clock, ErrorDetail, Event, InstallationId, Record, State, SystemClock,
    Timestamp, TokenStore,
};
use tokio::sync::broadcast;

/// The refresh protocol's pure decision steps, for the model checker (`tokenkeeper-model`).
#[doc(hidden)]
pub use decide::{
    Context as DecideContext, Decision, Mode, decide, refresh_token_deadline, rejection_reason,
    unpresentable,
};
pub use events::{LocalEvent, LocalEventKind};
pub use explain::{Explanation, Health};
pub use fleet::{EventStream, EventsError};
pub use guard::MassRejectionGuard;
pub use plan::{Failure, Plan, Rules, plan_failure, retired_past_leeway};
pub use policy::RefreshPolicy;
pub use refresher::{RefresherConfig, RefresherCounts, RefresherHandle};
pub use retry::is_own_write;
pub use unsaved::{UnsavedFileError, UnsavedRestore, UnsavedTokens};

use cache::Cache;
use flight::Flights;

use crate::error::Error;
use crate::oauth::client::{OAuthClient, Revocation};
use crate::oauth::config::{ConfigError, ConsumerConfig};

/// The engine every clone of a [`TokenManager`] shares: the OAuth client, the store, the
/// clock, the policy, the cache, the flights in progress and the consumer breaker.
pub(crate) struct Engine {
    pub(crate) client: OAuthClient,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) policy: RefreshPolicy,
    pub(crate) cache: Cache,
    pub(crate) flights: Flights,
    pub(crate) events: broadcast::Sender<LocalEvent>,
    pub(crate) process_tag: String,
    pub(crate) flight_seq: AtomicU64,
    /// This manager's consumer as recorded in its installations (`profile/client_id`).
    pub(crate) consumer: String,
    /// `consumer` as the metrics label (shared, so recording allocates nothing).
    pub(crate) consumer_label: Arc<str>,
    pub(crate) in_flight: unsaved::InFlight,
    pub(crate) unsaved: unsaved::Place,
    pub(crate) seal: unsaved::Seal,
    breaker: Mutex<Option<(Timestamp, ErrorDetail)>>,
    /// Installations this process holds back after a malformed request (see `hold_back`).
    holds: Mutex<std::collections::HashMap<InstallationId, (Timestamp, ErrorDetail)>>,
    pub(crate) guard: guard::Guard,
    /// This process's lapsed leases under which nothing rotated.
    pub(crate) quiet_leases: lease::QuietLeases,
    /// False while the startup restore of unsaved tokens runs.
    pub(crate) restored: tokio::sync::watch::Sender<bool>,
    /// The cache's event watcher, once started (`fleet::ensure_watch`).
    pub(crate) watch: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Permits for rotating refreshes in flight (`RefreshPolicy::max_rotations_in_flight`),
    /// when the provider rotates without a reuse leeway.
    pub(crate) rotations: Option<Arc<tokio::sync::Semaphore>>,
    /// Set when the unsaved-tokens place may hold something to put back (see `restore.rs`).
    pub(crate) unsaved_waiting: std::sync::atomic::AtomicBool,
    /// One restore of the unsaved-tokens place at a time.
    pub(crate) restoring: tokio::sync::Mutex<()>,
    /// What the last restore could not land (those installations' flights are refused).
    pub(crate) unsaved_kept: Mutex<restore::KeptResults>,
}

impl Engine {
    /// Waits (at most 30 s) for the startup restore of unsaved tokens, if one runs.
    pub(crate) async fn restore_done(&self) {
        let mut done = self.restored.subscribe();
        let wait = std::time::Duration::from_secs(30);
        let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
    }

    pub(crate) fn emit(&self, id: &InstallationId, kind: LocalEventKind) {
        match &kind {
            LocalEventKind::Backoff { cause, .. } => metrics::backoff(&self.consumer_label, *cause),
            LocalEventKind::ReauthorizationRequired { reason, .. } => {
                metrics::reauthorization(&self.consumer_label, *reason)
            }
            _ => {}
        }
        let _ = self.events.send(LocalEvent {
            installation: id.clone(),
            at: self.clock.now(),
            kind,
        });
    }

    /// The consumer breaker, or this installation's hold in this process, while open.
    pub(crate) fn breaker_open(
        &self,
        id: &InstallationId,
        now: Timestamp,
    ) -> Option<(Timestamp, ErrorDetail)> {
        let consumer = self
            .breaker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|(until, _)| now < *until);
        consumer.or_else(|| {
            let holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
            holds.get(id).filter(|(until, _)| now < *until).cloned()
        })
    }

    /// Holds installation `id` back in this process until `until` (a malformed request).
    pub(crate) fn hold_back(&self, id: &InstallationId, until: Timestamp, detail: ErrorDetail) {
        let now = self.clock.now();
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        if holds.len() >= 4096 {
            holds.retain(|_, (u, _)| *u > now);
        }
        holds.insert(id.clone(), (until, detail));
    }

    pub(crate) fn trip_breaker(&self, until: Timestamp, detail: ErrorDetail) {
        metrics::breaker_trip(&self.consumer_label);
        *self.breaker.lock().unwrap_or_else(PoisonError::into_inner) = Some((until, detail));
    }

    /// Refuses a record that belongs to another consumer.
    pub(crate) fn owns(&self, record: &Record) -> Result<(), Error> {
        if record.consumer() == self.consumer {
            return Ok(());
        }
        Err(Error::ForeignConsumer {
            id: record.id().clone(),
            owner: record.consumer().to_owned(),
            this: self.consumer.clone(),
        })
    }

    /// The stored record of `id`: `NotFound` when there is none. A read the store could not
    /// answer is tried twice more (50 ms, then 200 ms later): the first command on a
    /// connection the server dropped (a restart, a failover) fails while it reconnects.
    pub(crate) async fn load(&self, id: &InstallationId) -> Result<Record, Error> {
        let mut retries = [50u64, 200].into_iter();
        loop {
            match self.store.get(id).await {
                Ok(Some(record)) => return Ok(record),
                Ok(None) => return Err(Error::NotFound { id: id.clone() }),
                Err(tokenkeeper_core::StoreError::Unavailable { .. })
                    if let Some(ms) = retries.next() =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(Error::store(id, e)),
            }
        }
    }

    /// Applies `change` to the stored record by compare-and-swap, re-reading and re-applying
    /// on conflicts, and returns the written record. `change` may end the loop with an error
    /// (e.g. the record is already in the target state).
    pub(crate) async fn update(
        &self,
        id: &InstallationId,
        mut change: impl FnMut(&Record, Timestamp) -> Result<Record, Error>,
    ) -> Result<Record, Error> {
        let mut current = self.load(id).await?;
        loop {
            let next = change(&current, self.clock.now())?;
            match self.store.compare_and_swap(&next, current.version()).await {
                Ok(CasOutcome::Swapped) => return Ok(next),
                Ok(CasOutcome::Conflict(stored)) => current = *stored,
                Ok(CasOutcome::Missing) => return Err(Error::NotFound { id: id.clone() }),
                Err(e) => return Err(Error::store(id, e)),
            }
        }
    }
}

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
    /// deterministic simulator in `tests/simulation`).
    #[doc(hidden)]
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
        let policy = self.policy;
        policy.validate(&self.consumer)?;
        let unsaved = unsaved::Place::choose(
            self.unsaved,
            self.unsaved_dir,
            self.store.unsaved_tokens_home(),
        )?;
        let mut client = match self.http {
            Some(http) => OAuthClient::with_http_client(self.consumer, self.clock.clone(), http)?,
            None => OAuthClient::new(self.consumer, self.clock.clone())?,
        };
        if let Some(transport) = self.transport {
            client = client.with_token_transport(transport);
        }
        let consumer = crate::oauth::authorize::consumer_name(&client);
        let mut tag = [0u8; 4];
        let _ = getrandom::fill(&mut tag);
        let process_tag = format!(
            "{}-{:02x}{:02x}{:02x}{:02x}",
            std::process::id(),
            tag[0],
            tag[1],
            tag[2],
            tag[3]
        );
        let (events, _) = broadcast::channel(self.event_capacity);
        let cache = Cache::new(policy.cache_capacity, policy.cache_revalidate);
        let rotation = client.consumer().profile().rotation;
        let rotations = policy
            .max_rotations_in_flight
            .filter(|_| rotation.rotates() && rotation.reuse_leeway().is_none())
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        let manager = TokenManager {
            engine: Arc::new(Engine {
                client,
                store: self.store,
                clock: self.clock,
                policy,
                cache,
                flights: Flights::default(),
                events,
                process_tag,
                flight_seq: AtomicU64::new(0),
                consumer_label: Arc::from(consumer.as_str()),
                consumer,
                in_flight: unsaved::InFlight::default(),
                unsaved,
                seal: self.seal,
                breaker: Mutex::new(None),
                holds: Mutex::default(),
                guard: guard::Guard::default(),
                quiet_leases: lease::QuietLeases::default(),
                restored: tokio::sync::watch::Sender::new(true),
                watch: tokio::sync::Mutex::new(None),
                rotations,
                unsaved_waiting: std::sync::atomic::AtomicBool::new(false),
                restoring: tokio::sync::Mutex::new(()),
                unsaved_kept: Mutex::default(),
            }),
        };
        // What an earlier process left in the unsaved-tokens directory is put back now;
        // flights wait for it before taking a lease (their stored token may be the retired one).
        if manager.engine.unsaved.has_files()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
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
        Ok(manager)
    }
}

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
        TokenManagerBuilder {
            policy: RefreshPolicy::for_consumer(&consumer),
            consumer,
            store,
            clock: Arc::new(SystemClock),
            http: None,
            event_capacity: 1024,
            unsaved: None,
            unsaved_dir: None,
            seal: unsaved::Seal::None,
            transport: None,
        }
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
            metrics::cache(&self.engine.consumer_label, true);
            return Ok(token);
        }
        metrics::cache(&self.engine.consumer_label, false);
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
                flight::Joined::Follower(rx) => rx,
                flight::Joined::Leader(landing, rx) => {
                    let (engine, flight_id) = (self.engine.clone(), id.clone());
                    flight::Detachable::new(async move {
                        // A flight that ended between this caller's cache miss and its join
                        // may have cached a fresh token: no second store read for it.
                        let cached = matches!(mode, Mode::OnDemand)
                            .then(|| engine.cache.fresh(&flight_id, engine.clock.now()))
                            .flatten();
                        let outcome = match cached {
                            Some(token) => Ok(token),
                            None => {
                                fleet::ensure_watch(&engine).await;
                                refresh::run(&engine, &flight_id, &mode).await
                            }
                        };
                        landing.land(outcome);
                    })
                    .await;
                    rx
                }
            };
            flight::wait(id, rx).await
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
    ///     tokenkeeper::Revocation::Revoked => println!("revoked here and at the provider"),
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
    /// # -> Result<(), tokenkeeper::ConfigError> {
    /// let kept = Arc::new(Mutex::new(Vec::new()));
    /// let manager = tokenkeeper::TokenManager::builder(consumer, store)
    ///     .on_unsaved_tokens({
    ///         let kept = kept.clone();
    ///         move |unsaved| kept.lock().unwrap().push(unsaved)
    ///     })
    ///     .build()?;
    /// // Later, once the store works again:
    /// # async fn later(manager: tokenkeeper::TokenManager, kept: Arc<Mutex<Vec<tokenkeeper::UnsavedTokens>>>) {
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
    /// so a deploy never abandons rotated tokens between the provider's reply and the store.
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
