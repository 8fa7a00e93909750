//! Lifecycle events broadcast to the application, so it can email a user whose installation
//! needs re-authorization or page an operator when the consumer's credentials are refused.

use tokenkeeper_core::{BackoffCause, ErrorDetail, InstallationId, ReauthReason, Timestamp};

/// Something that happened to an installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEvent {
    /// The installation.
    pub installation: InstallationId,
    /// When.
    pub at: Timestamp,
    /// What.
    pub kind: LocalEventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalEventKind {
    /// A new authorization (or re-authorization) stored tokens.
    Authorized,
    /// Tokens obtained elsewhere were imported.
    Imported,
    /// A refresh stored new tokens.
    Refreshed {
        /// When the new access token expires.
        expires_at: Timestamp,
    },
    /// A refresh failed without condemning the tokens; retry scheduled.
    Backoff {
        /// Next attempt.
        until: Timestamp,
        /// Why.
        cause: BackoffCause,
        /// What the provider said.
        error: ErrorDetail,
    },
    /// The user must authorize the app again.
    ReauthorizationRequired {
        /// Why.
        reason: ReauthReason,
        /// What the provider said.
        error: Option<ErrorDetail>,
    },
    /// The application revoked the installation.
    Revoked,
}
