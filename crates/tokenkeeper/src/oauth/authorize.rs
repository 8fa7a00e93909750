//! The authorization flow, provider side: `begin` builds the provider URL with a signed,
//! expiring `state` (see [`state`](super::state)) and a PKCE (S256) challenge; `complete`
//! checks the state and exchanges the code once.
//!
//! Nothing here writes a record: [`OAuthClient::complete_authorization`] hands back a
//! [`Grant`], and `TokenManager::complete_authorization` is what turns a grant into an
//! installation (recognising a repeated callback, re-authorizing an existing installation,
//! choosing the first due time through the refresh policy). The [design document](crate::_documentation::design)'s
//! "Authorization flow" section says why the state is signed rather than stored.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokenkeeper_core::{
    IdToken, IllegalTransition, InstallationId, StoreError, Timestamp, TokenSet,
};

use crate::oauth::client::OAuthClient;
use crate::oauth::error::OAuthError;
use crate::oauth::state::{self, NONCE_LEN, StateClaims};

/// The authorization code from the provider's callback (`?code=`). Single use; `Debug`
/// prints `[redacted]`.
#[derive(Clone)]
pub struct AuthorizationCode(SecretString);

impl AuthorizationCode {
    /// Wraps the callback's `code` parameter.
    pub fn new(code: impl Into<String>) -> Self {
        Self(SecretString::from(code.into()))
    }

    /// The code, for the token request.
    pub fn secret(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for AuthorizationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthorizationCode([redacted])")
    }
}

impl From<&str> for AuthorizationCode {
    fn from(code: &str) -> Self {
        Self::new(code)
    }
}

impl From<String> for AuthorizationCode {
    fn from(code: String) -> Self {
        Self::new(code)
    }
}

/// Why an authorization could not begin or complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorizationError {
    /// The `state` was not issued by this consumer (tampered, garbled, or another consumer's).
    #[error(
        "the authorization state is not one this consumer issued (tampered, truncated, or from another consumer or key); start the authorization again"
    )]
    InvalidState,
    /// The `state` expired before the callback arrived.
    #[error(
        "the authorization for installation {installation} expired at {expired_at}; start the authorization again"
    )]
    ExpiredState {
        /// The installation the flow was for.
        installation: InstallationId,
        /// When the flow stopped being accepted.
        expired_at: Timestamp,
    },
    /// The provider refused the code exchange.
    #[error("completing the authorization for installation {installation} failed: {source}")]
    Exchange {
        /// The installation the flow was for.
        installation: InstallationId,
        /// The provider's answer, classified.
        #[source]
        source: OAuthError,
    },
    /// The store failed while recording the new installation.
    #[error(
        "completing the authorization for installation {installation} failed in the store: {source}"
    )]
    Store {
        /// The installation the flow was for.
        installation: InstallationId,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The installation id belongs to another OAuth consumer sharing the store; its record
    /// was left untouched (the new grant's tokens are not stored).
    #[error(
        "installation {installation} belongs to consumer {owner}; this authorization was not recorded: choose another installation id, or give each consumer its own store namespace"
    )]
    ForeignConsumer {
        /// The installation the flow was for.
        installation: InstallationId,
        /// The consumer its record belongs to.
        owner: String,
    },
    /// The stored record refused the new grant (a state machine rule).
    #[error("recording the authorization failed: {0}")]
    Refused(#[source] IllegalTransition),
    /// The system random generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(String),
}

/// A begun authorization: send the user to `url`.
#[derive(Debug, Clone)]
pub struct AuthorizationRequest {
    /// The provider's authorization URL, with `state` and the PKCE challenge.
    pub url: Url,
    /// The `state` value (also in `url`): bind it to the user's session.
    pub state: String,
    /// The installation the authorization will create (or re-authorize).
    pub installation: InstallationId,
    /// The callback must arrive before this.
    pub expires_at: Timestamp,
}

/// A verified, exchanged authorization: the tokens of a grant, not yet stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The installation the flow was begun for.
    pub installation: InstallationId,
    /// The grant's first token set.
    pub tokens: TokenSet,
    /// The OpenID Connect ID token, when the provider sent one.
    pub id_token: Option<IdToken>,
    /// When the flow began (a record authorized at or after this instant came from this
    /// flow's code: that is how a repeated callback is recognised).
    pub begun_at: Timestamp,
}

/// A completed authorization, as recorded by `TokenManager::complete_authorization`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The installation.
    pub installation: InstallationId,
    /// False when a repeated callback found the installation the first one created, or when
    /// the flow re-authorized an existing installation.
    pub created: bool,
    /// The OpenID Connect ID token of this exchange (`None` for a repeated callback, which
    /// made no exchange, and for providers that send none).
    pub id_token: Option<IdToken>,
    /// What is already known to go wrong with this grant (empty when nothing is).
    pub warnings: Vec<AuthorizationWarning>,
}

/// Something about a completed authorization the application should act on now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorizationWarning {
    /// The provider issued no refresh token although the profile expects one: the
    /// installation works until its access token expires, then needs a new authorization.
    #[error(
        "the provider issued no refresh token: installation {installation} works until {expires_at} and then needs the user to authorize the app again; for an OpenID server, request the offline_access scope and prompt=consent (ProviderProfile::with_offline_access)"
    )]
    NoRefreshToken {
        /// The installation.
        installation: InstallationId,
        /// When its access token expires.
        expires_at: Timestamp,
    },
}

/// A state whose signature and expiry checked out.
pub(crate) struct VerifiedState {
    pub(crate) installation: InstallationId,
    pub(crate) begun_at: Timestamp,
    pub(crate) pkce_verifier: Option<String>,
}

fn random_id(nonce: &[u8]) -> Result<InstallationId, AuthorizationError> {
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    InstallationId::new(format!("inst-{hex}"))
        .map_err(|e| AuthorizationError::Random(e.to_string()))
}

impl OAuthClient {
    /// Begins an authorization for a new installation (`installation` chooses its id; by
    /// default a random one) or, with the id of an existing one, a re-authorization.
    ///
    /// # Errors
    ///
    /// [`AuthorizationError::Random`] only if the operating system's random generator fails.
    pub fn begin_authorization(
        &self,
        installation: Option<InstallationId>,
    ) -> Result<AuthorizationRequest, AuthorizationError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| AuthorizationError::Random(e.to_string()))?;
        let installation = match installation {
            Some(id) => id,
            None => random_id(&nonce)?,
        };
        let consumer = self.consumer();
        let expires_at = self
            .clock()
            .now()
            .saturating_add(consumer.authorization_ttl());
        let key = state::signing_key(consumer);
        let state = state::encode(
            &key,
            &StateClaims {
                installation: installation.clone(),
                nonce,
                expires_at,
            },
        );

        let profile = consumer.profile();
        let mut url = profile.authorize_url.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", consumer.client_id())
                .append_pair("response_type", "code")
                .append_pair("redirect_uri", consumer.redirect_uri().as_str())
                .append_pair("state", &state);
            if !consumer.scopes().is_empty() {
                q.append_pair(
                    "scope",
                    &consumer.scopes().join(&profile.scope_separator.to_string()),
                );
            }
            if profile.pkce {
                let verifier = state::pkce_verifier(&key, &nonce);
                let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier));
                q.append_pair("code_challenge", &challenge)
                    .append_pair("code_challenge_method", "S256");
            }
            for (k, v) in &profile.extra_authorize_params {
                q.append_pair(k, v);
            }
        }
        Ok(AuthorizationRequest {
            url,
            state,
            installation,
            expires_at,
        })
    }

    /// Checks a callback's `state`: signed by this consumer's key and not expired.
    pub(crate) fn verify_state(&self, state: &str) -> Result<VerifiedState, AuthorizationError> {
        let key = state::signing_key(self.consumer());
        let claims = state::decode(&key, state).map_err(|_| AuthorizationError::InvalidState)?;
        if self.clock().now() >= claims.expires_at {
            return Err(AuthorizationError::ExpiredState {
                installation: claims.installation,
                expired_at: claims.expires_at,
            });
        }
        let begun_at = claims
            .expires_at
            .saturating_sub(self.consumer().authorization_ttl());
        let pkce_verifier = self
            .consumer()
            .profile()
            .pkce
            .then(|| state::pkce_verifier(&key, &claims.nonce));
        Ok(VerifiedState {
            installation: claims.installation,
            begun_at,
            pkce_verifier,
        })
    }

    /// Completes an authorization on the provider's side: verifies `state` and exchanges
    /// `code` (once). The tokens are returned, not stored: use
    /// `TokenManager::complete_authorization` to record the installation (it also recognises
    /// a repeated callback without a second exchange).
    ///
    /// # Errors
    ///
    /// [`AuthorizationError::InvalidState`] for a state this consumer did not sign,
    /// [`AuthorizationError::ExpiredState`] past `authorization_ttl`, and
    /// [`AuthorizationError::Exchange`] when the provider refuses the code.
    pub async fn complete_authorization(
        &self,
        code: &AuthorizationCode,
        state: &str,
    ) -> Result<Grant, AuthorizationError> {
        let verified = self.verify_state(state)?;
        let grant = self
            .exchange_code(code, verified.pkce_verifier.as_deref())
            .await
            .map_err(|source| AuthorizationError::Exchange {
                installation: verified.installation.clone(),
                source,
            })?;
        Ok(Grant {
            installation: verified.installation,
            tokens: grant.tokens,
            id_token: grant.id_token,
            begun_at: verified.begun_at,
        })
    }
}

/// The consumer name recorded in each installation: `profile/client_id`.
pub(crate) fn consumer_name(client: &OAuthClient) -> String {
    format!(
        "{}/{}",
        client.consumer().profile().name,
        client.consumer().client_id()
    )
}
