//! Provider behaviours the mock can play, with their wire details (docs/design.md, "Provider facts").
//!
//! Each [`MockProfile`] expands to [`Rules`]: token lifetimes, rotation and reuse leeway, refresh
//! token expiry, which request encodings are accepted, how success bodies are spelled and the
//! exact error bodies (status, `error`, `error_description`) the real provider returns. Tests of
//! the client assert against these, so they are written down once, here.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const DAY: u64 = 24 * 3600;

/// A provider behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MockProfile {
    /// Bitbucket Cloud before 2026-05-04: non-rotating refresh tokens, `scopes` field.
    BitbucketLegacy,
    /// Bitbucket Cloud since 2026-05-04: rotating refresh tokens that expire unused, `scope` field.
    #[default]
    Bitbucket,
    /// Atlassian 3LO: rotating, JSON bodies, 10-minute reuse leeway, reuse detection.
    Atlassian3lo,
    /// GitHub App user tokens: rotating, old tokens die on use, errors in 200 replies.
    GithubApp,
    /// Google: long-lived refresh tokens, refresh replies omit `refresh_token`.
    Google,
}

impl MockProfile {
    /// Every profile.
    pub const ALL: [MockProfile; 5] = [
        Self::BitbucketLegacy,
        Self::Bitbucket,
        Self::Atlassian3lo,
        Self::GithubApp,
        Self::Google,
    ];

    /// The command-line / admin name.
    pub fn name(self) -> &'static str {
        match self {
            Self::BitbucketLegacy => "bitbucket-legacy",
            Self::Bitbucket => "bitbucket",
            Self::Atlassian3lo => "atlassian-3lo",
            Self::GithubApp => "github-app",
            Self::Google => "google",
        }
    }

    /// The behaviour this profile plays.
    pub fn rules(self) -> Rules {
        match self {
            Self::BitbucketLegacy => bitbucket_legacy(),
            Self::Bitbucket => bitbucket(),
            Self::Atlassian3lo => atlassian_3lo(),
            Self::GithubApp => github_app(),
            Self::Google => google(),
        }
    }
}

/// [`MockProfile::BitbucketLegacy`]: Bitbucket Cloud before 2026-05-04.
fn bitbucket_legacy() -> Rules {
    Rules {
        access_ttl: Duration::from_secs(7200),
        rotation: RotationRule::None,
        refresh_inactivity: None,
        refresh_absolute: None,
        accepts_json: false,
        scope_field: ScopeField::Scopes,
        refresh_reply_has_refresh_token: true,
        grant_type_in_state: true,
        token_type: "bearer",
        refresh_expires_in_field: false,
        retired_revocation_revokes_grant: true,
        errors: bitbucket_errors(),
    }
}

/// [`MockProfile::Bitbucket`]: Bitbucket Cloud since 2026-05-04.
fn bitbucket() -> Rules {
    Rules {
        access_ttl: Duration::from_secs(7200),
        rotation: RotationRule::Rotate {
            leeway: None,
            reuse_revokes_family: false,
            old_access_dies: false,
        },
        refresh_inactivity: Some(Duration::from_secs(90 * DAY)),
        refresh_absolute: None,
        accepts_json: false,
        scope_field: ScopeField::Scope,
        refresh_reply_has_refresh_token: true,
        grant_type_in_state: true,
        token_type: "bearer",
        refresh_expires_in_field: false,
        retired_revocation_revokes_grant: true,
        errors: Errors {
            // Unknown or retired tokens are refused as before; a token that expired
            // unused comes back as `invalid_grant`.
            expired_refresh: ErrorBody::new(400, "invalid_grant", "Invalid refresh_token"),
            ..bitbucket_errors()
        },
    }
}

/// [`MockProfile::Atlassian3lo`]: Atlassian 3LO.
fn atlassian_3lo() -> Rules {
    Rules {
        access_ttl: Duration::from_secs(3600),
        rotation: RotationRule::Rotate {
            leeway: Some(Duration::from_secs(600)),
            reuse_revokes_family: true,
            old_access_dies: false,
        },
        refresh_inactivity: Some(Duration::from_secs(90 * DAY)),
        refresh_absolute: Some(Duration::from_secs(365 * DAY)),
        accepts_json: true,
        scope_field: ScopeField::Scope,
        refresh_reply_has_refresh_token: true,
        grant_type_in_state: false,
        token_type: "Bearer",
        refresh_expires_in_field: false,
        retired_revocation_revokes_grant: true,
        errors: Errors {
            invalid_refresh: ErrorBody::new(
                403,
                "invalid_grant",
                "Unknown or invalid refresh token.",
            ),
            expired_refresh: ErrorBody::new(
                403,
                "invalid_grant",
                "Unknown or invalid refresh token.",
            ),
            bad_client: ErrorBody::new(401, "access_denied", "Unauthorized"),
            bad_code: ErrorBody::new(403, "invalid_grant", "Invalid authorization code"),
            bad_verifier: ErrorBody::new(403, "invalid_grant", "Invalid code verifier"),
            unsupported_grant: ErrorBody::new(
                400,
                "unsupported_grant_type",
                "Unsupported grant type",
            ),
        },
    }
}

/// [`MockProfile::GithubApp`]: GitHub App user tokens.
fn github_app() -> Rules {
    Rules {
        access_ttl: Duration::from_secs(28_800),
        rotation: RotationRule::Rotate {
            leeway: None,
            reuse_revokes_family: false,
            old_access_dies: true,
        },
        // Each refresh token is valid 6 months from its issue.
        refresh_inactivity: Some(Duration::from_secs(15_897_600)),
        refresh_absolute: None,
        accepts_json: true,
        scope_field: ScopeField::Scope,
        refresh_reply_has_refresh_token: true,
        grant_type_in_state: false,
        token_type: "bearer",
        refresh_expires_in_field: true,
        retired_revocation_revokes_grant: true,
        errors: Errors {
            // GitHub answers token errors with HTTP 200 and an `error` body.
            invalid_refresh: ErrorBody::new(
                200,
                "bad_refresh_token",
                "The refresh token passed is incorrect or expired.",
            ),
            expired_refresh: ErrorBody::new(
                200,
                "bad_refresh_token",
                "The refresh token passed is incorrect or expired.",
            ),
            bad_client: ErrorBody::new(
                200,
                "incorrect_client_credentials",
                "The client_id and/or client_secret passed are incorrect.",
            ),
            bad_code: ErrorBody::new(
                200,
                "bad_verification_code",
                "The code passed is incorrect or expired.",
            ),
            bad_verifier: ErrorBody::new(
                200,
                "bad_verification_code",
                "The code_verifier does not match the code_challenge.",
            ),
            unsupported_grant: ErrorBody::new(
                200,
                "unsupported_grant_type",
                "The grant type is not supported.",
            ),
        },
    }
}

/// [`MockProfile::Google`]: Google.
fn google() -> Rules {
    Rules {
        access_ttl: Duration::from_secs(3599),
        rotation: RotationRule::None,
        refresh_inactivity: Some(Duration::from_secs(180 * DAY)),
        refresh_absolute: None,
        accepts_json: true,
        scope_field: ScopeField::Scope,
        refresh_reply_has_refresh_token: false,
        grant_type_in_state: false,
        token_type: "Bearer",
        refresh_expires_in_field: false,
        retired_revocation_revokes_grant: true,
        errors: Errors {
            invalid_refresh: ErrorBody::new(
                400,
                "invalid_grant",
                "Token has been expired or revoked.",
            ),
            expired_refresh: ErrorBody::new(
                400,
                "invalid_grant",
                "Token has been expired or revoked.",
            ),
            bad_client: ErrorBody::new(401, "invalid_client", "Unauthorized"),
            bad_code: ErrorBody::new(400, "invalid_grant", "Malformed auth code."),
            bad_verifier: ErrorBody::new(400, "invalid_grant", "Invalid code verifier."),
            unsupported_grant: ErrorBody::new(
                400,
                "unsupported_grant_type",
                "Invalid grant_type: ",
            ),
        },
    }
}

/// The error bodies both Bitbucket profiles share.
fn bitbucket_errors() -> Errors {
    Errors {
        invalid_refresh: ErrorBody::new(400, "invalid_request", "Invalid refresh_token"),
        expired_refresh: ErrorBody::new(400, "invalid_request", "Invalid refresh_token"),
        bad_client: ErrorBody::new(
            400,
            "unauthorized_client",
            "Invalid OAuth client credentials",
        ),
        bad_code: ErrorBody::new(400, "invalid_grant", "The specified code is not valid."),
        bad_verifier: ErrorBody::new(400, "invalid_grant", "Invalid code_verifier."),
        unsupported_grant: ErrorBody::new(400, "invalid_grant", "Unsupported grant type: None"),
    }
}

impl fmt::Display for MockProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown profile name.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown provider profile {0:?}; choose one of bitbucket-legacy, bitbucket, atlassian-3lo, github-app, google"
)]
pub struct UnknownProfile(pub String);

impl FromStr for MockProfile {
    type Err = UnknownProfile;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownProfile(s.to_owned()))
    }
}

/// How refresh tokens behave on use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationRule {
    /// The same refresh token keeps working (and is returned again, or omitted).
    None,
    /// Every use issues a new refresh token and retires the old one.
    Rotate {
        /// How long a retired token still works (Atlassian: 10 minutes).
        leeway: Option<Duration>,
        /// Whether using a retired token after the leeway revokes every token of the grant.
        reuse_revokes_family: bool,
        /// Whether the access token issued with the old refresh token dies on use (GitHub).
        old_access_dies: bool,
    },
}

/// Which field carries the granted scopes in a success body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeField {
    /// `scopes` (Bitbucket before 2026-05-04).
    Scopes,
    /// `scope` (RFC 6749).
    Scope,
}

/// One error reply: status and RFC 6749 §5.2 body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// HTTP status (GitHub uses 200).
    pub status: u16,
    /// `error`.
    pub error: &'static str,
    /// `error_description`.
    pub description: &'static str,
}

impl ErrorBody {
    const fn new(status: u16, error: &'static str, description: &'static str) -> Self {
        Self {
            status,
            error,
            description,
        }
    }
}

/// The error replies of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Errors {
    /// An unknown, revoked or already-rotated refresh token.
    pub invalid_refresh: ErrorBody,
    /// A refresh token past its inactivity or absolute expiry.
    pub expired_refresh: ErrorBody,
    /// Wrong or missing client credentials.
    pub bad_client: ErrorBody,
    /// An unknown, used or expired authorization code.
    pub bad_code: ErrorBody,
    /// A PKCE verifier that does not match the challenge.
    pub bad_verifier: ErrorBody,
    /// A missing or unknown `grant_type`, or a JSON body where only forms are accepted.
    pub unsupported_grant: ErrorBody,
}

/// Everything that makes one provider behave unlike another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Refresh token rotation.
    pub rotation: RotationRule,
    /// A refresh token unused for this long dies.
    pub refresh_inactivity: Option<Duration>,
    /// A grant's refresh tokens die this long after the authorization.
    pub refresh_absolute: Option<Duration>,
    /// Whether a JSON request body is accepted (Bitbucket: form only).
    pub accepts_json: bool,
    /// How the scope field is spelled.
    pub scope_field: ScopeField,
    /// Whether a refresh reply carries `refresh_token` (Google omits it).
    pub refresh_reply_has_refresh_token: bool,
    /// Whether `state` echoes the grant type (Bitbucket does).
    pub grant_type_in_state: bool,
    /// The `token_type` spelling.
    pub token_type: &'static str,
    /// Whether `refresh_token_expires_in` is sent (GitHub).
    pub refresh_expires_in_field: bool,
    /// Whether revoking a retired refresh token (RFC 7009) revokes its grant. A provider that
    /// treats a retired token as invalid answers 200 and revokes nothing (RFC 7009 section
    /// 2.2: invalid tokens cause no error), leaving the grant's live token live.
    pub retired_revocation_revokes_grant: bool,
    /// The error replies.
    pub errors: Errors,
}
