//! Installations come into being here: the manager's side of the authorization flow (the
//! OAuth client verifies the state and exchanges the code; the manager claims the flow in the
//! store first, checks the provider account, and records the grant) and
//! the import of token pairs obtained elsewhere. Both choose the first due time through the
//! [`RefreshPolicy`](super::RefreshPolicy), like every other write.

mod claim;
use std::sync::Arc;
use std::time::Duration;

use tokenkeeper_core::{
    CasOutcome, Event, InstallationId, Record, StateKind, StoreError, TokenSet,
};

use crate::error::Error;
use crate::manager::TokenManager;
use crate::manager::events::LocalEventKind;
use crate::oauth::authorize::{
    AuthorizationError, AuthorizationRequest, AuthorizationWarning, Completed, Grant,
    VerifiedState, consumer_name,
};
use crate::oauth::binding::{AuthorizationCode, AuthorizationState, BrowserBinding};
use crate::oauth::state::{Expect, Purpose};
use claim::{FlowClaim, Phase};

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
    /// another flow is refused with `AuthorizationError::Superseded` (before the code is
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
    /// [`Error::Authorization`] wrapping an [`AuthorizationError`]: `InvalidState`,
    /// `ExpiredState`, `BrowserMismatch` (another browser's binding), `AlreadyUsed` (this flow
    /// was completed with another code), `DuplicateCallback`, `AlreadyInstalled`,
    /// `DifferentAccount`, `Identity`, `Exchange` (the provider refused the code),
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
        let refused = |e: AuthorizationError| {
            crate::manager::metrics::authorization_refused(
                &self.engine.consumer_label,
                e.reason_label(),
            );
            Error::Authorization(Arc::new(e))
        };
        crate::oauth::authorize::check_issuer(self.engine.client.consumer().profile(), iss)
            .map_err(refused)?;
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
    ) -> Result<(Completed, Option<Record>), AuthorizationError> {
        let engine = &self.engine;
        let verified = engine.client.verify_state(state, binding)?;
        let installation = verified.installation.clone();
        // A code that cannot be one costs neither a claim nor a token request (review N8).
        if !crate::oauth::authorize::plausible_code(code.secret()) {
            return Err(AuthorizationError::MalformedCode {
                installation: installation.clone(),
            });
        }
        let key = claim::flow_key(&engine.consumer, &verified.flow);
        let ttl = verified
            .expires_at
            .duration_since(engine.clock.now())
            .saturating_add(claim::CLAIM_SKEW_MARGIN);
        let mut by = [0u8; 16];
        getrandom::fill(&mut by).map_err(|e| AuthorizationError::Random(e.to_string()))?;
        let mine = FlowClaim {
            code: code.fingerprint(),
            by: by.iter().map(|b| format!("{b:02x}")).collect(),
            phase: Phase::Exchanging,
        };
        let claimed = match engine.store.claim_flow(&key, &mine.encode(), ttl).await {
            Ok(claimed) => claimed,
            Err(source) => {
                self.settle_own_failed_claim(&key, &mine, ttl).await;
                return Err(AuthorizationError::Store {
                    installation: installation.clone(),
                    source,
                });
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
        let phase = match &outcome {
            Ok((done, _)) => Phase::Completed {
                created: done.created,
            },
            Err(e) => Phase::Failed {
                reason: e.to_string(),
                code_sent,
            },
        };
        let settled = FlowClaim {
            code: mine.code,
            by: mine.by,
            phase,
        };
        if let Err(e) = engine.store.settle_flow(&key, &settled.encode(), ttl).await {
            // The outcome stands; a duplicate callback waiting for it times out instead.
            tracing::warn!(installation = %installation, error = %e, "the outcome of an authorization could not be written to its flow claim");
        }
        outcome
    }

    /// A duplicate callback: the flow was claimed already. The same code gets the claimant's
    /// outcome (waiting for it while the exchange runs); another code is refused.
    /// After a claim the store reported as failed: it may have been stored even so (its
    /// acknowledgement lost); then say that nothing was exchanged, so a retry of this callback
    /// does not wait for an exchange that never ran. Anything else there (another callback's
    /// live claim) is left alone (review N8: overwriting it told later duplicates the flow had
    /// failed while its claimant was completing it).
    async fn settle_own_failed_claim(&self, key: &str, mine: &FlowClaim, ttl: Duration) {
        let store = &self.engine.store;
        let ours = mine.encode();
        if !matches!(store.get_flow(key).await, Ok(Some(stored)) if stored == ours) {
            return;
        }
        let failed = FlowClaim {
            code: mine.code.clone(),
            by: mine.by.clone(),
            phase: Phase::Failed {
                reason: "the flow could not be claimed in the store".into(),
                code_sent: false,
            },
        };
        let _ = store.settle_flow(key, &failed.encode(), ttl).await;
    }

    async fn follow_claim(
        &self,
        key: &str,
        mut current: Vec<u8>,
        code: &str,
        installation: &InstallationId,
    ) -> Result<Completed, AuthorizationError> {
        let engine = &self.engine;
        let duplicate = |outcome: &str| AuthorizationError::DuplicateCallback {
            installation: installation.clone(),
            outcome: outcome.to_owned(),
        };
        // The claimant's exchange and account check each take at most the HTTP timeout; its
        // store reads and writes, a few seconds more.
        let patience = engine
            .client
            .consumer()
            .http_timeout()
            .saturating_mul(3)
            .saturating_add(Duration::from_secs(5));
        // Checked: an `http_timeout` near `Duration::MAX` must not panic here (review I2).
        let now = tokio::time::Instant::now();
        let give_up = now
            .checked_add(patience)
            .unwrap_or_else(|| now + Duration::from_secs(24 * 3600));
        loop {
            let claim = FlowClaim::decode(&current).filter(|c| {
                // Constant-time enough: both are fixed-length hex fingerprints.
                c.code.len() == code.len()
                    && c.code
                        .bytes()
                        .zip(code.bytes())
                        .fold(0u8, |a, (x, y)| a | (x ^ y))
                        == 0
            });
            let Some(claim) = claim else {
                return Err(AuthorizationError::AlreadyUsed {
                    installation: installation.clone(),
                });
            };
            match claim.phase {
                Phase::Completed { created } => {
                    return Ok(Completed {
                        installation: installation.clone(),
                        created,
                        replayed: true,
                        account: None,
                        id_token: None,
                        warnings: Vec::new(),
                    });
                }
                Phase::Failed {
                    reason,
                    code_sent: false,
                } => {
                    return Err(duplicate(&format!(
                        "failed before the code was sent to the provider ({reason})"
                    )));
                }
                Phase::Failed { reason, .. } => {
                    return Err(duplicate(&format!("failed; the code is spent ({reason})")));
                }
                Phase::Exchanging => {}
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(duplicate(
                    "did not finish in time (it may have stopped; the code may be spent)",
                ));
            }
            tokio::time::sleep(claim::POLL_INTERVAL).await;
            current = match engine.store.get_flow(key).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return Err(duplicate("expired without an outcome")),
                Err(source) => {
                    return Err(AuthorizationError::Store {
                        installation: installation.clone(),
                        source,
                    });
                }
            };
        }
    }

    /// The claimant's part: exchange the code, read the account, record the grant.
    /// `code_sent` becomes true once the code went to the provider.
    async fn exchange_and_record(
        &self,
        code: &AuthorizationCode,
        verified: &VerifiedState,
        code_sent: &mut bool,
    ) -> Result<(Completed, Option<Record>), AuthorizationError> {
        let engine = &self.engine;
        let installation = &verified.installation;
        let store_err = |source| AuthorizationError::Store {
            installation: installation.clone(),
            source,
        };
        // What can be refused without the provider is refused before the code is spent.
        let before = engine.store.get(installation).await.map_err(store_err)?;
        if verified.purpose == Purpose::Reauthorize
            && let Some(what) = superseded(verified.expect, before.as_ref())
        {
            return Err(AuthorizationError::Superseded {
                installation: installation.clone(),
                what,
            });
        }
        if let Some(existing) = &before {
            if verified.purpose == Purpose::Install {
                return Err(AuthorizationError::AlreadyInstalled {
                    installation: installation.clone(),
                });
            }
            if existing.consumer() != engine.consumer {
                return Err(AuthorizationError::ForeignConsumer {
                    installation: installation.clone(),
                    owner: existing.consumer().to_owned(),
                });
            }
        }
        *code_sent = true;
        let exchanged = engine
            .client
            .exchange_code(code, verified.pkce_verifier.as_deref())
            .await
            .map_err(|source| AuthorizationError::Exchange {
                installation: installation.clone(),
                source,
            })?;
        // A grant that is not stored is not revoked either: at providers that revoke per user
        // and client, that would end the account's other grants (a sibling installation, or
        // this one's stored tokens).
        let account = engine
            .client
            .account_of(&exchanged)
            .await
            .map_err(|reason| AuthorizationError::Identity {
                installation: installation.clone(),
                reason,
            })?;
        let unverified = before
            .as_ref()
            .is_some_and(|r| r.account().is_none() && account.is_some());
        let grant = Grant {
            installation: installation.clone(),
            tokens: exchanged.tokens,
            id_token: exchanged.id_token,
        };
        let (created, written) = self
            .store_grant(before, &grant, account.clone(), verified)
            .await?;
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
        // A reply that states its scopes is compared with the request (no statement: no word).
        let missing: Vec<String> = engine
            .client
            .consumer()
            .scopes()
            .iter()
            .filter(|s| !tokens.scopes.is_empty() && !tokens.scopes.contains(s))
            .cloned()
            .collect();
        if !missing.is_empty() {
            warnings.push(AuthorizationWarning::ScopesNotGranted {
                installation: grant.installation.clone(),
                missing,
            });
        }
        if let (true, Some(account)) = (unverified, &account) {
            warnings.push(AuthorizationWarning::AccountNotVerified {
                installation: grant.installation.clone(),
                account: account.clone(),
            });
        }
        let done = Completed {
            installation: grant.installation,
            created,
            replayed: false,
            account,
            id_token: grant.id_token,
            warnings,
        };
        Ok((done, Some(written)))
    }

    /// Records a grant: a new record, or the `Authorized` transition over an existing one
    /// (compare-and-swap, retried on conflicts: a new grant wins over anything in flight), if
    /// the existing one belongs to the same provider account. Returns whether a new
    /// installation was created, and the record written.
    async fn store_grant(
        &self,
        mut current: Option<Record>,
        grant: &Grant,
        account: Option<String>,
        verified: &VerifiedState,
    ) -> Result<(bool, Record), AuthorizationError> {
        let engine = &self.engine;
        let purpose = verified.purpose;
        let store_err = |source| AuthorizationError::Store {
            installation: grant.installation.clone(),
            source,
        };
        loop {
            // Each attempt sees the record as stored now: a revocation or another flow's
            // grant that raced this one is not undone (review N3).
            if purpose == Purpose::Reauthorize
                && let Some(what) = superseded(verified.expect, current.as_ref())
            {
                return Err(AuthorizationError::Superseded {
                    installation: grant.installation.clone(),
                    what,
                });
            }
            let now = engine.clock.now();
            let refresh_at = engine.policy.refresh_at(&grant.tokens, now);
            let Some(existing) = current else {
                let record = Record::new(
                    grant.installation.clone(),
                    consumer_name(&engine.client),
                    grant.tokens.clone(),
                    refresh_at,
                    now,
                )
                .with_account(account.clone());
                // The code is spent: retry a store hiccup once before giving up on the tokens.
                let mut outcome = engine.store.create(&record).await;
                if matches!(outcome, Err(StoreError::Unavailable { .. })) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    outcome = engine.store.create(&record).await;
                }
                // A create retried after `Unavailable` may find the row its first try wrote.
                let ours = match &outcome {
                    Err(
                        e @ (StoreError::AlreadyExists { .. } | StoreError::Unavailable { .. }),
                    ) => crate::manager::flight::retry::applied(engine, &record, e).await,
                    _ => false,
                };
                return match outcome {
                    Ok(()) => Ok((true, record)),
                    _ if ours => Ok((true, record)),
                    Err(StoreError::AlreadyExists { .. }) if purpose == Purpose::Install => {
                        Err(AuthorizationError::AlreadyInstalled {
                            installation: grant.installation.clone(),
                        })
                    }
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
            // A record without an account (imported, or older than the check) takes the new
            // grant's; one with an account takes only a grant of the same account.
            if let (Some(stored), Some(new)) = (existing.account(), account.as_deref())
                && stored != new
            {
                return Err(AuthorizationError::DifferentAccount {
                    installation: grant.installation.clone(),
                });
            }
            let event = Event::Authorized {
                tokens: grant.tokens.clone(),
                refresh_at,
                account: account
                    .clone()
                    .or_else(|| existing.account().map(str::to_owned)),
            };
            let next = existing
                .apply(event, now)
                .map_err(AuthorizationError::Refused)?;
            match engine
                .store
                .compare_and_swap(&next, existing.version())
                .await
            {
                Ok(CasOutcome::Swapped) => return Ok((false, next)),
                // Our own write, applied by an attempt whose reply was lost and resent (a
                // Redis Cluster retry): the grant is stored, not superseded by "another flow".
                Ok(CasOutcome::Conflict(stored))
                    if crate::manager::flight::retry::is_own_write(&stored, &next) =>
                {
                    return Ok((false, next));
                }
                Ok(CasOutcome::Conflict(stored)) => current = Some(*stored),
                Ok(CasOutcome::Missing) => current = None,
                // Applied, its acknowledgement lost: the grant is stored.
                Err(e) if crate::manager::flight::retry::applied(engine, &next, &e).await => {
                    return Ok((false, next));
                }
                Err(e) => return Err(store_err(e)),
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
