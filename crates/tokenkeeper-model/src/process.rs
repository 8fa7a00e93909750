//! A process of the fleet in the model: where it is in one refresh flight.

use crate::provider::Answer;
use crate::record::Rec;

/// Where a process is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Between flights: its next step reads the record and decides.
    Idle,
    /// Holds the lease; nothing sent yet.
    Holding(Flight),
    /// Its token request (presenting `held`'s refresh token) is on its way; the provider must
    /// handle it by `deadline` or never.
    Sent {
        /// The flight.
        flight: Flight,
        /// The last tick the provider may handle it.
        deadline: u8,
    },
    /// The provider answered; the reply is on its way back (`None`: it was lost).
    Replied {
        /// The flight.
        flight: Flight,
        /// The answer.
        answer: Option<Answer>,
    },
    /// Mutation `UseBeforeWrite` only: the new access token is in use, the write not done.
    Using {
        /// The record as written under the lease.
        held: Rec,
        /// The new token's rotation number.
        new: u8,
    },
    /// Gone (SIGKILL): everything in memory is lost.
    Crashed,
}

impl Phase {
    /// A short name, for printed counterexamples.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Holding(_) => "holding",
            Self::Sent { .. } => "sent",
            Self::Replied { answer: None, .. } => "reply-lost",
            Self::Replied { .. } => "replied",
            Self::Using { .. } => "using",
            Self::Crashed => "crashed",
        }
    }
}

/// A flight under a lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Flight {
    /// The record as last written under the lease.
    pub held: Rec,
    /// The tick of the write that last confirmed the lease.
    pub confirmed: u8,
    /// The flight took the lease over from a peer (evidence that something may have rotated
    /// under it, as the engine's `takeover_evidence` judges it).
    pub takeover: bool,
    /// Something may have rotated under this lease (a takeover, or an attempt of its own
    /// whose reply was lost or was a 5xx): the engine's `HeldLease::in_doubt`.
    pub doubt: bool,
    /// When the lease was taken, the token it holds had already been rotated by a flight that
    /// crashed, lost its reply or was paused past its lease: presenting it again is inside the
    /// inherent window, not a protocol failure.
    pub inherited_loss: bool,
}

/// One process: its phase, its wall-clock skew, and the lease version it is watching.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Process {
    /// Where it is.
    pub phase: Phase,
    /// The record version it has seen unchanged under a peer's lease, and since when (tick).
    pub watch: Option<(u64, u8)>,
    /// It has finished: the decision step told it to stop (a terminal record).
    pub done: bool,
    /// Its own last lease (holder `p{p}`) had nothing sent under it as far as it knows (it
    /// stalled before sending, or could not learn whether its lease write was applied):
    /// the engine's `unsent` and `quiet_leases`. Retaking it is evidence of a lost rotation
    /// only if that lease was itself a takeover.
    pub quiet: Option<Quiet>,
    /// Results in its unsaved-tokens place, `(presented, new)`: rotated tokens the store did
    /// not take. They are put back before the process takes any lease (the engine's
    /// `restore_waiting`), and its flights present nothing while one cannot land.
    pub unsaved: Vec<(u8, u8)>,
}

/// What a process knows of its own last lease under which it sent nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quiet {
    /// That lease was itself a takeover (its doubt carries over).
    pub was_takeover: bool,
    /// The flight stalled under it before sending (the engine's `unsent`): it takes the lease
    /// back at once instead of watching it for a TTL.
    pub unsent: bool,
}
