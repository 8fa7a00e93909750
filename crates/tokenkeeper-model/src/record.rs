//! The stored record as a model state: the engine's real `Record`, compared and hashed by
//! what the protocol reads (version, state, lease, refresh token, failure streak with its
//! evidence and doubt, due time, the lease a version was written under, when the current and
//! the lapsed leases were taken), not by the rest of its history and timestamps of
//! bookkeeping, so equivalent states are explored once.

use std::hash::{Hash, Hasher};

use tokenkeeper_core::{Record, State};

/// A record in a model state.
#[derive(Debug, Clone)]
pub struct Rec(pub Record);

impl Rec {
    /// The index `k` of the refresh token `r{k}` the record holds (tokens are named by their
    /// rotation number).
    pub fn token(&self) -> u8 {
        token_index(&self.0)
    }
}

/// The rotation number of a record's refresh token (`r{k}`).
pub(crate) fn token_index(record: &Record) -> u8 {
    record
        .tokens()
        .refresh_token
        .as_ref()
        .and_then(|r| r.secret().strip_prefix('r')?.parse().ok())
        .unwrap_or(u8::MAX)
}

/// When each lease of the history was taken, newest first.
fn lease_times(r: &Record) -> impl Iterator<Item = tokenkeeper_core::Timestamp> + '_ {
    let all: Vec<_> = r
        .history()
        .filter(|e| {
            matches!(
                e.event,
                tokenkeeper_core::EventKind::LeaseAcquired
                    | tokenkeeper_core::EventKind::LeaseTakenOver
            )
        })
        .map(|e| e.at)
        .collect();
    all.into_iter().rev()
}

/// What the protocol reads from a record.
fn projection(r: &Record) -> impl Hash + PartialEq + '_ {
    let lease = r.state().lease().map(|l| (&l.holder, l.until, l.fence));
    let backoff = match r.state() {
        State::Backoff { until, .. } => Some(*until),
        _ => None,
    };
    let reason = match r.state() {
        State::ReauthorizationRequired { reason, .. } => Some(*reason),
        _ => None,
    };
    (
        (r.version(), r.state().kind(), lease, backoff, reason),
        token_index(r),
        r.due_at(),
        r.failures().map(|f| {
            (
                f.consecutive,
                f.possibly_committed_since,
                f.server_error_since,
                f.revived_after_verdict.is_some(),
                f.doubt_until,
            )
        }),
        r.written_under(),
        // What the engine reads from the history: when the lease and the leases it took
        // over were taken.
        (
            r.lease_entry_at(),
            r.lease_taken_at(),
            lease_times(r).nth(1),
        ),
    )
}

impl PartialEq for Rec {
    fn eq(&self, other: &Self) -> bool {
        projection(&self.0) == projection(&other.0)
    }
}

impl Eq for Rec {}

impl Hash for Rec {
    fn hash<H: Hasher>(&self, state: &mut H) {
        projection(&self.0).hash(state);
    }
}
