//! What the engine reports through the [`metrics`] facade: install any recorder (Prometheus,
//! StatsD, OpenTelemetry) and these appear; without one every call is a no-op. Every series
//! carries the `consumer` label (`ConsumerConfig::name`), so consumers sharing a process stay
//! apart. Never a token, never an installation id (unbounded label values would explode a
//! time-series database; `tracing` spans carry the installation). The consumer label is an
//! `Arc<str>` made once per manager, and the cache's series keys are built once
//! ([`CacheCounters`]): recording a cache hit allocates nothing of its own (none at all
//! without a recorder; with one, what the recorder's lookup of the series costs), as
//! `tests/hot_path_allocations.rs` counts.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tokenkeeper_refreshes_total` | counter | `outcome` (`ok`, `failed`), `class` | refresh requests sent to the token endpoint; `class` is the failure class (`none` when ok) |
//! | `tokenkeeper_refresh_duration_seconds` | histogram | | time of one refresh request |
//! | `tokenkeeper_lease_takeovers_total` | counter | | leases taken over from a silent or lapsed holder |
//! | `tokenkeeper_store_conflicts_total` | counter | `operation` (`lease`, `result`) | compare-and-swaps another writer won |
//! | `tokenkeeper_backoffs_total` | counter | `cause` | refreshes deferred (transient, consumer credentials, configuration, mass rejection) |
//! | `tokenkeeper_breaker_trips_total` | counter | | consumer-wide breaker trips (credentials refused) |
//! | `tokenkeeper_reauthorizations_required_total` | counter | `reason` | installations condemned |
//! | `tokenkeeper_cache_hits_total` / `_misses_total` | counter | | `access_token` served from the cache or not |
//! | `tokenkeeper_cache_invalidations_total` | counter | | cached tokens dropped because another process ended them |
//! | `tokenkeeper_refresher_lag_seconds` | gauge | | now minus the oldest due time, at each refresher sweep |
//! | `tokenkeeper_authorizations_refused_total` | counter | `reason` | callbacks refused (`AuthorizationError::reason_label`: `invalid_state`, `browser_mismatch`, `malformed_code`, `exchange`, ...) |
//! | `tokenkeeper_installations` | gauge | `state` | installations in the store by state (every consumer sharing it; no `consumer` label), counted by the refresher every `state_count_every` with `TokenStore::count_states`, at most `state_count_limit` per state |

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper_core::{BackoffCause, FailureClass, ReauthReason, StateKind};

pub(crate) const REFRESHES: &str = "tokenkeeper_refreshes_total";
pub(crate) const REFRESH_DURATION: &str = "tokenkeeper_refresh_duration_seconds";
pub(crate) const TAKEOVERS: &str = "tokenkeeper_lease_takeovers_total";
pub(crate) const CONFLICTS: &str = "tokenkeeper_store_conflicts_total";
pub(crate) const BACKOFFS: &str = "tokenkeeper_backoffs_total";
pub(crate) const BREAKER_TRIPS: &str = "tokenkeeper_breaker_trips_total";
pub(crate) const REAUTHORIZATIONS: &str = "tokenkeeper_reauthorizations_required_total";
pub(crate) const CACHE_HITS: &str = "tokenkeeper_cache_hits_total";
pub(crate) const CACHE_MISSES: &str = "tokenkeeper_cache_misses_total";
pub(crate) const CACHE_INVALIDATIONS: &str = "tokenkeeper_cache_invalidations_total";
pub(crate) const REFRESHER_LAG: &str = "tokenkeeper_refresher_lag_seconds";
pub(crate) const INSTALLATIONS: &str = "tokenkeeper_installations";
pub(crate) const AUTHORIZATIONS_REFUSED: &str = "tokenkeeper_authorizations_refused_total";

/// A callback was refused, for `reason` (a bounded label: review I3).
pub(crate) fn authorization_refused(consumer: &Arc<str>, reason: &'static str) {
    metrics::counter!(AUTHORIZATIONS_REFUSED, "consumer" => Arc::clone(consumer), "reason" => reason)
        .increment(1);
}

/// A refresh request ended: `Ok` or its failure class.
pub(crate) fn refresh(consumer: &Arc<str>, class: Option<FailureClass>, took: Duration) {
    let (outcome, class) = match class {
        None => ("ok", "none"),
        Some(c) => ("failed", class_label(c)),
    };
    metrics::counter!(REFRESHES, "consumer" => Arc::clone(consumer), "outcome" => outcome, "class" => class)
        .increment(1);
    metrics::histogram!(REFRESH_DURATION, "consumer" => Arc::clone(consumer)).record(took);
}

fn class_label(class: FailureClass) -> &'static str {
    match class {
        FailureClass::RefreshTokenRejected => "refresh_token_rejected",
        FailureClass::ConsumerCredentialsInvalid => "consumer_credentials_invalid",
        FailureClass::ScopeRejected => "scope_rejected",
        FailureClass::Configuration => "configuration",
        FailureClass::Transient => "transient",
        _ => "other",
    }
}

pub(crate) fn takeover(consumer: &Arc<str>) {
    metrics::counter!(TAKEOVERS, "consumer" => Arc::clone(consumer)).increment(1);
}

pub(crate) fn conflict(consumer: &Arc<str>, operation: &'static str) {
    metrics::counter!(CONFLICTS, "consumer" => Arc::clone(consumer), "operation" => operation)
        .increment(1);
}

pub(crate) fn backoff(consumer: &Arc<str>, cause: BackoffCause) {
    let cause = match cause {
        BackoffCause::Transient => "transient",
        BackoffCause::ConsumerCredentialsInvalid => "consumer_credentials_invalid",
        BackoffCause::Configuration => "configuration",
        BackoffCause::MassRejection => "mass_rejection",
        _ => "other",
    };
    metrics::counter!(BACKOFFS, "consumer" => Arc::clone(consumer), "cause" => cause).increment(1);
}

pub(crate) fn breaker_trip(consumer: &Arc<str>) {
    metrics::counter!(BREAKER_TRIPS, "consumer" => Arc::clone(consumer)).increment(1);
}

pub(crate) fn reauthorization(consumer: &Arc<str>, reason: ReauthReason) {
    let reason = match reason {
        ReauthReason::RefreshTokenRejected => "refresh_token_rejected",
        ReauthReason::ScopesChanged => "scopes_changed",
        ReauthReason::RefreshTokenExpired => "refresh_token_expired",
        ReauthReason::RotatedTokenLost => "rotated_token_lost",
        ReauthReason::FailureBudgetExhausted => "failure_budget_exhausted",
        ReauthReason::NoRefreshToken => "no_refresh_token",
        _ => "other",
    };
    metrics::counter!(REAUTHORIZATIONS, "consumer" => Arc::clone(consumer), "reason" => reason)
        .increment(1);
}

/// The cache's hit and miss series of one consumer, their keys built once: `counter!` with a
/// label builds its key (a vector of labels) on every call, one allocation per cache hit
/// (measured by `tests/hot_path_allocations.rs`). The recorder is still looked up on every
/// call, so one installed after the manager was built is used.
#[derive(Debug)]
pub(crate) struct CacheCounters {
    hits: metrics::Key,
    misses: metrics::Key,
}

/// The metadata `counter!` would give these series.
static CACHE_METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl CacheCounters {
    pub(crate) fn new(consumer: &Arc<str>) -> Self {
        let key = |name: &'static str| {
            metrics::Key::from_parts(
                name,
                vec![metrics::Label::new("consumer", Arc::clone(consumer))],
            )
        };
        Self {
            hits: key(CACHE_HITS),
            misses: key(CACHE_MISSES),
        }
    }

    /// Counts one `access_token` served from the cache (`hit`) or not.
    pub(crate) fn count(&self, hit: bool) {
        let key = if hit { &self.hits } else { &self.misses };
        metrics::with_recorder(|r| r.register_counter(key, &CACHE_METADATA)).increment(1);
    }
}

pub(crate) fn cache_invalidation(consumer: &Arc<str>) {
    metrics::counter!(CACHE_INVALIDATIONS, "consumer" => Arc::clone(consumer)).increment(1);
}

pub(crate) fn refresher_lag(consumer: &Arc<str>, lag: Duration) {
    metrics::gauge!(REFRESHER_LAG, "consumer" => Arc::clone(consumer)).set(lag.as_secs_f64());
}

pub(crate) fn installations(state: StateKind, count: u64) {
    metrics::gauge!(INSTALLATIONS, "state" => state.as_str()).set(count as f64);
}
