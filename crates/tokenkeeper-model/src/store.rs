//! The store in the model: one record behind an atomic compare-and-swap (the version and the
//! lease a version was written under) that can fail a write, or apply it and report a
//! failure all the same (a lost acknowledgement, a timeout after commit). The writer then
//! does what the engine does: a result or failure write is retried with the record it sent
//! and the engine's `on_conflict` / `settle_conflict` recognise it in the conflict that
//! follows; a lease write is checked with one read ([`is_own_write`], the engine's
//! `retry::applied`). The `NoOwnWrite` mutation switches that recognition off in the engine's
//! code itself.

use tokenkeeper::__protocol::is_own_write;
use tokenkeeper_core::Record;

use crate::model::{Mutation, ProtocolModel, State};
use crate::record::{Rec, token_index};

/// A fault of one store write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Not applied; the writer gets an error.
    Refused,
    /// Applied; the writer gets an error all the same.
    AppliedLost,
}

/// How a write ended, as the store reported it.
#[derive(Debug)]
pub enum Wrote {
    /// Stored and acknowledged.
    Ok,
    /// Another write came first: the stored record.
    Conflict(Box<Record>),
    /// The store reported an error; the write may have been applied. The engine retries it
    /// (with the record it sent) and recognises its own write in the conflict that follows,
    /// or checks with one read ([`ProtocolModel::applied`]) where it does not retry.
    Errored,
    /// Not taken within the writer's patience (the store out for all of it).
    Failed,
}

impl ProtocolModel {
    /// Writes `next` over `expected` with the step's pending fault, if any.
    pub(crate) fn write(&self, s: &mut State, next: &Record, expected: u64) -> Wrote {
        let fault = s.pending_fault.take();
        let stored = &s.store.0;
        let fenced = self.config.mutation != Mutation::NoFence;
        if fenced && (stored.version() != expected || !next.lease_matches(stored)) {
            return match fault {
                // The writer gets an error, not the conflict.
                Some(Fault::Refused) => Wrote::Failed,
                Some(Fault::AppliedLost) => Wrote::Errored,
                None => Wrote::Conflict(Box::new(stored.clone())),
            };
        }
        match fault {
            Some(Fault::Refused) => Wrote::Failed,
            Some(Fault::AppliedLost) => {
                self.store_record(s, next.clone());
                Wrote::Errored
            }
            None => {
                self.store_record(s, next.clone());
                Wrote::Ok
            }
        }
    }

    /// The engine's one read after a write that errored where it does not retry (its
    /// `retry::applied`): whether the store holds exactly `written`.
    pub(crate) fn applied(&self, s: &State, written: &Record) -> bool {
        is_own_write(&s.store.0, written)
    }

    /// Replaces the stored record, noting landed tokens and regressions.
    fn store_record(&self, s: &mut State, next: Record) {
        let (before, after) = (token_index(&s.store.0), token_index(&next));
        if after != u8::MAX {
            // Tokens are numbered in the order the provider issued them: storing an older one
            // over a newer one is a stale writer's.
            if before != u8::MAX && after < before {
                s.regressed = true;
            }
            s.landed |= 1 << after;
        }
        s.store = Rec(next);
    }
}
