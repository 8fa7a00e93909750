//! `OAuthClient`: the token endpoint client, on one shared `reqwest::Client` (rustls,
//! connection pooling, timeouts).
//!
//! It builds each request the way the profile says (HTTP Basic or body credentials, form or
//! JSON), records the time the request was *sent* so `expires_at` is never late, caps the
//! reply's size while reading it, and hands the bytes to [`parse_token_response`]. Secrets go
//! only into the request: never into a log line or an error.

use std::sync::Arc;
use std::time::SystemTime;

use reqwest::header::{ACCEPT, RETRY_AFTER};
use tokenkeeper_core::{Clock, FailureClass, InstallationId, RefreshToken, TokenSet};

use crate::config::{ConfigError, ConsumerConfig};
use crate::error::{ErrorKind, OAuthError, Operation};
use crate::profile::{BodyEncoding, ClientAuth};
use crate::response::{RawResponse, parse_retry_after, parse_token_response};

/// Speaks OAuth 2.0 to one consumer's provider. Cheap to clone.
#[derive(Clone)]
pub struct OAuthClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) http: reqwest::Client,
    pub(crate) consumer: ConsumerConfig,
    pub(crate) clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthClient")
            .field("consumer", &self.inner.consumer)
            .finish_non_exhaustive()
    }
}

/// Whether the provider revoked a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The provider confirmed the revocation.
    Revoked,
    /// The profile has no revocation endpoint; nothing was sent.
    Unsupported,
}

impl OAuthClient {
    /// A client with its own `reqwest::Client` built from the consumer's timeouts.
    pub fn new(consumer: ConsumerConfig, clock: Arc<dyn Clock>) -> Result<Self, ConfigError> {
        let http = reqwest::Client::builder()
            .timeout(consumer.http_timeout())
            .connect_timeout(consumer.connect_timeout())
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokenkeeper/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::InvalidUrl {
                field: "http client",
                value: String::new(),
                reason: e.to_string(),
            })?;
        Ok(Self::with_http_client(consumer, clock, http))
    }

    /// A client on a `reqwest::Client` you already have (its timeouts apply).
    pub fn with_http_client(
        consumer: ConsumerConfig,
        clock: Arc<dyn Clock>,
        http: reqwest::Client,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                http,
                consumer,
                clock,
            }),
        }
    }

    /// The consumer.
    pub fn consumer(&self) -> &ConsumerConfig {
        &self.inner.consumer
    }

    /// The shared HTTP client (for API calls with the tokens).
    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Exchanges an authorization code (with its PKCE verifier) for a new token set.
    pub async fn exchange_code(
        &self,
        code: &str,
        pkce_verifier: Option<&str>,
    ) -> Result<TokenSet, OAuthError> {
        let mut params = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code.to_owned()),
            (
                "redirect_uri",
                self.inner.consumer.redirect_uri().as_str().to_owned(),
            ),
        ];
        if let Some(v) = pkce_verifier {
            params.push(("code_verifier", v.to_owned()));
        }
        self.token_request(Operation::CodeExchange, None, params, None)
            .await
    }

    /// Refreshes `current` with its own refresh token. The result is merged: a reply without a
    /// refresh token or scopes keeps `current`'s.
    pub async fn refresh(
        &self,
        installation: &InstallationId,
        current: &TokenSet,
    ) -> Result<TokenSet, OAuthError> {
        let Some(refresh) = &current.refresh_token else {
            return Err(OAuthError::new(
                Operation::Refresh,
                ErrorKind::InvalidResponse,
                FailureClass::RefreshTokenRejected,
            )
            .with_detail("the installation has no refresh token")
            .for_installation(Some(installation)));
        };
        self.refresh_with(installation, refresh, current).await
    }

    /// Refreshes with a specific refresh token (e.g. the previous one, inside a reuse leeway),
    /// merging the reply onto `previous`.
    pub async fn refresh_with(
        &self,
        installation: &InstallationId,
        refresh_token: &RefreshToken,
        previous: &TokenSet,
    ) -> Result<TokenSet, OAuthError> {
        let params = vec![
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", refresh_token.secret().to_owned()),
        ];
        self.token_request(
            Operation::Refresh,
            Some(installation),
            params,
            Some(previous),
        )
        .await
    }

    /// The client-credentials grant: a token for the consumer itself, not an installation.
    pub async fn client_credentials(&self) -> Result<TokenSet, OAuthError> {
        let params = vec![("grant_type", "client_credentials".to_owned())];
        self.token_request(Operation::ClientCredentials, None, params, None)
            .await
    }

    /// RFC 7009: asks the provider to revoke a token (a refresh token revokes its grant).
    pub async fn revoke(
        &self,
        installation: Option<&InstallationId>,
        token: &str,
        hint: &str,
    ) -> Result<Revocation, OAuthError> {
        let Some(url) = self.inner.consumer.profile().revoke_url.clone() else {
            return Ok(Revocation::Unsupported);
        };
        let params = vec![
            ("token", token.to_owned()),
            ("token_type_hint", hint.to_owned()),
        ];
        let (raw, _) = self
            .send(Operation::Revoke, installation, url, params)
            .await?;
        if (200..300).contains(&raw.status) {
            return Ok(Revocation::Revoked);
        }
        let now = self.inner.clock.now();
        match parse_token_response(
            self.inner.consumer.profile(),
            Operation::Revoke,
            &raw,
            now,
            None,
        ) {
            Err(e) => Err(e.for_installation(installation)),
            Ok(_) => Ok(Revocation::Revoked),
        }
    }

    async fn token_request(
        &self,
        operation: Operation,
        installation: Option<&InstallationId>,
        params: Vec<(&'static str, String)>,
        previous: Option<&TokenSet>,
    ) -> Result<TokenSet, OAuthError> {
        let url = self.inner.consumer.profile().token_url.clone();
        let (raw, sent_at) = self.send(operation, installation, url, params).await?;
        parse_token_response(
            self.inner.consumer.profile(),
            operation,
            &raw,
            sent_at,
            previous,
        )
        .map_err(|e| e.for_installation(installation))
    }

    /// Sends one request and reads the capped reply. Returns the reply and when it was sent.
    async fn send(
        &self,
        operation: Operation,
        installation: Option<&InstallationId>,
        url: reqwest::Url,
        mut params: Vec<(&'static str, String)>,
    ) -> Result<(RawResponse, tokenkeeper_core::Timestamp), OAuthError> {
        let consumer = &self.inner.consumer;
        let profile = consumer.profile();
        let mut request = self.inner.http.post(url).header(ACCEPT, "application/json");
        match profile.client_auth {
            ClientAuth::Basic => {
                request = request.basic_auth(
                    consumer.client_id(),
                    Some(consumer.client_secret().expose()),
                );
            }
            ClientAuth::RequestBody => {
                params.push(("client_id", consumer.client_id().to_owned()));
                params.push((
                    "client_secret",
                    consumer.client_secret().expose().to_owned(),
                ));
            }
        }
        request = match profile.body_encoding {
            BodyEncoding::Form => request.form(&params),
            BodyEncoding::Json => {
                let map: serde_json::Map<String, serde_json::Value> = params
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                    .collect();
                request.json(&map)
            }
        };
        let transport = |e: reqwest::Error| {
            let what = if e.is_timeout() {
                "the provider did not answer in time"
            } else if e.is_connect() {
                "cannot connect to the provider"
            } else {
                "the connection to the provider failed"
            };
            let mut err = OAuthError::new(operation, ErrorKind::Transport, FailureClass::Transient)
                .with_detail(what)
                .for_installation(installation);
            // reqwest errors name the URL, never the body or headers that hold secrets.
            err.0.source = Some(Box::new(e.without_url()));
            err
        };
        let sent_at = self.inner.clock.now();
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let limit = consumer.max_response_bytes();
        let too_large = || {
            let mut e = OAuthError::new(operation, ErrorKind::TooLarge, FailureClass::Transient)
                .with_detail(format!(
                    "the reply exceeds the {limit}-byte limit (max_response_bytes); it was not read"
                ))
                .for_installation(installation);
            e.0.status = Some(status);
            e
        };
        if response
            .content_length()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok((
            RawResponse {
                status,
                retry_after,
                body,
            },
            sent_at,
        ))
    }
}
