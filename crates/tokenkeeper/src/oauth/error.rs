//! The OAuth half's errors: `OAuthError`, a failed exchange with the provider, classified
//! (see [the design document](crate::_documentation::design), "Error classification"),
//! carrying the provider's own words and never a token; and `AuthorizationError`, the
//! provider's side of a refused authorization callback. Neither knows a store.

use std::fmt;
use std::time::Duration;

use tokenkeeper_core::{
    CommitEvidence, ErrorDetail, FailureClass, InstallationId, Timestamp, backend::BoxError,
};

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

/// A failed exchange with the provider.
///
/// Two independent axes describe it: [`ErrorKind`] says *how* it failed (the provider answered
/// with an OAuth error, no answer arrived, the answer was unreadable or too large) and
/// [`FailureClass`] says *what it means* for the installation (retry, re-authorize, fix the
/// consumer). The fields are private: the only way to build one is the constructors of this
/// module, so every error carries a consistent kind, class and note.
///
/// Boxed: errors travel in `Result`s on hot paths.
#[derive(Debug)]
pub struct OAuthError(Box<OAuthErrorRepr>);

#[derive(Debug)]
struct OAuthErrorRepr {
    operation: Operation,
    installation: Option<InstallationId>,
    kind: ErrorKind,
    class: FailureClass,
    status: Option<u16>,
    error: Option<String>,
    description: Option<String>,
    error_uri: Option<String>,
    retry_after: Option<Duration>,
    /// Our own words on what was wrong with the exchange (not the provider's).
    note: Option<String>,
    /// For transport failures: the request may have been sent (not a refused connection).
    reached_provider: bool,
    source: Option<BoxError>,
}

/// The provider's OAuth error reply (`error`, `error_description`, `error_uri`), as read.
#[derive(Debug, Default)]
pub(crate) struct ProviderWords {
    pub(crate) error: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) error_uri: Option<String>,
}

impl OAuthError {
    fn new(operation: Operation, kind: ErrorKind, class: FailureClass) -> Self {
        Self(Box::new(OAuthErrorRepr {
            operation,
            installation: None,
            kind,
            class,
            status: None,
            error: None,
            description: None,
            error_uri: None,
            retry_after: None,
            note: None,
            reached_provider: false,
            source: None,
        }))
    }

    /// Replaces every occurrence of a secret this request sent (a code, a verifier, a refresh
    /// token, the client secret, the Basic credentials), as sent or as a form body encodes
    /// it (a gateway echoing `refresh_token=1%2F%2F0g…`), in the provider's words with
    /// `[redacted]`: they must not reach errors, logs or the stored history.
    pub(crate) fn without_secrets(mut self, secrets: &[String]) -> Self {
        let forms: Vec<String> = secrets
            .iter()
            .filter(|s| s.len() >= 4)
            .flat_map(|s| {
                let encoded: String = form_urlencoded::byte_serialize(s.as_bytes()).collect();
                [s.clone(), encoded]
            })
            .collect();
        let scrub = |field: &mut Option<String>| {
            if let Some(text) = field {
                for secret in &forms {
                    if text.contains(secret.as_str()) {
                        *text = text.replace(secret.as_str(), "[redacted]");
                    }
                }
            }
        };
        scrub(&mut self.0.error);
        scrub(&mut self.0.description);
        scrub(&mut self.0.error_uri);
        self
    }

    /// The provider answered with an OAuth error (or an error page, `words` empty and `note`
    /// saying so).
    pub(crate) fn provider(
        operation: Operation,
        class: FailureClass,
        status: u16,
        words: ProviderWords,
        retry_after: Option<Duration>,
        note: Option<&str>,
    ) -> Self {
        let mut e = Self::new(operation, ErrorKind::Provider, class);
        e.0.status = Some(status);
        e.0.error = words.error;
        e.0.description = words.description;
        e.0.error_uri = words.error_uri;
        e.0.retry_after = retry_after;
        e.0.note = note.map(str::to_owned);
        e
    }

    /// An answer (or no answer yet) that is not a usable token reply: `why` says what is
    /// wrong with it.
    pub(crate) fn invalid_response(
        operation: Operation,
        class: FailureClass,
        status: Option<u16>,
        retry_after: Option<Duration>,
        why: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(operation, ErrorKind::InvalidResponse, class);
        e.0.status = status;
        e.0.retry_after = retry_after;
        e.0.note = Some(why.into());
        e
    }

    /// No usable answer: the transport failed. The source names no URL, body or header.
    pub(crate) fn transport(operation: Operation, source: reqwest::Error) -> Self {
        let what = if source.is_timeout() {
            "the provider did not answer in time"
        } else if source.is_connect() {
            "cannot connect to the provider"
        } else {
            "the connection to the provider failed"
        };
        let mut e = Self::new(operation, ErrorKind::Transport, FailureClass::Transient);
        e.0.note = Some(what.to_owned());
        e.0.reached_provider = !source.is_connect();
        e.0.source = Some(Box::new(source.without_url()));
        e
    }

    /// No reply, from a transport that is not `reqwest` (the simulator's).
    pub(crate) fn transport_failure(operation: Operation, reached_provider: bool) -> Self {
        let mut e = Self::new(operation, ErrorKind::Transport, FailureClass::Transient);
        e.0.note = Some(if reached_provider {
            "the connection to the provider failed".to_owned()
        } else {
            "cannot connect to the provider".to_owned()
        });
        e.0.reached_provider = reached_provider;
        e
    }

    /// The request outlived its hard deadline (the client's own timeout did not fire).
    pub(crate) fn deadline(operation: Operation, limit: Duration) -> Self {
        let mut e = Self::new(operation, ErrorKind::Transport, FailureClass::Transient);
        e.0.note = Some(format!(
            "the provider did not answer within the {}s deadline",
            limit.as_secs_f64()
        ));
        e.0.reached_provider = true;
        e
    }

    /// The reply was larger than `limit` bytes and was not read.
    pub(crate) fn too_large(operation: Operation, status: u16, limit: usize) -> Self {
        let mut e = Self::new(operation, ErrorKind::TooLarge, FailureClass::Transient);
        e.0.status = Some(status);
        e.0.note = Some(format!(
            "the reply exceeds the {limit}-byte limit (max_response_bytes); it was not read"
        ));
        e
    }

    /// Names the installation the exchange was for.
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
    /// What it means for the installation.
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
    /// True when the provider answered with an OAuth error (or an error page).
    pub fn is_provider_error(&self) -> bool {
        self.0.kind == ErrorKind::Provider
    }
    /// True when no usable answer arrived (connect, TLS, reset, timeout).
    pub fn is_transport(&self) -> bool {
        self.0.kind == ErrorKind::Transport
    }
    /// True when an answer arrived but was not a usable token reply.
    pub fn is_invalid_response(&self) -> bool {
        self.0.kind == ErrorKind::InvalidResponse
    }
    /// Whether the request may have been committed by the provider although its reply was
    /// lost: a timeout or a connection lost after sending, an unreadable or oversized 2xx. A
    /// rotating provider has then likely retired the refresh token that was sent.
    pub fn may_have_committed(&self) -> bool {
        self.commit_evidence() == CommitEvidence::ReplyLost
    }

    /// What this failure says about whether the provider committed the request: a lost reply
    /// (see [`may_have_committed`](Self::may_have_committed)); a server error (5xx), which a
    /// gateway or CDN may send after the origin committed; or nothing (a 4xx or 429 is the
    /// provider's word that it did not, and a request that never reached it committed
    /// nothing).
    pub fn commit_evidence(&self) -> CommitEvidence {
        let status = self.0.status;
        let two_xx = status.is_some_and(|s| (200..300).contains(&s));
        match self.0.kind {
            ErrorKind::Transport if self.0.reached_provider => CommitEvidence::ReplyLost,
            ErrorKind::InvalidResponse | ErrorKind::TooLarge if two_xx => CommitEvidence::ReplyLost,
            // An OAuth error body, an error page or an unreadable body: any 5xx answer.
            _ if status.is_some_and(|s| (500..600).contains(&s)) => CommitEvidence::ServerError,
            _ => CommitEvidence::None,
        }
    }

    /// Our own note on what was wrong (not the provider's words), if any.
    pub fn note(&self) -> Option<&str> {
        self.0.note.as_deref()
    }

    /// The record of this failure kept in the installation's history.
    pub fn to_detail(&self) -> ErrorDetail {
        ErrorDetail {
            class: self.0.class,
            status: self.0.status,
            error: self.0.error.clone(),
            description: self.0.description.clone().or_else(|| self.0.note.clone()),
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
        if let Some(note) = &self.0.note {
            write!(f, ": {note}")?;
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

/// Why an authorization could not begin or complete on the provider's side: the callback's
/// issuer, state, binding or code, the code exchange, or the provider account. What the
/// manager refuses when it records the grant (a replayed flow, another account, the store)
/// is [`InstallError`](crate::InstallError).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorizationError {
    /// The callback's `iss` (RFC 9207) names another authorization server than this
    /// consumer's: a mix-up attack, or a callback routed to the wrong consumer.
    #[error(
        "the authorization response comes from issuer {received:?}, not this consumer's ({expected}); nothing was exchanged: route each provider's callback to its own consumer"
    )]
    IssuerMismatch {
        /// The consumer's issuer.
        expected: String,
        /// What the callback said (control characters and white space removed, at most 100
        /// characters).
        received: String,
    },
    /// The profile names its issuer, so the callback's `iss` (or its absence) must be passed
    /// on: `complete_authorization` cannot tell which it was.
    #[error(
        "this consumer names its issuer: complete the flow with complete_authorization_with_issuer, passing the callback's `iss` parameter (None when the callback had none)"
    )]
    IssuerNotPassed,
    /// The provider sends `iss` with every authorization response, and this one had none.
    #[error(
        "the authorization response carries no `iss`, which this provider always sends (RFC 9207); nothing was exchanged: pass the callback's `iss` to complete_authorization_with_issuer"
    )]
    MissingIssuer,
    /// No state key is configured, so no flow can begin or complete.
    #[error(
        "no state key is configured: set ConsumerConfigBuilder::state_key to 32 random bytes shared by every process (StateKey::from_base64 of `openssl rand -base64 32`)"
    )]
    NoStateKey,
    /// The callback request carries no cookie of this flow.
    #[error(
        "this browser holds no cookie of this authorization (another browser, cookies blocked, or a replayed callback); nothing was exchanged: start the installation again from this browser"
    )]
    MissingBinding,
    /// The browser-binding cookie's value is not one this library made.
    #[error(
        "the browser-binding cookie is missing or malformed; the user must start the authorization again from this browser"
    )]
    InvalidBinding,
    /// The callback came with another browser's binding: the state was issued to a different
    /// browser. A replayed or injected callback, or a planted cookie.
    #[error(
        "the callback for installation {installation} did not come from the browser that began the authorization (its binding cookie does not match); nothing was exchanged: the user must start the authorization again from this browser"
    )]
    BrowserMismatch {
        /// The installation the flow was for.
        installation: InstallationId,
    },
    /// The provider account of the new grant could not be read, so it could not be checked.
    #[error(
        "the provider account of the new authorization of installation {installation} could not be read ({reason}); nothing was stored: start the authorization again, or check ProviderProfile::identity"
    )]
    Identity {
        /// The installation the flow was for.
        installation: InstallationId,
        /// What went wrong (never a token).
        reason: String,
    },
    /// The `state` was not issued by this consumer (tampered, garbled, or another consumer's).
    #[error(
        "the authorization state is not one this consumer issued (tampered, truncated, or from another consumer or key); start the authorization again"
    )]
    InvalidState,
    /// The callback's `code` cannot be an authorization code: empty, longer than
    /// 2,048 bytes, or with characters outside RFC 6749's VSCHAR (printable ASCII,
    /// Appendix A.11). Refused before anything is claimed or sent (review N8).
    #[error(
        "the callback's authorization code for installation {installation} is empty, too long or not printable ASCII; nothing was sent: start the authorization again"
    )]
    MalformedCode {
        /// The installation the flow was for.
        installation: InstallationId,
    },
    /// The `state` expired before the callback arrived.
    #[error(
        "the authorization for installation {installation} expired at {expired_at}; start the authorization again"
    )]
    ExpiredState {
        /// The installation the flow was for.
        installation: InstallationId,
        /// When the flow stopped being accepted.
        expired_at: Timestamp,
    },
    /// The provider refused the code exchange.
    #[error("completing the authorization for installation {installation} failed: {source}")]
    Exchange {
        /// The installation the flow was for.
        installation: InstallationId,
        /// The provider's answer, classified.
        #[source]
        source: OAuthError,
    },
    /// The system random generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(String),
}

impl AuthorizationError {
    /// A short, stable name of the kind of refusal: the `reason` label of
    /// `tokenkeeper_authorizations_refused_total` (review I3), one of a fixed set.
    pub fn reason_label(&self) -> &'static str {
        match self {
            Self::IssuerMismatch { .. } => "issuer_mismatch",
            Self::IssuerNotPassed => "issuer_not_passed",
            Self::MissingIssuer => "missing_issuer",
            Self::NoStateKey => "no_state_key",
            Self::MissingBinding => "missing_binding",
            Self::InvalidBinding => "invalid_binding",
            Self::BrowserMismatch { .. } => "browser_mismatch",
            Self::Identity { .. } => "identity",
            Self::InvalidState => "invalid_state",
            Self::MalformedCode { .. } => "malformed_code",
            Self::ExpiredState { .. } => "expired_state",
            Self::Exchange { .. } => "exchange",
            Self::Random(_) => "random",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review N9: a secret echoed as a form body encodes it is scrubbed too.
    #[test]
    fn form_encoded_echoes_of_secrets_are_scrubbed() {
        let words = ProviderWords {
            error: Some("invalid_request".into()),
            description: Some("body: refresh_token=1%2F%2F0g-secret&x=1".into()),
            error_uri: None,
        };
        let e = OAuthError::provider(
            Operation::Refresh,
            FailureClass::Transient,
            400,
            words,
            None,
            None,
        )
        .without_secrets(&["1//0g-secret".to_owned()]);
        let text = e.to_string();
        assert!(!text.contains("0g-secret"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
    }
}
