//! A refresh lease held by this process: taken, kept alive while the flight works, and
//! watched for silence when a peer holds it.
//!
//! Leases are short (a few seconds beyond the HTTP timeout) so a dead holder blocks its
//! installation for seconds. Safety does not rest on clocks agreeing:
//!
//! - the holder sends its token request only while the lease, as last confirmed by the store,
//!   outlasts the whole request ([`HeldLease::may_send`]); a holder that stalled after taking
//!   its lease renews it first, or re-reads;
//! - the holder renews the lease every third of its TTL while it waits for the provider or
//!   retries a store write ([`HeldLease::while_working`], [`HeldLease::renew_if_due`]);
//! - a peer takes a lease over when it has watched the very same record version for a whole
//!   TTL of its own monotonic time ([`Watch`]), and the store's compare-and-swap on that
//!   version proves nothing was written meanwhile (`Event::LeaseTakenOver`). Every renewal
//!   writes a new version, so a live holder is never taken over. A process that never watched
//!   the lease takes it over only after the expiry written in it, the TTL plus the clock-skew
//!   margin.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokenkeeper_core::{CasOutcome, Event, LeaseHolder, Record, StoreError};
use tokio::time::Instant;

use super::writes;
use crate::manager::Engine;

/// A lease this flight holds: the record as last written under it, and when the write that
/// last confirmed it started (a peer cannot have begun watching that version earlier).
#[derive(Debug)]
pub(crate) struct HeldLease {
    record: Record,
    confirmed: Instant,
    ttl: Duration,
    /// Something may have rotated under this lease: it was a takeover of a peer's, or an
    /// attempt under it may have been committed without a usable reply.
    doubt: bool,
}

/// How a renewal ended.
pub(crate) enum Renewal {
    /// The store took it: the lease is confirmed until another TTL from now.
    Renewed,
    /// The record changed under us (a peer took the lease over, a revocation): stop renewing.
    Lost,
}

impl HeldLease {
    /// The lease written by a compare-and-swap that started at `confirmed`.
    pub(crate) fn new(record: Record, confirmed: Instant, ttl: Duration) -> Self {
        Self {
            record,
            confirmed,
            ttl,
            doubt: false,
        }
    }

    /// Notes that something may have rotated under this lease.
    pub(crate) fn mark_doubt(&mut self) {
        self.doubt = true;
    }

    /// Whether something may have rotated under this lease.
    pub(crate) fn in_doubt(&self) -> bool {
        self.doubt
    }

    /// The record as last written under the lease.
    pub(crate) fn record(&self) -> &Record {
        &self.record
    }

    /// The lease's fence (the version that took it; renewals keep it).
    pub(crate) fn fence(&self) -> u64 {
        self.record
            .state()
            .lease()
            .map_or(self.record.version(), |l| l.fence)
    }

    /// Whether a token request that may take `bound` to end, sent now, ends (and its last
    /// bytes reach the provider) before any peer could take the lease over: a whole TTL
    /// after the last confirmation.
    pub(crate) fn may_send(&self, bound: Duration) -> bool {
        let since = Instant::now().saturating_duration_since(self.confirmed);
        writes::may_send(since, bound, self.ttl)
    }

    /// `stored` (read after a conflict) holds this very lease, moved on by one of our own
    /// writes whose acknowledgement was lost (the store applied it but reported an error):
    /// adopt it as the record under the lease. `false` when the lease is another's (or
    /// `stored` is not newer than what we hold).
    pub(crate) fn adopt_if_ours(&mut self, stored: &Record) -> bool {
        if writes::holds_own_lease(&self.record, stored) {
            self.record = stored.clone();
            return true;
        }
        false
    }

    /// When the next renewal is due.
    fn renewal_due(&self) -> Instant {
        self.confirmed + self.ttl / 3
    }

    /// Renews the lease by compare-and-swap.
    pub(crate) async fn renew(&mut self, engine: &Engine) -> Result<Renewal, StoreError> {
        let started = Instant::now();
        let now = engine.clock.now();
        let event = Event::LeaseRenewed {
            fence: self.fence(),
            until: engine.policy.lease_until(now),
        };
        let Ok(next) = self.record.apply(event, now) else {
            return Ok(Renewal::Lost);
        };
        match engine
            .store
            .compare_and_swap(&next, self.record.version())
            .await?
        {
            CasOutcome::Swapped => {
                self.record = next;
                self.confirmed = started;
                Ok(Renewal::Renewed)
            }
            // An earlier renewal of ours landed although the store reported an error: the
            // lease is still ours; the next renewal goes on from the stored version.
            CasOutcome::Conflict(stored) if self.adopt_if_ours(&stored) => {
                Err(StoreError::unavailable(
                    "lease",
                    "compare_and_swap",
                    "an earlier renewal landed unacknowledged; retrying from it",
                ))
            }
            CasOutcome::Conflict(_) | CasOutcome::Missing => Ok(Renewal::Lost),
        }
    }

    /// Renews the lease if a third of its TTL has passed since it was last confirmed (between
    /// retries of a store write). Failures are only logged: the caller goes on either way.
    pub(crate) async fn renew_if_due(&mut self, engine: &Engine) -> Option<Renewal> {
        if Instant::now() < self.renewal_due() {
            return None;
        }
        match self.renew(engine).await {
            Ok(renewal) => Some(renewal),
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the refresh lease");
                None
            }
        }
    }

    /// Runs `work` (the token request) to completion, renewing the lease every third of its
    /// TTL meanwhile. The work is polled all along, renewals included, so its own deadline
    /// holds however slow the store is. It is never abandoned: once sent, its reply is the
    /// only copy of a rotated token, and a lost lease still lets it land as a late result.
    pub(crate) async fn while_working<F: Future>(&mut self, engine: &Engine, work: F) -> F::Output {
        let mut work = std::pin::pin!(work);
        let mut next_try = self.renewal_due();
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                () = tokio::time::sleep_until(next_try) => {}
            }
            let renewal = {
                let renewal = self.renew(engine);
                let mut renewal = std::pin::pin!(renewal);
                tokio::select! {
                    biased;
                    // The reply came first: it matters more than the renewal, which is dropped
                    // (if it landed unacknowledged, the result write adopts it).
                    out = &mut work => return out,
                    r = &mut renewal => r,
                }
            };
            match renewal {
                Ok(Renewal::Renewed) => next_try = self.renewal_due(),
                Ok(Renewal::Lost) => {
                    tracing::warn!(
                        "the refresh lease was lost while waiting for the provider; its reply will be written as a late result"
                    );
                    return work.await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the refresh lease; retrying");
                    next_try = Instant::now() + self.ttl / 10;
                }
            }
        }
    }
}

/// What a waiting flight has seen of a peer's lease: the record version and when it first
/// saw it (monotonic).
#[derive(Debug, Default)]
pub(crate) struct Watch(Option<(u64, Instant)>);

impl Watch {
    /// Notes the record just read; returns its version if the same version has now been seen
    /// for at least `ttl` (its holder fell silent).
    pub(crate) fn silent_for(&mut self, record: &Record, ttl: Duration) -> Option<u64> {
        if record.state().lease().is_none() {
            self.0 = None;
            return None;
        }
        let version = record.version();
        match self.0 {
            Some((seen, since)) if seen == version => {
                writes::silent(Instant::now().saturating_duration_since(since), ttl)
                    .then_some(version)
            }
            _ => {
                self.0 = Some((version, Instant::now()));
                None
            }
        }
    }
}

/// Leases of this process's own flights that ended without writing their outcome, although
/// they know nothing rotated under them (the provider refused, or failed without a possible
/// commit, and the store would not record it). When such a lease lapses and a flight of this
/// process takes it over, that is no evidence of a lost rotation, so a refusal then is
/// explained as what it is. Bounded: the oldest notes are forgotten first.
#[derive(Debug, Default)]
pub(crate) struct QuietLeases(Mutex<VecDeque<LeaseHolder>>);

impl QuietLeases {
    const CAPACITY: usize = 1024;

    /// Notes that nothing rotated under `holder`'s lease.
    pub(crate) fn note(&self, holder: &LeaseHolder) {
        let mut quiet = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if quiet.len() == Self::CAPACITY {
            quiet.pop_front();
        }
        quiet.push_back(holder.clone());
    }

    /// Whether nothing rotated under `holder`'s lease.
    pub(crate) fn contains(&self, holder: &LeaseHolder) -> bool {
        let quiet = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        quiet.contains(holder)
    }

    /// Forgets the note on `holder`'s lease (it was taken over).
    pub(crate) fn forget(&self, holder: &LeaseHolder) {
        let mut quiet = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        quiet.retain(|h| h != holder);
    }
}
