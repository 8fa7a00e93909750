//! `explain(id)`: the answer to "why does this installation not work?" in plain language,
//! from the record's state, failure bookkeeping and bounded history. Never shows a token.

use std::fmt;

use tokenkeeper_core::{
    BackoffCause, ErrorDetail, EventKind, FailureStreak, HistoryEntry, InstallationId,
    ReauthReason, Record, State, StateKind, Timestamp,
};

use super::flight::decide::refresh_token_deadline;
use super::policy::RefreshPolicy;
use crate::ProviderProfile;

/// An installation's health, for code that acts on it (dashboards, alerts, emails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Working: active, or a refresh in progress.
    Healthy,
    /// Refreshing is failing for now (`cause`); the tokens are kept and retried at `retry_at`.
    /// The current access token is served while it is valid.
    Degraded {
        /// Why refreshes are on hold.
        cause: BackoffCause,
        /// When the next attempt is due.
        retry_at: Timestamp,
    },
    /// Only a new authorization by the user helps.
    NeedsReauthorization {
        /// Why the grant ended.
        reason: ReauthReason,
    },
    /// The application revoked it.
    Revoked,
}

/// What tokenkeeper knows about one installation, and what to do about it.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The installation.
    pub installation: InstallationId,
    /// Its consumer.
    pub consumer: String,
    /// Its state.
    pub state: State,
    /// The record version.
    pub version: u64,
    /// When the current access token expires.
    pub access_expires_at: Timestamp,
    /// The granted scopes.
    pub scopes: String,
    /// Whether a refresh token is held.
    pub has_refresh_token: bool,
    /// When the next action is due.
    pub due_at: Option<Timestamp>,
    /// When the refresh token was last used.
    pub refresh_token_last_used: Timestamp,
    /// When the refresh token stops working and which limit says so (the provider's word,
    /// the profile's inactivity or absolute expiry), if anything limits it.
    pub refresh_token_expires: Option<(Timestamp, &'static str)>,
    /// When the current grant was authorized.
    pub authorized_at: Timestamp,
    /// The current failure streak.
    pub failures: Option<FailureStreak>,
    /// The last error the provider returned (or tokenkeeper's own verdict, when it carries no
    /// HTTP status and no error code).
    pub last_error: Option<ErrorDetail>,
    /// The last error belongs to an earlier grant: the installation was authorized again
    /// since, and the current grant has not failed.
    pub last_error_of_earlier_grant: bool,
    /// What was irregular about the reply of the latest refresh, if it was (kept anyway).
    pub refresh_anomaly: Option<ErrorDetail>,
    /// This process's consumer breaker, when open: until when, and the provider's refusal of
    /// the process's own configuration (its client credentials, or the form of its
    /// requests). It is not the installation's fault and is kept out of the shared record
    /// (other processes may be configured right); it says why this process does not refresh.
    pub process_breaker: Option<(Timestamp, ErrorDetail)>,
    /// The last transitions, oldest first.
    pub history: Vec<HistoryEntry>,
    /// The plain-language summary: what happened and what to do.
    pub summary: String,
}

impl Explanation {
    /// Adds this process's open consumer breaker (see [`Explanation::process_breaker`]).
    pub(crate) fn with_breaker(mut self, breaker: Option<(Timestamp, ErrorDetail)>) -> Self {
        if let Some((until, detail)) = &breaker {
            let what = match detail.class {
                tokenkeeper_core::FailureClass::Configuration => {
                    "refused this process's refresh request as malformed. Check the provider profile"
                }
                _ => "refused this process's client credentials. Fix the client id/secret",
            };
            self.summary = format!(
                "{} This process does not refresh until {until}: the provider {what} (it said: {detail}); other processes of the fleet are not held up, and the installation's tokens are kept.",
                self.summary
            );
        }
        self.process_breaker = breaker;
        self
    }

    /// The state's kind (`active`, `refreshing`, `backoff`, ...).
    pub fn kind(&self) -> StateKind {
        self.state.kind()
    }

    /// The installation's health, machine-readable.
    pub fn health(&self) -> Health {
        match &self.state {
            State::Backoff { until, cause } => Health::Degraded {
                cause: *cause,
                retry_at: *until,
            },
            State::ReauthorizationRequired { reason, .. } => {
                Health::NeedsReauthorization { reason: *reason }
            }
            State::Revoked { .. } => Health::Revoked,
            _ => Health::Healthy,
        }
    }

    /// True when the installation works (active, or refreshing).
    pub fn is_healthy(&self) -> bool {
        self.health() == Health::Healthy
    }

    /// Why a new authorization is needed, when it is.
    pub fn reauthorization_reason(&self) -> Option<ReauthReason> {
        match self.health() {
            Health::NeedsReauthorization { reason } => Some(reason),
            _ => None,
        }
    }

    pub(crate) fn of(
        record: &Record,
        now: Timestamp,
        policy: &RefreshPolicy,
        profile: &ProviderProfile,
    ) -> Self {
        let tokens = record.tokens();
        let refresh_token_expires = refresh_token_deadline(record, profile);
        let refresh_anomaly = record
            .history()
            .filter(|h| matches!(h.event, EventKind::Refreshed | EventKind::LateRefreshed))
            .last()
            .and_then(|h| h.error.clone());
        let summary = state_summary(record, now, refresh_token_expires);
        let summary = with_notes(summary, record, policy, refresh_anomaly.as_ref());
        Self {
            installation: record.id().clone(),
            consumer: record.consumer().to_owned(),
            state: record.state().clone(),
            version: record.version(),
            access_expires_at: tokens.expires_at,
            scopes: tokens.scopes.to_string(),
            has_refresh_token: tokens.refresh_token.is_some(),
            due_at: record.due_at(),
            refresh_token_last_used: record.refresh_token_last_used(),
            refresh_token_expires,
            authorized_at: record.authorized_at(),
            failures: record.failures().cloned(),
            last_error: record.last_error().cloned(),
            last_error_of_earlier_grant: from_earlier_grant(record),
            refresh_anomaly,
            process_breaker: None,
            history: record.history().cloned().collect(),
            summary,
        }
    }
}

/// What the provider said about the latest failure, or that it was not asked.
fn provider_words(e: Option<&ErrorDetail>) -> String {
    match e {
        Some(e) if from_provider(e) => format!(" The provider said: {e}."),
        Some(e) => format!(
            " Nothing was asked of the provider: {}.",
            e.description
                .as_deref()
                .unwrap_or("tokenkeeper's own verdict")
        ),
        None => String::new(),
    }
}

/// The summary of the record's state, and what to do about it.
fn state_summary(
    record: &Record,
    now: Timestamp,
    refresh_token_expires: Option<(Timestamp, &'static str)>,
) -> String {
    match record.state() {
        State::Active => active_summary(record, now, refresh_token_expires),
        State::Refreshing { lease } => format!(
            "A refresh is in progress by {} (lease until {}). If that process died, another takes over when the lease lapses.",
            lease.holder, lease.until
        ),
        State::Backoff { until, cause } => backoff_summary(record, *until, *cause),
        State::ReauthorizationRequired { reason, since } => format!(
            "Needs the user to authorize the app again: {} (since {since}).{} Start a new authorization for installation {} and complete it; nothing else can repair it.",
            reason.describe(),
            provider_words(record.last_error()),
            record.id()
        ),
        State::Revoked { at } => {
            format!("Revoked by the application at {at}. Authorize it again to use it.")
        }
        _ => "Unknown state.".to_owned(),
    }
}

fn active_summary(
    record: &Record,
    now: Timestamp,
    refresh_token_expires: Option<(Timestamp, &'static str)>,
) -> String {
    let tokens = record.tokens();
    if !tokens.expires() && tokens.refresh_token.is_none() {
        return "Healthy: the access token does not expire (the provider gave it no expiry and no refresh token); it is served until the API refuses it, then the user must authorize the app again.".to_owned();
    }
    if tokens.refresh_token.is_none() && now < tokens.expires_at {
        return format!(
            "Healthy until {}: the access token is valid until then, but the provider issued no refresh token, so the user must authorize the app again after that.",
            tokens.expires_at
        );
    }
    if let Some((at, why)) = refresh_token_expires.filter(|(at, _)| now >= *at) {
        return format!(
            "Expiring: the refresh token expired at {at} by {why}; the next refresh records RefreshTokenExpired. Authorize the app again for installation {}.",
            record.id()
        );
    }
    if now < tokens.expires_at {
        return format!(
            "Healthy: the access token is valid until {}; the next refresh is due at {}.",
            tokens.expires_at,
            record
                .due_at()
                .map_or_else(|| "-".into(), |d| d.to_string())
        );
    }
    format!(
        "Healthy but idle: the access token expired at {}; it is refreshed on the next use or by the background refresher.",
        tokens.expires_at
    )
}

fn backoff_summary(record: &Record, until: Timestamp, cause: BackoffCause) -> String {
    let streak = record
        .failures()
        .filter(|f| f.consecutive > 0)
        .map(|f| {
            format!(
                " {} attempt(s) in a row have failed since {}.",
                f.consecutive, f.first_at
            )
        })
        .unwrap_or_default();
    let said = provider_words(record.last_error());
    match cause {
        BackoffCause::ConsumerCredentialsInvalid => format!(
            "The provider refused the consumer's client credentials.{said}{streak} Fix the client id/secret; this installation's tokens are kept and refreshing resumes at {until}."
        ),
        BackoffCause::MassRejection => format!(
            "The provider refused the refresh token, but it had refused those of many other installations since this process's last successful refresh, so the refusal is not believed yet.{said} Check the token URL and the provider's status; if the consumer's scopes were changed on purpose, every installation must be authorized again. Tokens are kept; the next attempt is at {until}."
        ),
        BackoffCause::Configuration => format!(
            "The provider refused the refresh request as malformed.{said} Check the provider profile; tokens are kept; next attempt at {until}."
        ),
        _ => format!(
            "The last refresh failed temporarily.{said}{streak} Tokens are kept; the next attempt is at {until}; the current access token is served until {}.",
            record.tokens().expires_at
        ),
    }
}

/// The summary with what else the record says: a revival in doubt, tokens shorter-lived than
/// the refresh interval, an irregular last refresh reply.
fn with_notes(
    summary: String,
    record: &Record,
    policy: &RefreshPolicy,
    refresh_anomaly: Option<&ErrorDetail>,
) -> String {
    let mut summary = summary;
    if let Some(at) = record.failures().and_then(|f| f.revived_after_verdict)
        && matches!(record.state(), State::Active)
    {
        summary = format!(
            "{summary} At {at} a late result revived it after another process had condemned, tried or taken the lease of the refresh token it rotated away; if that process presented the retired token, a provider with reuse detection may have revoked the grant, and the next refresh would then be refused (explained as a lost rotation)."
        );
    }
    if let Some(note) = short_lived(record, policy) {
        summary = format!("{summary} {note}");
    }
    if let Some(a) = refresh_anomaly {
        summary = format!(
            "{summary} The latest refresh reply was irregular ({}); if refreshes start failing, authorize again and check the provider profile.",
            a.description.as_deref().unwrap_or("see the history")
        );
    }
    summary
}

/// Whether `detail` is about a request to the provider (its words: an HTTP status or an
/// OAuth error code; or a transient failure of the request itself, a timeout or a reset),
/// not a verdict tokenkeeper reached without asking it (no refresh token, an expiry, a
/// leeway passed).
fn from_provider(detail: &ErrorDetail) -> bool {
    detail.status.is_some()
        || detail.error.is_some()
        || detail.class == tokenkeeper_core::FailureClass::Transient
}

/// A note when the provider's access tokens go stale before the next refresh is allowed.
fn short_lived(record: &Record, policy: &RefreshPolicy) -> Option<String> {
    let tokens = record.tokens();
    let allowed = tokens
        .obtained_at
        .saturating_add(policy.min_refresh_interval);
    (tokens.refresh_token.is_some() && policy.stale_at(tokens) < allowed).then(|| {
        format!(
            "The provider's access tokens live {:?}, which runs out before the minimum interval between refreshes ({:?}, RefreshPolicy::min_refresh_interval): callers get RefreshTooSoon from {} until {allowed}.",
            tokens.lifetime(),
            policy.min_refresh_interval,
            policy.stale_at(tokens),
        )
    })
}

/// Whether the record's last error belongs to an earlier grant: a new authorization came
/// after the last history entry that carried an error (or that entry has left the bounded
/// history while the record was authorized again since).
fn from_earlier_grant(record: &Record) -> bool {
    let history: Vec<_> = record.history().collect();
    let errored = history.iter().rposition(|h| h.error.is_some());
    let granted = history
        .iter()
        .rposition(|h| matches!(h.event, EventKind::Authorized | EventKind::Created));
    match (errored, granted) {
        (Some(e), Some(g)) => g > e,
        (None, Some(_)) => record.last_error().is_some(),
        _ => false,
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "installation {} ({})", self.installation, self.consumer)?;
        writeln!(f, "  state:    {}", self.state.kind())?;
        writeln!(f, "  summary:  {}", self.summary)?;
        let refresh = match (self.has_refresh_token, self.refresh_token_expires) {
            (false, _) => "none".to_owned(),
            (true, None) => "held".to_owned(),
            (true, Some((at, why))) => format!("held, expires {at} ({why})"),
        };
        let access = if self.access_expires_at == Timestamp::MAX {
            "never".to_owned()
        } else {
            self.access_expires_at.to_string()
        };
        writeln!(
            f,
            "  tokens:   access expires {access}; refresh token {refresh}; scopes [{}]; authorized {}",
            self.scopes, self.authorized_at
        )?;
        if let Some(last) = &self.last_error {
            let whose = match (self.last_error_of_earlier_grant, from_provider(last)) {
                (true, _) => " (of an earlier grant; the current one has not failed)",
                (false, false) => " (tokenkeeper's verdict; nothing was asked of the provider)",
                (false, true) => "",
            };
            writeln!(f, "  last error{whose}: {last}")?;
        }
        writeln!(
            f,
            "  history (oldest first, record version {}):",
            self.version
        )?;
        for h in &self.history {
            write!(
                f,
                "    {} v{} {}: {} -> {}",
                h.at, h.version, h.event, h.from, h.to
            )?;
            if let Some(e) = &h.error {
                write!(f, " [{e}]")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
