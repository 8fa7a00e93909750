//! The authorization flow, provider side: `begin` makes the flow's browser binding and
//! builds the provider URL with a signed, expiring `state` (see [`state`](super::state)) and a
//! PKCE (S256) challenge derived from the binding; `complete` checks the state against the
//! binding and exchanges the code.
//!
//! Nothing here writes a record: [`OAuthClient::complete_authorization`] hands back a
//! [`Grant`], and `TokenManager::complete_authorization` is what turns a grant into an
//! installation (claiming the flow in the store so the code is exchanged once, checking the
//! provider account of a re-authorization, choosing the first due time through the refresh
//! policy). The [design document](crate::_documentation::design)'s
//! "Authorization flow" section says why the state is signed rather than stored.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::Url;
use sha2::{Digest, Sha256};
use tokenkeeper_core::{IdToken, InstallationId, Timestamp, TokenSet};

use crate::oauth::binding::{AuthorizationCode, AuthorizationState, BrowserBinding};
use crate::oauth::client::OAuthClient;
use crate::oauth::error::AuthorizationError;
use crate::oauth::state::{self, Expect, NONCE_LEN, Purpose, StateClaims};

/// A begun authorization: set the `binding` cookie and send the user to `url`. `Debug`
/// leaves out the URL's query (it carries the state) and the binding.
pub struct AuthorizationRequest {
    /// The provider's authorization URL, with `state` and the PKCE challenge.
    pub url: Url,
    /// The signed `state` (also in `url`).
    pub state: AuthorizationState,
    /// The flow's browser binding: keep it in a cookie of this browser
    /// ([`set_cookie_header`](Self::set_cookie_header)) and hand it back to
    /// `complete_authorization` ([`BrowserBinding::from_cookie_header`]).
    pub binding: BrowserBinding,
    /// The installation the authorization will create (or re-authorize).
    pub installation: InstallationId,
    /// The callback must arrive before this.
    pub expires_at: Timestamp,
    /// How long the flow stays valid (the cookie's `Max-Age`).
    ttl: std::time::Duration,
}

impl AuthorizationRequest {
    /// The `Set-Cookie` header value that keeps the flow's binding in this browser: a
    /// `__Host-` cookie named after the state, `HttpOnly; Secure; SameSite=Lax; Path=/`,
    /// expiring with the flow. See [`BrowserBinding`] for why each attribute.
    pub fn set_cookie_header(&self) -> String {
        self.binding.set_cookie_header(&self.state, self.ttl)
    }
}

impl std::fmt::Debug for AuthorizationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut endpoint = self.url.clone();
        endpoint.set_query(None);
        f.debug_struct("AuthorizationRequest")
            .field("url", &format_args!("{endpoint}?[redacted]"))
            .field("state", &self.state)
            .field("binding", &self.binding)
            .field("installation", &self.installation)
            .field("expires_at", &self.expires_at)
            .finish()
    }
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
}

/// A completed authorization, as recorded by `TokenManager::complete_authorization`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The installation.
    pub installation: InstallationId,
    /// False when the flow re-authorized an existing installation (or for a repeated callback
    /// of a flow that did).
    pub created: bool,
    /// True for a repeated callback (same browser, same code) answered with the first one's
    /// outcome, without a second exchange.
    pub replayed: bool,
    /// The provider account the grant belongs to (the profile's identity check), when read:
    /// show it to the user ("installed as …") so a grant approved with an unexpected account
    /// is noticed. `None` for a repeated callback, and when the check is disabled.
    pub account: Option<String>,
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
    /// The provider granted fewer scopes than the consumer asked for (the user unticked some,
    /// or the consumer's scopes at the provider differ): calls that need them will fail.
    #[error(
        "installation {installation} was granted without the scopes {missing:?} the consumer asked for; API calls that need them will be refused: check the consumer's scopes at the provider and ask the user to authorize again"
    )]
    ScopesNotGranted {
        /// The installation.
        installation: InstallationId,
        /// Requested scopes the grant does not carry.
        missing: Vec<String>,
    },
    /// The installation had no recorded provider account (created before accounts were
    /// recorded, or imported), so this re-authorization could not be checked against it; the
    /// new grant's account is recorded from now on.
    #[error(
        "installation {installation} had no recorded provider account, so this re-authorization (account {account}) could not be checked against the original one; confirm with the user that this is the right account"
    )]
    AccountNotVerified {
        /// The installation.
        installation: InstallationId,
        /// The new grant's account, now recorded.
        account: String,
    },
}

/// The longest authorization code accepted, in bytes (provider codes are tens to hundreds).
pub(crate) const MAX_CODE_LEN: usize = 2048;

/// Whether `code` can be an authorization code: 1 to [`MAX_CODE_LEN`] VSCHARs (RFC 6749
/// Appendix A.11: `%x20-7E`).
pub(crate) fn plausible_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= MAX_CODE_LEN
        && code.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A state whose signature, expiry and browser binding checked out.
pub(crate) struct VerifiedState {
    pub(crate) installation: InstallationId,
    /// The flow's id (the state's nonce, hex).
    pub(crate) flow: String,
    pub(crate) purpose: Purpose,
    /// What the installation's record must still be (review N3).
    pub(crate) expect: Expect,
    pub(crate) expires_at: Timestamp,
    pub(crate) pkce_verifier: Option<String>,
}

/// A random id for a new installation, independent of the flow's nonce (which names the
/// flow's claim in the store).
fn random_id() -> Result<InstallationId, AuthorizationError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| AuthorizationError::Random(e.to_string()))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
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
        let (installation, purpose) = match installation {
            Some(id) => (id, Purpose::Reauthorize),
            None => (random_id()?, Purpose::Install),
        };
        self.begin(installation, purpose, Expect::Unknown)
    }

    /// Begins a flow for `installation` with what it is for and what its record must still
    /// be at the callback (signed into the state).
    pub(crate) fn begin(
        &self,
        installation: InstallationId,
        purpose: Purpose,
        expect: Expect,
    ) -> Result<AuthorizationRequest, AuthorizationError> {
        let consumer = self.consumer();
        let key = consumer
            .state_keys()
            .first()
            .ok_or(AuthorizationError::NoStateKey)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| AuthorizationError::Random(e.to_string()))?;
        let binding = BrowserBinding::generate()?;
        let expires_at = self
            .clock()
            .now()
            .saturating_add(consumer.authorization_ttl());
        let state = AuthorizationState::new(state::encode(
            key,
            &consumer_tag(consumer),
            &StateClaims {
                installation: installation.clone(),
                nonce,
                expires_at,
                purpose,
                binding_hash: binding.hash(),
                expect,
            },
        ));

        let profile = consumer.profile();
        let mut url = profile.authorize_url.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", consumer.client_id())
                .append_pair("response_type", "code")
                .append_pair("redirect_uri", consumer.redirect_uri().as_str())
                .append_pair("state", state.as_str());
            if !consumer.scopes().is_empty() {
                q.append_pair(
                    "scope",
                    &consumer.scopes().join(&profile.scope_separator.to_string()),
                );
            }
            if profile.pkce {
                let verifier = binding.pkce_verifier(&nonce);
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
            binding,
            installation,
            expires_at,
            ttl: consumer.authorization_ttl(),
        })
    }

    /// Checks a callback's `state`: signed by one of this consumer's state keys, not expired,
    /// and issued to the browser whose `binding` came with the callback.
    pub(crate) fn verify_state(
        &self,
        state: &AuthorizationState,
        binding: &BrowserBinding,
    ) -> Result<VerifiedState, AuthorizationError> {
        let keys = self.consumer().state_keys();
        if keys.is_empty() {
            return Err(AuthorizationError::NoStateKey);
        }
        let claims = state::decode(keys, &consumer_tag(self.consumer()), state.as_str())
            .map_err(|_| AuthorizationError::InvalidState)?;
        if self.clock().now() >= claims.expires_at {
            return Err(AuthorizationError::ExpiredState {
                installation: claims.installation,
                expired_at: claims.expires_at,
            });
        }
        if !state::same_hash(&claims.binding_hash, &binding.hash()) {
            return Err(AuthorizationError::BrowserMismatch {
                installation: claims.installation,
            });
        }
        let pkce_verifier = self
            .consumer()
            .profile()
            .pkce
            .then(|| binding.pkce_verifier(&claims.nonce));
        Ok(VerifiedState {
            installation: claims.installation,
            flow: claims.nonce.iter().map(|b| format!("{b:02x}")).collect(),
            purpose: claims.purpose,
            expect: claims.expect,
            expires_at: claims.expires_at,
            pkce_verifier,
        })
    }

    /// Completes an authorization on the provider's side: verifies `state` against the
    /// browser's `binding` and exchanges `code`. The tokens are returned, not stored, and
    /// nothing stops a duplicate callback from exchanging the code again: use
    /// `TokenManager::complete_authorization`, which claims the flow in the store first,
    /// checks the provider account and records the installation.
    ///
    /// # Errors
    ///
    /// [`AuthorizationError::InvalidState`] for a state this consumer did not sign,
    /// [`AuthorizationError::ExpiredState`] past `authorization_ttl`,
    /// [`AuthorizationError::BrowserMismatch`] for another browser's binding, and
    /// [`AuthorizationError::Exchange`] when the provider refuses the code.
    pub async fn complete_authorization(
        &self,
        code: &AuthorizationCode,
        state: &AuthorizationState,
        binding: &BrowserBinding,
    ) -> Result<Grant, AuthorizationError> {
        // No `iss` given: refused if the provider always sends one (see
        // `TokenManager::complete_authorization_with_issuer`).
        check_issuer(self.consumer().profile(), None)?;
        let verified = self.verify_state(state, binding)?;
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
        })
    }
}

/// Checks a callback's `iss` (RFC 9207) against the profile: equal to its issuer when both
/// are known; present when the provider always sends it.
pub(crate) fn check_issuer(
    profile: &crate::ProviderProfile,
    received: Option<&str>,
) -> Result<(), AuthorizationError> {
    match (received, profile.issuer.as_deref()) {
        (Some(got), Some(want)) if got != want => Err(AuthorizationError::IssuerMismatch {
            expected: want.to_owned(),
            received: got
                .chars()
                .filter(|c| !c.is_control() && !c.is_whitespace())
                .take(100)
                .collect(),
        }),
        (None, _) if profile.callback_iss_required => Err(AuthorizationError::MissingIssuer),
        _ => Ok(()),
    }
}

/// What a state is bound to (review N1): the consumer's profile name, client id, redirect URI
/// and token endpoint, hashed. Another consumer (even one sharing the state key) refuses it.
fn consumer_tag(consumer: &crate::oauth::config::ConsumerConfig) -> [u8; state::CONSUMER_TAG_LEN] {
    let profile = consumer.profile();
    let mut hash = Sha256::new();
    for part in [
        profile.name.as_str(),
        consumer.client_id(),
        consumer.redirect_uri().as_str(),
        profile.token_url.as_str(),
    ] {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    hash.finalize().into()
}

/// The consumer name recorded in each installation (see [`ConsumerConfig::name`]).
///
/// [`ConsumerConfig::name`]: crate::ConsumerConfig::name
pub(crate) fn consumer_name(client: &OAuthClient) -> String {
    client.consumer().name()
}
