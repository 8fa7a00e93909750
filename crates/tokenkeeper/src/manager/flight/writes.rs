//! The engine's write sequences decided without I/O: what a result write and a failure write
//! do after the store answered with a conflict, whether a conflicting record holds the
//! flight's own lease, and when a lease may be presented under or taken over. The engine
//! drives these with its store (`success.rs`, `failure.rs`, `lease.rs`); the model checker
//! (`tokenkeeper-model`) drives the very same functions with its in-memory store, so what it
//! verifies is this code, not a copy. Under the private `__model` feature, [`switch_off`]
//! lets the model remove one [`Safeguard`] on its own thread, to show that the checker then
//! finds a counterexample (mutation testing of the real code); without the feature the
//! safeguards cannot be switched off.

use std::time::Duration;

use tokenkeeper_core::TokenSet;
use tokenkeeper_core::{ErrorDetail, Event, IllegalTransition, Record, RefreshToken, Timestamp};

use crate::manager::policy::TRANSIT;

/// A safeguard of the write sequences that the model checker can remove to show it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Safeguard {
    /// A write whose acknowledgement was lost is recognised as the writer's own
    /// ([`is_own_write`](super::retry::is_own_write)).
    OwnWrite,
    /// A late result lands only on a record that still holds the refresh token it presented.
    PresentedCheck,
    /// A token request is sent only while the lease outlasts it ([`may_send`]).
    SendWindow,
    /// A watched lease is taken over only after a whole TTL of silence ([`silent`]).
    SilenceThreshold,
}

#[cfg(feature = "__model")]
thread_local! {
    static SWITCHED_OFF: std::cell::Cell<Option<Safeguard>> = const { std::cell::Cell::new(None) };
}

/// Removes `safeguard` (or none) from the write sequences run on this thread. Only the model
/// checker calls this.
#[cfg(feature = "__model")]
pub fn switch_off(safeguard: Option<Safeguard>) {
    SWITCHED_OFF.with(|off| off.set(safeguard));
}

/// Whether `safeguard` was switched off on this thread (never without `__model`).
#[inline]
pub(crate) fn off(safeguard: Safeguard) -> bool {
    #[cfg(feature = "__model")]
    {
        SWITCHED_OFF.with(|off| off.get() == Some(safeguard))
    }
    #[cfg(not(feature = "__model"))]
    {
        let _ = safeguard;
        false
    }
}

/// Whether `stored` (read after a conflict, or after an error) holds `held`'s very lease,
/// moved on by one of its holder's own writes whose acknowledgement was lost (a renewal):
/// the same holder and fence, at a newer version. The flight then adopts `stored`.
pub fn holds_own_lease(held: &Record, stored: &Record) -> bool {
    let ours = match (stored.state().lease(), held.state().lease()) {
        (Some(theirs), Some(mine)) => theirs.holder == mine.holder && theirs.fence == mine.fence,
        _ => false,
    };
    ours && stored.version() > held.version()
}

/// Whether a token request that may take `bound` to end, sent `since_confirmed` after the
/// lease was last confirmed by the store, ends (and its last bytes reach the provider, within
/// `TRANSIT`, half a second) before a peer that watched the lease for a whole `ttl` could
/// take it over.
pub fn may_send(since_confirmed: Duration, bound: Duration, ttl: Duration) -> bool {
    off(Safeguard::SendWindow) || since_confirmed + bound + TRANSIT <= ttl
}

/// Whether a lease watched at one version for `watched_for` (monotonic time) has been silent
/// long enough to be taken over: a whole `ttl`, so a live holder, which renews every third of
/// it, is never taken over.
pub fn silent(watched_for: Duration, ttl: Duration) -> bool {
    let threshold = if off(Safeguard::SilenceThreshold) {
        ttl.saturating_sub(Duration::from_secs(1))
    } else {
        ttl
    };
    watched_for >= threshold
}

/// What a failure write (a condemnation, a backoff) does after the store reported a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleConflict {
    /// The stored record is the write itself, applied although its acknowledgement was lost.
    Written,
    /// One of the lease's own writes (a renewal) landed unacknowledged: adopt the stored
    /// record as the held one and write again on top of it.
    Adopt,
    /// Another writer moved the record: the lease is lost and nothing is recorded.
    Lost,
}

/// What a failure write does after writing `written` over `held` met `stored` instead.
pub fn settle_conflict(held: &Record, written: &Record, stored: &Record) -> SettleConflict {
    if super::retry::is_own_write(stored, written) {
        SettleConflict::Written
    } else if holds_own_lease(held, stored) {
        SettleConflict::Adopt
    } else {
        SettleConflict::Lost
    }
}

/// The record a failure write writes next over `held`: the one `sent` before (after a store
/// error, kept so that the store's copy of it is recognisable as ours) while `held` has not
/// moved, or `event` applied to `held`.
pub fn settle_next(
    held: &Record,
    event: &Event,
    sent: Option<Record>,
    now: Timestamp,
) -> Result<Record, IllegalTransition> {
    match sent {
        Some(next) if next.version() == held.version().saturating_add(1) => Ok(next),
        _ => held.apply(event.clone(), now),
    }
}

/// What a result write does after the store reported a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultConflict {
    /// The stored record is the write itself, applied although its acknowledgement was lost.
    Written,
    /// One of the lease's own writes (a renewal) landed unacknowledged: adopt the stored
    /// record as the held one and write the result again on top of it.
    Adopt,
    /// Another's record still holds the refresh token the result presented: the result
    /// lands on top of it as `LateRefreshed` (the next write).
    Late,
    /// The stored record refuses the result (revoked, or holding another refresh token).
    Obsolete,
}

/// One refresh result on its way to the store, across write attempts: a `Refreshed` write
/// under the lease, then, once another's write is stored, a `LateRefreshed` write on top of
/// it, which the state machine accepts only while that record still holds the presented
/// refresh token.
#[derive(Debug)]
pub struct ResultWrite {
    presented: RefreshToken,
    /// The write under the lease.
    event: Event,
    /// The write on top of whatever is stored, once the lease is lost.
    late: Event,
    /// What to write, and over which version, when it is not computed from the held record.
    pending: Option<(Record, u64)>,
    lease_lost: bool,
}

impl ResultWrite {
    /// The result `tokens`, obtained under `held`'s lease by presenting `presented`.
    pub fn new(
        held: &Record,
        presented: RefreshToken,
        tokens: TokenSet,
        refresh_at: Timestamp,
        anomaly: Option<ErrorDetail>,
    ) -> Self {
        let fence = held.state().lease().map_or(held.version(), |l| l.fence);
        Self {
            event: Event::Refreshed {
                fence,
                tokens: tokens.clone(),
                refresh_at,
                anomaly,
            },
            late: Event::LateRefreshed {
                presented: presented.clone(),
                tokens,
                refresh_at,
                obtained_under: held.state().lease().map(|l| l.holder.clone()),
            },
            presented,
            pending: None,
            lease_lost: false,
        }
    }

    /// The refresh token the result presented.
    pub fn presented(&self) -> &RefreshToken {
        &self.presented
    }

    /// Whether the lease is lost (the result now lands late; no more renewals).
    pub fn lease_lost(&self) -> bool {
        self.lease_lost
    }

    /// The record to write and the version it replaces: the pending one (a late result, or a
    /// retry over a held record that has not moved), or the result applied to `held`.
    pub fn next_write(
        &mut self,
        held: &Record,
        now: Timestamp,
    ) -> Result<(Record, u64), IllegalTransition> {
        match self.pending.take() {
            Some(p) if self.lease_lost || p.1 == held.version() => Ok(p),
            _ => Ok((held.apply(self.event.clone(), now)?, held.version())),
        }
    }

    /// The store did not take `written` over `expected` (an error): write it again next.
    pub fn retry(&mut self, written: Record, expected: u64) {
        self.pending = Some((written, expected));
    }

    /// Writing `written` over `held` met `stored` instead.
    pub fn on_conflict(
        &mut self,
        held: &Record,
        stored: &Record,
        written: &Record,
        now: Timestamp,
    ) -> ResultConflict {
        if super::retry::is_own_write(stored, written) {
            return ResultConflict::Written;
        }
        if !self.lease_lost && holds_own_lease(held, stored) {
            return ResultConflict::Adopt;
        }
        let late = match &self.late {
            Event::LateRefreshed {
                tokens,
                refresh_at,
                obtained_under,
                ..
            } if off(Safeguard::PresentedCheck) => Event::LateRefreshed {
                presented: stored
                    .tokens()
                    .refresh_token
                    .clone()
                    .unwrap_or_else(|| self.presented.clone()),
                tokens: tokens.clone(),
                refresh_at: *refresh_at,
                obtained_under: obtained_under.clone(),
            },
            late => late.clone(),
        };
        match stored.apply(late, now) {
            Ok(revived) => {
                self.pending = Some((revived, stored.version()));
                self.lease_lost = true;
                ResultConflict::Late
            }
            Err(_) => ResultConflict::Obsolete,
        }
    }
}
