//! The store in the model: one record behind an atomic compare-and-swap (the version and the
//! lease a version was written under) that can fail a write, or apply it and report a
//! failure all the same (a lost acknowledgement, a timeout after commit). After a failure the
//! engine reads the record once and recognises its own applied write with the engine's real
//! [`is_own_write`]; the `NoOwnWrite` mutation switches that recognition off in the engine's
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

/// How a write ended, as the engine sees it after its recognition step.
#[derive(Debug)]
pub enum Wrote {
    /// Stored (acknowledged, or recognised as its own after an error or a conflict).
    Ok,
    /// Another write came first: the stored record.
    Conflict(Box<Record>),
    /// Not known to be stored (it may be, when the recognition is mutated away).
    Failed,
}

impl ProtocolModel {
    /// Writes `next` over `expected` with the step's pending fault, if any.
    pub(crate) fn write(&self, s: &mut State, next: &Record, expected: u64) -> Wrote {
        let fault = s.pending_fault.take();
        let stored = &s.store.0;
        let fenced = self.config.mutation != Mutation::NoFence;
        if fenced && (stored.version() != expected || !next.lease_matches(stored)) {
            let stored = Box::new(stored.clone());
            return match fault {
                _ if self.recognises(&stored, next) => Wrote::Ok,
                // The writer got an error, not the conflict.
                Some(_) => Wrote::Failed,
                None => Wrote::Conflict(stored),
            };
        }
        if fault == Some(Fault::Refused) {
            return Wrote::Failed;
        }
        self.store_record(s, next.clone());
        match fault {
            Some(Fault::AppliedLost) if self.recognises(&s.store.0, next) => Wrote::Ok,
            Some(_) => Wrote::Failed,
            None => Wrote::Ok,
        }
    }

    /// The engine's recognition of its own write in `stored` (switched off on this thread
    /// by the `NoOwnWrite` mutation: see [`ProtocolModel::arm`]).
    pub(crate) fn recognises(&self, stored: &Record, written: &Record) -> bool {
        is_own_write(stored, written)
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
