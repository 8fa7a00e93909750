//! The lifecycle states of an installation and the reasons that accompany them.
//!
//! A lease exists only inside [`State::Refreshing`], and a terminal state carries the reason it
//! was entered, so "a lease on a dead installation" or "re-authorization required, reason
//! unknown" cannot be written down at all.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// Who holds a lease: unique per process and per refresh flight.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseHolder(String);

impl LeaseHolder {
    /// Wraps a holder name (e.g. `host:pid:flight-n`).
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The holder name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The right to refresh one installation, taken by compare-and-swap.
///
/// `fence` is the record version the lease was taken at: the holder's later writes name it, and
/// any write by someone else in between bumps the version, so a holder that lost its lease fails
/// its compare-and-swap whatever its clock says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it.
    pub holder: LeaseHolder,
    /// When it lapses if not renewed; after this anyone may take it over.
    pub until: Timestamp,
    /// The record version at which it was taken.
    pub fence: u64,
}

/// Why a transient-looking problem put an installation in [`State::Backoff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BackoffCause {
    /// 5xx, 429, timeout, connection error, unparseable reply: try again later.
    Transient,
    /// The provider rejected the *consumer's* credentials (`invalid_client`,
    /// `unauthorized_client`). Consumer-wide: the installation's tokens are kept untouched and
    /// it resumes once the client secret is fixed.
    ConsumerCredentialsInvalid,
    /// The request was refused as malformed (`unsupported_grant_type`, other
    /// `invalid_request`): a configuration bug on our side; tokens are kept.
    Configuration,
    /// The provider refused this refresh token, but it had refused those of many other
    /// installations since the last successful refresh: a provider incident or a token URL
    /// pointed at another server is likelier than that many users revoking at once, so the
    /// tokens are kept and the refusal is not believed yet (the mass-rejection guard).
    MassRejection,
}

/// Why an installation needs its user to authorize the app again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReauthReason {
    /// The provider rejected the refresh token (`invalid_grant`, Bitbucket's "Invalid
    /// refresh_token", GitHub's `bad_refresh_token`): the user revoked the app, the consumer's
    /// scopes changed, or the token was rotated by someone who lost the new one.
    RefreshTokenRejected,
    /// The provider said the granted scopes no longer hold (`invalid_scope`), typically after
    /// the consumer's scopes were changed.
    ScopesChanged,
    /// The refresh token expired (inactivity or absolute lifetime) before it was used.
    RefreshTokenExpired,
    /// The provider rotated the refresh token but the reply never reached us (a crash or a lost
    /// response), and it allows no reuse of the previous token: only the provider holds the
    /// live token now.
    RotatedTokenLost,
    /// Refreshes kept failing transiently for longer than the failure budget allows.
    FailureBudgetExhausted,
    /// The provider issued no refresh token and the access token expired.
    NoRefreshToken,
}

impl ReauthReason {
    /// A plain-language sentence saying what happened.
    pub fn describe(self) -> &'static str {
        match self {
            Self::RefreshTokenRejected => {
                "the provider rejected the refresh token (the user revoked the app, the consumer's scopes changed, or the token was already used)"
            }
            Self::ScopesChanged => {
                "the consumer's scopes changed, which revokes every token it issued"
            }
            Self::RefreshTokenExpired => "the refresh token expired before it was used",
            Self::RotatedTokenLost => {
                "the provider rotated the refresh token but its reply was lost (a crash or a dropped response) and the provider allows no reuse of the previous token"
            }
            Self::FailureBudgetExhausted => {
                "refreshes kept failing for longer than the failure budget allows"
            }
            Self::NoRefreshToken => {
                "the provider issued no refresh token and the access token expired"
            }
        }
    }
}

/// Where an installation is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum State {
    /// Tokens are usable or refreshable; nothing is in progress.
    Active,
    /// A refresh is in progress under `lease`.
    Refreshing {
        /// The lease of the refreshing flight.
        lease: Lease,
    },
    /// The last refresh failed without condemning the tokens; the next attempt is due at
    /// `until`. The current access token is still served while it is valid.
    Backoff {
        /// Earliest time of the next attempt.
        until: Timestamp,
        /// What kind of failure put it here.
        cause: BackoffCause,
    },
    /// Terminal until a new authorization replaces the tokens.
    ReauthorizationRequired {
        /// Why.
        reason: ReauthReason,
        /// Since when.
        since: Timestamp,
    },
    /// Revoked by the application. Terminal until a new authorization.
    Revoked {
        /// When.
        at: Timestamp,
    },
}

impl State {
    /// The state's kind, without data.
    pub fn kind(&self) -> StateKind {
        match self {
            Self::Active => StateKind::Active,
            Self::Refreshing { .. } => StateKind::Refreshing,
            Self::Backoff { .. } => StateKind::Backoff,
            Self::ReauthorizationRequired { .. } => StateKind::ReauthorizationRequired,
            Self::Revoked { .. } => StateKind::Revoked,
        }
    }

    /// True for states only a new authorization leaves.
    pub fn is_terminal(&self) -> bool {
        self.kind().is_terminal()
    }

    /// The lease, when refreshing.
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            Self::Refreshing { lease } => Some(lease),
            _ => None,
        }
    }
}

/// The kind of a [`State`], for filters, indexes and history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StateKind {
    /// [`State::Active`]
    Active,
    /// [`State::Refreshing`]
    Refreshing,
    /// [`State::Backoff`]
    Backoff,
    /// [`State::ReauthorizationRequired`]
    ReauthorizationRequired,
    /// [`State::Revoked`]
    Revoked,
}

impl StateKind {
    /// Every kind, in lifecycle order.
    pub const ALL: [StateKind; 5] = [
        Self::Active,
        Self::Refreshing,
        Self::Backoff,
        Self::ReauthorizationRequired,
        Self::Revoked,
    ];

    /// True for states only a new authorization leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::ReauthorizationRequired | Self::Revoked)
    }

    /// A stable lowercase name, used by backends as an index key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Refreshing => "refreshing",
            Self::Backoff => "backoff",
            Self::ReauthorizationRequired => "reauthorization_required",
            Self::Revoked => "revoked",
        }
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`StateKind::as_str`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a state name (expected one of active, refreshing, backoff, reauthorization_required, revoked)"
)]
pub struct UnknownStateKind(pub String);

impl std::str::FromStr for StateKind {
    type Err = UnknownStateKind;

    /// Parses the name [`StateKind::as_str`] writes (how backends read their state index).
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| UnknownStateKind(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_kinds_parse_back_from_their_names() {
        for kind in StateKind::ALL {
            assert_eq!(kind.as_str().parse::<StateKind>(), Ok(kind));
        }
        let err = "Active".parse::<StateKind>().unwrap_err();
        assert!(err.to_string().contains("not a state name"), "{err}");
    }
}
