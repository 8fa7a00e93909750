//! Provider profiles: everything that makes one OAuth provider behave unlike another, as data.
//!
//! A [`ProviderProfile`] names the endpoints, how the client authenticates and encodes its
//! requests, whether refresh tokens rotate (and with what reuse leeway), default lifetimes and
//! expiries, PKCE support, extra authorization parameters, and how the provider's error bodies
//! map to the failure classes of docs/design.md ("Error classification"). Presets cover Bitbucket (rotating and legacy),
//! Atlassian 3LO, GitHub Apps and Google; [`ProviderProfile::generic`] starts any RFC 6749
//! provider.

use std::time::Duration;

use reqwest::Url;
use tokenkeeper_core::{FailureClass, Timestamp, TokenSet};

const DAY: u64 = 24 * 3600;

/// How the client proves its identity to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// `Authorization: Basic base64(client_id:client_secret)`.
    Basic,
    /// `client_id` and `client_secret` in the request body.
    RequestBody,
}

/// How token requests are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyEncoding {
    /// `application/x-www-form-urlencoded` (RFC 6749; Bitbucket accepts nothing else).
    Form,
    /// `application/json` (Atlassian's documented form).
    Json,
}

/// What a refresh does to the refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rotation {
    /// The same refresh token keeps working.
    Never,
    /// Every refresh issues a new refresh token and retires the old one.
    Rotates {
        /// How long the retired token still works (Atlassian: 10 minutes); `None` if not at all.
        reuse_leeway: Option<Duration>,
    },
}

impl Rotation {
    /// Whether a refresh retires the refresh token it used.
    pub fn rotates(&self) -> bool {
        matches!(self, Self::Rotates { .. })
    }

    /// How long a retired refresh token still works, for a rotating provider that allows it.
    pub fn reuse_leeway(&self) -> Option<Duration> {
        match self {
            Self::Rotates { reuse_leeway } => *reuse_leeway,
            Self::Never => None,
        }
    }
}

/// One rule mapping a provider error to a failure class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRule {
    /// The `error` code it matches.
    pub error: String,
    /// If set, `error_description` must contain this (case-insensitive).
    pub description_contains: Option<String>,
    /// The class.
    pub class: FailureClass,
}

/// How a provider's errors map to failure classes: the profile's own rules first, then the
/// RFC 6749 defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorMap {
    rules: Vec<ErrorRule>,
}

impl ErrorMap {
    /// Adds a rule (checked before the ones already added and before the defaults).
    pub fn rule(
        mut self,
        error: &str,
        description_contains: Option<&str>,
        class: FailureClass,
    ) -> Self {
        self.rules.insert(
            0,
            ErrorRule {
                error: error.to_owned(),
                description_contains: description_contains.map(str::to_lowercase),
                class,
            },
        );
        self
    }

    /// The class of an error reply from the token endpoint.
    pub fn classify(&self, status: u16, error: &str, description: Option<&str>) -> FailureClass {
        let description = description.unwrap_or("").to_lowercase();
        for rule in &self.rules {
            if rule.error == error
                && rule
                    .description_contains
                    .as_ref()
                    .is_none_or(|d| description.contains(d))
            {
                return rule.class;
            }
        }
        match error {
            "invalid_grant" => FailureClass::RefreshTokenRejected,
            "invalid_client" | "unauthorized_client" => FailureClass::ConsumerCredentialsInvalid,
            "invalid_scope" => FailureClass::ScopeRejected,
            "unsupported_grant_type" | "invalid_request" | "unsupported_response_type" => {
                FailureClass::Configuration
            }
            "temporarily_unavailable" | "server_error" | "slow_down" => FailureClass::Transient,
            // A 401 from the token endpoint is the client's credentials, whatever the code says.
            _ if status == 401 => FailureClass::ConsumerCredentialsInvalid,
            // Unknown codes never condemn an installation: they go through the failure budget.
            _ => FailureClass::Transient,
        }
    }
}

/// When to refresh, relative to an access token's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A token is treated as expired this long before `expires_at` (clamped to a quarter of
    /// its lifetime, so 60-second test tokens are still used).
    pub skew: Duration,
    /// Refresh proactively this long before expiry...
    pub refresh_ahead: Duration,
    /// ...but not before this fraction (in percent) of the lifetime has passed.
    pub refresh_after_percent: u8,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            skew: Duration::from_secs(60),
            refresh_ahead: Duration::from_secs(15 * 60),
            refresh_after_percent: 80,
        }
    }
}

impl Timing {
    /// The skew for a token of this lifetime: `skew`, but at most a quarter of the lifetime.
    pub fn skew_for(&self, lifetime: Duration) -> Duration {
        self.skew.min(lifetime / 4)
    }

    /// The instant after which `tokens` are no longer served: `expires_at - skew`.
    pub fn stale_at(&self, tokens: &TokenSet) -> Timestamp {
        tokens
            .expires_at
            .saturating_sub(self.skew_for(tokens.lifetime()))
    }

    /// When to refresh `tokens` proactively: the later of `expires_at - refresh_ahead` and
    /// `refresh_after_percent` of the lifetime, but never after they go stale.
    pub fn refresh_at(&self, tokens: &TokenSet) -> Timestamp {
        let lifetime = tokens.lifetime();
        let ahead = tokens.expires_at.saturating_sub(self.refresh_ahead);
        let share = tokens.obtained_at.saturating_add(
            lifetime.mul_f64(f64::from(self.refresh_after_percent.min(100)) / 100.0),
        );
        ahead.max(share).min(self.stale_at(tokens))
    }
}

/// Everything tokenkeeper needs to know about a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderProfile {
    /// A short name (`bitbucket`), recorded in every installation's record.
    pub name: String,
    /// The authorization endpoint.
    pub authorize_url: Url,
    /// The token endpoint.
    pub token_url: Url,
    /// The RFC 7009 revocation endpoint, if the provider has one.
    pub revoke_url: Option<Url>,
    /// Client authentication.
    pub client_auth: ClientAuth,
    /// Request body encoding.
    pub body_encoding: BodyEncoding,
    /// Refresh token rotation.
    pub rotation: Rotation,
    /// Lifetime assumed when a reply omits `expires_in`.
    pub default_access_lifetime: Duration,
    /// A reply with neither `expires_in` nor a refresh token carries a token that does not
    /// expire (GitHub OAuth apps, and GitHub Apps with expiring user tokens turned off): it
    /// is served until the API refuses it and never condemned by a timer. When `false`, such
    /// a token takes `default_access_lifetime` and becomes `NoRefreshToken` when that runs out.
    pub unstated_expiry_is_permanent: bool,
    /// An unused refresh token dies after this long (keep-alive refreshes before it).
    pub refresh_inactivity_expiry: Option<Duration>,
    /// A grant's refresh tokens die this long after the authorization.
    pub refresh_absolute_expiry: Option<Duration>,
    /// Whether to send PKCE (S256) challenges.
    pub pkce: bool,
    /// Extra query parameters for the authorization URL.
    pub extra_authorize_params: Vec<(String, String)>,
    /// Scopes always requested (e.g. `offline_access` for OpenID servers).
    pub required_scopes: Vec<String>,
    /// Whether every authorization should bring a refresh token (default true). One that
    /// brings none, for a token that expires, is flagged at once in `Completed::warnings` (and
    /// `explain` says so) instead of surfacing at the first refresh. OpenID servers issue one
    /// only when asked: see [`ProviderProfile::with_offline_access`].
    pub expects_refresh_token: bool,
    /// Scope separator in requests (space per RFC 6749).
    pub scope_separator: char,
    /// Error classification.
    pub errors: ErrorMap,
    /// Refresh timing defaults.
    pub timing: Timing,
    /// How the provider account of a grant is read, so that re-authorizing an installation
    /// with another account is refused (its tokens stay untouched). The presets read the
    /// provider's user endpoint; a [`generic`](Self::generic) profile must choose.
    pub identity: IdentityCheck,
    /// The authorization server's issuer identifier (RFC 8414 `issuer`), when known. A
    /// callback that carries `iss` (RFC 9207) must name exactly this issuer, so a mix-up
    /// that brings another server's authorization response here is refused.
    pub issuer: Option<String>,
    /// The server sends `iss` with every authorization response (its metadata's
    /// `authorization_response_iss_parameter_supported`): a callback without it is refused.
    pub callback_iss_required: bool,
}

/// How the provider account a grant belongs to is read (see [`ProviderProfile::identity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityCheck {
    /// `GET url` with the new access token; the account is the JSON value (string or number)
    /// at `pointer` (RFC 6901, e.g. `/uuid`).
    Endpoint {
        /// The user endpoint.
        url: Url,
        /// Where the account id sits in its JSON reply.
        pointer: String,
    },
    /// The `sub` claim of the OpenID Connect ID token the token endpoint returned (request
    /// the `openid` scope). Read without verifying the signature: it came straight from the
    /// token endpoint over TLS (OpenID Connect Core §3.1.3.7).
    IdTokenSubject,
    /// No check: a re-authorization may bind an installation to another provider account.
    /// Choose this only when installations are not tied to one account.
    Disabled,
    /// Not chosen yet: building a consumer with it fails, naming the choices.
    Unset,
}

impl IdentityCheck {
    /// An identity endpoint and the JSON pointer of the account id in its reply.
    pub fn endpoint(url: Url, pointer: impl Into<String>) -> Self {
        Self::Endpoint {
            url,
            pointer: pointer.into(),
        }
    }
}

fn url(s: &str) -> Url {
    Url::parse(s).expect("preset endpoints are valid URL literals")
}

impl ProviderProfile {
    /// What an OpenID Connect server needs to issue a refresh token: the `offline_access`
    /// scope and `prompt=consent` (many servers issue one only on a consent screen). Adds both
    /// unless already there.
    pub fn with_offline_access(mut self) -> Self {
        if !self.required_scopes.iter().any(|s| s == "offline_access") {
            self.required_scopes.push("offline_access".into());
        }
        if !self
            .extra_authorize_params
            .iter()
            .any(|(k, _)| k == "prompt")
        {
            self.extra_authorize_params
                .push(("prompt".into(), "consent".into()));
        }
        self
    }

    /// A plain RFC 6749 provider: form bodies, HTTP Basic, no rotation, 1-hour default
    /// lifetime, PKCE on, default error mapping. Adjust the public fields as needed.
    pub fn generic(name: impl Into<String>, authorize_url: Url, token_url: Url) -> Self {
        Self {
            name: name.into(),
            authorize_url,
            token_url,
            revoke_url: None,
            client_auth: ClientAuth::Basic,
            body_encoding: BodyEncoding::Form,
            rotation: Rotation::Never,
            default_access_lifetime: Duration::from_secs(3600),
            unstated_expiry_is_permanent: false,
            refresh_inactivity_expiry: None,
            refresh_absolute_expiry: None,
            pkce: true,
            extra_authorize_params: Vec::new(),
            required_scopes: Vec::new(),
            expects_refresh_token: true,
            scope_separator: ' ',
            errors: ErrorMap::default(),
            timing: Timing::default(),
            identity: IdentityCheck::Unset,
            issuer: None,
            callback_iss_required: false,
        }
    }

    /// Points every endpoint (the identity endpoint too) at another server with the same
    /// paths (a mock, a proxy).
    pub fn with_base_url(mut self, base: &Url) -> Self {
        for u in [&mut self.authorize_url, &mut self.token_url] {
            *u = rebase(u, base);
        }
        if let IdentityCheck::Endpoint { url, .. } = &mut self.identity {
            *url = rebase(url, base);
        }
        if let Some(r) = &mut self.revoke_url {
            *r = rebase(r, base);
        }
        self
    }

    /// Reads the grant's account from `url` instead (same JSON pointer; for a profile without
    /// an identity endpoint, `/sub`).
    pub fn with_identity_endpoint(mut self, url: Url) -> Self {
        self.identity = match self.identity {
            IdentityCheck::Endpoint { pointer, .. } => IdentityCheck::Endpoint { url, pointer },
            _ => IdentityCheck::endpoint(url, "/sub"),
        };
        self
    }

    /// Sets the three endpoints explicitly (not the identity endpoint: see
    /// [`with_identity_endpoint`](Self::with_identity_endpoint)).
    pub fn with_endpoints(mut self, authorize: Url, token: Url, revoke: Option<Url>) -> Self {
        self.authorize_url = authorize;
        self.token_url = token;
        self.revoke_url = revoke;
        self
    }
}

fn rebase(u: &Url, base: &Url) -> Url {
    let mut out = base.clone();
    out.set_path(u.path());
    out.set_query(u.query());
    out
}

fn bitbucket_errors() -> ErrorMap {
    ErrorMap::default()
        // "Invalid refresh_token" comes as invalid_request (legacy) or invalid_grant.
        .rule(
            "invalid_request",
            Some("refresh_token"),
            FailureClass::RefreshTokenRejected,
        )
        // A JSON body makes Bitbucket see no grant type at all: our bug, not the user's.
        .rule(
            "invalid_grant",
            Some("unsupported grant type"),
            FailureClass::Configuration,
        )
}

/// Bitbucket Cloud since 2026-05-04: rotating refresh tokens that expire after about three
/// months unused; 2-hour access tokens; form bodies only.
pub fn bitbucket() -> ProviderProfile {
    ProviderProfile {
        rotation: Rotation::Rotates { reuse_leeway: None },
        default_access_lifetime: Duration::from_secs(7200),
        refresh_inactivity_expiry: Some(Duration::from_secs(90 * DAY)),
        revoke_url: None,
        errors: bitbucket_errors(),
        // The identity endpoint needs the `account` scope.
        required_scopes: vec!["account".into()],
        identity: IdentityCheck::endpoint(url("https://api.bitbucket.org/2.0/user"), "/uuid"),
        ..ProviderProfile::generic(
            "bitbucket",
            url("https://bitbucket.org/site/oauth2/authorize"),
            url("https://bitbucket.org/site/oauth2/access_token"),
        )
    }
}

/// Bitbucket Cloud before 2026-05-04: the same refresh token forever.
pub fn bitbucket_legacy() -> ProviderProfile {
    ProviderProfile {
        name: "bitbucket-legacy".into(),
        rotation: Rotation::Never,
        refresh_inactivity_expiry: None,
        ..bitbucket()
    }
}

/// Atlassian 3LO (Jira, Confluence): rotating with a 10-minute reuse leeway, 1-hour access
/// tokens, refresh tokens die after 90 days unused or 365 days in all.
pub fn atlassian_3lo() -> ProviderProfile {
    ProviderProfile {
        client_auth: ClientAuth::RequestBody,
        body_encoding: BodyEncoding::Json,
        rotation: Rotation::Rotates {
            reuse_leeway: Some(Duration::from_secs(600)),
        },
        default_access_lifetime: Duration::from_secs(3600),
        refresh_inactivity_expiry: Some(Duration::from_secs(90 * DAY)),
        refresh_absolute_expiry: Some(Duration::from_secs(365 * DAY)),
        extra_authorize_params: vec![
            ("audience".into(), "api.atlassian.com".into()),
            ("prompt".into(), "consent".into()),
        ],
        // `read:me` is what the identity endpoint (/me) needs.
        required_scopes: vec!["offline_access".into(), "read:me".into()],
        identity: IdentityCheck::endpoint(url("https://api.atlassian.com/me"), "/account_id"),
        ..ProviderProfile::generic(
            "atlassian-3lo",
            url("https://auth.atlassian.com/authorize"),
            url("https://auth.atlassian.com/oauth/token"),
        )
    }
}

/// GitHub App user tokens: 8-hour access tokens, rotating refresh tokens valid 6 months from
/// their issue (each reply says so in `refresh_token_expires_in`); errors come in 200 replies
/// with GitHub's own codes. A reply with neither `expires_in` nor a refresh token (an OAuth
/// app, or expiring user tokens turned off) is a token that never expires.
pub fn github_app() -> ProviderProfile {
    ProviderProfile {
        client_auth: ClientAuth::RequestBody,
        rotation: Rotation::Rotates { reuse_leeway: None },
        default_access_lifetime: Duration::from_secs(28_800),
        unstated_expiry_is_permanent: true,
        // Each rotation issues a new refresh token valid 6 months: an inactivity limit.
        refresh_inactivity_expiry: Some(Duration::from_secs(15_897_600)),
        scope_separator: ',',
        errors: ErrorMap::default()
            .rule(
                "bad_refresh_token",
                None,
                FailureClass::RefreshTokenRejected,
            )
            .rule(
                "incorrect_client_credentials",
                None,
                FailureClass::ConsumerCredentialsInvalid,
            )
            .rule(
                "bad_verification_code",
                None,
                FailureClass::RefreshTokenRejected,
            ),
        identity: IdentityCheck::endpoint(url("https://api.github.com/user"), "/id"),
        ..ProviderProfile::generic(
            "github-app",
            url("https://github.com/login/oauth/authorize"),
            url("https://github.com/login/oauth/access_token"),
        )
    }
}

/// Google: long-lived refresh tokens that refresh replies do not repeat; 1-hour access tokens.
pub fn google() -> ProviderProfile {
    ProviderProfile {
        client_auth: ClientAuth::RequestBody,
        revoke_url: Some(url("https://oauth2.googleapis.com/revoke")),
        extra_authorize_params: vec![
            ("access_type".into(), "offline".into()),
            ("prompt".into(), "consent".into()),
        ],
        // The userinfo endpoint answers `sub` with the `openid` scope.
        required_scopes: vec!["openid".into()],
        identity: IdentityCheck::endpoint(
            url("https://openidconnect.googleapis.com/v1/userinfo"),
            "/sub",
        ),
        ..ProviderProfile::generic(
            "google",
            url("https://accounts.google.com/o/oauth2/v2/auth"),
            url("https://oauth2.googleapis.com/token"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_access_asks_an_openid_server_for_a_refresh_token() {
        let url = |s: &str| Url::parse(s).unwrap();
        let p = ProviderProfile::generic(
            "oidc",
            url("https://id.example/authorize"),
            url("https://id.example/token"),
        )
        .with_offline_access()
        .with_offline_access();
        assert_eq!(p.required_scopes, ["offline_access"]);
        assert_eq!(
            p.extra_authorize_params,
            [("prompt".to_owned(), "consent".to_owned())]
        );
        assert!(p.expects_refresh_token);
    }

    #[test]
    fn presets_have_real_urls() {
        for p in [
            bitbucket(),
            bitbucket_legacy(),
            atlassian_3lo(),
            github_app(),
            google(),
        ] {
            assert_eq!(p.token_url.scheme(), "https");
        }
    }

    #[test]
    fn error_map_classifies_design_table() {
        let bb = bitbucket().errors;
        let c = |e: &str, d: &str| bb.classify(400, e, Some(d));
        assert_eq!(
            c("invalid_request", "Invalid refresh_token"),
            FailureClass::RefreshTokenRejected
        );
        assert_eq!(
            c("invalid_grant", "Invalid refresh_token"),
            FailureClass::RefreshTokenRejected
        );
        assert_eq!(
            c("invalid_grant", "Unsupported grant type: None"),
            FailureClass::Configuration
        );
        assert_eq!(
            c("unauthorized_client", "x"),
            FailureClass::ConsumerCredentialsInvalid
        );
        assert_eq!(c("invalid_scope", ""), FailureClass::ScopeRejected);
        assert_eq!(
            c("invalid_request", "missing code"),
            FailureClass::Configuration
        );
        assert_eq!(c("something_new", ""), FailureClass::Transient);
        assert_eq!(
            bb.classify(401, "access_denied", None),
            FailureClass::ConsumerCredentialsInvalid
        );
        let gh = github_app().errors;
        assert_eq!(
            gh.classify(200, "bad_refresh_token", None),
            FailureClass::RefreshTokenRejected
        );
        assert_eq!(
            gh.classify(200, "incorrect_client_credentials", None),
            FailureClass::ConsumerCredentialsInvalid
        );
    }

    #[test]
    fn timing_for_long_and_short_tokens() {
        use tokenkeeper_core::AccessToken;
        let t0 = Timestamp::from_unix_secs(0);
        let tokens = |secs| {
            TokenSet::bearer(
                AccessToken::new("a"),
                None,
                t0,
                t0.saturating_add(Duration::from_secs(secs)),
            )
        };
        let timing = Timing::default();
        // 2 hours: refresh at 1h45 (later than 80% = 1h36), stale at 1h59.
        assert_eq!(
            timing.refresh_at(&tokens(7200)),
            Timestamp::from_unix_secs(6300)
        );
        assert_eq!(
            timing.stale_at(&tokens(7200)),
            Timestamp::from_unix_secs(7140)
        );
        // 60 s test tokens: skew clamps to 15 s; refresh at 80% = 48 s, before stale at 45 s? no:
        // never after stale, so 45 s.
        assert_eq!(timing.stale_at(&tokens(60)), Timestamp::from_unix_secs(45));
        assert_eq!(
            timing.refresh_at(&tokens(60)),
            Timestamp::from_unix_secs(45)
        );
    }

    #[test]
    fn rebasing_keeps_paths() {
        let base = Url::parse("http://127.0.0.1:9999").unwrap();
        let p = bitbucket().with_base_url(&base);
        assert_eq!(
            p.token_url.as_str(),
            "http://127.0.0.1:9999/site/oauth2/access_token"
        );
    }
}
