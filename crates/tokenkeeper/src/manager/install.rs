//! Installations come into being here: the manager's side of the authorization flow (the
//! OAuth client verifies the state and exchanges the code; the manager records the grant) and
//! the import of token pairs obtained elsewhere. Both choose the first due time through the
//! [`RefreshPolicy`](super::RefreshPolicy), like every other write.

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper_core::{Event, InstallationId, Record, StoreError, TokenSet};

use super::TokenManager;
use super::events::LifecycleEventKind;
use crate::error::Error;
use crate::oauth::authorize::{
    AuthorizationCode, AuthorizationError, AuthorizationRequest, AuthorizationWarning, Completed,
    Grant, consumer_name,
};

impl TokenManager {
    /// Begins an authorization: a new installation, or `Some(id)` to re-authorize one (the
    /// way out of `ReauthorizationRequired`). Send the user to the returned `url`.
    ///
    /// # Errors
    ///
    /// [`Error::Authorization`] only if the system random generator fails.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn demo(manager: tokenkeeper::TokenManager) -> Result<(), tokenkeeper::Error> {
    /// let begun = manager.begin_authorization(None)?;
    /// // Redirect the browser to begun.url; keep begun.state with the user's session.
    /// assert!(begun.url.as_str().contains("state="));
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

    /// Completes an authorization from the provider's callback (`code`, `state`): verifies
    /// the state, exchanges the code once and records the installation (or, for a flow begun
    /// for an existing installation, replaces its tokens). A repeated callback, recognised by
    /// the installation having been authorized after this flow began, returns the
    /// installation without a second exchange (`created: false`).
    ///
    /// # Errors
    ///
    /// [`Error::Authorization`] wrapping [`AuthorizationError::InvalidState`] (a state this
    /// consumer did not sign), [`AuthorizationError::ExpiredState`],
    /// [`AuthorizationError::Exchange`] (the provider refused the code) or
    /// [`AuthorizationError::Store`] (the grant could not be recorded).
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(manager: tokenkeeper::TokenManager, code: String, state: String)
    /// # -> Result<(), tokenkeeper::Error> {
    /// // In the redirect URI's handler, with the query's `code` and `state`:
    /// let done = manager.complete_authorization(code, &state).await?;
    /// println!("installation {} (new: {})", done.installation, done.created);
    /// # Ok(()) }
    /// ```
    pub async fn complete_authorization(
        &self,
        code: impl Into<AuthorizationCode>,
        state: &str,
    ) -> Result<Completed, Error> {
        let (done, written) = self
            .record_authorization(&code.into(), state)
            .await
            .map_err(|e| Error::Authorization(Arc::new(e)))?;
        if let Some(record) = written {
            // Tokens of the previous grant, cached before, are never served again.
            self.engine.cache.forget(&done.installation, Some(&record));
            self.engine
                .emit(&done.installation, LifecycleEventKind::Authorized);
        }
        Ok(done)
    }

    async fn record_authorization(
        &self,
        code: &AuthorizationCode,
        state: &str,
    ) -> Result<(Completed, Option<Record>), AuthorizationError> {
        let engine = &self.engine;
        let verified = engine.client.verify_state(state)?;
        let installation = verified.installation.clone();
        let store_err = |source| AuthorizationError::Store {
            installation: installation.clone(),
            source,
        };
        let repeated = |r: &Option<Record>| {
            r.as_ref()
                .is_some_and(|r| r.authorized_at() >= verified.begun_at)
        };
        let already = |_| {
            let done = Completed {
                installation: installation.clone(),
                created: false,
                id_token: None,
                warnings: Vec::new(),
            };
            (done, None)
        };
        let before = engine.store.get(&installation).await.map_err(store_err)?;
        if repeated(&before) {
            return Ok(already(()));
        }
        let exchanged = engine
            .client
            .exchange_code(code, verified.pkce_verifier.as_deref())
            .await;
        let grant = match exchanged {
            Ok(grant) => Grant {
                installation: installation.clone(),
                tokens: grant.tokens,
                id_token: grant.id_token,
                begun_at: verified.begun_at,
            },
            Err(source) => {
                // A concurrent duplicate callback may have won the single-use code.
                if repeated(&engine.store.get(&installation).await.map_err(store_err)?) {
                    return Ok(already(()));
                }
                return Err(AuthorizationError::Exchange {
                    installation: installation.clone(),
                    source,
                });
            }
        };
        let (created, written) = self.store_grant(before, &grant).await?;
        let tokens = written.tokens();
        let mut warnings = Vec::new();
        if engine.client.consumer().profile().expects_refresh_token
            && tokens.refresh_token.is_none()
            && tokens.expires()
        {
            tracing::warn!(installation = %grant.installation, "the provider issued no refresh token; the installation needs a new authorization once its access token expires");
            warnings.push(AuthorizationWarning::NoRefreshToken {
                installation: grant.installation.clone(),
                expires_at: tokens.expires_at,
            });
        }
        let done = Completed {
            installation: grant.installation,
            created,
            id_token: grant.id_token,
            warnings,
        };
        Ok((done, Some(written)))
    }

    /// Records a grant: a new record, or the `Authorized` transition over an existing one
    /// (compare-and-swap, retried on conflicts: a new grant wins over anything in flight).
    /// Returns whether a new installation was created, and the record written.
    async fn store_grant(
        &self,
        mut current: Option<Record>,
        grant: &Grant,
    ) -> Result<(bool, Record), AuthorizationError> {
        let engine = &self.engine;
        let store_err = |source| AuthorizationError::Store {
            installation: grant.installation.clone(),
            source,
        };
        loop {
            let now = engine.clock.now();
            let refresh_at = engine.policy.refresh_at(&grant.tokens, now);
            let Some(existing) = current else {
                let record = Record::new(
                    grant.installation.clone(),
                    consumer_name(&engine.client),
                    grant.tokens.clone(),
                    refresh_at,
                    now,
                );
                // The code is spent: retry a store hiccup once before giving up on the tokens.
                let mut outcome = engine.store.create(&record).await;
                if matches!(outcome, Err(StoreError::Unavailable { .. })) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    outcome = engine.store.create(&record).await;
                }
                return match outcome {
                    Ok(()) => Ok((true, record)),
                    Err(StoreError::AlreadyExists { .. }) => {
                        current = engine
                            .store
                            .get(&grant.installation)
                            .await
                            .map_err(store_err)?;
                        continue;
                    }
                    Err(e) => Err(store_err(e)),
                };
            };
            if existing.consumer() != engine.consumer {
                return Err(AuthorizationError::ForeignConsumer {
                    installation: grant.installation.clone(),
                    owner: existing.consumer().to_owned(),
                });
            }
            let event = Event::Authorized {
                tokens: grant.tokens.clone(),
                refresh_at,
            };
            let next = existing
                .apply(event, now)
                .map_err(AuthorizationError::Refused)?;
            match engine
                .store
                .compare_and_swap(&next, existing.version())
                .await
                .map_err(store_err)?
            {
                tokenkeeper_core::CasOutcome::Swapped => return Ok((false, next)),
                tokenkeeper_core::CasOutcome::Conflict(stored) => current = Some(*stored),
                tokenkeeper_core::CasOutcome::Missing => current = None,
            }
        }
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
    /// use tokenkeeper::{AccessToken, InstallationId, RefreshToken, Scopes, SystemClock, Clock, TokenSet};
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
        let record = Record::new(
            id.clone(),
            consumer_name(&engine.client),
            tokens,
            refresh_at,
            now,
        );
        engine
            .store
            .create(&record)
            .await
            .map_err(|e| Error::store(&id, e))?;
        engine.emit(&id, LifecycleEventKind::Imported);
        Ok(())
    }
}
