//! `ConsumerConfig`: the OAuth consumer (client) every installation belongs to, validated once
//! by a builder that says exactly what is wrong.

use std::fmt;
use std::time::Duration;

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};

use crate::profile::ProviderProfile;

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
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required setting was not given.
    #[error("{field} is required: set it with .{field}(...) on the builder")]
    Missing {
        /// The setting.
        field: &'static str,
    },
    /// A setting was given but empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The setting.
        field: &'static str,
    },
    /// A URL did not parse or is unusable.
    #[error("{field} {value:?} is not a usable URL: {reason}")]
    InvalidUrl {
        /// The setting.
        field: &'static str,
        /// The value (never a secret).
        value: String,
        /// Why.
        reason: String,
    },
    /// A duration is out of range or contradicts another.
    #[error("{field}: {reason}")]
    InvalidDuration {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
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
    scopes: Vec<String>,
    http_timeout: Duration,
    connect_timeout: Duration,
    max_response_bytes: usize,
    authorization_ttl: Duration,
    state_key: Option<SecretString>,
}

impl ConsumerConfig {
    /// A builder for a consumer of `profile`.
    pub fn builder(profile: ProviderProfile) -> ConsumerConfigBuilder {
        ConsumerConfigBuilder {
            profile,
            client_id: None,
            client_secret: None,
            redirect_uri: None,
            scopes: Vec::new(),
            http_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_response_bytes: 64 * 1024,
            authorization_ttl: Duration::from_secs(600),
            state_key: None,
        }
    }

    /// The provider profile.
    pub fn profile(&self) -> &ProviderProfile {
        &self.profile
    }
    /// The client id.
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
        &self.scopes
    }
    /// The timeout of one HTTP exchange with the provider.
    pub fn http_timeout(&self) -> Duration {
        self.http_timeout
    }
    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
    /// The largest token endpoint reply accepted.
    pub fn max_response_bytes(&self) -> usize {
        self.max_response_bytes
    }
    /// How long an authorization may take from `begin` to the callback.
    pub fn authorization_ttl(&self) -> Duration {
        self.authorization_ttl
    }
    pub(crate) fn state_key(&self) -> Option<&str> {
        self.state_key.as_ref().map(|k| k.expose_secret())
    }
}

/// Builds a [`ConsumerConfig`]; `build` validates everything at once.
#[derive(Debug, Clone)]
pub struct ConsumerConfigBuilder {
    profile: ProviderProfile,
    client_id: Option<String>,
    client_secret: Option<ClientSecret>,
    redirect_uri: Option<String>,
    scopes: Vec<String>,
    http_timeout: Duration,
    connect_timeout: Duration,
    max_response_bytes: usize,
    authorization_ttl: Duration,
    state_key: Option<SecretString>,
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
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }
    /// Timeout of one HTTP exchange with the provider (default 10 s).
    pub fn http_timeout(mut self, timeout: Duration) -> Self {
        self.http_timeout = timeout;
        self
    }
    /// Connect timeout (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    /// Largest token endpoint reply accepted (default 64 KiB).
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }
    /// How long a begun authorization stays valid (default 10 minutes).
    pub fn authorization_ttl(mut self, ttl: Duration) -> Self {
        self.authorization_ttl = ttl;
        self
    }
    /// The key that signs authorization `state` values. Every process completing
    /// authorizations must use the same key; by default it is derived from the client secret.
    pub fn state_key(mut self, key: impl Into<String>) -> Self {
        self.state_key = Some(SecretString::from(key.into()));
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<ConsumerConfig, ConfigError> {
        let client_id = self
            .client_id
            .ok_or(ConfigError::Missing { field: "client_id" })?;
        if client_id.trim().is_empty() {
            return Err(ConfigError::Empty { field: "client_id" });
        }
        let client_secret = self.client_secret.ok_or(ConfigError::Missing {
            field: "client_secret",
        })?;
        if client_secret.expose().is_empty() {
            return Err(ConfigError::Empty {
                field: "client_secret",
            });
        }
        let raw_redirect = self.redirect_uri.ok_or(ConfigError::Missing {
            field: "redirect_uri",
        })?;
        let redirect_uri = parse_http_url("redirect_uri", &raw_redirect)?;
        for (field, u) in [
            ("profile.authorize_url", &self.profile.authorize_url),
            ("profile.token_url", &self.profile.token_url),
        ] {
            parse_http_url(field, u.as_str())?;
        }
        if let Some(u) = &self.profile.revoke_url {
            parse_http_url("profile.revoke_url", u.as_str())?;
        }
        for (field, d) in [
            ("http_timeout", self.http_timeout),
            ("connect_timeout", self.connect_timeout),
            ("authorization_ttl", self.authorization_ttl),
        ] {
            if d.is_zero() {
                return Err(ConfigError::InvalidDuration {
                    field,
                    reason: "must be greater than zero".into(),
                });
            }
        }
        if self.connect_timeout > self.http_timeout {
            return Err(ConfigError::InvalidDuration {
                field: "connect_timeout",
                reason: format!(
                    "{:?} exceeds http_timeout {:?}; the whole exchange cannot be shorter than connecting",
                    self.connect_timeout, self.http_timeout
                ),
            });
        }
        if self.max_response_bytes < 256 {
            return Err(ConfigError::InvalidDuration {
                field: "max_response_bytes",
                reason: "must be at least 256 bytes to hold a token reply".into(),
            });
        }
        if let Some(key) = &self.state_key
            && key.expose_secret().len() < 16
        {
            return Err(ConfigError::Empty {
                field: "state_key (at least 16 bytes)",
            });
        }
        let mut scopes = self.scopes;
        for s in &self.profile.required_scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        Ok(ConsumerConfig {
            profile: self.profile,
            client_id,
            client_secret,
            redirect_uri,
            scopes,
            http_timeout: self.http_timeout,
            connect_timeout: self.connect_timeout,
            max_response_bytes: self.max_response_bytes,
            authorization_ttl: self.authorization_ttl,
            state_key: self.state_key,
        })
    }
}

fn parse_http_url(field: &'static str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value).map_err(|e| ConfigError::InvalidUrl {
        field,
        value: value.to_owned(),
        reason: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::InvalidUrl {
            field,
            value: value.to_owned(),
            reason: "must be an http or https URL with a host".into(),
        });
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
            ConfigError::InvalidDuration {
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
            ConfigError::InvalidDuration {
                field: "connect_timeout",
                ..
            }
        ));
        assert!(base().state_key("short").build().is_err());
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
        assert_eq!(c.scopes(), ["read:jira-work", "offline_access"]);
        assert!(!format!("{c:?}").contains("super-secret-value"));
    }
}
