//! The authorization flow: `begin` builds the provider URL with a signed, expiring `state`
//! and a PKCE (S256) challenge; `complete` checks the state in constant time, exchanges the
//! code once, and creates a new, independent installation.
//!
//! The state is not stored anywhere: it is an HMAC-SHA256-signed token holding its expiry, a
//! random nonce and the installation id, and the PKCE verifier is derived from the nonce with
//! the same key. So any process with the consumer's configuration can complete an
//! authorization another process began, there is no pending-authorization table to share or
//! clean up, and a tampered or foreign state fails the MAC check. (DESIGN.md §8 suggests a
//! stored state; the signed one gives the same guarantees without a second storage contract.)
//! The installation id is fixed when the flow begins, so a repeated callback finds the
//! installation the first one created and returns it without a second code exchange. As with
//! any OAuth state, bind it to the user's session (a cookie) to stop login CSRF.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use reqwest::Url;
use sha2::{Digest, Sha256};
use tokenkeeper_core::{InstallationId, Record, StoreError, Timestamp, TokenStore};

use crate::client::OAuthClient;
use crate::error::OAuthError;

type HmacSha256 = Hmac<Sha256>;

const STATE_VERSION: u8 = 1;
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;

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
        /// When it expired.
        expired_at: Timestamp,
    },
    /// The provider refused the code exchange.
    #[error("completing the authorization for installation {installation} failed: {source}")]
    Exchange {
        /// The installation the flow was for.
        installation: InstallationId,
        /// The provider's answer.
        #[source]
        source: OAuthError,
    },
    /// The store failed.
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
    /// The installation the authorization will create.
    pub installation: InstallationId,
    /// The callback must arrive before this.
    pub expires_at: Timestamp,
}

/// A completed authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The installation.
    pub installation: InstallationId,
    /// False when a repeated callback found the installation the first one created.
    pub created: bool,
}

struct VerifiedState {
    installation: InstallationId,
    nonce: [u8; NONCE_LEN],
    issued_at: Timestamp,
}

fn state_key(client: &OAuthClient) -> Vec<u8> {
    let consumer = client.consumer();
    if let Some(key) = consumer.state_key() {
        return key.as_bytes().to_vec();
    }
    let mut mac = HmacSha256::new_from_slice(consumer.client_secret().expose().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(b"tokenkeeper/state-key/v1/");
    mac.update(consumer.client_id().as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn pkce_verifier(key: &[u8], nonce: &[u8]) -> String {
    let mut m = mac(key);
    m.update(b"pkce/v1/");
    m.update(nonce);
    URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
}

fn random_id(nonce: &[u8]) -> InstallationId {
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    InstallationId::new(format!("inst-{hex}")).expect("hex ids are valid")
}

impl OAuthClient {
    /// Begins an authorization for a new installation (`installation` chooses its id; by
    /// default a random one).
    pub fn begin_authorization(
        &self,
        installation: Option<InstallationId>,
    ) -> Result<AuthorizationRequest, AuthorizationError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| AuthorizationError::Random(e.to_string()))?;
        let installation = installation.unwrap_or_else(|| random_id(&nonce));
        let consumer = self.consumer();
        let expires_at = self
            .clock()
            .now()
            .saturating_add(consumer.authorization_ttl());
        let key = state_key(self);

        let id = installation.as_str().as_bytes();
        let mut bytes = Vec::with_capacity(1 + 8 + NONCE_LEN + 1 + id.len() + MAC_LEN);
        bytes.push(STATE_VERSION);
        bytes.extend_from_slice(&expires_at.unix_nanos().to_be_bytes());
        bytes.extend_from_slice(&nonce);
        bytes.push(id.len() as u8); // ids are at most 200 bytes
        bytes.extend_from_slice(id);
        let mut m = mac(&key);
        m.update(&bytes);
        bytes.extend_from_slice(&m.finalize().into_bytes());
        let state = URL_SAFE_NO_PAD.encode(&bytes);

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
                let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(pkce_verifier(&key, &nonce)));
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

    fn verify_state(&self, state: &str) -> Result<VerifiedState, AuthorizationError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(state.trim())
            .map_err(|_| AuthorizationError::InvalidState)?;
        if bytes.len() < 1 + 8 + NONCE_LEN + 1 + 1 + MAC_LEN || bytes[0] != STATE_VERSION {
            return Err(AuthorizationError::InvalidState);
        }
        let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut m = mac(&state_key(self));
        m.update(body);
        // Constant-time comparison.
        m.verify_slice(tag)
            .map_err(|_| AuthorizationError::InvalidState)?;
        let expires = i64::from_be_bytes(
            body[1..9]
                .try_into()
                .map_err(|_| AuthorizationError::InvalidState)?,
        );
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&body[9..9 + NONCE_LEN]);
        let id_len = usize::from(body[9 + NONCE_LEN]);
        let id_bytes = body
            .get(10 + NONCE_LEN..)
            .filter(|b| b.len() == id_len)
            .ok_or(AuthorizationError::InvalidState)?;
        let installation =
            InstallationId::from_bytes(id_bytes).map_err(|_| AuthorizationError::InvalidState)?;
        let expired_at = Timestamp::from_unix_nanos(expires);
        if self.clock().now() >= expired_at {
            return Err(AuthorizationError::ExpiredState {
                installation,
                expired_at,
            });
        }
        let issued_at = expired_at.saturating_sub(self.consumer().authorization_ttl());
        Ok(VerifiedState {
            installation,
            nonce,
            issued_at,
        })
    }

    /// Completes an authorization: verifies `state`, exchanges `code` once and stores the new
    /// installation (or, for an authorization begun for an existing installation, replaces its
    /// tokens: the way out of `ReauthorizationRequired`). A repeated callback, recognised by
    /// the installation having been authorized after this flow began, returns the installation
    /// without a second exchange.
    pub async fn complete_authorization(
        &self,
        store: &dyn TokenStore,
        code: &str,
        state: &str,
    ) -> Result<Completed, AuthorizationError> {
        let VerifiedState {
            installation,
            nonce,
            issued_at,
        } = self.verify_state(state)?;
        let store_err = |source| AuthorizationError::Store {
            installation: installation.clone(),
            source,
        };
        let existing = |created| Completed {
            installation: installation.clone(),
            created,
        };
        let repeated =
            |r: &Option<Record>| r.as_ref().is_some_and(|r| r.authorized_at() >= issued_at);
        let before = store.get(&installation).await.map_err(store_err)?;
        if repeated(&before) {
            return Ok(existing(false));
        }
        let verifier = self
            .consumer()
            .profile()
            .pkce
            .then(|| pkce_verifier(&state_key(self), &nonce));
        let tokens = match self.exchange_code(code, verifier.as_deref()).await {
            Ok(tokens) => tokens,
            Err(source) => {
                // A concurrent duplicate callback may have won the single-use code.
                if repeated(&store.get(&installation).await.map_err(store_err)?) {
                    return Ok(existing(false));
                }
                return Err(AuthorizationError::Exchange {
                    installation: installation.clone(),
                    source,
                });
            }
        };
        let now = self.clock().now();
        let refresh_at = self.consumer().profile().timing.refresh_at(&tokens);
        if let Some(current) = before {
            return self
                .reauthorize(store, current, tokens, refresh_at)
                .await
                .map(|()| existing(false))
                .map_err(store_err);
        }
        let record = Record::new(
            installation.clone(),
            consumer_name(self),
            tokens,
            refresh_at,
            now,
        );
        // The code is spent: retry a store hiccup once before giving up on these tokens.
        let mut outcome = store.create(&record).await;
        if matches!(outcome, Err(StoreError::Unavailable { .. })) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            outcome = store.create(&record).await;
        }
        match outcome {
            Ok(()) => Ok(existing(true)),
            Err(StoreError::AlreadyExists { .. }) => Ok(existing(false)),
            Err(source) => Err(store_err(source)),
        }
    }
}

impl OAuthClient {
    /// Replaces an existing installation's tokens after a new authorization (compare-and-swap,
    /// retried on conflicts: a new grant wins over anything in flight).
    async fn reauthorize(
        &self,
        store: &dyn TokenStore,
        mut current: Record,
        tokens: tokenkeeper_core::TokenSet,
        refresh_at: Timestamp,
    ) -> Result<(), StoreError> {
        loop {
            let now = self.clock().now();
            let next = current
                .apply(
                    tokenkeeper_core::Event::Authorized {
                        tokens: tokens.clone(),
                        refresh_at,
                    },
                    now,
                )
                .map_err(|e| StoreError::InvalidArgument {
                    backend: "tokenkeeper",
                    operation: "reauthorize",
                    id: current.id().clone(),
                    message: e.to_string(),
                })?;
            match store.compare_and_swap(&next, current.version()).await? {
                tokenkeeper_core::CasOutcome::Swapped => return Ok(()),
                tokenkeeper_core::CasOutcome::Conflict(now_stored) => current = *now_stored,
                tokenkeeper_core::CasOutcome::Missing => return store.create(&next).await,
            }
        }
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
