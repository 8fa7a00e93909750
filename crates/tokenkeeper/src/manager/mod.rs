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
mod error;
mod events;
mod explain;
mod flight;
mod policy;
mod refresh;
mod refresher;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use tokenkeeper_core::{
    AccessToken, CasOutcome, Clock, ErrorDetail, Event, InstallationId, Record, State, SystemClock,
    Timestamp, TokenSet, TokenStore,
};
use tokio::sync::broadcast;

pub use error::Error;
pub use events::{LifecycleEvent, LifecycleEventKind};
pub use explain::Explanation;
pub use policy::RefreshPolicy;
pub use refresher::{RefresherConfig, RefresherHandle, RefresherStats};

use cache::Cache;
use flight::Flights;
use refresh::Mode;

use crate::authorization::{AuthorizationRequest, consumer_name};
use crate::client::{OAuthClient, Revocation};
use crate::config::{ConfigError, ConsumerConfig};

pub(crate) struct Inner {
    pub(crate) client: OAuthClient,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) policy: RefreshPolicy,
    pub(crate) cache: Cache,
    pub(crate) flights: Flights,
    pub(crate) events: broadcast::Sender<LifecycleEvent>,
    pub(crate) process_tag: String,
    pub(crate) flight_seq: AtomicU64,
    breaker: Mutex<Option<(Timestamp, ErrorDetail)>>,
}

impl Inner {
    pub(crate) fn emit(&self, id: &InstallationId, kind: LifecycleEventKind) {
        let _ = self.events.send(LifecycleEvent {
            installation: id.clone(),
            at: self.clock.now(),
            kind,
        });
    }

    pub(crate) fn breaker_open(&self, now: Timestamp) -> Option<(Timestamp, ErrorDetail)> {
        self.breaker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|(until, _)| now < *until)
    }

    pub(crate) fn trip_breaker(&self, until: Timestamp, detail: ErrorDetail) {
        *self.breaker.lock().unwrap_or_else(PoisonError::into_inner) = Some((until, detail));
    }
}

/// Configures a [`TokenManager`].
pub struct TokenManagerBuilder {
    consumer: ConsumerConfig,
    store: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    policy: Option<RefreshPolicy>,
    http: Option<reqwest::Client>,
    event_capacity: usize,
}

impl TokenManagerBuilder {
    /// The clock (default: the system clock). Tests use a [`tokenkeeper_core::ManualClock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Replaces the refresh policy (start from [`RefreshPolicy::for_consumer`]).
    pub fn policy(mut self, policy: RefreshPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Adjusts the default policy.
    pub fn tune(mut self, f: impl FnOnce(&mut RefreshPolicy)) -> Self {
        let mut policy = self
            .policy
            .take()
            .unwrap_or_else(|| RefreshPolicy::for_consumer(&self.consumer));
        f(&mut policy);
        self.policy = Some(policy);
        self
    }

    /// Seals every token before it reaches the store (feature `encryption`): a leaked
    /// database or Redis dump holds no usable token. Every process sharing the store needs the
    /// same keyring.
    #[cfg(feature = "encryption")]
    pub fn encryption(mut self, keyring: tokenkeeper_core::sealed::Keyring) -> Self {
        self.store = Arc::new(tokenkeeper_core::sealed::Sealed::new(self.store, keyring));
        self
    }

    /// Uses an existing `reqwest::Client` for the provider and API calls.
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// How many lifecycle events a slow subscriber may lag behind (default 1024).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Validates the policy against the consumer and builds the manager.
    pub fn build(self) -> Result<TokenManager, ConfigError> {
        let policy = self
            .policy
            .unwrap_or_else(|| RefreshPolicy::for_consumer(&self.consumer));
        policy.validate(&self.consumer)?;
        let client = match self.http {
            Some(http) => OAuthClient::with_http_client(self.consumer, self.clock.clone(), http),
            None => OAuthClient::new(self.consumer, self.clock.clone())?,
        };
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
        Ok(TokenManager {
            inner: Arc::new(Inner {
                client,
                store: self.store,
                clock: self.clock,
                policy,
                cache: Cache::default(),
                flights: Flights::default(),
                events,
                process_tag,
                flight_seq: AtomicU64::new(0),
                breaker: Mutex::new(None),
            }),
        })
    }
}

/// Keeps every installation of one consumer supplied with valid tokens. Cheap to clone.
#[derive(Clone)]
pub struct TokenManager {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("consumer", self.inner.client.consumer())
            .field("store", &self.inner.store)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl TokenManager {
    /// A builder for `consumer`'s installations kept in `store`.
    pub fn builder(consumer: ConsumerConfig, store: impl TokenStore) -> TokenManagerBuilder {
        Self::builder_shared(consumer, Arc::new(store))
    }

    /// A builder over a store shared with other code.
    pub fn builder_shared(
        consumer: ConsumerConfig,
        store: Arc<dyn TokenStore>,
    ) -> TokenManagerBuilder {
        TokenManagerBuilder {
            consumer,
            store,
            clock: Arc::new(SystemClock),
            policy: None,
            http: None,
            event_capacity: 1024,
        }
    }

    /// The OAuth client.
    pub fn client(&self) -> &OAuthClient {
        &self.inner.client
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.inner.store
    }

    /// The policy in force.
    pub fn policy(&self) -> &RefreshPolicy {
        &self.inner.policy
    }

    /// A valid access token for `id`. From the in-process cache when fresh (no store I/O);
    /// otherwise through one refresh flight per installation.
    pub async fn access_token(&self, id: &InstallationId) -> Result<AccessToken, Error> {
        if let Some(token) = self.cached_token(id) {
            return Ok(token);
        }
        self.refresh(id, Mode::OnDemand).await
    }

    /// The cached access token, if it is still fresh: the synchronous hot path of
    /// [`TokenManager::access_token`], without ever refreshing.
    pub fn cached_token(&self, id: &InstallationId) -> Option<AccessToken> {
        self.inner.cache.fresh(id, self.inner.clock.now())
    }

    /// Refreshes now, unless another caller already replaced the current access token.
    pub async fn force_refresh(&self, id: &InstallationId) -> Result<AccessToken, Error> {
        let current = match self.inner.store.get(id).await {
            Ok(Some(r)) => r.tokens().access_token.clone(),
            Ok(None) => return Err(Error::NotFound { id: id.clone() }),
            Err(e) => return Err(Error::store(id, e)),
        };
        self.refresh_rejected(id, current).await
    }

    /// Refreshes because the API rejected `rejected`; a flight already in progress may
    /// answer with that same token, so a second, forced flight follows in that case.
    async fn refresh_rejected(
        &self,
        id: &InstallationId,
        rejected: AccessToken,
    ) -> Result<AccessToken, Error> {
        self.inner.cache.remove(id);
        for _ in 0..2 {
            let token = self
                .refresh(
                    id,
                    Mode::Forced {
                        rejected: rejected.clone(),
                    },
                )
                .await?;
            if token != rejected {
                return Ok(token);
            }
        }
        self.refresh(id, Mode::Forced { rejected }).await
    }

    /// Forgets the cached token (call after the API answered 401); the next `access_token`
    /// re-reads the store.
    pub fn invalidate(&self, id: &InstallationId) {
        self.inner.cache.remove(id);
    }

    /// Joins (or leads) the installation's flight. The leader drives the refresh inline; if
    /// it is dropped, the refresh finishes in a spawned task, so a dropped caller cancels
    /// nothing.
    pub(crate) async fn refresh(
        &self,
        id: &InstallationId,
        mode: Mode,
    ) -> Result<AccessToken, Error> {
        let rx = match self.inner.flights.join(id) {
            flight::Joined::Follower(rx) => rx,
            flight::Joined::Leader(landing, rx) => {
                let (inner, flight_id) = (self.inner.clone(), id.clone());
                flight::Detachable::new(async move {
                    let outcome = refresh::run(&inner, &flight_id, &mode).await;
                    landing.land(outcome);
                })
                .await;
                rx
            }
        };
        flight::wait(id, rx).await
    }

    /// Sends `request` with the installation's bearer token; on a 401 refreshes once (unless
    /// another caller already did) and retries once. Requests with a streaming body cannot be
    /// retried and return the 401.
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
        let fresh = self.refresh_rejected(id, token).await?;
        retry.bearer_auth(fresh.secret()).send().await.map_err(http)
    }

    /// Begins an authorization (a new installation, or `Some(id)` to re-authorize one).
    pub fn begin_authorization(
        &self,
        installation: Option<InstallationId>,
    ) -> Result<AuthorizationRequest, Error> {
        self.inner
            .client
            .begin_authorization(installation)
            .map_err(|e| Error::Authorization(Arc::new(e)))
    }

    /// Completes an authorization from the provider's callback (`code`, `state`).
    pub async fn complete_authorization(
        &self,
        code: &str,
        state: &str,
    ) -> Result<InstallationId, Error> {
        let done = self
            .inner
            .client
            .complete_authorization(&*self.inner.store, code, state)
            .await
            .map_err(|e| Error::Authorization(Arc::new(e)))?;
        self.inner.cache.remove(&done.installation);
        self.inner
            .emit(&done.installation, LifecycleEventKind::Authorized);
        Ok(done.installation)
    }

    /// Adopts a token pair obtained elsewhere (migrating existing installations), without a
    /// provider call.
    pub async fn import_installation(
        &self,
        id: InstallationId,
        tokens: TokenSet,
    ) -> Result<(), Error> {
        let invalid = |reason: &str| Error::InvalidImport {
            id: id.clone(),
            reason: reason.to_owned(),
        };
        if tokens.access_token.secret().is_empty() {
            return Err(invalid("the access token is empty"));
        }
        if tokens
            .refresh_token
            .as_ref()
            .is_some_and(|r| r.secret().is_empty())
        {
            return Err(invalid(
                "the refresh token is empty (pass None if there is none)",
            ));
        }
        if tokens.expires_at < tokens.obtained_at {
            return Err(invalid("expires_at is before obtained_at"));
        }
        let now = self.inner.clock.now();
        let refresh_at = self.inner.policy.refresh_at(&tokens, now);
        let record = Record::new(
            id.clone(),
            consumer_name(&self.inner.client),
            tokens,
            refresh_at,
            now,
        );
        match self.inner.store.create(&record).await {
            Ok(()) => {
                self.inner.emit(&id, LifecycleEventKind::Imported);
                Ok(())
            }
            Err(e) => Err(Error::store(&id, e)),
        }
    }

    /// Revokes an installation: marked `Revoked` in the store first (so nothing uses it), then
    /// its refresh token is revoked at the provider when the profile has an endpoint. A
    /// provider failure is returned; the installation stays revoked.
    pub async fn revoke(&self, id: &InstallationId) -> Result<Revocation, Error> {
        let revoked = loop {
            let current = match self.inner.store.get(id).await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(Error::NotFound { id: id.clone() }),
                Err(e) => return Err(Error::store(id, e)),
            };
            if let State::Revoked { at } = current.state() {
                return Err(Error::Revoked {
                    id: id.clone(),
                    at: *at,
                });
            }
            let now = self.inner.clock.now();
            let next = current
                .apply(Event::Revoked, now)
                .map_err(|e| Error::Internal {
                    id: id.clone(),
                    reason: e.to_string(),
                })?;
            match self
                .inner
                .store
                .compare_and_swap(&next, current.version())
                .await
            {
                Ok(CasOutcome::Swapped) => break next,
                Ok(CasOutcome::Conflict(_)) => continue,
                Ok(CasOutcome::Missing) => return Err(Error::NotFound { id: id.clone() }),
                Err(e) => return Err(Error::store(id, e)),
            }
        };
        self.inner.cache.remove(id);
        self.inner.emit(id, LifecycleEventKind::Revoked);
        let tokens = revoked.tokens();
        let (token, hint) = match &tokens.refresh_token {
            Some(r) => (r.secret(), "refresh_token"),
            None => (tokens.access_token.secret(), "access_token"),
        };
        self.inner
            .client
            .revoke(Some(id), token, hint)
            .await
            .map_err(|e| Error::Provider {
                id: id.clone(),
                source: Arc::new(e),
            })
    }

    /// What tokenkeeper knows about `id` and what to do about it.
    pub async fn explain(&self, id: &InstallationId) -> Result<Explanation, Error> {
        match self.inner.store.get(id).await {
            Ok(Some(record)) => Ok(Explanation::of(&record, self.inner.clock.now())),
            Ok(None) => Err(Error::NotFound { id: id.clone() }),
            Err(e) => Err(Error::store(id, e)),
        }
    }

    /// Lifecycle events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.inner.events.subscribe()
    }

    /// Starts the background refresher with the default pacing.
    pub fn spawn_refresher(&self) -> RefresherHandle {
        self.spawn_refresher_with(RefresherConfig::default())
    }

    /// Starts the background refresher.
    pub fn spawn_refresher_with(&self, config: RefresherConfig) -> RefresherHandle {
        refresher::spawn(self.clone(), config)
    }

    /// How many installations have a usable token cached in this process.
    pub fn cached_installations(&self) -> usize {
        self.inner.cache.len()
    }
}
