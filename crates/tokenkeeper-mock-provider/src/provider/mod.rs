//! The provider's state and rules, with no HTTP in sight: consumers, grants, tokens, codes,
//! the provider clock, counters, and the grant/refresh/revoke logic of each profile.
//!
//! Every completed authorization is a new grant with its own token family; refreshing one never
//! touches another. The HTTP layer (`http.rs`) parses requests into calls on [`Provider`] and
//! serializes what it returns.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::Digest as _;

use crate::faults::FaultPlan;
use crate::profile::{ErrorBody, MockProfile, RotationRule, Rules, ScopeField};

/// How long an authorization code may wait for its exchange.
pub const CODE_TTL: Duration = Duration::from_secs(600);

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

/// Why a grant stopped working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokedBy {
    /// The consumer's scopes changed.
    ScopeChange,
    /// An administrator (the test) revoked it.
    Admin,
    /// RFC 7009 revocation by the client.
    Client,
    /// A retired refresh token was used after the leeway (reuse detection).
    ReuseDetected,
    /// The authorization code it came from was presented again (RFC 6749 §4.1.2).
    CodeReused,
}

/// Counters of one grant (one installation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantCounters {
    /// The consumer it belongs to.
    pub consumer: String,
    /// Refresh requests naming one of its refresh tokens.
    pub refresh_calls: u64,
    /// Successful refreshes.
    pub refreshes: u64,
    /// Successful refreshes that issued a new refresh token.
    pub rotations: u64,
    /// Refused refreshes.
    pub rejected: u64,
    /// Uses of a retired refresh token past the leeway.
    pub reuse_detections: u64,
    /// Uses of a retired refresh token inside the leeway (allowed).
    pub leeway_reuses: u64,
    /// Why it was revoked, if it was.
    pub revoked: Option<RevokedBy>,
}

/// Counters over the whole provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Authorize requests.
    pub authorize_calls: u64,
    /// Token endpoint requests.
    pub token_calls: u64,
    /// Successful code exchanges (= grants created).
    pub code_exchanges: u64,
    /// Attempts to exchange an already-used code.
    pub code_reuses: u64,
    /// Refresh requests.
    pub refresh_calls: u64,
    /// Successful refreshes.
    pub refreshes: u64,
    /// Successful refreshes that rotated the refresh token.
    pub rotations: u64,
    /// Refused refreshes.
    pub rejected_refreshes: u64,
    /// Reuse detections.
    pub reuse_detections: u64,
    /// Allowed reuses inside the leeway.
    pub leeway_reuses: u64,
    /// Requests with wrong or missing client credentials.
    pub client_auth_failures: u64,
    /// Client-credentials grants issued.
    pub client_credentials: u64,
    /// RFC 7009 revocation requests.
    pub revocations: u64,
    /// Resource requests.
    pub resource_calls: u64,
    /// Resource requests refused with 401.
    pub resource_unauthorized: u64,
    /// Faults injected.
    pub faults_injected: u64,
}

/// A snapshot of all counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Provider-wide totals.
    pub totals: Totals,
    /// Per grant, by grant id.
    pub grants: BTreeMap<u64, GrantCounters>,
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

#[derive(Debug)]
struct CodeInfo {
    consumer: String,
    redirect_uri: Option<String>,
    challenge: Option<(String, String)>,
    expires: Duration,
    used: bool,
    /// The user who approved it.
    account: String,
    /// The grant its exchange created (revoked if the code is presented again).
    grant: Option<u64>,
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

/// The authorize request, as parsed.
#[derive(Debug, Clone, Default)]
pub struct AuthorizeRequest {
    /// `client_id`
    pub client_id: Option<String>,
    /// `response_type`
    pub response_type: Option<String>,
    /// `redirect_uri`
    pub redirect_uri: Option<String>,
    /// `state`
    pub state: Option<String>,
    /// `code_challenge`
    pub code_challenge: Option<String>,
    /// `code_challenge_method`
    pub code_challenge_method: Option<String>,
    /// Who approves (the mock's stand-in for a login); [`DEFAULT_ACCOUNT`] when absent.
    pub account: Option<String>,
}

/// The account that approves an authorization when none is named.
pub const DEFAULT_ACCOUNT: &str = "mock-user";

/// Why an authorize request was refused (shown to the user, not redirected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}: {description}")]
pub struct AuthorizeError {
    /// RFC 6749 §4.1.2.1 error code.
    pub error: &'static str,
    /// What is wrong.
    pub description: String,
}

fn authorize_error(error: &'static str, description: impl Into<String>) -> AuthorizeError {
    AuthorizeError {
        error,
        description: description.into(),
    }
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

/// Whether `uri` is under the registered callback `prefix`: the prefix, then the end, or a
/// `/`, `:` (a port), `?` or `#` when the prefix does not end at a separator itself; so
/// `http://127.0.0.1.evil.example/` and `http://127.0.0.1@evil.example/` are not under
/// `http://127.0.0.1`.
fn redirect_allowed(uri: &str, prefix: &str) -> bool {
    let Some(rest) = uri.strip_prefix(prefix) else {
        return false;
    };
    let after_separator = prefix.ends_with(['/', '?', '&']);
    let authority_done = rest.is_empty() || rest.starts_with(['/', ':', '?', '#']);
    let port_ok = !rest.starts_with(':')
        || rest[1..]
            .split(['/', '?', '#'])
            .next()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (after_separator || authority_done) && port_ok && !uri.contains('@')
}

fn is_pkce_text(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// The redirect URI an authorization answers to: the requested one when the consumer's
/// callback URL (`prefix`) allows it, the callback URL when none is requested.
fn checked_redirect(requested: Option<&str>, prefix: &str) -> Result<String, AuthorizeError> {
    match requested {
        Some(uri) if redirect_allowed(uri, prefix) => Ok(uri.to_owned()),
        Some(uri) => Err(authorize_error(
            "invalid_request",
            format!("redirect_uri {uri:?} does not match the consumer's callback URL"),
        )),
        None => Ok(prefix.to_owned()),
    }
}

/// The PKCE challenge and its method (`plain` when unnamed) an authorization request
/// carries, if any; a method without a challenge, an unknown method or a malformed challenge
/// is an error.
fn checked_challenge(
    challenge: Option<&str>,
    method: Option<&str>,
) -> Result<Option<(String, String)>, AuthorizeError> {
    let Some(challenge) = challenge else {
        return match method {
            None => Ok(None),
            Some(_) => Err(authorize_error(
                "invalid_request",
                "code_challenge is missing",
            )),
        };
    };
    let method = method.unwrap_or("plain");
    if !matches!(method, "S256" | "plain") {
        return Err(authorize_error(
            "invalid_request",
            format!("code_challenge_method {method:?} is not supported"),
        ));
    }
    if !is_pkce_text(challenge) {
        return Err(authorize_error(
            "invalid_request",
            "code_challenge is malformed",
        ));
    }
    Ok(Some((challenge.to_owned(), method.to_owned())))
}

/// `BASE64URL(SHA256(verifier))` without padding (RFC 7636 §4.2).
pub fn s256_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
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

    pub(crate) fn counters(&self) -> Counters {
        Counters {
            totals: self.totals.clone(),
            grants: self
                .grants
                .iter()
                .enumerate()
                .map(|(i, g)| (i as u64, g.counters.clone()))
                .collect(),
        }
    }

    /// Zeroes every counter (grants keep their revocation status).
    pub(crate) fn reset_counters(&mut self) {
        self.totals = Totals::default();
        for g in &mut self.grants {
            g.counters = GrantCounters {
                consumer: std::mem::take(&mut g.counters.consumer),
                revoked: g.counters.revoked,
                ..GrantCounters::default()
            };
        }
    }

    /// The grant a token (access or refresh) belongs to.
    pub(crate) fn grant_of(&self, token: &str) -> Option<u64> {
        self.refresh
            .get(token)
            .map(|r| r.grant)
            .or_else(|| self.access.get(token).and_then(|a| a.grant))
    }

    pub(crate) fn revoke_grant(&mut self, grant: u64, by: RevokedBy) -> bool {
        let Some(g) = self.grants.get_mut(grant as usize) else {
            return false;
        };
        if g.counters.revoked.is_none() {
            g.counters.revoked = Some(by);
        }
        for a in &g.access_tokens {
            if let Some(info) = self.access.get_mut(a) {
                info.dead = true;
            }
        }
        true
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

    /// Auto-approves an authorization request and returns the single-use code.
    pub(crate) fn authorize(
        &mut self,
        req: &AuthorizeRequest,
    ) -> Result<(String, String), AuthorizeError> {
        self.totals.authorize_calls += 1;
        let client_id = req
            .client_id
            .as_deref()
            .ok_or_else(|| authorize_error("invalid_request", "client_id is missing"))?;
        let consumer = self.consumers.get(client_id).ok_or_else(|| {
            authorize_error("invalid_client", format!("unknown client_id {client_id:?}"))
        })?;
        let redirect = checked_redirect(req.redirect_uri.as_deref(), &consumer.redirect_prefix)?;
        if req.response_type.as_deref() != Some("code") {
            return Err(authorize_error(
                "unsupported_response_type",
                "response_type must be \"code\"",
            ));
        }
        if let Some(state) = &req.state
            && (state.len() > 2048 || state.chars().any(char::is_control))
        {
            return Err(authorize_error("invalid_request", "state is malformed"));
        }
        let challenge = checked_challenge(
            req.code_challenge.as_deref(),
            req.code_challenge_method.as_deref(),
        )?;
        let code = self.token("code_");
        let expires = self.now() + CODE_TTL;
        self.codes.insert(
            code.clone(),
            CodeInfo {
                consumer: client_id.to_owned(),
                redirect_uri: req.redirect_uri.clone(),
                challenge,
                expires,
                used: false,
                account: req
                    .account
                    .clone()
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| DEFAULT_ACCOUNT.to_owned()),
                grant: None,
            },
        );
        Ok((redirect, code))
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

    fn issue_access(&mut self, grant: Option<u64>, consumer: &str) -> String {
        let access = self.token("at_");
        let expires = self.now() + self.rules.access_ttl;
        self.access.insert(
            access.clone(),
            AccessInfo {
                grant,
                consumer: consumer.to_owned(),
                expires,
                dead: false,
            },
        );
        if let Some(g) = grant.and_then(|g| self.grants.get_mut(g as usize)) {
            g.access_tokens.push(access.clone());
        }
        access
    }

    fn issue_refresh(&mut self, grant: u64, access: &str) -> String {
        let refresh = self.token("rt_");
        let now = self.now();
        self.refresh.insert(
            refresh.clone(),
            RefreshInfo {
                grant,
                last_used: now,
                status: RefreshStatus::Live,
                access: access.to_owned(),
            },
        );
        refresh
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

    fn exchange_code(
        &mut self,
        consumer: &str,
        params: &HashMap<String, String>,
    ) -> Result<Map<String, Value>, ErrorBody> {
        let now = self.now();
        let bad_code = self.rules.errors.bad_code.clone();
        let code = params.get("code").ok_or_else(|| bad_code.clone())?;
        let info = self.codes.get_mut(code).ok_or_else(|| bad_code.clone())?;
        if info.used {
            self.totals.code_reuses += 1;
            // RFC 6749 §4.1.2: a code presented twice revokes what it was exchanged for.
            if let Some(grant) = info.grant {
                self.revoke_grant(grant, RevokedBy::CodeReused);
            }
            return Err(bad_code);
        }
        if info.consumer != consumer || info.expires <= now {
            return Err(bad_code);
        }
        if let Some(uri) = &info.redirect_uri
            && params.get("redirect_uri") != Some(uri)
        {
            return Err(bad_code);
        }
        if info.challenge.is_none() && params.contains_key("code_verifier") {
            // A verifier for a code issued without a challenge: a PKCE downgrade (RFC 9700
            // §4.8.2 requires refusing it).
            info.used = true;
            return Err(self.rules.errors.bad_verifier.clone());
        }
        if let Some((challenge, method)) = &info.challenge {
            let ok = match params.get("code_verifier") {
                Some(v) if is_pkce_text(v) => match method.as_str() {
                    "S256" => &s256_challenge(v) == challenge,
                    _ => v == challenge,
                },
                _ => false,
            };
            if !ok {
                // A failed verification burns the code, as RFC 7636 servers do.
                info.used = true;
                return Err(self.rules.errors.bad_verifier.clone());
            }
        }
        info.used = true;
        let account = info.account.clone();
        info.grant = Some(self.grants.len() as u64);
        self.totals.code_exchanges += 1;
        let scopes = self
            .consumers
            .get(consumer)
            .map(|c| c.scopes.clone())
            .unwrap_or_default();
        let grant = self.grants.len() as u64;
        self.grants.push(Grant {
            account: account.clone(),
            scopes: scopes.clone(),
            created: now,
            counters: GrantCounters {
                consumer: consumer.to_owned(),
                ..GrantCounters::default()
            },
            access_tokens: Vec::new(),
        });
        let access = self.issue_access(Some(grant), consumer);
        let refresh = self.issue_refresh(grant, &access);
        let mut body = self.success(&access, Some(&refresh), &scopes, "authorization_code");
        if scopes.iter().any(|s| s == "openid") {
            body.insert(
                "id_token".into(),
                json!(id_token(&self.issuer, consumer, &account, now)),
            );
        }
        Ok(body)
    }

    fn refresh(
        &mut self,
        consumer: &str,
        params: &HashMap<String, String>,
    ) -> Result<Map<String, Value>, ErrorBody> {
        self.totals.refresh_calls += 1;
        let now = self.now();
        let (token, grant_id, old_access) = self.accept_refresh_token(consumer, params, now)?;
        let grant = &mut self.grants[grant_id as usize];
        grant.counters.refreshes += 1;
        self.totals.refreshes += 1;
        let scopes = grant.scopes.clone();
        let access = self.issue_access(Some(grant_id), consumer);
        let reply_refresh = self.roll_refresh_token(&token, grant_id, &old_access, &access, now);
        Ok(self.success(&access, reply_refresh.as_deref(), &scopes, "refresh_token"))
    }

    /// The refresh token `params` present, with its grant and the access token issued
    /// beside it, when `consumer` may refresh with it at `now`: it is known, of this
    /// consumer's live grant, live (or retired within the leeway) and not expired. Counts the
    /// call against the grant, and each rejection.
    fn accept_refresh_token(
        &mut self,
        consumer: &str,
        params: &HashMap<String, String>,
        now: Duration,
    ) -> Result<(String, u64, String), ErrorBody> {
        let invalid = self.rules.errors.invalid_refresh.clone();
        let expired = self.rules.errors.expired_refresh.clone();
        let Some(token) = params.get("refresh_token").cloned() else {
            self.totals.rejected_refreshes += 1;
            return Err(invalid);
        };
        let Some(info) = self.refresh.get(&token) else {
            self.totals.rejected_refreshes += 1;
            return Err(invalid);
        };
        let (grant_id, status, last_used, old_access) =
            (info.grant, info.status, info.last_used, info.access.clone());
        let grant = &mut self.grants[grant_id as usize];
        grant.counters.refresh_calls += 1;
        if grant.counters.consumer != consumer || grant.counters.revoked.is_some() {
            return Err(self.reject_refresh(grant_id, invalid));
        }
        if let RefreshStatus::Retired { at } = status {
            self.check_reuse(grant_id, at, now, invalid)?;
        }
        let created = self.grants[grant_id as usize].created;
        if self
            .rules
            .refresh_inactivity
            .is_some_and(|limit| now.saturating_sub(last_used) > limit)
            || self
                .rules
                .refresh_absolute
                .is_some_and(|limit| now.saturating_sub(created) > limit)
        {
            return Err(self.reject_refresh(grant_id, expired));
        }
        Ok((token, grant_id, old_access))
    }

    /// Counts a rejected refresh against `grant_id` and the totals, and returns `body`.
    fn reject_refresh(&mut self, grant_id: u64, body: ErrorBody) -> ErrorBody {
        self.grants[grant_id as usize].counters.rejected += 1;
        self.totals.rejected_refreshes += 1;
        body
    }

    /// A refresh token retired at `at` presented again at `now`: within the rotation's
    /// leeway a counted reuse; after it a reuse detection, rejected with `invalid` (and the
    /// grant's whole family revoked when the profile says so).
    fn check_reuse(
        &mut self,
        grant_id: u64,
        at: Duration,
        now: Duration,
        invalid: ErrorBody,
    ) -> Result<(), ErrorBody> {
        let (leeway, revoke) = match self.rules.rotation {
            RotationRule::Rotate {
                leeway,
                reuse_revokes_family,
                ..
            } => (leeway, reuse_revokes_family),
            RotationRule::None => (None, false),
        };
        let grant = &mut self.grants[grant_id as usize];
        if leeway.is_some_and(|l| now.saturating_sub(at) <= l) {
            grant.counters.leeway_reuses += 1;
            self.totals.leeway_reuses += 1;
            return Ok(());
        }
        grant.counters.reuse_detections += 1;
        self.totals.reuse_detections += 1;
        let out = self.reject_refresh(grant_id, invalid);
        if revoke {
            self.revoke_grant(grant_id, RevokedBy::ReuseDetected);
        }
        Err(out)
    }

    /// The refresh token a successful refresh replies with, after the profile's rotation
    /// rule ran on the presented `token` (whose grant's new access token is `access`): kept
    /// (returned again if the profile does) or retired for a new one (the old access token
    /// dying with it if the profile says so).
    fn roll_refresh_token(
        &mut self,
        token: &str,
        grant_id: u64,
        old_access: &str,
        access: &str,
        now: Duration,
    ) -> Option<String> {
        match self.rules.rotation {
            RotationRule::None => {
                if let Some(info) = self.refresh.get_mut(token) {
                    info.last_used = now;
                    info.access = access.to_owned();
                }
                self.rules
                    .refresh_reply_has_refresh_token
                    .then(|| token.to_owned())
            }
            RotationRule::Rotate {
                old_access_dies, ..
            } => {
                if let Some(info) = self.refresh.get_mut(token)
                    && matches!(info.status, RefreshStatus::Live)
                {
                    info.status = RefreshStatus::Retired { at: now };
                }
                if old_access_dies && let Some(a) = self.access.get_mut(old_access) {
                    a.dead = true;
                }
                let g = &mut self.grants[grant_id as usize];
                g.counters.rotations += 1;
                self.totals.rotations += 1;
                Some(self.issue_refresh(grant_id, access))
            }
        }
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

/// An OpenID Connect ID token for `account` of `consumer`: a JWT-shaped value whose payload
/// names the issuer, subject (the account) and audience. Unsigned (`alg: none`): this is a
/// test double; a real provider signs it.
fn id_token(issuer: &str, consumer: &str, account: &str, now: Duration) -> String {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let iat = now.as_secs();
    let header = json!({"alg": "none", "typ": "JWT"});
    let claims = json!({
        "iss": issuer,
        "sub": account,
        "aud": consumer,
        "iat": iat,
        "exp": iat + 3600,
    });
    format!("{}.{}.", b64(&header), b64(&claims))
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

#[cfg(test)]
mod redirect_tests {
    use super::redirect_allowed;

    #[test]
    fn only_uris_under_the_registered_callback_are_allowed() {
        let prefix = "http://127.0.0.1";
        for ok in [
            "http://127.0.0.1",
            "http://127.0.0.1/callback",
            "http://127.0.0.1:8080/callback?x=1",
        ] {
            assert!(redirect_allowed(ok, prefix), "{ok}");
        }
        for bad in [
            "http://127.0.0.1.evil.example/",
            "http://127.0.0.1@evil.example/",
            "http://127.0.0.1:80@evil.example/",
            "http://127.0.0.1:evil.example/",
            "https://127.0.0.1/",
        ] {
            assert!(!redirect_allowed(bad, prefix), "{bad}");
        }
        assert!(redirect_allowed(
            "https://app.example/cb/done",
            "https://app.example/cb/"
        ));
    }
}
