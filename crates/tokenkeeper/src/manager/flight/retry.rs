//! Store writes whose outcome is in doubt. A write the store applied may still be reported
//! as failed (a timeout after commit, a replica shortfall): [`applied`] recognises it, so
//! the engine behaves as if the acknowledgement had arrived. And [`Patience`] bounds how long
//! a flight keeps retrying a store write that failed: every write the engine makes
//! after the provider answered carries something the store must not lose (rotated tokens, a
//! condemnation, a backoff), so a failing store is retried with a growing pause for a bounded
//! patience. While the manager shuts down the patience shrinks to `shutdown_grace`, counted
//! from when the flight noticed: long enough to ride out a store failover, short enough for
//! an orchestrator's termination grace period.

use std::time::Duration;

use tokenkeeper_core::{Record, StoreError};
use tokio::time::Instant;

use super::writes::Safeguard;
use crate::manager::Engine;

/// The retry budget of one write.
pub(crate) struct Patience<'a> {
    engine: &'a Engine,
    deadline: Instant,
    /// When this flight first saw the manager shutting down.
    closing_since: Option<Instant>,
    delay: Duration,
    max_delay: Duration,
}

impl<'a> Patience<'a> {
    /// A budget of `patience` from now, pausing 50 ms, then twice as long each time, at most
    /// 5 s (at most a tenth of the patience, so short budgets get several tries).
    pub(crate) fn new(engine: &'a Engine, patience: Duration) -> Self {
        Self {
            engine,
            deadline: after(Instant::now(), patience),
            closing_since: None,
            delay: Duration::from_millis(50),
            max_delay: (patience / 10).clamp(Duration::from_millis(50), Duration::from_secs(5)),
        }
    }

    /// After the write failed with `error`: pauses (never past the budget) and returns true
    /// while the budget lasts, otherwise returns false at once.
    pub(crate) async fn wait(&mut self, error: &StoreError) -> bool {
        let now = Instant::now();
        let mut deadline = self.deadline;
        if self.engine.in_flight.is_closing() {
            let since = *self.closing_since.get_or_insert(now);
            deadline = deadline.min(after(since, self.engine.policy.shutdown_grace));
        }
        if now >= deadline {
            return false;
        }
        // The last pause ends at the deadline, so the budget is used whole.
        let pause = self.delay.min(deadline - now);
        tracing::warn!(error = %error, retry_in = ?pause, "the store did not take the write; retrying");
        tokio::time::sleep(pause).await;
        self.delay = (self.delay * 2).min(self.max_delay);
        true
    }
}

/// `at + d`, or about thirty years on when that overflows (a patience of `Duration::MAX`
/// means "never give up").
fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(30 * 365 * 24 * 3600))
}

/// Whether the store holds exactly `written` after the write failed with `error`: a write
/// whose acknowledgement was lost (a timeout after commit, a connection dropped after commit)
/// is then as good as acknowledged. One read; a read that fails says no. A write the store
/// reports as applied without its configured durability (a Redis `WAIT` shortfall) is never
/// taken as written: it may vanish in a failover, and a lease or result acted on then could
/// let a peer present the same refresh token.
pub(crate) async fn applied(engine: &Engine, written: &Record, error: &StoreError) -> bool {
    !error.is_not_durable()
        && matches!(engine.store.get(written.id()).await, Ok(Some(stored)) if is_own_write(&stored, written))
}

/// Whether `stored` (read after a write whose outcome was in doubt: an error, or a conflict)
/// is this flight's own `written` record, applied: the same version with the same content.
/// Versions only grow and every write is computed from the record it replaces, so no other
/// writer can have produced it. The model checker calls this very function (and may switch
/// it off, [`Safeguard::OwnWrite`], to show the recognition matters).
pub fn is_own_write(stored: &Record, written: &Record) -> bool {
    !super::writes::off(Safeguard::OwnWrite) && stored == written
}
