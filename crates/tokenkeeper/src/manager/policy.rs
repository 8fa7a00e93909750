//! `RefreshPolicy`: when to refresh, how long leases last, how to back off and when to give up,
//! with defaults from the provider profile and validation of the rules that keep leases safe.

use std::time::Duration;

use tokenkeeper_core::{FailureStreak, Record, Timestamp, TokenSet};

use super::flight::guard::MassRejectionGuard;
use crate::oauth::Timing;
use crate::oauth::{ConfigError, ConsumerConfig};

/// How long after a token request's deadline its last bytes may still reach the provider
/// (network transit; monotonic clocks drifting apart). A request is sent only if its bound
/// plus this ends before any peer could take the lease over.
pub(crate) const TRANSIT: Duration = Duration::from_millis(500);

/// The least spare time a lease must have beyond a token request's bound and
/// [`TRANSIT`]: room for the lease write (and a renewal before sending) to complete.
pub(crate) const HEADROOM: Duration = Duration::from_secs(1);

/// The longest a token request can take from sending to giving up: the HTTP timeout plus
/// the grace to read a reply that arrived.
pub(crate) fn request_bound(consumer: &ConsumerConfig) -> Duration {
    consumer.http_timeout() + crate::oauth::DEADLINE_GRACE
}

/// Refresh timing, leases, backoff and the failure budget.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshPolicy {
    /// Skew, refresh-ahead window and lifetime share (from the profile by default).
    pub timing: Timing,
    /// Spread proactive refreshes over up to this share of the token lifetime (percent), so a
    /// fleet authorized together does not refresh in one burst. Default 5.
    pub jitter_percent: u8,
    /// Refresh proactively (the background refresher acts at `refresh_at`). When false,
    /// installations are refreshed on demand and only kept alive before their refresh token's
    /// inactivity expiry.
    pub proactive: bool,
    /// Refresh an idle installation this long after its refresh token was last used (default:
    /// the profile's inactivity expiry minus 7 days; `None` without an inactivity expiry).
    pub keep_alive: Option<Duration>,
    /// How long a refresh lease lasts without renewal (default: the HTTP timeout plus 5 s).
    /// Its holder renews it every third of it while it works (waiting for the provider,
    /// retrying a store write), and a peer that watches it go unrenewed for this long (its own
    /// monotonic time, whatever the clocks say) takes it over: a dead holder blocks its
    /// installation for about this long. Must exceed the HTTP timeout plus the 250 ms reply
    /// grace by at least 1.5 s, so a token request always ends before a peer could take
    /// its lease over, even when no renewal lands.
    pub lease_ttl: Duration,
    /// The most two machines' clocks may disagree (default 30 s). The expiry time written into
    /// a lease is `lease_ttl` plus this margin, so a process that never watched the lease
    /// (a background refresher arriving later) does not take it over early by its clock.
    pub lease_margin: Duration,
    /// How long a caller waits for another process's refresh before giving up (default: twice
    /// the lease TTL, enough to watch a dead holder's lease fall silent and take it over; at
    /// least the TTL plus a second).
    pub peer_wait: Duration,
    /// First backoff delay after a transient failure (default 2 s).
    pub backoff_base: Duration,
    /// Longest backoff delay (default 10 minutes).
    pub backoff_max: Duration,
    /// Give up (re-authorization required) once refreshes have failed transiently for this
    /// long... (default 3 days)
    pub failure_budget: Duration,
    /// ...and at least this many times in a row (default 5), so one outage cannot condemn an
    /// installation by a single unlucky attempt.
    pub failure_budget_attempts: u32,
    /// How long every refresh fails fast after the provider refused the consumer's
    /// credentials (default 60 s).
    pub consumer_breaker: Duration,
    /// How long a flight keeps trying to write tokens the provider has already rotated while
    /// the store fails (default 5 minutes). The new refresh token exists nowhere else, so the
    /// flight retries every store error for this long before handing the tokens to the
    /// unsaved-tokens sink (`TokenManagerBuilder::on_unsaved_tokens`).
    pub result_write_patience: Duration,
    /// While the manager shuts down ([`TokenManager::shutdown`](crate::TokenManager::shutdown)),
    /// how long a flight still retries a store write that fails before handing rotated tokens
    /// to the unsaved-tokens sink (default 5 s): long enough to ride out a store failover,
    /// short enough for an orchestrator's termination grace period.
    pub shutdown_grace: Duration,
    /// The shortest time between two refreshes of one installation (default 1 s). A provider
    /// that issues access tokens with a tiny or zero `expires_in` is believed (a token is
    /// never served past the expiry the provider gave), and this interval is what keeps such
    /// tokens from turning every call into a refresh: when a token goes stale before the next
    /// refresh is allowed, callers get `Error::RefreshTooSoon` until then.
    pub min_refresh_interval: Duration,
    /// The longest a caller of `access_token` (or `send_authorized`) waits for a refresh
    /// (default 30 s); past it the caller gets `Error::Busy` while the refresh goes on in the
    /// background and lands for the next caller.
    pub caller_wait: Duration,
    /// The longest this process serves a cached access token without reading its record
    /// again (default 30 s). Past it, the next call re-reads the record (one store read per
    /// installation however many callers wait), so a revocation, re-authorization or
    /// condemnation by *another* process stops this process serving the old token within
    /// this bound. In the process that made the change it takes effect at once. Zero reads
    /// the store on every call.
    pub cache_revalidate: Duration,
    /// How many installations' access tokens this process caches at most (default 100 000);
    /// beyond that the least recently used are evicted. The background refresher never adds
    /// entries, it only updates those callers use.
    pub cache_capacity: usize,
    /// How often this process reads the store's lifecycle event log (default 500 ms): to drop
    /// cached tokens another process revoked, condemned, deleted or replaced by a new grant
    /// (so within about this bound, not `cache_revalidate`), and to feed
    /// [`TokenManager::events`](crate::TokenManager::events) streams. Zero turns the cache's
    /// watcher off (`cache_revalidate` alone bounds staleness then).
    pub event_poll: Duration,
    /// A 401 from the API forces a refresh only when the current tokens are at least this old
    /// (default 60 s): an API that refuses a fresh token for another reason (an endpoint
    /// outside the granted scopes, a misbehaving gateway) gets the same token back instead of
    /// a rotation per call.
    pub forced_refresh_min_interval: Duration,
    /// On a provider that rotates refresh tokens without a reuse leeway (Bitbucket), how many
    /// refreshes this manager (a process usually has one per consumer) has in flight at most
    /// (default 8). Between the provider's
    /// commit and the result's write the new refresh token exists only in this process, so a
    /// crash (SIGKILL, OOM) there loses each such installation: this bounds what one crash
    /// costs, at a throughput of about this many refreshes per provider round trip per
    /// process. Flights over the bound wait without a lease, so peers may take their
    /// installations meanwhile. `None` lifts the bound; providers with a leeway (a peer
    /// recovers the installation with the retired token) and without rotation ignore it.
    pub max_rotations_in_flight: Option<usize>,
    /// Stop condemning when the provider refuses the refresh tokens of many installations
    /// since the last successful refresh (default on: 10 within 10 minutes, held up to 24 h;
    /// see [`MassRejectionGuard`]); `None` condemns every refusal at once.
    pub mass_rejection: Option<MassRejectionGuard>,
}

impl RefreshPolicy {
    /// Defaults for a consumer (from its profile and HTTP timeout).
    pub fn for_consumer(consumer: &ConsumerConfig) -> Self {
        let profile = consumer.profile();
        let lease_margin = Duration::from_secs(30);
        let lease_ttl = consumer.http_timeout() + Duration::from_secs(5);
        Self {
            timing: profile.timing,
            jitter_percent: 5,
            proactive: true,
            keep_alive: profile.refresh_inactivity_expiry.map(|e| {
                e.saturating_sub(Duration::from_secs(7 * 24 * 3600))
                    .max(e / 2)
            }),
            lease_ttl,
            lease_margin,
            peer_wait: lease_ttl * 2,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(600),
            failure_budget: Duration::from_secs(3 * 24 * 3600),
            failure_budget_attempts: 5,
            consumer_breaker: Duration::from_secs(60),
            result_write_patience: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(5),
            min_refresh_interval: Duration::from_secs(1),
            caller_wait: Duration::from_secs(30),
            cache_revalidate: Duration::from_secs(30),
            cache_capacity: 100_000,
            event_poll: Duration::from_millis(500),
            forced_refresh_min_interval: Duration::from_secs(60),
            mass_rejection: Some(MassRejectionGuard::default()),
            max_rotations_in_flight: Some(8),
        }
    }

    /// Checks the rules that keep leases safe.
    ///
    /// # Errors
    ///
    /// [`ConfigError::OutOfRange`] naming the first field that breaks a rule: the lease must
    /// outlast its token request (the exchange deadline and the grace to read a reply that
    /// arrived) by at least a second even if no renewal lands; the clock-skew margin must be
    /// positive; callers must be willing to wait out a dead holder's lease; backoff, budget,
    /// waits and jitter must be in range; keep-alive must come before the refresh token's
    /// inactivity expiry.
    pub fn validate(&self, consumer: &ConsumerConfig) -> Result<(), ConfigError> {
        self.validate_lease(consumer)?;
        self.validate_retries(consumer)?;
        self.validate_bounds()
    }

    /// The lease outlasts its token request, covers clock skew, and callers wait it out.
    fn validate_lease(&self, consumer: &ConsumerConfig) -> Result<(), ConfigError> {
        if self.lease_margin.is_zero() {
            return out_of_range_err(
                "lease_margin",
                "must be positive: it covers clock skew between machines".into(),
            );
        }
        if self.lease_ttl < request_bound(consumer) + TRANSIT + HEADROOM {
            return out_of_range_err(
                "lease_ttl",
                format!(
                    "{:?} must exceed the HTTP timeout ({:?}) plus the 250 ms reply grace by at least {:?}; otherwise a token request could outlive its lease and race another process, or never find time to be sent",
                    self.lease_ttl,
                    consumer.http_timeout(),
                    TRANSIT + HEADROOM,
                ),
            );
        }
        if self.peer_wait < self.lease_ttl + HEADROOM {
            return out_of_range_err(
                "peer_wait",
                format!(
                    "{:?} is not at least a second longer than the lease TTL ({:?}): callers would give up (Busy) before they have watched a dead holder's lease fall silent and could take it over",
                    self.peer_wait, self.lease_ttl
                ),
            );
        }
        Ok(())
    }

    /// Backoff, the failure budget, keep-alive and the waits are in range.
    fn validate_retries(&self, consumer: &ConsumerConfig) -> Result<(), ConfigError> {
        if self.failure_budget_attempts == 0 {
            return out_of_range_err("failure_budget_attempts", "must be at least 1".into());
        }
        if let (Some(keep_alive), Some(expiry)) = (
            self.keep_alive,
            consumer.profile().refresh_inactivity_expiry,
        ) && keep_alive >= expiry
        {
            return out_of_range_err(
                "keep_alive",
                format!(
                    "{keep_alive:?} is not before the refresh token's inactivity expiry ({expiry:?}): idle installations would expire before being kept alive"
                ),
            );
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return Err(ConfigError::OutOfRange {
                field: "backoff_base",
                reason: "must be positive and at most backoff_max".into(),
            });
        }
        if self.caller_wait.is_zero() {
            return Err(ConfigError::OutOfRange {
                field: "caller_wait",
                reason: "must be positive".into(),
            });
        }
        if self.result_write_patience.is_zero() {
            return Err(ConfigError::OutOfRange {
                field: "result_write_patience",
                reason: "must be positive: rotated tokens must get at least one write attempt"
                    .into(),
            });
        }
        Ok(())
    }

    /// The guard, the rotation bound, the cache and the jitter are in range.
    fn validate_bounds(&self) -> Result<(), ConfigError> {
        if let Some(guard) = &self.mass_rejection
            && (guard.threshold == 0 || guard.window.is_zero() || guard.hold.is_zero())
        {
            return out_of_range_err(
                "mass_rejection",
                "threshold, window and hold must all be positive (or turn the guard off with None)"
                    .into(),
            );
        }
        if self.max_rotations_in_flight == Some(0) {
            return out_of_range_err(
                "max_rotations_in_flight",
                "must be at least 1 (None lifts the bound)".into(),
            );
        }
        if self.cache_capacity == 0 {
            return out_of_range_err(
                "cache_capacity",
                "must be at least 1 (use cache_revalidate = 0 to read the store on every call)"
                    .into(),
            );
        }
        if self.jitter_percent > 50 {
            return Err(ConfigError::OutOfRange {
                field: "jitter_percent",
                reason: "at most 50 (percent of the token lifetime)".into(),
            });
        }
        Ok(())
    }

    /// The expiry written into a lease taken or renewed at `now`: the TTL plus the clock-skew
    /// margin (a peer that watched the lease takes it over after the TTL of silence alone).
    pub fn lease_until(&self, now: Timestamp) -> Timestamp {
        now.saturating_add(self.lease_ttl + self.lease_margin)
    }

    /// The instant after which `tokens` are no longer served.
    pub fn stale_at(&self, tokens: &TokenSet) -> Timestamp {
        self.timing.stale_at(tokens)
    }

    /// When the next refresh of freshly obtained `tokens` is due (jittered earlier by up to
    /// `jitter_percent` of the lifetime).
    /// Without a refresh token there is nothing to refresh: the record falls due when the
    /// access token expires (never for a permanent one), to be marked `NoRefreshToken`.
    pub fn refresh_at(&self, tokens: &TokenSet, last_used: Timestamp) -> Timestamp {
        if tokens.refresh_token.is_none() {
            return tokens.expires_at;
        }
        let keep_alive = self.keep_alive.map(|k| last_used.saturating_add(k));
        let ahead = if self.proactive {
            let jitter = tokens
                .lifetime()
                .mul_f64(f64::from(self.jitter_percent) / 100.0 * fastrand::f64());
            // Never before the next refresh is allowed (tokens shorter-lived than that).
            let allowed = tokens.obtained_at.saturating_add(self.min_refresh_interval);
            Some(
                self.timing
                    .refresh_at(tokens)
                    .saturating_sub(jitter)
                    .max(allowed),
            )
        } else {
            None
        };
        match (ahead, keep_alive) {
            (Some(a), Some(k)) => a.min(k),
            (Some(a), None) => a,
            (None, Some(k)) => k,
            (None, None) => self.stale_at(tokens),
        }
    }

    /// When to retry after the `streak`-th consecutive transient failure: exponential with
    /// full jitter, never sooner than the provider's `Retry-After`.
    pub fn retry_at(
        &self,
        now: Timestamp,
        streak: Option<&FailureStreak>,
        retry_after: Option<Duration>,
    ) -> Timestamp {
        self.retry_at_with_jitter(now, streak, retry_after, fastrand::f64())
    }

    /// [`retry_at`](Self::retry_at) with the jitter given: `jitter` in `[0, 1)` places the
    /// retry in the backoff window (pure, for the failure plan and the model).
    pub fn retry_at_with_jitter(
        &self,
        now: Timestamp,
        streak: Option<&FailureStreak>,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Timestamp {
        let n = streak.map_or(0, |s| s.consecutive).min(20);
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << n.min(16))
            .min(self.backoff_max);
        let delay = cap
            .mul_f64(jitter.clamp(0.0, 1.0))
            .max(self.backoff_base / 2);
        now.saturating_add(delay.max(retry_after.unwrap_or(Duration::ZERO)))
    }

    /// Whether one more transient failure exhausts the budget.
    pub fn budget_exhausted(&self, record: &Record, now: Timestamp) -> bool {
        record.failures().is_some_and(|s| {
            s.consecutive.saturating_add(1) >= self.failure_budget_attempts
                && now.duration_since(s.first_at) >= self.failure_budget
        })
    }
}

/// A validation failure of `field`.
fn out_of_range_err(field: &'static str, reason: String) -> Result<(), ConfigError> {
    Err(ConfigError::OutOfRange { field, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles;

    fn consumer() -> ConsumerConfig {
        ConsumerConfig::builder(profiles::bitbucket())
            .client_id("k")
            .client_secret("s")
            .redirect_uri("https://app.example/cb")
            .build()
            .unwrap()
    }

    fn refused(tune: impl FnOnce(&mut RefreshPolicy)) -> &'static str {
        let c = consumer();
        let mut p = RefreshPolicy::for_consumer(&c);
        tune(&mut p);
        match p.validate(&c) {
            Err(ConfigError::OutOfRange { field, .. }) => field,
            other => panic!("expected OutOfRange, got {other:?}"),
        }
    }

    #[test]
    fn the_defaults_are_valid_and_every_rule_names_its_field() {
        let c = consumer();
        RefreshPolicy::for_consumer(&c).validate(&c).unwrap();
        assert_eq!(refused(|p| p.lease_margin = Duration::ZERO), "lease_margin");
        assert_eq!(
            refused(|p| p.lease_ttl = Duration::from_secs(11)),
            "lease_ttl"
        );
        assert_eq!(
            refused(|p| p.peer_wait = p.lease_ttl - Duration::from_secs(1)),
            "peer_wait"
        );
        assert_eq!(
            refused(|p| p.failure_budget_attempts = 0),
            "failure_budget_attempts"
        );
        assert_eq!(
            refused(|p| p.keep_alive = Some(Duration::from_secs(200 * 24 * 3600))),
            "keep_alive"
        );
        assert_eq!(refused(|p| p.backoff_base = Duration::ZERO), "backoff_base");
        assert_eq!(refused(|p| p.caller_wait = Duration::ZERO), "caller_wait");
        assert_eq!(refused(|p| p.jitter_percent = 51), "jitter_percent");
        assert_eq!(refused(|p| p.cache_capacity = 0), "cache_capacity");
        for broken in [
            |g: &mut MassRejectionGuard| g.threshold = 0,
            |g: &mut MassRejectionGuard| g.window = Duration::ZERO,
            |g: &mut MassRejectionGuard| g.hold = Duration::ZERO,
        ] {
            let mut guard = MassRejectionGuard::default();
            broken(&mut guard);
            assert_eq!(
                refused(|p| p.mass_rejection = Some(guard)),
                "mass_rejection"
            );
        }
        // Zero means "read the store on every call"; no guard is allowed too.
        let c = consumer();
        let mut p = RefreshPolicy::for_consumer(&c);
        p.cache_revalidate = Duration::ZERO;
        p.mass_rejection = None;
        p.validate(&c).unwrap();
    }
}
