//! The provider's state and rules, with no HTTP in sight: consumers, grants, tokens, codes,
//! the provider clock, counters, and the grant/refresh/revoke logic of each profile.
//!
//! Every completed authorization is a new grant with its own token family; refreshing one never
//! touches another. The HTTP layer (`http.rs`) parses requests into calls on [`Provider`] and
//! serializes what it returns.
//!
//! This file holds the provider's state ([`Provider`], its consumers and the grant, token
//! and code records it keeps), its clock, the token endpoint's dispatch, the revocation and
//! resource endpoints, and the consumer administration. The authorization-code flow (the
//! authorize request, its redirect and PKCE checks, the code exchange) is in `authorize.rs`;
//! the bookkeeping of grants and tokens (issuing, the refresh grant with its rotation and
//! reuse rules, revoking a grant) in `grants.rs`; the counters a test asserts on in
//! `counters.rs`.

mod authorize;
mod counters;
mod grants;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::faults::FaultPlan;
use crate::profile::{ErrorBody, MockProfile, Rules, ScopeField};

pub use authorize::{AuthorizeError, AuthorizeRequest, CODE_TTL, DEFAULT_ACCOUNT, s256_challenge};
pub use counters::{Counters, GrantCounters, RevokedBy, Totals};

use authorize::CodeInfo;

/// A registered OAuth consumer (client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerSpec {
    /// The client id (Bitbucket: the consumer "key").
    pub client_id: String,
    /// The client secret.
    pub client_secret: String,
    /// Redirect URIs must start with this.
    pub redirect_prefix: String,
    /// The scopes the consumer is configured with; every grant gets these.
    pub scopes: Vec<String>,
}

impl ConsumerSpec {
    /// A consumer with redirect prefix `http://127.0.0.1` and scopes `repository account`.
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            redirect_prefix: "http://127.0.0.1".into(),
            scopes: vec!["repository".into(), "account".into()],
        }
    }

    /// Sets the redirect URI prefix.
    pub fn redirect_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.redirect_prefix = prefix.into();
        self
    }

    /// Sets the configured scopes.
    pub fn scopes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, scopes: I) -> Self {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }
}

#[derive(Debug)]
struct Grant {
    /// The user who approved it.
    account: String,
    scopes: Vec<String>,
    created: Duration,
    counters: GrantCounters,
    access_tokens: Vec<String>,
}

#[derive(Debug)]
struct AccessInfo {
    grant: Option<u64>,
    consumer: String,
    expires: Duration,
    dead: bool,
}

#[derive(Debug, Clone, Copy)]
enum RefreshStatus {
    Live,
    Retired { at: Duration },
}

#[derive(Debug)]
struct RefreshInfo {
    grant: u64,
    last_used: Duration,
    status: RefreshStatus,
    /// The access token issued together with it (GitHub kills it when this one is used).
    access: String,
}

/// The outcome of a resource request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceOutcome {
    /// The token is good: the grant id.
    Ok(Option<u64>),
    /// The token expired.
    Expired,
    /// The token is unknown or revoked.
    Invalid,
}

/// Where the provider's "now" comes from: the system clock, or a function (a simulator's
/// virtual clock).
#[derive(Clone, Default)]
pub struct TimeSource(pub(crate) Option<std::sync::Arc<dyn Fn() -> SystemTime + Send + Sync>>);

impl std::fmt::Debug for TimeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "TimeSource(custom)"
        } else {
            "TimeSource(system)"
        })
    }
}

/// The provider.
#[derive(Debug)]
pub struct Provider {
    pub(crate) profile: MockProfile,
    pub(crate) rules: Rules,
    consumers: BTreeMap<String, ConsumerSpec>,
    grants: Vec<Grant>,
    access: HashMap<String, AccessInfo>,
    refresh: HashMap<String, RefreshInfo>,
    codes: HashMap<String, CodeInfo>,
    offset: Duration,
    /// Where "now" comes from (default: the system clock), before the offset.
    pub(crate) time: TimeSource,
    pub(crate) rng: fastrand::Rng,
    pub(crate) faults: FaultPlan,
    pub(crate) totals: Totals,
    serial: u64,
    /// The bearer token the admin API requires, random per run (never from the seed).
    pub(crate) admin_token: String,
    /// Its issuer identifier (its base URL, once bound): the `iss` of its ID tokens.
    pub(crate) issuer: String,
    /// Whether `GET /authorize` shows a consent page instead of approving at once.
    pub(crate) consent_page: bool,
}

impl Provider {
    pub(crate) fn new(
        profile: MockProfile,
        rules: Rules,
        consumers: Vec<ConsumerSpec>,
        seed: u64,
    ) -> Self {
        Self {
            profile,
            rules,
            consumers: consumers
                .into_iter()
                .map(|c| (c.client_id.clone(), c))
                .collect(),
            grants: Vec::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            codes: HashMap::new(),
            offset: Duration::ZERO,
            time: TimeSource::default(),
            rng: fastrand::Rng::with_seed(seed),
            faults: FaultPlan::default(),
            totals: Totals::default(),
            serial: 0,
            admin_token: random_token(),
            issuer: String::new(),
            consent_page: false,
        }
    }

    /// The provider's clock: its time source (the system clock by default) plus everything
    /// `advance` added.
    pub(crate) fn now(&self) -> Duration {
        let base = match &self.time.0 {
            Some(source) => source(),
            None => SystemTime::now(),
        };
        base.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.offset)
    }

    pub(crate) fn advance(&mut self, by: Duration) {
        self.offset = self.offset.saturating_add(by);
    }

    pub(crate) fn now_system(&self) -> SystemTime {
        UNIX_EPOCH + self.now()
    }

    fn token(&mut self, prefix: &str) -> String {
        self.serial += 1;
        format!(
            "{prefix}{:016x}{:016x}{:x}",
            self.rng.u64(..),
            self.rng.u64(..),
            self.serial
        )
    }

    /// Changes a consumer's scopes: every grant it issued is revoked, as Bitbucket does.
    pub(crate) fn set_scopes(&mut self, client_id: &str, scopes: Vec<String>) -> Option<usize> {
        let consumer = self.consumers.get_mut(client_id)?;
        consumer.scopes = scopes;
        let ids: Vec<u64> = self
            .grants
            .iter()
            .enumerate()
            .filter(|(_, g)| g.counters.consumer == client_id && g.counters.revoked.is_none())
            .map(|(i, _)| i as u64)
            .collect();
        for id in &ids {
            self.revoke_grant(*id, RevokedBy::ScopeChange);
        }
        Some(ids.len())
    }

    pub(crate) fn rotate_secret(&mut self, client_id: &str, secret: String) -> bool {
        match self.consumers.get_mut(client_id) {
            Some(c) => {
                c.client_secret = secret;
                true
            }
            None => false,
        }
    }

    /// Authenticates the client: HTTP Basic or body fields.
    fn authenticate(
        &mut self,
        params: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<String, ErrorBody> {
        let (id, secret) = match basic {
            Some(pair) => pair,
            None => match (params.get("client_id"), params.get("client_secret")) {
                (Some(id), Some(secret)) => (id.clone(), secret.clone()),
                _ => {
                    self.totals.client_auth_failures += 1;
                    return Err(self.rules.errors.bad_client.clone());
                }
            },
        };
        match self.consumers.get(&id) {
            Some(c) if c.client_secret == secret => Ok(id),
            _ => {
                self.totals.client_auth_failures += 1;
                Err(self.rules.errors.bad_client.clone())
            }
        }
    }

    /// The token endpoint.
    pub(crate) fn token_request(
        &mut self,
        params: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<Map<String, Value>, ErrorBody> {
        self.totals.token_calls += 1;
        let Some(grant_type) = params.get("grant_type").cloned() else {
            return Err(self.rules.errors.unsupported_grant.clone());
        };
        let consumer = self.authenticate(params, basic)?;
        match grant_type.as_str() {
            "authorization_code" => self.exchange_code(&consumer, params),
            "refresh_token" => self.refresh(&consumer, params),
            "client_credentials" => {
                self.totals.client_credentials += 1;
                let access = self.issue_access(None, &consumer);
                let scopes = self
                    .consumers
                    .get(&consumer)
                    .map(|c| c.scopes.clone())
                    .unwrap_or_default();
                Ok(self.success(&access, None, &scopes, "client_credentials"))
            }
            _ => Err(self.rules.errors.unsupported_grant.clone()),
        }
    }

    fn success(
        &self,
        access: &str,
        refresh: Option<&str>,
        scopes: &[String],
        grant_type: &str,
    ) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("access_token".into(), json!(access));
        let scope_text = scopes.join(" ");
        match self.rules.scope_field {
            ScopeField::Scopes => body.insert("scopes".into(), json!(scope_text)),
            ScopeField::Scope => body.insert("scope".into(), json!(scope_text)),
        };
        body.insert("expires_in".into(), json!(self.rules.access_ttl.as_secs()));
        body.insert("token_type".into(), json!(self.rules.token_type));
        if self.rules.grant_type_in_state {
            body.insert("state".into(), json!(grant_type));
        }
        if let Some(refresh) = refresh {
            body.insert("refresh_token".into(), json!(refresh));
            if self.rules.refresh_expires_in_field
                && let Some(limit) = self
                    .rules
                    .refresh_inactivity
                    .or(self.rules.refresh_absolute)
            {
                body.insert("refresh_token_expires_in".into(), json!(limit.as_secs()));
            }
        }
        body
    }

    /// RFC 7009: revoking a refresh token revokes its grant; an access token only itself.
    /// Unknown tokens are not an error.
    pub(crate) fn revoke_token(
        &mut self,
        params: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<(), ErrorBody> {
        self.totals.revocations += 1;
        self.authenticate(params, basic)?;
        let Some(token) = params.get("token") else {
            return Ok(());
        };
        if let Some(info) = self.refresh.get(token) {
            let retired = matches!(info.status, RefreshStatus::Retired { .. });
            let grant = info.grant;
            if !retired || self.rules.retired_revocation_revokes_grant {
                self.revoke_grant(grant, RevokedBy::Client);
            }
        } else if let Some(a) = self.access.get_mut(token) {
            a.dead = true;
        }
        Ok(())
    }

    /// Checks a bearer token for the resource endpoint.
    /// The account that approved grant `grant`.
    pub(crate) fn account_of(&self, grant: u64) -> Option<String> {
        self.grants.get(grant as usize).map(|g| g.account.clone())
    }

    pub(crate) fn check_access(&mut self, token: Option<&str>) -> ResourceOutcome {
        self.totals.resource_calls += 1;
        let now = self.now();
        let outcome = match token.and_then(|t| self.access.get(t)) {
            None => ResourceOutcome::Invalid,
            Some(a) if a.dead => ResourceOutcome::Invalid,
            Some(a)
                if a.grant
                    .and_then(|g| self.grants.get(g as usize))
                    .is_some_and(|g| g.counters.revoked.is_some()) =>
            {
                ResourceOutcome::Invalid
            }
            Some(a) if a.expires <= now => ResourceOutcome::Expired,
            Some(a) if !self.consumers.contains_key(&a.consumer) => ResourceOutcome::Invalid,
            Some(a) => ResourceOutcome::Ok(a.grant),
        };
        if !matches!(outcome, ResourceOutcome::Ok(_)) {
            self.totals.resource_unauthorized += 1;
        }
        outcome
    }
}

/// 32 random bytes from the operating system, hex: a per-run admin token an attacker who knows
/// the seed cannot guess.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: the admin API stays closed (no token matches an empty one).
        return String::new();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
