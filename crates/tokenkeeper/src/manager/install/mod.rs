//! Installations come into being here: the manager's side of the authorization flow (the
//! OAuth client verifies the state and exchanges the code; the manager claims the flow in the
//! store first, checks the provider account, and records the grant) and
//! the import of token pairs obtained elsewhere. Both choose the first due time through the
//! [`RefreshPolicy`](super::RefreshPolicy), like every other write.

mod claim;
mod error;
mod follow;
mod grant;

pub use error::InstallError;
use error::Refusal;

use std::sync::Arc;

use tokenkeeper_core::{InstallationId, Record, StateKind, TokenSet};

use crate::error::Error;
use crate::manager::TokenManager;
use crate::manager::events::LocalEventKind;
use crate::oauth::{AuthorizationCode, AuthorizationState, BrowserBinding};
use crate::oauth::{AuthorizationError, AuthorizationRequest, Completed, consumer_name};
use crate::oauth::{Expect, Purpose};
use claim::FlowClaim;

impl TokenManager {
    /// Begins an authorization: a new installation, or `Some(id)` to re-authorize one (the
    /// way out of `ReauthorizationRequired`). Set the returned `binding` as a cookie of this
    /// browser and send it to `url`.
    ///
    /// `Some(id)` reads nothing from the store: such a flow never undoes a revocation, but
    /// it does not see a deletion or another flow's grant since it began either. Prefer
    /// [`begin_reauthorization`](Self::begin_reauthorization), which does, and
    /// [`begin_installation`](Self::begin_installation) to choose the id of a new one.
    ///
    /// # Errors
    ///
    /// [`Error::Authorization`] wrapping [`AuthorizationError::NoStateKey`] when the consumer
    /// has no state key, or [`AuthorizationError::Random`] if the system random generator
    /// fails.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn demo(manager: tokenkeeper::TokenManager) -> Result<(), tokenkeeper::Error> {
    /// let begun = manager.begin_authorization(None)?;
    /// // Answer with a redirect to begun.url and this Set-Cookie header (the flow's binding):
    /// let cookie = begun.set_cookie_header();
    /// assert!(begun.url.as_str().contains("state=") && cookie.starts_with("__Host-tkflow-"));
    /// # Ok(()) }
    /// ```
    pub fn begin_authorization(
        &self,
        installation: Option<InstallationId>,
    ) -> Result<AuthorizationRequest, Error> {
        self.engine
            .client
            .begin_authorization(installation)
            .map_err(|e| Error::Authorization(Arc::new(e)))
    }

    /// Begins a re-authorization of `installation` that holds only while the installation
    /// stays as it is now (review N3): the state carries whether its record exists and, if
    /// it does, its incarnation, authorization generation and whether it is revoked. A
    /// callback after the installation was revoked, deleted, created again or authorized by
    /// another flow is refused with `InstallError::Superseded` (before the code is
    /// spent, when seen then). Re-authorizing a revoked installation takes a flow begun after
    /// the revocation, through this method.
    ///
    /// # Errors
    ///
    /// [`Error::ForeignConsumer`] for another consumer's installation, [`Error::Store`], and
    /// those of [`begin_authorization`](Self::begin_authorization).
    pub async fn begin_reauthorization(
        &self,
        installation: &InstallationId,
    ) -> Result<AuthorizationRequest, Error> {
        let expect = match self.engine.store.get(installation).await {
            Ok(None) => Expect::Absent,
            Ok(Some(record)) => {
                self.engine.owns(&record)?;
                Expect::Present {
                    created: record.created_at(),
                    generation: record.generation(),
                    revoked: record.state().kind() == StateKind::Revoked,
                }
            }
            Err(e) => return Err(Error::store(installation, e)),
        };
        self.engine
            .client
            .begin(installation.clone(), Purpose::Reauthorize, expect)
            .map_err(|e| Error::Authorization(Arc::new(e)))
    }

    /// Begins an authorization for a new installation with an id the application chooses
    /// (`begin_authorization(None)` picks a random one): the callback is refused with
    /// `AlreadyInstalled` if the id exists by then, so one user cannot re-authorize another's
    /// installation by choosing its id (review N3).
    ///
    /// # Errors
    ///
    /// Those of [`begin_authorization`](Self::begin_authorization).
    pub fn begin_installation(
        &self,
        installation: InstallationId,
    ) -> Result<AuthorizationRequest, Error> {
        self.engine
            .client
            .begin(installation, Purpose::Install, Expect::Unknown)
            .map_err(|e| Error::Authorization(Arc::new(e)))
    }

    /// Completes an authorization from the provider's callback: the query's `code` and
    /// `state`, and the `binding` read from the cookie [`begin_authorization`] set
    /// ([`BrowserBinding::from_cookie_header`]).
    ///
    /// Verifies the state and that it was issued to this browser, claims the flow in the
    /// store (so that of any number of callbacks of one flow, in any process, exactly one
    /// exchanges the code), exchanges the code, reads the grant's provider account, and
    /// records the installation (or, for a flow begun for an existing installation, replaces
    /// its tokens, if the account is the same). A repeated callback with the same code from
    /// the same browser gets the first one's outcome (`replayed: true`) without an exchange.
    ///
    /// [`begin_authorization`]: Self::begin_authorization
    ///
    /// # Errors
    ///
    /// [`Error::Authorization`] wrapping an [`AuthorizationError`] (the provider's side):
    /// `InvalidState`, `ExpiredState`, `BrowserMismatch` (another browser's binding),
    /// `MalformedCode`, `Identity` or `Exchange` (the provider refused the code);
    /// [`Error::Install`] wrapping an [`InstallError`](crate::InstallError) (the store's
    /// side): `AlreadyUsed` (this flow was completed with another code),
    /// `DuplicateCallback`, `AlreadyInstalled`, `Superseded`, `DifferentAccount`,
    /// `ForeignConsumer` or `Store`.
    ///
    /// # Examples
    ///
    /// ```
    /// use tokenkeeper::{AuthorizationCode, AuthorizationState, BrowserBinding};
    ///
    /// # async fn demo(manager: tokenkeeper::TokenManager, code: String, state: String, cookies: String)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// // In the redirect URI's handler, with the query's `code` and `state` and the request's
    /// // Cookie header:
    /// let state = AuthorizationState::new(state);
    /// let binding = BrowserBinding::from_cookie_header(&cookies, &state)?;
    /// let done = manager
    ///     .complete_authorization(AuthorizationCode::new(code), &state, &binding)
    ///     .await?;
    /// // Answer with Set-Cookie: state.clear_cookie_header()
    /// println!("installation {} as account {:?}", done.installation, done.account);
    /// # Ok(()) }
    /// ```
    pub async fn complete_authorization(
        &self,
        code: AuthorizationCode,
        state: &AuthorizationState,
        binding: &BrowserBinding,
    ) -> Result<Completed, Error> {
        if self.engine.client.consumer().profile().issuer.is_some() {
            // Which `iss` came (or none) is the mix-up defence: it must be passed on.
            return Err(Error::Authorization(Arc::new(
                AuthorizationError::IssuerNotPassed,
            )));
        }
        self.complete_authorization_with_issuer(code, state, binding, None)
            .await
    }

    /// [`complete_authorization`](Self::complete_authorization) with the callback's `iss`
    /// parameter (RFC 9207), the mix-up defence: when the profile names its
    /// [`issuer`](crate::ProviderProfile::issuer), an `iss` naming another server is refused
    /// before anything is claimed or exchanged, and a provider that always sends `iss`
    /// ([`callback_iss_required`](crate::ProviderProfile::callback_iss_required)) must have
    /// sent it.
    ///
    /// # Errors
    ///
    /// Those of [`complete_authorization`](Self::complete_authorization), and
    /// `IssuerMismatch` or `MissingIssuer`.
    pub async fn complete_authorization_with_issuer(
        &self,
        code: AuthorizationCode,
        state: &AuthorizationState,
        binding: &BrowserBinding,
        iss: Option<&str>,
    ) -> Result<Completed, Error> {
        let refused = |e: Refusal| {
            crate::manager::metrics::authorization_refused(
                &self.engine.consumer_label,
                e.reason_label(),
            );
            Error::from(e)
        };
        crate::oauth::check_issuer(self.engine.client.consumer().profile(), iss)
            .map_err(|e| refused(e.into()))?;
        let (done, written) = self
            .record_authorization(&code, state, binding)
            .await
            .map_err(refused)?;
        if let Some(record) = written {
            // Tokens of the previous grant, cached before, are never served again.
            self.engine.cache.forget(&done.installation, Some(&record));
            self.engine
                .emit(&done.installation, LocalEventKind::Authorized);
        }
        Ok(done)
    }

    async fn record_authorization(
        &self,
        code: &AuthorizationCode,
        state: &AuthorizationState,
        binding: &BrowserBinding,
    ) -> Result<(Completed, Option<Record>), Refusal> {
        let engine = &self.engine;
        let verified = engine.client.verify_state(state, binding)?;
        let installation = verified.installation.clone();
        // A code that cannot be one costs neither a claim nor a token request (review N8).
        if !crate::oauth::plausible_code(code.secret()) {
            return Err(AuthorizationError::MalformedCode { installation }.into());
        }
        // A deploy's `shutdown()` waits for this callback to record what it exchanges (review
        // SU5); one arriving after shutdown began claims and exchanges nothing.
        let Some(_in_flight) = engine.in_flight.enter() else {
            return Err(InstallError::ShuttingDown { installation }.into());
        };
        let key = claim::flow_key(&engine.consumer, &verified.flow);
        let ttl = verified
            .expires_at
            .duration_since(engine.clock.now())
            .saturating_add(claim::CLAIM_SKEW_MARGIN);
        let mine = FlowClaim::exchanging(code)?;
        let claimed = match engine.store.claim_flow(&key, &mine.encode(), ttl).await {
            Ok(claimed) => claimed,
            Err(source) => {
                self.settle_own_failed_claim(&key, &mine, ttl).await;
                return Err(InstallError::Store {
                    installation,
                    source,
                }
                .into());
            }
        };
        if let Some(existing) = claimed {
            return self
                .follow_claim(&key, existing, &mine.code, &installation)
                .await
                .map(|done| (done, None));
        }
        let mut code_sent = false;
        let outcome = self
            .exchange_and_record(code, &verified, &mut code_sent)
            .await;
        let settled = mine.settled(&outcome, code_sent);
        if let Err(e) = engine.store.settle_flow(&key, &settled.encode(), ttl).await {
            // The outcome stands; a duplicate callback waiting for it times out instead.
            tracing::warn!(installation = %installation, error = %e, "the outcome of an authorization could not be written to its flow claim");
        }
        outcome
    }

    /// Adopts a token pair obtained elsewhere (migrating existing installations), without a
    /// provider call.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidImport`] for an empty access or refresh token or an expiry before the
    /// time obtained; [`Error::Store`] (`AlreadyExists` when the id is taken).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenkeeper::{AccessToken, InstallationId, core::RefreshToken, core::Scopes, core::SystemClock, core::Clock, core::TokenSet};
    ///
    /// # async fn demo(manager: tokenkeeper::TokenManager) -> Result<(), Box<dyn std::error::Error>> {
    /// let now = SystemClock.now();
    /// let tokens = TokenSet {
    ///     access_token: AccessToken::new("access-from-the-old-system"),
    ///     refresh_token: Some(RefreshToken::new("refresh-from-the-old-system")),
    ///     token_type: "bearer".into(),
    ///     expires_at: now.saturating_add(Duration::from_secs(3600)),
    ///     scopes: Scopes::parse("repository account"),
    ///     obtained_at: now,
    ///     refresh_expires_at: None,
    /// };
    /// manager.import_installation(InstallationId::new("workspace-1")?, tokens).await?;
    /// # Ok(()) }
    /// ```
    pub async fn import_installation(
        &self,
        id: InstallationId,
        tokens: TokenSet,
    ) -> Result<(), Error> {
        self.import_installation_with_account(id, tokens, None)
            .await
    }

    /// [`import_installation`](Self::import_installation), recording the provider `account`
    /// the tokens belong to (review N4). An installation imported without one takes whatever
    /// account its first re-authorization brings (with the `AccountNotVerified` warning); with
    /// one, a re-authorization by another account is refused (`DifferentAccount`) as for any
    /// installation authorized here.
    ///
    /// # Errors
    ///
    /// Those of [`import_installation`](Self::import_installation).
    pub async fn import_installation_with_account(
        &self,
        id: InstallationId,
        tokens: TokenSet,
        account: Option<String>,
    ) -> Result<(), Error> {
        let invalid = |reason: &str| Error::InvalidImport {
            id: id.clone(),
            reason: reason.to_owned(),
        };
        if tokens.access_token.secret().is_empty() {
            return Err(invalid("the access token is empty"));
        }
        if tokens
            .refresh_token
            .as_ref()
            .is_some_and(|r| r.secret().is_empty())
        {
            return Err(invalid(
                "the refresh token is empty (pass None if there is none)",
            ));
        }
        if tokens.expires_at < tokens.obtained_at {
            return Err(invalid("expires_at is before obtained_at"));
        }
        let engine = &self.engine;
        let now = engine.clock.now();
        let refresh_at = engine.policy.refresh_at(&tokens, now);
        if account
            .as_ref()
            .is_some_and(|a| a.is_empty() || a.len() > 256 || a.chars().any(char::is_control))
        {
            return Err(invalid(
                "the account is empty, longer than 256 bytes or has control characters",
            ));
        }
        let record = Record::new(
            id.clone(),
            consumer_name(&engine.client),
            tokens,
            refresh_at,
            now,
        )
        .with_account(account);
        engine
            .store
            .create(&record)
            .await
            .map_err(|e| Error::store(&id, e))?;
        engine.emit(&id, LocalEventKind::Imported);
        Ok(())
    }
}

/// How the installation's record left what a re-authorization was begun for, if it did
/// (review N3): revoked, deleted, created again or authorized by another flow since. A flow
/// that knows nothing of the record (begun without reading the store) still never undoes a
/// revocation: re-authorizing a revoked installation takes a flow begun after it
/// ([`TokenManager::begin_reauthorization`]).
fn superseded(expect: Expect, record: Option<&Record>) -> Option<&'static str> {
    let revoked = |r: &Record| r.state().kind() == StateKind::Revoked;
    match (expect, record) {
        (Expect::Unknown, Some(r)) if revoked(r) => Some(
            "is revoked, and a flow begun with begin_authorization(Some(id)) never re-authorizes a revoked installation: begin one with begin_reauthorization",
        ),
        (Expect::Unknown, _) | (Expect::Absent, None) => None,
        (Expect::Absent, Some(_)) => Some("was created by another flow since this one began"),
        (Expect::Present { .. }, None) => Some("was deleted since this flow began"),
        (
            Expect::Present {
                created,
                generation,
                revoked: was_revoked,
            },
            Some(r),
        ) => {
            if r.created_at() != created {
                Some("was deleted and created again since this flow began")
            } else if r.generation() != generation {
                Some("was authorized again by another flow since this one began")
            } else if revoked(r) && !was_revoked {
                Some("was revoked since this flow began")
            } else {
                None
            }
        }
    }
}
