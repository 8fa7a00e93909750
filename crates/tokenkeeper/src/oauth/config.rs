//! `ConsumerConfig`: the OAuth consumer (client) every installation belongs to, validated once
//! by a builder that says exactly what is wrong.

use std::fmt;
use std::time::Duration;

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};

use crate::oauth::keys::StateKey;
use crate::oauth::profile::{IdentityCheck, ProviderProfile};

/// The consumer's client secret. `Debug` prints `[redacted]`; there is no `Display`.
#[derive(Clone)]
pub struct ClientSecret(SecretString);

impl ClientSecret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(SecretString::from(secret.into()))
    }

    pub(crate) fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret([redacted])")
    }
}

/// What is wrong with a configuration.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required setting was not given.
    #[error("{field} is required: set it with .{field}(...) on the builder")]
    Missing {
        /// The builder method that sets it.
        field: &'static str,
    },
    /// A setting was given but empty (or only whitespace).
    #[error("{field} must not be empty")]
    Empty {
        /// The builder method that sets it.
        field: &'static str,
    },
    /// A URL did not parse or is unusable.
    #[error("{field} {value:?} is not a usable URL: {reason}")]
    InvalidUrl {
        /// The builder method or profile field that holds it.
        field: &'static str,
        /// The value as given (URLs here never carry secrets).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value (a duration, a size, a percentage, a key length) is out of its range or
    /// contradicts another setting.
    #[error("{field}: {reason}")]
    OutOfRange {
        /// The builder method or policy field that sets it.
        field: &'static str,
        /// The allowed range, or the setting it contradicts.
        reason: String,
    },
    /// The operating system's random generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(String),
    /// The HTTP client could not be built (TLS backend initialisation failed).
    #[error("the HTTP client could not be built: {0}")]
    HttpClient(#[source] std::sync::Arc<reqwest::Error>),
}

impl PartialEq for ConfigError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Missing { field: a }, Self::Missing { field: b })
            | (Self::Empty { field: a }, Self::Empty { field: b }) => a == b,
            (
                Self::InvalidUrl {
                    field: a,
                    value: va,
                    reason: ra,
                },
                Self::InvalidUrl {
                    field: b,
                    value: vb,
                    reason: rb,
                },
            ) => (a, va, ra) == (b, vb, rb),
            (
                Self::OutOfRange {
                    field: a,
                    reason: ra,
                },
                Self::OutOfRange {
                    field: b,
                    reason: rb,
                },
            ) => (a, ra) == (b, rb),
            (Self::HttpClient(a), Self::HttpClient(b)) => std::sync::Arc::ptr_eq(a, b),
            (Self::Random(a), Self::Random(b)) => a == b,
            _ => false,
        }
    }
}

/// The settings that have defaults: declared once, held by the builder and by the validated
/// configuration alike.
#[derive(Debug, Clone)]
struct Settings {
    scopes: Vec<String>,
    http_timeout: Duration,
    connect_timeout: Duration,
    max_response_bytes: usize,
    authorization_ttl: Duration,
    /// The current key first, then the previous ones still accepted.
    state_keys: Vec<StateKey>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            scopes: Vec::new(),
            http_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_response_bytes: 64 * 1024,
            authorization_ttl: Duration::from_secs(600),
            state_keys: Vec::new(),
        }
    }
}

/// An OAuth consumer: provider profile, client credentials, redirect URI, scopes and HTTP
/// limits.
///
/// ```
/// use tokenkeeper::{ConsumerConfig, profiles};
///
/// let consumer = ConsumerConfig::builder(profiles::bitbucket())
///     .client_id("key")
///     .client_secret("secret")
///     .redirect_uri("https://app.example.com/oauth/callback")
///     .scopes(["repository", "account"])
///     .build()
///     .unwrap();
/// assert_eq!(consumer.client_id(), "key");
/// assert!(!format!("{consumer:?}").contains("secret\""));
///
/// let err = ConsumerConfig::builder(profiles::bitbucket()).client_id("key").build().unwrap_err();
/// assert_eq!(err.to_string(), "client_secret is required: set it with .client_secret(...) on the builder");
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    profile: ProviderProfile,
    client_id: String,
    client_secret: ClientSecret,
    redirect_uri: Url,
    settings: Settings,
}

impl ConsumerConfig {
    /// A builder for a consumer of `profile`.
    pub fn builder(profile: ProviderProfile) -> ConsumerConfigBuilder {
        ConsumerConfigBuilder {
            profile,
            client_id: None,
            client_secret: None,
            redirect_uri: None,
            settings: Settings::default(),
            state_key: None,
            previous_state_keys: Vec::new(),
        }
    }

    /// The provider profile.
    pub fn profile(&self) -> &ProviderProfile {
        &self.profile
    }
    /// The client id (Bitbucket calls it the consumer's key).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
    pub(crate) fn client_secret(&self) -> &ClientSecret {
        &self.client_secret
    }
    /// The redirect URI registered with the provider.
    pub fn redirect_uri(&self) -> &Url {
        &self.redirect_uri
    }
    /// The scopes requested at authorization (profile-required ones included).
    pub fn scopes(&self) -> &[String] {
        &self.settings.scopes
    }
    /// The longest one HTTP exchange with the provider may take, connect to last byte.
    pub fn http_timeout(&self) -> Duration {
        self.settings.http_timeout
    }
    /// The longest connecting to the provider may take.
    pub fn connect_timeout(&self) -> Duration {
        self.settings.connect_timeout
    }
    /// The largest token endpoint reply read, in bytes.
    pub fn max_response_bytes(&self) -> usize {
        self.settings.max_response_bytes
    }
    /// How long an authorization may take from `begin` to the callback.
    pub fn authorization_ttl(&self) -> Duration {
        self.settings.authorization_ttl
    }
    /// The name its installations are recorded under: `profile/client_id@binding`, where the
    /// binding is 12 hex digits of SHA-256 over the token endpoint's URL (review E2). A
    /// process with the same profile and client id pointed at another authorization server
    /// (a staging copy, a sandbox tenant, a regional endpoint) is another consumer: it gets
    /// `ForeignConsumer` for these installations and sends their refresh tokens nowhere.
    ///
    /// Only where refresh tokens go is bound: naming the profile's `issuer` later, or a
    /// revocation endpoint, does not make the installations someone else's. The URL is taken
    /// as written (after URL parsing): changing it in any way (a trailing slash, a query)
    /// makes another consumer, whose `ForeignConsumer` says so at the first call.
    ///
    /// ```
    /// use tokenkeeper::{ConsumerConfig, profiles};
    /// let at = |token_url: &str| {
    ///     let p = profiles::bitbucket();
    ///     let profile = p.clone().with_endpoints(p.authorize_url.clone(), token_url.parse().unwrap(), None);
    ///     ConsumerConfig::builder(profile)
    ///         .client_id("key").client_secret("secret").redirect_uri("https://app.example/cb")
    ///         .build().unwrap()
    /// };
    /// let production = at("https://bitbucket.org/site/oauth2/access_token");
    /// let staging = at("https://staging.example/site/oauth2/access_token");
    /// assert!(production.name().starts_with("bitbucket/key@"));
    /// assert_ne!(production.name(), staging.name());
    /// ```
    pub fn name(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.profile.token_url.as_str().as_bytes());
        let binding: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}/{}@{binding}", self.profile.name, self.client_id)
    }

    /// The keys that verify authorization states: the current one (which signs) first.
    pub(crate) fn state_keys(&self) -> &[StateKey] {
        &self.settings.state_keys
    }
}

/// Builds a [`ConsumerConfig`]; `build` validates everything at once and names the first
/// setting that is wrong.
#[derive(Debug, Clone)]
pub struct ConsumerConfigBuilder {
    profile: ProviderProfile,
    client_id: Option<String>,
    client_secret: Option<ClientSecret>,
    redirect_uri: Option<String>,
    settings: Settings,
    state_key: Option<StateKey>,
    previous_state_keys: Vec<StateKey>,
}

impl ConsumerConfigBuilder {
    /// The client id (Bitbucket: the consumer's key).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }
    /// The client secret.
    pub fn client_secret(mut self, secret: impl Into<String>) -> Self {
        self.client_secret = Some(ClientSecret::new(secret));
        self
    }
    /// The redirect (callback) URI registered with the provider.
    pub fn redirect_uri(mut self, uri: impl Into<String>) -> Self {
        self.redirect_uri = Some(uri.into());
        self
    }
    /// Scopes to request (Bitbucket ignores these: the consumer's configured scopes apply).
    pub fn scopes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, scopes: I) -> Self {
        self.settings.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }
    /// Timeout of one HTTP exchange with the provider (default 10 s).
    pub fn http_timeout(mut self, timeout: Duration) -> Self {
        self.settings.http_timeout = timeout;
        self
    }
    /// Connect timeout (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }
    /// Largest token endpoint reply accepted (default 64 KiB).
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.settings.max_response_bytes = bytes;
        self
    }
    /// How long a begun authorization stays valid (default 10 minutes, at most a day).
    pub fn authorization_ttl(mut self, ttl: Duration) -> Self {
        self.settings.authorization_ttl = ttl;
        self
    }
    /// The key that signs authorization `state` values: a dedicated random secret of at least
    /// 32 bytes, shared by every process that begins or completes authorizations (never
    /// derived from the client secret). Without one, `begin_authorization` fails with
    /// [`AuthorizationError::NoStateKey`](crate::oauth::AuthorizationError::NoStateKey).
    ///
    /// To rotate: give every process the new key as `state_key` and the old one as
    /// [`previous_state_key`](Self::previous_state_key); once `authorization_ttl` has passed
    /// since the last process switched, drop the previous key.
    pub fn state_key(mut self, key: StateKey) -> Self {
        self.state_key = Some(key);
        self
    }
    /// A retired state key whose states are still accepted (never used to sign). Call once
    /// per key, in any order with [`state_key`](Self::state_key).
    pub fn previous_state_key(mut self, key: StateKey) -> Self {
        self.previous_state_keys.push(key);
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Missing`] or [`ConfigError::Empty`] for an absent client id, secret or
    /// redirect URI; [`ConfigError::InvalidUrl`] for a redirect URI or profile endpoint that is
    /// not an http(s) URL with a host; [`ConfigError::OutOfRange`] for zero timeouts, a connect
    /// timeout longer than the exchange timeout, a reply limit under 256 bytes or two state keys with one id
    /// under 16 bytes.
    pub fn build(self) -> Result<ConsumerConfig, ConfigError> {
        let (client_id, client_secret) = self.validate_credentials()?;
        let redirect_uri = self.validate_urls()?;
        let mut settings = self.settings;
        if self.state_key.is_none() && !self.previous_state_keys.is_empty() {
            return Err(ConfigError::OutOfRange {
                field: "state_key",
                reason: "previous state keys are set but no current one: set state_key too".into(),
            });
        }
        settings.state_keys = self
            .state_key
            .into_iter()
            .chain(self.previous_state_keys)
            .collect();
        validate_limits(&settings)?;
        validate_issuer(&self.profile)?;
        for s in &self.profile.required_scopes {
            if !settings.scopes.contains(s) {
                settings.scopes.push(s.clone());
            }
        }
        Ok(ConsumerConfig {
            profile: self.profile,
            client_id,
            client_secret,
            redirect_uri,
            settings,
        })
    }

    fn validate_credentials(&self) -> Result<(String, ClientSecret), ConfigError> {
        let client_id = self
            .client_id
            .clone()
            .ok_or(ConfigError::Missing { field: "client_id" })?;
        if client_id.trim().is_empty() {
            return Err(ConfigError::Empty { field: "client_id" });
        }
        let client_secret = self.client_secret.clone().ok_or(ConfigError::Missing {
            field: "client_secret",
        })?;
        if client_secret.expose().is_empty() {
            return Err(ConfigError::Empty {
                field: "client_secret",
            });
        }
        Ok((client_id, client_secret))
    }

    fn validate_urls(&self) -> Result<Url, ConfigError> {
        let raw_redirect = self.redirect_uri.as_deref().ok_or(ConfigError::Missing {
            field: "redirect_uri",
        })?;
        let redirect_uri = parse_http_url("redirect_uri", raw_redirect)?;
        let profile = &self.profile;
        for (field, u) in [
            ("profile.authorize_url", Some(&profile.authorize_url)),
            ("profile.token_url", Some(&profile.token_url)),
            ("profile.revoke_url", profile.revoke_url.as_ref()),
        ] {
            if let Some(u) = u {
                parse_http_url(field, u.as_str())?;
            }
        }
        match &profile.identity {
            IdentityCheck::Endpoint { url, pointer } => {
                parse_http_url("profile.identity", url.as_str())?;
                if !pointer.is_empty() && !pointer.starts_with('/') {
                    return Err(ConfigError::OutOfRange {
                        field: "profile.identity",
                        reason: format!("the JSON pointer {pointer:?} must start with '/'"),
                    });
                }
            }
            IdentityCheck::Unset => {
                return Err(ConfigError::OutOfRange {
                    field: "profile.identity",
                    reason: "choose how a grant's provider account is read, so re-authorizing an installation with another account is refused: IdentityCheck::endpoint(user_endpoint, \"/sub\"), IdentityCheck::IdTokenSubject, or IdentityCheck::Disabled to accept any account".into(),
                });
            }
            IdentityCheck::IdTokenSubject | IdentityCheck::Disabled => {}
        }
        Ok(redirect_uri)
    }
}

/// An issuer must be an https URL without query or fragment (RFC 8414 §2), compared
/// character for character with a callback's `iss` (RFC 9207 §2.4: mind a trailing slash);
/// requiring `iss` without naming the issuer would check nothing.
fn validate_issuer(profile: &ProviderProfile) -> Result<(), ConfigError> {
    let refuse = |reason: &str| {
        Err(ConfigError::OutOfRange {
            field: "issuer",
            reason: reason.into(),
        })
    };
    match &profile.issuer {
        None if profile.callback_iss_required => refuse(
            "callback_iss_required is set but the profile names no issuer to compare `iss` with: set ProviderProfile::issuer",
        ),
        None => Ok(()),
        Some(issuer) => match parse_http_url("issuer", issuer)?.query() {
            None => Ok(()),
            Some(_) => refuse(
                "the issuer must be an https URL without query or fragment, exactly as the server's metadata and its `iss` spell it",
            ),
        },
    }
}

/// The longest a begun authorization may stay valid (review I2).
const MAX_AUTHORIZATION_TTL: Duration = Duration::from_secs(24 * 3600);

fn validate_limits(settings: &Settings) -> Result<(), ConfigError> {
    let out_of_range = |field, reason: String| Err(ConfigError::OutOfRange { field, reason });
    for (field, d) in [
        ("http_timeout", settings.http_timeout),
        ("connect_timeout", settings.connect_timeout),
        ("authorization_ttl", settings.authorization_ttl),
    ] {
        if d.is_zero() {
            return out_of_range(field, "must be greater than zero".into());
        }
    }
    if settings.authorization_ttl > MAX_AUTHORIZATION_TTL {
        return out_of_range(
            "authorization_ttl",
            format!(
                "{:?} is longer than a day: a begun authorization (its cookie, its claim in the store) must not outlive the visit it belongs to",
                settings.authorization_ttl
            ),
        );
    }
    if settings.connect_timeout > settings.http_timeout {
        return out_of_range(
            "connect_timeout",
            format!(
                "{:?} exceeds http_timeout {:?}; the whole exchange cannot be shorter than connecting",
                settings.connect_timeout, settings.http_timeout
            ),
        );
    }
    if settings.max_response_bytes < 256 {
        return out_of_range(
            "max_response_bytes",
            "must be at least 256 bytes to hold a token reply".into(),
        );
    }
    let ids: std::collections::BTreeSet<u8> =
        settings.state_keys.iter().map(StateKey::id).collect();
    if ids.len() != settings.state_keys.len() {
        return out_of_range(
            "state_key",
            "two state keys share an id: give each key its own id (states carry it)".into(),
        );
    }
    Ok(())
}

/// An https URL with a host, or http on a loopback host (local tests and mocks): plain http
/// elsewhere would carry the client secret, codes and tokens in cleartext. No user name or
/// password (the error shows the URL with its password hidden) and no fragment.
fn parse_http_url(field: &'static str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value).map_err(|e| ConfigError::InvalidUrl {
        field,
        value: value.to_owned(),
        reason: e.to_string(),
    })?;
    let refuse = |reason: &str| {
        let mut shown = url.clone();
        if url.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        Err(ConfigError::InvalidUrl {
            field,
            value: shown.to_string(),
            reason: reason.to_owned(),
        })
    };
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return refuse("must be an http or https URL with a host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("must not carry a user name or password");
    }
    if url.fragment().is_some() {
        return refuse("must not carry a fragment (#...)");
    }
    let host = url.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if url.scheme() == "http" && !loopback {
        return refuse(
            "plain http would carry the client secret, codes and tokens in cleartext: use https (http is accepted only on a loopback host, for local tests)",
        );
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles;

    fn base() -> ConsumerConfigBuilder {
        ConsumerConfig::builder(profiles::bitbucket())
            .client_id("k")
            .client_secret("s")
            .redirect_uri("https://app.example/cb")
    }

    /// Review I2: a begun authorization lives at most a day (its cookie's `Max-Age`, its
    /// claim in the store, and the state's own expiry all follow it).
    #[test]
    fn an_authorization_lives_at_most_a_day() {
        let day = Duration::from_secs(24 * 3600);
        assert!(base().authorization_ttl(day).build().is_ok());
        match base()
            .authorization_ttl(day + Duration::from_secs(1))
            .build()
        {
            Err(ConfigError::OutOfRange { field, .. }) => assert_eq!(field, "authorization_ttl"),
            other => panic!("expected authorization_ttl out of range, got {other:?}"),
        }
        assert!(base().authorization_ttl(Duration::MAX).build().is_err());
    }

    // A table of refused settings, read top-down: longer than 70 lines on purpose.
    #[allow(clippy::too_many_lines)]
    #[test]
    fn validation_names_the_problem() {
        assert!(base().build().is_ok());
        assert_eq!(
            base().client_secret("").build().unwrap_err(),
            ConfigError::Empty {
                field: "client_secret"
            }
        );
        assert_eq!(
            base().client_id(" ").build().unwrap_err(),
            ConfigError::Empty { field: "client_id" }
        );
        let err = base().redirect_uri("not a url").build().unwrap_err();
        assert!(
            err.to_string().contains("redirect_uri \"not a url\""),
            "{err}"
        );
        for (bad, why) in [
            ("http://app.example/cb", "cleartext"),
            (
                "https://user:hunter2@app.example/cb",
                "user name or password",
            ),
            ("https://app.example/cb#frag", "fragment"),
        ] {
            let err = base().redirect_uri(bad).build().unwrap_err();
            let text = err.to_string();
            assert!(text.contains(why) && !text.contains("hunter2"), "{text}");
        }
        for good in [
            "http://127.0.0.1:8080/cb",
            "http://localhost/cb",
            "http://[::1]/cb",
        ] {
            base().redirect_uri(good).build().unwrap();
        }
        let mut profile = profiles::bitbucket();
        profile.token_url = Url::parse("http://bitbucket.org/site/oauth2/access_token").unwrap();
        let err = ConsumerConfig::builder(profile)
            .client_id("k")
            .client_secret("s")
            .redirect_uri("https://app.example/cb")
            .build()
            .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::InvalidUrl {
                    field: "profile.token_url",
                    ..
                }
            ),
            "{err}"
        );
        let err = base().redirect_uri("ftp://x/cb").build().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::InvalidUrl {
                field: "redirect_uri",
                ..
            }
        ));
        let err = base().http_timeout(Duration::ZERO).build().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::OutOfRange {
                field: "http_timeout",
                ..
            }
        ));
        let err = base()
            .connect_timeout(Duration::from_secs(30))
            .build()
            .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::OutOfRange {
                field: "connect_timeout",
                ..
            }
        ));
        let key = |id| StateKey::generate(id).unwrap();
        assert!(
            base()
                .state_key(key(1))
                .previous_state_key(key(2))
                .build()
                .is_ok()
        );
        assert!(
            base()
                .state_key(key(1))
                .previous_state_key(key(1))
                .build()
                .is_err()
        );
        assert!(base().previous_state_key(key(1)).build().is_err());
        // The order of the calls does not matter: the current key signs.
        let built = base()
            .previous_state_key(key(1))
            .state_key(key(2))
            .build()
            .unwrap();
        let ids: Vec<u8> = built.state_keys().iter().map(StateKey::id).collect();
        assert_eq!(ids, [2, 1]);
    }

    #[test]
    fn required_scopes_are_added_and_secret_is_redacted() {
        let c = ConsumerConfig::builder(profiles::atlassian_3lo())
            .client_id("k")
            .client_secret("super-secret-value")
            .redirect_uri("https://app.example/cb")
            .scopes(["read:jira-work"])
            .build()
            .unwrap();
        assert_eq!(c.scopes(), ["read:jira-work", "offline_access", "read:me"]);
        assert!(!format!("{c:?}").contains("super-secret-value"));
    }
}
