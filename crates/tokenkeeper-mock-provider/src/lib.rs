//! # tokenkeeper-mock-provider
//!
//! A faithful local OAuth 2.0 provider for tests, examples and benchmarks. It plays Bitbucket
//! Cloud (legacy and rotating), Atlassian 3LO, GitHub App and Google behaviours
//! ([`MockProfile`]), including their exact error bodies, and injects the faults real providers
//! and networks produce ([`Fault`]): 5xx with HTML or JSON bodies, 429 with `Retry-After`,
//! latency, resets, malformed or oversized bodies, a 200 carrying an error, missing fields and
//! **commit-then-drop** (the refresh token is rotated, then the reply is lost).
//!
//! It listens on `127.0.0.1:0` by default so tests never collide, and counts everything per
//! grant ([`Counters`]) so a test can assert "exactly one refresh per installation" and "zero
//! reuse detections".
//!
//! **A test double, not a stable API**: its types and behaviours change whenever tokenkeeper's
//! tests need them to, in any release. Never expose it beyond loopback.
//!
//! ```
//! use tokenkeeper_mock_provider::{MockProvider, MockProfile};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let mock = MockProvider::builder().profile(MockProfile::Bitbucket).start().await?;
//! // Each completed authorization is a new, independent grant.
//! let code = mock.authorize_code("tokenkeeper-test-key", None, None).unwrap();
//! assert!(code.starts_with("code_"));
//! println!("token endpoint: {}", mock.token_url());
//! assert_eq!(mock.counters().totals.authorize_calls, 1);
//! # Ok(())
//! # }
//! ```
//!
//! Endpoints (same paths for every profile): `GET /site/oauth2/authorize`,
//! `POST /site/oauth2/access_token`, `POST /site/oauth2/revoke`, `GET /2.0/user`, and the
//! loopback-only admin API under `/admin` (`POST /admin/consumers/{id}/scopes`,
//! `POST /admin/consumers/{id}/secret`, `POST /admin/grants/revoke`, `GET /admin/clock`,
//! `POST /admin/clock/advance`, `GET|PUT /admin/faults`, `GET /admin/counters`,
//! `POST /admin/counters/reset`).

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

mod admin;
mod faults;
mod http;
mod profile;
mod provider;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::{Endpoint, Fault, FaultPlan, FaultRule, Trigger};
pub use http::paths;
pub use profile::{
    ErrorBody, Errors, MockProfile, RotationRule, Rules, ScopeField, UnknownProfile,
};
pub use provider::{
    AuthorizeError, AuthorizeRequest, CODE_TTL, ConsumerSpec, Counters, DEFAULT_ACCOUNT,
    GrantCounters, RevokedBy, Totals, s256_challenge,
};

use http::Shared;
use provider::Provider;

/// The client id of the consumer a builder registers when given none.
pub const DEFAULT_CLIENT_ID: &str = "tokenkeeper-test-key";
/// Its client secret.
pub const DEFAULT_CLIENT_SECRET: &str = "tokenkeeper-test-secret";

/// Configures and starts a [`MockProvider`].
#[derive(Debug, Clone)]
pub struct MockProviderBuilder {
    profile: MockProfile,
    consumers: Vec<ConsumerSpec>,
    seed: u64,
    addr: SocketAddr,
    access_ttl: Option<Duration>,
    refresh_inactivity: Option<Option<Duration>>,
    leeway: Option<Option<Duration>>,
    retired_revocation: Option<bool>,
    time: provider::TimeSource,
    insecure_public: bool,
    consent_page: bool,
}

impl Default for MockProviderBuilder {
    fn default() -> Self {
        Self {
            profile: MockProfile::default(),
            consumers: Vec::new(),
            seed: 0x70ce_11ee_9e1e,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            access_ttl: None,
            refresh_inactivity: None,
            leeway: None,
            retired_revocation: None,
            time: provider::TimeSource::default(),
            insecure_public: false,
            consent_page: false,
        }
    }
}

impl MockProviderBuilder {
    /// The behaviour to play (default: [`MockProfile::Bitbucket`]).
    pub fn profile(mut self, profile: MockProfile) -> Self {
        self.profile = profile;
        self
    }

    /// Registers a consumer. Without any, one with [`DEFAULT_CLIENT_ID`] /
    /// [`DEFAULT_CLIENT_SECRET`] is registered.
    pub fn consumer(mut self, consumer: ConsumerSpec) -> Self {
        self.consumers.push(consumer);
        self
    }

    /// Seeds the random generator (tokens and probabilistic faults), for replayable runs.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Where to listen (default `127.0.0.1:0`, a free port).
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Overrides the profile's access token lifetime (e.g. 60 s test servers).
    pub fn access_ttl(mut self, ttl: Duration) -> Self {
        self.access_ttl = Some(ttl);
        self
    }

    /// Overrides how long an unused refresh token lives (`None`: forever).
    pub fn refresh_inactivity(mut self, limit: Option<Duration>) -> Self {
        self.refresh_inactivity = Some(limit);
        self
    }

    /// Overrides the reuse leeway of a rotating profile.
    pub fn reuse_leeway(mut self, leeway: Option<Duration>) -> Self {
        self.leeway = Some(leeway);
        self
    }

    /// Whether revoking a retired refresh token revokes its grant (default true); `false`
    /// plays a provider for which a retired token is merely invalid.
    pub fn retired_revocation_revokes_grant(mut self, revokes: bool) -> Self {
        self.retired_revocation = Some(revokes);
        self
    }

    /// The rules the provider will play, with overrides applied.
    pub fn rules(&self) -> Rules {
        let mut rules = self.profile.rules();
        if let Some(revokes) = self.retired_revocation {
            rules.retired_revocation_revokes_grant = revokes;
        }
        if let Some(ttl) = self.access_ttl {
            rules.access_ttl = ttl;
        }
        if let Some(limit) = self.refresh_inactivity {
            rules.refresh_inactivity = limit;
        }
        if let (Some(new), RotationRule::Rotate { leeway, .. }) = (self.leeway, &mut rules.rotation)
        {
            *leeway = new;
        }
        rules
    }

    /// Takes "now" from `source` instead of the system clock (a simulator's virtual clock);
    /// `advance` still adds to it.
    pub fn time_source(mut self, source: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.time = provider::TimeSource(Some(std::sync::Arc::new(source)));
        self
    }

    fn shared(self) -> Shared {
        let rules = self.rules();
        let mut consumers = self.consumers;
        if consumers.is_empty() {
            consumers.push(ConsumerSpec::new(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET));
        }
        let mut provider = Provider::new(self.profile, rules, consumers, self.seed);
        provider.time = self.time;
        provider.consent_page = self.consent_page;
        Shared::new(provider)
    }

    /// A provider that serves no socket: requests reach it through [`MockProvider::handle`]
    /// (a simulator's in-process network).
    pub fn in_process(self) -> MockProvider {
        let addr = self.addr;
        MockProvider {
            addr,
            shared: self.shared(),
            shutdown: None,
            task: None,
        }
    }

    /// Shows a consent page at the authorization endpoint (an "Approve" button, and the
    /// account to approve as) instead of approving at once: for browser tests and demos.
    pub fn consent_page(mut self, show: bool) -> Self {
        self.consent_page = show;
        self
    }

    /// Allows a bind to an address other people can reach. The mock approves every
    /// authorization without a login and issues predictable tokens from its seed: never do
    /// this where real users or real credentials are.
    pub fn insecure_public(mut self, allow: bool) -> Self {
        self.insecure_public = allow;
        self
    }

    /// Binds the listener and starts serving on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// The bind's error; `PermissionDenied` for an address that is not loopback unless
    /// [`insecure_public`](Self::insecure_public) allows it.
    pub async fn start(self) -> std::io::Result<MockProvider> {
        let addr = self.addr;
        if !addr.ip().to_canonical().is_loopback() && !self.insecure_public {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the mock provider is a test double (it approves every authorization and its tokens are predictable); it binds loopback only, and {addr} is not: allow it explicitly with --insecure-public (MockProviderBuilder::insecure_public) if you must"
                ),
            ));
        }
        let shared = self.shared();
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        shared.lock().issuer = format!("http://{addr}");
        let app = http::router(shared.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(e) = server.await {
                tracing::error!(error = %e, "mock provider stopped with an error");
            }
        });
        Ok(MockProvider {
            addr,
            shared,
            shutdown: Some(tx),
            task: Some(task),
        })
    }
}

/// A running mock provider. Dropping it stops the server.
#[derive(Debug)]
pub struct MockProvider {
    addr: SocketAddr,
    shared: Shared,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockProvider {
    /// A builder with the defaults.
    pub fn builder() -> MockProviderBuilder {
        MockProviderBuilder::default()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its issuer identifier, the `iss` of its ID tokens: its base URL.
    pub fn issuer(&self) -> String {
        self.base_url()
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The authorization endpoint.
    pub fn authorize_url(&self) -> String {
        format!("{}{}", self.base_url(), paths::AUTHORIZE)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}{}", self.base_url(), paths::TOKEN)
    }

    /// The RFC 7009 revocation endpoint.
    pub fn revoke_url(&self) -> String {
        format!("{}{}", self.base_url(), paths::REVOKE)
    }

    /// The resource endpoint (`GET /2.0/user`).
    pub fn resource_url(&self) -> String {
        format!("{}{}", self.base_url(), paths::RESOURCE)
    }

    /// The admin API root.
    pub fn admin_url(&self) -> String {
        format!("{}{}", self.base_url(), paths::ADMIN)
    }

    /// The per-run token the admin API requires (`Authorization: Bearer`).
    pub fn admin_token(&self) -> String {
        self.shared.lock().admin_token.clone()
    }

    /// The profile it plays.
    pub fn profile(&self) -> MockProfile {
        self.shared.lock().profile
    }

    /// The rules it plays.
    pub fn rules(&self) -> Rules {
        self.shared.lock().rules.clone()
    }

    /// Serves one request in process, without a socket (the token and revocation endpoints).
    pub async fn handle(
        &self,
        request: axum::http::Request<axum::body::Body>,
    ) -> axum::http::Response<axum::body::Body> {
        use tower::ServiceExt;
        match http::router(self.shared.clone()).oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.shared.lock().counters()
    }

    /// Zeroes the counters.
    pub fn reset_counters(&self) {
        self.shared.lock().reset_counters();
    }

    /// The provider's clock.
    pub fn now(&self) -> SystemTime {
        self.shared.lock().now_system()
    }

    /// Moves the provider's clock forward.
    pub fn advance(&self, by: Duration) {
        self.shared.lock().advance(by);
    }

    /// Replaces the fault plan.
    pub fn set_faults(&self, rules: Vec<FaultRule>) {
        self.shared.lock().faults = FaultPlan(rules);
    }

    /// Changes a consumer's scopes, revoking every grant it issued; returns how many.
    pub fn set_consumer_scopes(&self, client_id: &str, scopes: &[&str]) -> Option<usize> {
        self.shared
            .lock()
            .set_scopes(client_id, scopes.iter().map(|s| (*s).to_owned()).collect())
    }

    /// Changes a consumer's client secret.
    pub fn rotate_client_secret(&self, client_id: &str, secret: &str) -> bool {
        self.shared
            .lock()
            .rotate_secret(client_id, secret.to_owned())
    }

    /// Revokes the grant a token belongs to; returns the grant id.
    pub fn revoke_grant_of(&self, token: &str) -> Option<u64> {
        let mut p = self.shared.lock();
        let grant = p.grant_of(token)?;
        p.revoke_grant(grant, RevokedBy::Admin).then_some(grant)
    }

    /// The grant id a token belongs to.
    pub fn grant_of(&self, token: &str) -> Option<u64> {
        self.shared.lock().grant_of(token)
    }

    /// Runs an auto-approved authorization without HTTP and returns the code, for benches and
    /// examples that need many grants quickly. `challenge` is `(code_challenge, method)`.
    pub fn authorize_code(
        &self,
        client_id: &str,
        redirect_uri: Option<&str>,
        challenge: Option<(&str, &str)>,
    ) -> Result<String, AuthorizeError> {
        self.authorize_code_as(DEFAULT_ACCOUNT, client_id, redirect_uri, challenge)
    }

    /// [`authorize_code`](Self::authorize_code), approved by `account` (whose id the identity
    /// endpoint and ID tokens then report).
    pub fn authorize_code_as(
        &self,
        account: &str,
        client_id: &str,
        redirect_uri: Option<&str>,
        challenge: Option<(&str, &str)>,
    ) -> Result<String, AuthorizeError> {
        let req = AuthorizeRequest {
            account: Some(account.to_owned()),
            client_id: Some(client_id.to_owned()),
            response_type: Some("code".into()),
            redirect_uri: redirect_uri.map(str::to_owned),
            state: None,
            code_challenge: challenge.map(|c| c.0.to_owned()),
            code_challenge_method: challenge.map(|c| c.1.to_owned()),
        };
        self.shared.lock().authorize(&req).map(|(_, code)| code)
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
