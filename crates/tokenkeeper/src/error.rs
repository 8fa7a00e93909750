//! The crate's error: what a `TokenManager` caller sees. Each variant says what happened, to
//! which installation, and what to do.
//!
//! Cheap to clone (sources are shared), because one refresh answers every caller waiting on it.

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper_core::{
    ErrorDetail, IllegalTransition, InstallationId, ReauthReason, StoreError, Timestamp,
};

use crate::oauth::AuthorizationError;
use crate::oauth::OAuthError;

fn provider_said(detail: &Option<ErrorDetail>) -> String {
    match detail {
        Some(d) => format!(" (provider said: {d})"),
        None => String::new(),
    }
}

/// What went wrong for a caller of `TokenManager`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No record for this installation.
    #[error(
        "installation {id} is unknown to the token store; complete an authorization or import it first"
    )]
    NotFound {
        /// The installation.
        id: InstallationId,
    },
    /// The installation needs its user to authorize the app again.
    #[error("installation {id} needs the user to authorize the app again: {} since {since}{}; start a new authorization for it", reason.describe(), provider_said(detail))]
    ReauthorizationRequired {
        /// The installation.
        id: InstallationId,
        /// Why.
        reason: ReauthReason,
        /// Since when.
        since: Timestamp,
        /// The provider's words.
        detail: Option<ErrorDetail>,
    },
    /// The application revoked the installation.
    #[error(
        "installation {id} was revoked by the application at {at}; authorize it again to use it"
    )]
    Revoked {
        /// The installation.
        id: InstallationId,
        /// When.
        at: Timestamp,
    },
    /// No valid access token right now; the tokens are kept and a retry is scheduled.
    #[error(
        "installation {id} has no valid access token right now: the last refresh failed temporarily ({detail}); it will be retried at {retry_at}"
    )]
    TemporarilyUnavailable {
        /// The installation.
        id: InstallationId,
        /// When the next attempt is due.
        retry_at: Timestamp,
        /// The failure.
        detail: ErrorDetail,
    },
    /// The access token went stale (or expired) before the next refresh is allowed: the
    /// provider issues tokens that live less than `RefreshPolicy::min_refresh_interval`.
    /// Nothing is wrong with the installation; retry at `retry_at`, or lower the interval.
    #[error(
        "installation {id} has no valid access token right now: the provider's token expires at {expires_at}, and the next refresh is allowed at {retry_at} (the minimum interval between refreshes guards against refresh storms from tokens this short-lived)"
    )]
    RefreshTooSoon {
        /// The installation.
        id: InstallationId,
        /// When the current access token expires (or expired), as the provider said.
        expires_at: Timestamp,
        /// When the next refresh is allowed.
        retry_at: Timestamp,
    },
    /// The provider refused the consumer's own credentials. Consumer-wide; tokens untouched.
    #[error(
        "refreshing installation {id} failed because the provider refused the consumer's client credentials ({detail}); fix the client id/secret: every installation's tokens are kept and refreshes resume after {retry_at}"
    )]
    ConsumerCredentials {
        /// The installation whose refresh hit it.
        id: InstallationId,
        /// When refreshes resume.
        retry_at: Timestamp,
        /// The failure.
        detail: ErrorDetail,
    },
    /// The provider refused this installation's refresh token, but it had refused those of
    /// many installations since the last successful refresh, so the refusal is held, not
    /// believed yet (`RefreshPolicy::mass_rejection`); the tokens are kept.
    #[error(
        "the provider refused installation {id}'s refresh token, after refusing those of many other installations since the last successful refresh ({detail}); it is not condemned yet: check the token URL and the provider's status; if the consumer's scopes were changed on purpose, every installation must be authorized again. Tokens are kept; retried after {retry_at}"
    )]
    RefusalsHeld {
        /// The installation.
        id: InstallationId,
        /// When the refusal is tried again.
        retry_at: Timestamp,
        /// The provider's refusal and the count.
        detail: ErrorDetail,
    },
    /// The provider refused the request as malformed: the profile is wrong for this provider.
    #[error(
        "refreshing installation {id} failed because the request was malformed for this provider ({detail}); check the provider profile; tokens are kept"
    )]
    Configuration {
        /// The installation.
        id: InstallationId,
        /// The failure.
        detail: ErrorDetail,
    },
    /// A refresh (another process's lease, or this process's own flight past
    /// `RefreshPolicy::caller_wait`) did not finish in time; it goes on.
    #[error(
        "installation {id} is being refreshed by {holder}, which did not finish within {waited:?}; the refresh goes on: try again shortly"
    )]
    Busy {
        /// The installation.
        id: InstallationId,
        /// Who holds the lease.
        holder: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The record changed under this process's lease before it recorded its refresh's
    /// failure (a takeover after a stall, a revocation, a re-authorization).
    #[error(
        "installation {id} changed before this process recorded the outcome of its refresh (a peer took the lapsed lease over, or the installation was revoked or re-authorized); try again"
    )]
    LeaseLost {
        /// The installation.
        id: InstallationId,
    },
    /// The manager is shutting down and starts no new refresh.
    #[error(
        "installation {id} was not refreshed: the token manager is shutting down and starts no new refresh"
    )]
    ShuttingDown {
        /// The installation.
        id: InstallationId,
    },
    /// The installation belongs to another OAuth consumer (another client id or provider)
    /// sharing this store. Nothing was sent to any provider and the record is untouched.
    #[error(
        "installation {id} belongs to consumer {owner}, not to this manager's consumer {this} (a consumer is its profile, client id and token endpoint with issuer: the same client id pointed at another token endpoint is another consumer); nothing was sent and nothing was done: check this process's provider endpoints, give each consumer its own store namespace (Redis prefix, SQLite file) or use the manager of {owner}"
    )]
    ForeignConsumer {
        /// The installation.
        id: InstallationId,
        /// The consumer the record belongs to (`profile/client_id@binding`, see
        /// [`ConsumerConfig::name`](crate::ConsumerConfig::name)).
        owner: String,
        /// This manager's consumer.
        this: String,
    },
    /// The store failed.
    #[error("the token store failed for installation {id}: {source}")]
    Store {
        /// The installation.
        id: InstallationId,
        /// The store's error.
        #[source]
        source: Arc<StoreError>,
    },
    /// Talking to the provider failed outside a refresh (revocation).
    #[error("{source}")]
    Provider {
        /// The installation.
        id: InstallationId,
        /// The provider's error.
        #[source]
        source: Arc<OAuthError>,
    },
    /// The authorization flow failed on the provider's side: the callback's issuer, state,
    /// binding or code, the code exchange, or the provider account.
    #[error(transparent)]
    Authorization(Arc<AuthorizationError>),
    /// The manager refused to record an authorization: a replayed or duplicate callback, an
    /// installation that exists, moved on, belongs to another account or consumer, or the
    /// store failed. Nothing was recorded.
    #[error(transparent)]
    Install(Arc<crate::manager::InstallError>),
    /// An unsaved-tokens file could not be read back.
    #[error(transparent)]
    UnsavedFile(Arc<crate::manager::UnsavedFileError>),
    /// Tokens given to `import_installation` are unusable.
    #[error("cannot import installation {id}: {reason}")]
    InvalidImport {
        /// The installation.
        id: InstallationId,
        /// What is wrong.
        reason: String,
    },
    /// The request built by `send_authorized` failed.
    #[error("the API request for installation {id} failed: {source}")]
    Http {
        /// The installation.
        id: InstallationId,
        /// The transport error (its URL removed).
        #[source]
        source: Arc<reqwest::Error>,
    },
    /// The stored record does not allow the change (a state machine rule refused it): the
    /// record changed underneath in a way this operation cannot build on.
    #[error("installation {id}: {source}; read it again (explain) and retry")]
    Transition {
        /// The installation.
        id: InstallationId,
        /// The rule that refused the change.
        #[source]
        source: Arc<IllegalTransition>,
    },
    /// A refresh task ended without an answer (it panicked, or its runtime shut down).
    #[error("the refresh of installation {id} ended unexpectedly ({reason}); try again")]
    Internal {
        /// The installation.
        id: InstallationId,
        /// What happened.
        reason: String,
    },
}

impl Error {
    pub(crate) fn transition(id: &InstallationId, source: IllegalTransition) -> Self {
        Self::Transition {
            id: id.clone(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn store(id: &InstallationId, source: StoreError) -> Self {
        Self::Store {
            id: id.clone(),
            source: Arc::new(source),
        }
    }

    /// The installation concerned, when there is one.
    pub fn installation(&self) -> Option<&InstallationId> {
        match self {
            Self::NotFound { id }
            | Self::ReauthorizationRequired { id, .. }
            | Self::Revoked { id, .. }
            | Self::TemporarilyUnavailable { id, .. }
            | Self::RefreshTooSoon { id, .. }
            | Self::ConsumerCredentials { id, .. }
            | Self::Configuration { id, .. }
            | Self::RefusalsHeld { id, .. }
            | Self::Busy { id, .. }
            | Self::Store { id, .. }
            | Self::Provider { id, .. }
            | Self::InvalidImport { id, .. }
            | Self::Http { id, .. }
            | Self::Transition { id, .. }
            | Self::LeaseLost { id }
            | Self::ForeignConsumer { id, .. }
            | Self::ShuttingDown { id }
            | Self::Internal { id, .. } => Some(id),
            Self::Install(e) => e.installation(),
            Self::Authorization(_) | Self::UnsavedFile(_) => None,
        }
    }

    /// True when only a new authorization helps.
    pub fn needs_reauthorization(&self) -> bool {
        matches!(
            self,
            Self::ReauthorizationRequired { .. } | Self::Revoked { .. }
        )
    }
}
