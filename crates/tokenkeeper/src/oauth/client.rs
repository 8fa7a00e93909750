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
use tokenkeeper_core::{Clock, FailureClass, IdToken, InstallationId, RefreshToken, TokenSet};

use crate::oauth::binding::AuthorizationCode;

use crate::oauth::config::{ConfigError, ConsumerConfig};
use crate::oauth::error::{OAuthError, Operation};
use crate::oauth::profile::{BodyEncoding, ClientAuth};
use crate::oauth::response::{RawResponse, id_token, parse_retry_after, parse_token_response};
use crate::oauth::transport::TokenTransport;

/// Speaks OAuth 2.0 to one consumer's provider. Cheap to clone.
#[derive(Clone)]
pub struct OAuthClient {
    inner: Arc<ClientParts>,
}

#[derive(Clone)]
struct ClientParts {
    /// Token endpoint requests only: no redirects, no retries, the consumer's timeouts.
    token_http: reqwest::Client,
    /// API calls with the tokens (the user's client, or the same as `token_http`).
    http: reqwest::Client,
    pub(crate) consumer: ConsumerConfig,
    pub(crate) clock: Arc<dyn Clock>,
    /// The simulator's stand-in for the network under token requests (never in production).
    transport: Option<Arc<dyn TokenTransport>>,
}

impl std::fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthClient")
            .field("consumer", &self.inner.consumer)
            .finish_non_exhaustive()
    }
}

/// What a code exchange returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeGrant {
    /// The installation's first token set.
    pub tokens: TokenSet,
    /// The OpenID Connect ID token, when the provider sent one (OpenID servers do when the
    /// `openid` scope was requested).
    pub id_token: Option<IdToken>,
}

/// How long a token request whose deadline passed may still finish reading a reply that has
/// already arrived (after the process was frozen, say).
pub(crate) const DEADLINE_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// The client for token endpoint requests: the consumer's timeouts, no redirects (a 307/308
/// would re-send the body, refresh token included), no retries (reqwest retries nothing by
/// default beyond protocol NACKs, which never reached the server).
fn token_client(consumer: &ConsumerConfig) -> Result<reqwest::Client, ConfigError> {
    // No total timeout here: `send` enforces the exchange deadline itself (see there).
    reqwest::Client::builder()
        .connect_timeout(consumer.connect_timeout())
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tokenkeeper/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ConfigError::HttpClient(Arc::new(e)))
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
    /// A client with its own `reqwest::Client` built from the consumer's timeouts, used for
    /// the token endpoint and for API calls.
    ///
    /// # Errors
    ///
    /// [`ConfigError::HttpClient`] if the TLS backend cannot be initialised.
    pub fn new(consumer: ConsumerConfig, clock: Arc<dyn Clock>) -> Result<Self, ConfigError> {
        let token_http = token_client(&consumer)?;
        // API calls: the consumer's timeouts as a total bound, and redirects followed (an API
        // may move a resource; reqwest drops the Authorization header across origins).
        let api_http = reqwest::Client::builder()
            .timeout(consumer.http_timeout())
            .connect_timeout(consumer.connect_timeout())
            .user_agent(concat!("tokenkeeper/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::HttpClient(Arc::new(e)))?;
        Ok(Self::assemble(consumer, clock, token_http, api_http))
    }

    /// A client whose API calls ([`OAuthClient::http`], `TokenManager::send_authorized`) go
    /// through a `reqwest::Client` you already have.
    ///
    /// Token requests never do: they always use a client of tokenkeeper's own, with the
    /// consumer's timeouts, no redirects and no retries, because a client that follows a
    /// redirect (307/308 re-send the body) or retries a POST would present a refresh token
    /// twice, and a rotating provider revokes the grant on reuse.
    ///
    /// # Errors
    ///
    /// [`ConfigError::HttpClient`] if the TLS backend cannot be initialised.
    pub fn with_http_client(
        consumer: ConsumerConfig,
        clock: Arc<dyn Clock>,
        http: reqwest::Client,
    ) -> Result<Self, ConfigError> {
        let token_http = token_client(&consumer)?;
        Ok(Self::assemble(consumer, clock, token_http, http))
    }

    /// Not a stable API: token requests go through `transport` instead of the network (the
    /// deterministic simulator; feature `__sim`).
    #[doc(hidden)]
    #[must_use]
    #[cfg(feature = "__sim")]
    pub fn with_token_transport(self, transport: Arc<dyn TokenTransport>) -> Self {
        let mut parts = (*self.inner).clone();
        parts.transport = Some(transport);
        Self {
            inner: Arc::new(parts),
        }
    }

    fn assemble(
        consumer: ConsumerConfig,
        clock: Arc<dyn Clock>,
        token_http: reqwest::Client,
        http: reqwest::Client,
    ) -> Self {
        Self {
            inner: Arc::new(ClientParts {
                token_http,
                http,
                consumer,
                clock,
                transport: None,
            }),
        }
    }

    /// The consumer.
    pub fn consumer(&self) -> &ConsumerConfig {
        &self.inner.consumer
    }

    /// The HTTP client for API calls with the tokens (the one passed to `with_http_client`, or
    /// one with the consumer's timeouts that follows redirects). Token requests never use it.
    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Exchanges an authorization code (with its PKCE verifier) for a new token set, and the
    /// OpenID `id_token` when the provider sends one.
    ///
    /// # Errors
    ///
    /// An [`OAuthError`] classified by what it means: a spent or foreign code is
    /// `RefreshTokenRejected`-class (`invalid_grant`), refused client credentials
    /// `ConsumerCredentialsInvalid`, network and 5xx failures `Transient`.
    pub async fn exchange_code(
        &self,
        code: &AuthorizationCode,
        pkce_verifier: Option<&str>,
    ) -> Result<CodeGrant, OAuthError> {
        let mut params = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code.secret().to_owned()),
            (
                "redirect_uri",
                self.inner.consumer.redirect_uri().as_str().to_owned(),
            ),
        ];
        if let Some(v) = pkce_verifier {
            params.push(("code_verifier", v.to_owned()));
        }
        let url = self.inner.consumer.profile().token_url.clone();
        let operation = Operation::CodeExchange;
        let secrets = self.sent_secrets(&params);
        let (raw, sent_at) = self.send(operation, None, url, params).await?;
        let profile = self.inner.consumer.profile();
        let tokens = parse_token_response(profile, operation, &raw, sent_at, None)
            .map_err(|e| e.without_secrets(&secrets))?;
        Ok(CodeGrant {
            tokens,
            id_token: id_token(&raw),
        })
    }

    /// Refreshes `current` with its own refresh token. The result is merged: a reply without a
    /// refresh token or scopes keeps `current`'s. This call takes no lease: use
    /// `TokenManager` to refresh installations that other processes may refresh too.
    ///
    /// # Errors
    ///
    /// An [`OAuthError`] classified by what it means (`RefreshTokenRejected`,
    /// `ScopeRejected`, `ConsumerCredentialsInvalid`, `Configuration` or `Transient`); an
    /// installation without a refresh token fails before any request.
    pub async fn refresh(
        &self,
        installation: &InstallationId,
        current: &TokenSet,
    ) -> Result<TokenSet, OAuthError> {
        let Some(refresh) = &current.refresh_token else {
            return Err(OAuthError::invalid_response(
                Operation::Refresh,
                FailureClass::RefreshTokenRejected,
                None,
                None,
                "the installation has no refresh token",
            )
            .for_installation(Some(installation)));
        };
        self.refresh_with(installation, refresh, current).await
    }

    /// Refreshes with a specific refresh token (e.g. the previous one, inside a reuse leeway),
    /// merging the reply onto `previous`. Takes no lease, like [`refresh`](Self::refresh).
    ///
    /// # Errors
    ///
    /// As [`refresh`](Self::refresh).
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
    ///
    /// # Errors
    ///
    /// An [`OAuthError`]; refused client credentials are `ConsumerCredentialsInvalid`.
    pub async fn client_credentials(&self) -> Result<TokenSet, OAuthError> {
        let params = vec![("grant_type", "client_credentials".to_owned())];
        self.token_request(Operation::ClientCredentials, None, params, None)
            .await
    }

    /// RFC 7009 for an installation's token set: revokes its refresh token (which revokes the
    /// grant), or its access token when it has none.
    ///
    /// # Errors
    ///
    /// As [`revoke`](Self::revoke).
    pub async fn revoke_tokens(
        &self,
        installation: Option<&InstallationId>,
        tokens: &TokenSet,
    ) -> Result<Revocation, OAuthError> {
        let (token, hint) = match &tokens.refresh_token {
            Some(r) => (r.secret(), "refresh_token"),
            None => (tokens.access_token.secret(), "access_token"),
        };
        self.revoke(installation, token, hint).await
    }

    /// RFC 7009: asks the provider to revoke a token (a refresh token revokes its grant).
    ///
    /// # Errors
    ///
    /// An [`OAuthError`] when the provider answers with an error or cannot be reached; a
    /// profile without a revocation endpoint is `Ok(Revocation::Unsupported)`.
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
        let secrets = self.sent_secrets(&params);
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
            Err(e) => Err(e.without_secrets(&secrets).for_installation(installation)),
            Ok(_) => Ok(Revocation::Revoked),
        }
    }

    /// The secrets a token request with `params` carries, to scrub from the provider's words.
    fn sent_secrets(&self, params: &[(&'static str, String)]) -> Vec<String> {
        let mut secrets: Vec<String> = params
            .iter()
            .filter(|(k, _)| matches!(*k, "code" | "code_verifier" | "refresh_token" | "token"))
            .map(|(_, v)| v.clone())
            .collect();
        let consumer = &self.inner.consumer;
        let secret = consumer.client_secret().expose();
        // The `Authorization: Basic` value carries id and secret together, base64-encoded.
        secrets.push(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:{secret}", consumer.client_id()),
        ));
        secrets.push(secret.to_owned());
        secrets
    }

    async fn token_request(
        &self,
        operation: Operation,
        installation: Option<&InstallationId>,
        params: Vec<(&'static str, String)>,
        previous: Option<&TokenSet>,
    ) -> Result<TokenSet, OAuthError> {
        let url = self.inner.consumer.profile().token_url.clone();
        let secrets = self.sent_secrets(&params);
        let (raw, sent_at) = self.send(operation, installation, url, params).await?;
        parse_token_response(
            self.inner.consumer.profile(),
            operation,
            &raw,
            sent_at,
            previous,
        )
        .map_err(|e| e.without_secrets(&secrets).for_installation(installation))
    }

    /// Sends one request and reads the capped reply. Returns the reply and when it was sent.
    async fn send(
        &self,
        operation: Operation,
        installation: Option<&InstallationId>,
        url: reqwest::Url,
        params: Vec<(&'static str, String)>,
    ) -> Result<(RawResponse, tokenkeeper_core::Timestamp), OAuthError> {
        let request = self.build_request(url, params);
        let sent_at = self.inner.clock.now();
        // The deadline that keeps a token request inside the lease it runs under. It is ours,
        // not reqwest's, so that a reply already received is never thrown away: a process
        // frozen past the deadline (SIGSTOP, a VM pause, CPU starvation) wakes with the
        // reply in its socket and the timer expired at once, so the read gets a short grace
        // before the timer's verdict counts. Throwing that reply away would lose a rotation.
        let deadline = self.inner.consumer.http_timeout();
        let read = self.read_reply(request, operation, installation);
        tokio::pin!(read);
        let outcome = match tokio::time::timeout(deadline, &mut read).await {
            Ok(outcome) => outcome,
            Err(_) => tokio::time::timeout(DEADLINE_GRACE, &mut read)
                .await
                .map_err(|_| {
                    OAuthError::deadline(operation, deadline).for_installation(installation)
                })?,
        };
        Ok((outcome?, sent_at))
    }

    /// The token endpoint request: the client's authentication (HTTP Basic or in the body)
    /// and the parameters, form-encoded or as JSON as the profile says.
    fn build_request(
        &self,
        url: reqwest::Url,
        mut params: Vec<(&'static str, String)>,
    ) -> reqwest::RequestBuilder {
        let consumer = &self.inner.consumer;
        let profile = consumer.profile();
        let mut request = self
            .inner
            .token_http
            .post(url)
            .header(ACCEPT, "application/json");
        match profile.client_auth {
            ClientAuth::Basic => {
                let secret = Some(consumer.client_secret().expose());
                request = request.basic_auth(consumer.client_id(), secret);
            }
            ClientAuth::RequestBody => {
                params.push(("client_id", consumer.client_id().to_owned()));
                let secret = consumer.client_secret().expose().to_owned();
                params.push(("client_secret", secret));
            }
        }
        match profile.body_encoding {
            BodyEncoding::Form => request.form(&params),
            BodyEncoding::Json => {
                let map: serde_json::Map<String, serde_json::Value> = params
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                    .collect();
                request.json(&map)
            }
        }
    }

    /// Sends `request` (through the simulated transport when one is set) and reads the
    /// status, `Retry-After` and the body, refusing a body over `max_response_bytes`.
    async fn read_reply(
        &self,
        request: reqwest::RequestBuilder,
        operation: Operation,
        installation: Option<&InstallationId>,
    ) -> Result<RawResponse, OAuthError> {
        // reqwest errors name the URL (dropped), never the body or headers that hold secrets.
        let transport =
            |e: reqwest::Error| OAuthError::transport(operation, e).for_installation(installation);
        let limit = self.inner.consumer.max_response_bytes();
        if let Some(simulated) = &self.inner.transport {
            let built = request.build().map_err(transport)?;
            let reply = simulated.send(built).await.map_err(|f| {
                OAuthError::transport_failure(operation, f.reached_provider)
                    .for_installation(installation)
            })?;
            if reply.body.len() > limit {
                return Err(OAuthError::too_large(operation, reply.status, limit)
                    .for_installation(installation));
            }
            return Ok(RawResponse {
                status: reply.status,
                retry_after: reply.retry_after,
                body: reply.body,
            });
        }
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        // An HTTP date is read against this client's clock, like every other time here.
        let now = self
            .inner
            .clock
            .now()
            .to_system_time()
            .unwrap_or_else(SystemTime::now);
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        let too_large =
            || OAuthError::too_large(operation, status, limit).for_installation(installation);
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
        Ok(RawResponse {
            status,
            retry_after,
            body,
        })
    }
}
