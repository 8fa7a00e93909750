//! The claimant's part of an authorization: refuse what can be refused before the code is
//! spent, exchange the code, read the provider account, and record the grant (a new record,
//! or the `Authorized` transition over the installation's record).

use std::time::Duration;

use tokenkeeper_core::{CasOutcome, Event, InstallationId, Record, StoreError, TokenSet};

use super::error::{InstallError, Refusal};
use super::superseded;
use crate::manager::TokenManager;
use crate::oauth::AuthorizationCode;
use crate::oauth::Purpose;
use crate::oauth::{
    AuthorizationError, AuthorizationWarning, Completed, Grant, VerifiedState, consumer_name,
};

impl TokenManager {
    /// The claimant's part: exchange the code, read the account, record the grant.
    /// `code_sent` becomes true once the code went to the provider.
    pub(super) async fn exchange_and_record(
        &self,
        code: &AuthorizationCode,
        verified: &VerifiedState,
        code_sent: &mut bool,
    ) -> Result<(Completed, Option<Record>), Refusal> {
        let engine = &self.engine;
        let installation = &verified.installation;
        // What can be refused without the provider is refused before the code is spent.
        let before = engine
            .store
            .get(installation)
            .await
            .map_err(|source| store_error(installation, source))?;
        refuse_before_exchange(verified, before.as_ref(), &engine.consumer)?;
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
        let mut warnings = self.grant_warnings(&grant.installation, written.tokens());
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

    /// What the application should know about a recorded grant: no refresh token where the
    /// profile expects one, or fewer scopes than requested (a reply that states its scopes is
    /// compared with the request; no statement, no word).
    fn grant_warnings(
        &self,
        installation: &InstallationId,
        tokens: &TokenSet,
    ) -> Vec<AuthorizationWarning> {
        let consumer = self.engine.client.consumer();
        let mut warnings = Vec::new();
        if consumer.profile().expects_refresh_token
            && tokens.refresh_token.is_none()
            && tokens.expires()
        {
            tracing::warn!(installation = %installation, "the provider issued no refresh token; the installation needs a new authorization once its access token expires");
            warnings.push(AuthorizationWarning::NoRefreshToken {
                installation: installation.clone(),
                expires_at: tokens.expires_at,
            });
        }
        let missing: Vec<String> = consumer
            .scopes()
            .iter()
            .filter(|s| !tokens.scopes.is_empty() && !tokens.scopes.contains(s))
            .cloned()
            .collect();
        if !missing.is_empty() {
            warnings.push(AuthorizationWarning::ScopesNotGranted {
                installation: installation.clone(),
                missing,
            });
        }
        warnings
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
    ) -> Result<(bool, Record), Refusal> {
        let engine = &self.engine;
        loop {
            // Each attempt sees the record as stored now: a revocation or another flow's
            // grant that raced this one is not undone (review N3).
            if verified.purpose == Purpose::Reauthorize
                && let Some(what) = superseded(verified.expect, current.as_ref())
            {
                return Err(InstallError::Superseded {
                    installation: grant.installation.clone(),
                    what,
                }
                .into());
            }
            let now = engine.clock.now();
            let refresh_at = engine.policy.refresh_at(&grant.tokens, now);
            let attempt = match current {
                None => {
                    let record = Record::new(
                        grant.installation.clone(),
                        consumer_name(&engine.client),
                        grant.tokens.clone(),
                        refresh_at,
                        now,
                    )
                    .with_account(account.clone());
                    self.create_grant(record, verified.purpose).await?
                }
                Some(existing) => {
                    self.authorize_over(existing, grant, account.clone(), refresh_at)
                        .await?
                }
            };
            match attempt {
                Attempt::Stored { created, record } => return Ok((created, record)),
                Attempt::Again(stored) => current = stored,
            }
        }
    }

    /// Creates the installation's record. The code is spent: a store hiccup is retried once
    /// before the tokens are given up, and a create retried after `Unavailable` may find the
    /// row its first try wrote.
    async fn create_grant(&self, record: Record, purpose: Purpose) -> Result<Attempt, Refusal> {
        let engine = &self.engine;
        let id = record.id().clone();
        let mut outcome = engine.store.create(&record).await;
        if matches!(outcome, Err(StoreError::Unavailable { .. })) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            outcome = engine.store.create(&record).await;
        }
        let ours = match &outcome {
            Err(e @ (StoreError::AlreadyExists { .. } | StoreError::Unavailable { .. })) => {
                crate::manager::flight::retry::applied(engine, &record, e).await
            }
            _ => false,
        };
        match outcome {
            Ok(()) => Ok(Attempt::created(record)),
            _ if ours => Ok(Attempt::created(record)),
            Err(StoreError::AlreadyExists { .. }) if purpose == Purpose::Install => {
                Err(InstallError::AlreadyInstalled { installation: id }.into())
            }
            Err(StoreError::AlreadyExists { .. }) => {
                let stored = engine.store.get(&id).await;
                Ok(Attempt::Again(
                    stored.map_err(|source| store_error(&id, source))?,
                ))
            }
            Err(e) => Err(store_error(&id, e).into()),
        }
    }

    /// The `Authorized` transition over `existing`, if it is this consumer's and of the same
    /// provider account (a record without an account, imported or older than the check,
    /// takes the new grant's).
    async fn authorize_over(
        &self,
        existing: Record,
        grant: &Grant,
        account: Option<String>,
        refresh_at: tokenkeeper_core::Timestamp,
    ) -> Result<Attempt, Refusal> {
        let engine = &self.engine;
        let installation = &grant.installation;
        refuse_foreign(&existing, &engine.consumer)?;
        if let (Some(stored), Some(new)) = (existing.account(), account.as_deref())
            && stored != new
        {
            return Err(InstallError::DifferentAccount {
                installation: installation.clone(),
            }
            .into());
        }
        let event = Event::Authorized {
            tokens: grant.tokens.clone(),
            refresh_at,
            account: account.or_else(|| existing.account().map(str::to_owned)),
        };
        let next = existing
            .apply(event, engine.clock.now())
            .map_err(InstallError::Refused)?;
        let stored = |record| {
            Ok(Attempt::Stored {
                created: false,
                record,
            })
        };
        match engine
            .store
            .compare_and_swap(&next, existing.version())
            .await
        {
            Ok(CasOutcome::Swapped) => stored(next),
            // Our own write, applied by an attempt whose reply was lost and resent (a Redis
            // Cluster retry): the grant is stored, not superseded by "another flow".
            Ok(CasOutcome::Conflict(current))
                if crate::manager::flight::retry::is_own_write(&current, &next) =>
            {
                stored(next)
            }
            Ok(CasOutcome::Conflict(current)) => Ok(Attempt::Again(Some(*current))),
            Ok(CasOutcome::Missing) => Ok(Attempt::Again(None)),
            // Applied, its acknowledgement lost: the grant is stored.
            Err(e) if crate::manager::flight::retry::applied(engine, &next, &e).await => {
                stored(next)
            }
            Err(e) => Err(store_error(installation, e).into()),
        }
    }
}

/// One attempt at recording a grant.
enum Attempt {
    /// Written (`created`: a new installation).
    Stored { created: bool, record: Record },
    /// Somebody wrote first: try again over this (`None`: no record).
    Again(Option<Record>),
}

impl Attempt {
    fn created(record: Record) -> Self {
        Self::Stored {
            created: true,
            record,
        }
    }
}

/// What is refused before the code is spent: a re-authorization whose record moved on, an
/// installation flow for an id that exists, another consumer's record.
fn refuse_before_exchange(
    verified: &VerifiedState,
    before: Option<&Record>,
    consumer: &str,
) -> Result<(), Refusal> {
    let installation = &verified.installation;
    if verified.purpose == Purpose::Reauthorize
        && let Some(what) = superseded(verified.expect, before)
    {
        return Err(InstallError::Superseded {
            installation: installation.clone(),
            what,
        }
        .into());
    }
    let Some(existing) = before else {
        return Ok(());
    };
    if verified.purpose == Purpose::Install {
        return Err(InstallError::AlreadyInstalled {
            installation: installation.clone(),
        }
        .into());
    }
    refuse_foreign(existing, consumer)
}

fn refuse_foreign(existing: &Record, consumer: &str) -> Result<(), Refusal> {
    if existing.consumer() == consumer {
        return Ok(());
    }
    Err(InstallError::ForeignConsumer {
        installation: existing.id().clone(),
        owner: existing.consumer().to_owned(),
    }
    .into())
}

fn store_error(installation: &InstallationId, source: StoreError) -> InstallError {
    InstallError::Store {
        installation: installation.clone(),
        source,
    }
}
