//! `OAuthError`: a failed exchange with the provider, classified (DESIGN.md §7), carrying the
//! provider's own words and never a token.

use std::fmt;
use std::time::Duration;

use tokenkeeper_core::{BoxError, ErrorDetail, FailureClass, InstallationId};

/// Which exchange with the provider failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Exchanging an authorization code.
    CodeExchange,
    /// Refreshing an installation's tokens.
    Refresh,
    /// The client-credentials grant.
    ClientCredentials,
    /// RFC 7009 revocation.
    Revoke,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CodeExchange => "authorization code exchange",
            Self::Refresh => "token refresh",
            Self::ClientCredentials => "client credentials grant",
            Self::Revoke => "token revocation",
        })
    }
}

/// How the exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The provider answered with an OAuth error (`error`, `error_description`).
    Provider,
    /// No usable answer: connection refused or reset, timeout, TLS.
    Transport,
    /// An answer that is not a token reply: not JSON, no `access_token`, an HTML page.
    InvalidResponse,
    /// The reply was larger than `max_response_bytes`.
    TooLarge,
}

/// A failed exchange with the provider. (Boxed: errors travel in `Result`s on hot paths.)
#[derive(Debug)]
pub struct OAuthError(pub(crate) Box<ErrorInner>);

#[derive(Debug)]
pub(crate) struct ErrorInner {
    pub(crate) operation: Operation,
    pub(crate) installation: Option<InstallationId>,
    pub(crate) kind: ErrorKind,
    pub(crate) class: FailureClass,
    pub(crate) status: Option<u16>,
    pub(crate) error: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) error_uri: Option<String>,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) detail: Option<String>,
    pub(crate) source: Option<BoxError>,
}

impl OAuthError {
    pub(crate) fn new(operation: Operation, kind: ErrorKind, class: FailureClass) -> Self {
        Self(Box::new(ErrorInner {
            operation,
            installation: None,
            kind,
            class,
            status: None,
            error: None,
            description: None,
            error_uri: None,
            retry_after: None,
            detail: None,
            source: None,
        }))
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.0.detail = Some(detail.into());
        self
    }

    pub(crate) fn for_installation(mut self, id: Option<&InstallationId>) -> Self {
        self.0.installation = id.cloned();
        self
    }

    /// The exchange that failed.
    pub fn operation(&self) -> Operation {
        self.0.operation
    }
    /// The installation, for refreshes.
    pub fn installation(&self) -> Option<&InstallationId> {
        self.0.installation.as_ref()
    }
    /// How it failed.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }
    /// What it means for the installation (DESIGN.md §7).
    pub fn class(&self) -> FailureClass {
        self.0.class
    }
    /// The HTTP status, if there was a reply.
    pub fn status(&self) -> Option<u16> {
        self.0.status
    }
    /// The provider's `error` code.
    pub fn error_code(&self) -> Option<&str> {
        self.0.error.as_deref()
    }
    /// The provider's `error_description`.
    pub fn error_description(&self) -> Option<&str> {
        self.0.description.as_deref()
    }
    /// The provider's `error_uri`.
    pub fn error_uri(&self) -> Option<&str> {
        self.0.error_uri.as_deref()
    }
    /// How long the provider asked us to wait (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }
    /// True for failures worth retrying later (network, 5xx, 429, garbled replies).
    pub fn is_transient(&self) -> bool {
        self.0.class == FailureClass::Transient
    }

    /// The record of this failure kept in the installation's history.
    pub fn to_detail(&self) -> ErrorDetail {
        ErrorDetail {
            class: self.0.class,
            status: self.0.status,
            error: self.0.error.clone(),
            description: self.0.description.clone().or_else(|| self.0.detail.clone()),
        }
    }

    fn advice(&self) -> &'static str {
        match self.0.class {
            FailureClass::RefreshTokenRejected => {
                "the provider no longer accepts this grant: the user must authorize the app again"
            }
            FailureClass::ConsumerCredentialsInvalid => {
                "the consumer's client id or secret was refused: fix the consumer configuration; installations are untouched"
            }
            FailureClass::ScopeRejected => {
                "the granted scopes no longer match the consumer's: the user must authorize the app again"
            }
            FailureClass::Configuration => {
                "the request was malformed for this provider: check the provider profile (endpoints, body encoding, client authentication)"
            }
            _ => "temporary: it will be retried later",
        }
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.operation)?;
        if let Some(id) = &self.0.installation {
            write!(f, " for installation {id}")?;
        }
        write!(f, " failed ({}", self.0.class)?;
        if let Some(status) = self.0.status {
            write!(f, ", HTTP {status}")?;
        }
        f.write_str(")")?;
        match (&self.0.error, &self.0.description) {
            (Some(e), Some(d)) => write!(f, ": {e}: {d}")?,
            (Some(e), None) => write!(f, ": {e}")?,
            _ => {}
        }
        if let Some(detail) = &self.0.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(after) = self.0.retry_after {
            write!(f, " (retry after {}s)", after.as_secs())?;
        }
        write!(f, "; {}", self.advice())
    }
}

impl std::error::Error for OAuthError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
