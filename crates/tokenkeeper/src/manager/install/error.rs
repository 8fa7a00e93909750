//! What the manager refuses when it records an authorization: the store side of the flow
//! (a replayed or duplicate callback, an installation that exists, moved on, belongs to
//! another account or consumer, or a store that failed). The provider side (the callback's
//! issuer, state and binding, the code exchange, the account) is
//! [`AuthorizationError`](crate::oauth::AuthorizationError), which knows no store: so the
//! OAuth half stays free of persistence.

use std::sync::Arc;

use tokenkeeper_core::{IllegalTransition, InstallationId, StoreError};

use crate::error::Error;
use crate::oauth::AuthorizationError;

/// Why the manager refused to record an authorization. Nothing was recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// This flow was already completed, or is being completed, with another code: a replayed
    /// or forged callback. Nothing was exchanged.
    #[error(
        "the authorization for installation {installation} was already used with another code; this callback was refused and nothing changed: start the authorization again"
    )]
    AlreadyUsed {
        /// The installation the flow was for.
        installation: InstallationId,
    },
    /// A flow begun for a new installation found the id taken.
    #[error(
        "installation {installation} already exists; a flow for a new installation cannot replace it: begin a re-authorization with its id"
    )]
    AlreadyInstalled {
        /// The installation the flow was for.
        installation: InstallationId,
    },
    /// The installation changed since this re-authorization began (review N3): it was
    /// revoked, deleted, created again or authorized by another flow, and a flow begun before
    /// that does not undo it. Nothing was recorded (and, when seen before the exchange, the
    /// code was not spent).
    #[error(
        "installation {installation} {what}; nothing was recorded: begin a new authorization if it should still be connected"
    )]
    Superseded {
        /// The installation the flow was for.
        installation: InstallationId,
        /// What happened to it (`was revoked since this flow began`, ...).
        what: &'static str,
    },
    /// A duplicate of this callback (same code) is being completed elsewhere and did not
    /// finish in time, or failed: its outcome is the one that counts.
    #[error(
        "the first callback of this authorization for installation {installation} {outcome}; start the authorization again"
    )]
    DuplicateCallback {
        /// The installation the flow was for.
        installation: InstallationId,
        /// What became of the first callback.
        outcome: String,
    },
    /// The new grant belongs to another provider account than the installation's: its
    /// stored tokens were left untouched. The new grant is not stored and not revoked
    /// (revoking it could end that account's other grants at providers that revoke per user
    /// and client); it expires at the provider.
    #[error(
        "the new authorization of installation {installation} belongs to another provider account than the one it was installed with; its tokens were left untouched: the user must authorize with the original account, or install anew"
    )]
    DifferentAccount {
        /// The installation the flow was for.
        installation: InstallationId,
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
    /// The manager is shutting down (`TokenManager::shutdown`): this callback claimed and
    /// exchanged nothing, so its code is unspent; the browser can be sent to the callback of
    /// a running process (review SU5: callbacks already exchanging are waited for).
    #[error(
        "the authorization for installation {installation} was not completed: the token manager is shutting down; nothing was exchanged, so the callback can be retried on a running process"
    )]
    ShuttingDown {
        /// The installation the flow was for.
        installation: InstallationId,
    },
    /// The stored record refused the new grant (a state machine rule).
    #[error("recording the authorization failed: {0}")]
    Refused(#[source] IllegalTransition),
}

impl InstallError {
    /// The installation the flow was for, when the error names one.
    pub fn installation(&self) -> Option<&InstallationId> {
        match self {
            Self::AlreadyUsed { installation }
            | Self::AlreadyInstalled { installation }
            | Self::Superseded { installation, .. }
            | Self::DuplicateCallback { installation, .. }
            | Self::DifferentAccount { installation }
            | Self::Store { installation, .. }
            | Self::ForeignConsumer { installation, .. }
            | Self::ShuttingDown { installation } => Some(installation),
            Self::Refused(_) => None,
        }
    }

    /// A short, stable name of the refusal, for metrics labels.
    pub fn reason_label(&self) -> &'static str {
        match self {
            Self::AlreadyUsed { .. } => "already_used",
            Self::AlreadyInstalled { .. } => "already_installed",
            Self::Superseded { .. } => "superseded",
            Self::DuplicateCallback { .. } => "duplicate_callback",
            Self::DifferentAccount { .. } => "different_account",
            Self::Store { .. } => "store",
            Self::ForeignConsumer { .. } => "foreign_consumer",
            Self::ShuttingDown { .. } => "shutting_down",
            Self::Refused(_) => "refused",
        }
    }
}

/// Why a callback was refused, inside the manager: on the provider's side or the store's.
/// Each becomes its own variant of [`Error`] at the public boundary.
#[derive(Debug)]
pub(crate) enum Refusal {
    Protocol(AuthorizationError),
    Install(InstallError),
}

impl From<AuthorizationError> for Refusal {
    fn from(e: AuthorizationError) -> Self {
        Self::Protocol(e)
    }
}

impl From<InstallError> for Refusal {
    fn from(e: InstallError) -> Self {
        Self::Install(e)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Protocol(e) => e.fmt(f),
            Self::Install(e) => e.fmt(f),
        }
    }
}

impl Refusal {
    pub(crate) fn reason_label(&self) -> &'static str {
        match self {
            Self::Protocol(e) => e.reason_label(),
            Self::Install(e) => e.reason_label(),
        }
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Protocol(e) => Error::Authorization(Arc::new(e)),
            Refusal::Install(e) => Error::Install(Arc::new(e)),
        }
    }
}
