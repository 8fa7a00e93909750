//! The protocol model: its state, the actions of processes, the provider and time, and the
//! properties the checker verifies.
//!
//! Time is in ticks of one second. A lease lasts [`TTL`] ticks of silence; its written expiry
//! adds [`MARGIN`] (the clock skew tolerated; process skews stay within it); a sent request is
//! handled by the provider within [`BOUND`] ticks or never (its deadline); a request is sent
//! only while `tick + BOUND + 1 <= confirmed + TTL` (one tick of transit), and a lease is
//! renewed once a tick has passed since it was confirmed (a third of the TTL).

use std::time::Duration;

use stateright::{Model, Property};
use tokenkeeper::__protocol::{Context, Decision, Mode, decide, rejection_reason};
use tokenkeeper_core::{
    AccessToken, BackoffCause, ErrorDetail, Event, FailureClass, InstallationId, LeaseHolder,
    Record, RefreshToken, Timestamp, TokenSet,
};

use crate::process::{Flight, Phase, Process};
use crate::provider::{Answer, Provider};
use crate::record::{Rec, token_index};

/// Ticks of silence after which a watched lease is taken over.
pub const TTL: u8 = 3;
/// The clock-skew margin added to a lease's written expiry.
pub const MARGIN: u8 = 2;
/// Ticks within which the provider handles a sent request, or never.
pub const BOUND: u8 = 1;

const T0: i64 = 1_800_000_000;
const CONSUMER: &str = "model/client";

/// One safeguard removed from the model's use of the real code, to show the checker catches
/// its absence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// The protocol as built.
    None,
    /// The store's compare-and-swap ignores the expected version and the lease (no fencing).
    NoFence,
    /// Processes ignore a peer's live lease (the decision to wait) and take it over at once.
    NoLease,
    /// The new access token is used before the rotated refresh token is written.
    UseBeforeWrite,
}

/// What the checker explores.
#[derive(Debug, Clone)]
pub struct Config {
    /// Wall-clock skew of each process, in ticks (within `MARGIN / 2` of each other's).
    pub skews: Vec<i8>,
    /// The provider's reuse leeway in ticks (`None`: reuse detection at once).
    pub leeway: Option<u8>,
    /// Time runs to this tick.
    pub max_tick: u8,
    /// The provider rotates at most this often.
    pub max_rotations: u8,
    /// At most this many processes crash.
    pub max_crashes: u8,
    /// At most this many replies are lost on the way back.
    pub max_losses: u8,
    /// Time passes only when no process can make progress (a fair scheduler, for liveness);
    /// otherwise time passes any time, which is how pauses are modelled.
    pub fair_time: bool,
    /// The safeguard removed, if any.
    pub mutation: Mutation,
}

impl Config {
    /// `processes` processes (skews -1, +1, 0 ticks), at most one crash and two lost replies,
    /// time to tick 5, two rotations, the protocol as built.
    pub fn new(processes: usize, leeway: Option<u8>) -> Self {
        Self {
            skews: [-1, 1, 0][..processes.clamp(1, 3)].to_vec(),
            leeway,
            max_tick: 5,
            max_rotations: 2,
            max_crashes: 1,
            max_losses: 2,
            fair_time: false,
            mutation: Mutation::None,
        }
    }
}

/// The model.
#[derive(Debug, Clone)]
pub struct ProtocolModel {
    /// What it explores.
    pub config: Config,
}

/// A state of the whole system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    /// Global time.
    pub tick: u8,
    /// The store's record.
    pub store: Rec,
    /// The provider.
    pub provider: Provider,
    /// The processes.
    pub procs: Vec<Process>,
    /// Crashes so far.
    pub crashes: u8,
    /// Replies lost so far.
    pub losses: u8,
    /// Bit `k`: the store has held refresh token `r{k}`.
    pub landed: u32,
    /// Bit `k`: access token `a{k}` was handed to a caller.
    pub used: u32,
    /// Bit `k`: the rotation of `r{k}` was lost to a fault (its holder crashed or lost the
    /// reply, or was paused past its lease and taken over), not to the protocol.
    pub fault_lost: u32,
    /// A write replaced the stored refresh token with an older one.
    pub regressed: bool,
    /// A retired token was presented although its successor had been stored.
    pub unexcused_reuse: bool,
    /// A condemnation whose reason the provider's state contradicts.
    pub untruthful: bool,
}

/// What happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// A tick of time passes.
    Tick,
    /// Process `p` takes its next step.
    Step(usize),
    /// Process `p` renews its lease.
    Renew(usize),
    /// The provider handles process `p`'s request.
    Handle(usize),
    /// Process `p`'s reply is lost.
    Lose(usize),
    /// Process `p` crashes.
    Crash(usize),
}

fn tokens(k: u8, at: Timestamp) -> TokenSet {
    // Expired before the model's time begins, whatever a process's skew: every process
    // always wants a refresh, so flights keep contending.
    TokenSet::bearer(
        AccessToken::new(format!("a{k}")),
        Some(RefreshToken::new(format!("r{k}"))),
        at,
        secs(-100),
    )
}

fn secs(t: i64) -> Timestamp {
    Timestamp::from_unix_secs(T0 + t)
}

impl ProtocolModel {
    /// Process `p`'s wall clock.
    fn wall(&self, s: &State, p: usize) -> Timestamp {
        secs(i64::from(s.tick) + i64::from(self.config.skews[p]))
    }

    fn lease_until(&self, s: &State, p: usize) -> Timestamp {
        self.wall(s, p)
            .saturating_add(Duration::from_secs(u64::from(TTL + MARGIN)))
    }

    /// The store's compare-and-swap (the version and the lease a version was written under);
    /// `Err(stored)` on a conflict. `NoFence` writes blindly.
    fn cas(&self, s: &mut State, next: Record, expected: u64) -> Result<(), Box<Record>> {
        let stored = &s.store.0;
        let fenced = self.config.mutation != Mutation::NoFence;
        if fenced && (stored.version() != expected || !next.lease_matches(stored)) {
            return Err(Box::new(stored.clone()));
        }
        let (before, after) = (token_index(stored), token_index(&next));
        if after != u8::MAX {
            if before != u8::MAX && after < before {
                s.regressed = true;
            }
            s.landed |= 1 << after;
        }
        s.store = Rec(next);
        Ok(())
    }

    /// The real decision step for process `p` over the stored record.
    fn decide(&self, s: &State, p: usize) -> Decision {
        let record = &s.store.0;
        let silent = match s.procs[p].watch {
            Some((v, since)) if v == record.version() && s.tick >= since + TTL => Some(v),
            _ => None,
        };
        let mode = Mode::OnDemand;
        decide(
            record,
            Context {
                mode: &mode,
                now: self.wall(s, p),
                stale_at: record.tokens().expires_at,
                breaker: None,
                consumer: CONSUMER,
                silent,
                forced_min_interval: std::time::Duration::ZERO,
                refresh_deadline: None,
                min_refresh_interval: std::time::Duration::ZERO,
                lifts_holds_before: None,
            },
        )
    }

    /// An idle process reads and decides; `None` when nothing changes.
    fn step_idle(&self, s: &mut State, p: usize) -> Option<()> {
        let version = s.store.0.version();
        let decision = match self.decide(s, p) {
            Decision::WaitForPeer { .. } if self.config.mutation == Mutation::NoLease => {
                Decision::TakeLease {
                    takeover: true,
                    watched: Some(version),
                    serve_valid: false,
                }
            }
            d => d,
        };
        match decision {
            Decision::TakeLease {
                takeover, watched, ..
            } => {
                let holder = LeaseHolder::new(format!("p{p}"));
                let until = self.lease_until(s, p);
                let event = match watched {
                    Some(watched) => Event::LeaseTakenOver {
                        holder,
                        until,
                        watched,
                    },
                    None => Event::LeaseAcquired { holder, until },
                };
                let leased = s.store.0.apply(event, self.wall(s, p)).ok()?;
                if takeover {
                    self.note_paused_holders(s);
                }
                let inherited_loss = self.rotation_lost(s, s.store.token());
                self.cas(s, leased.clone(), version).ok()?;
                s.procs[p].phase = Phase::Holding(Flight {
                    held: Rec(leased),
                    confirmed: s.tick,
                    takeover,
                    inherited_loss,
                });
                s.procs[p].watch = None;
                Some(())
            }
            Decision::WaitForPeer { .. } => {
                let watch = &mut s.procs[p].watch;
                if watch.is_some_and(|(v, _)| v == version) {
                    return None;
                }
                *watch = Some((version, s.tick));
                Some(())
            }
            Decision::Fail(_) if s.store.0.state().is_terminal() => {
                s.procs[p].done = true;
                Some(())
            }
            // Backing off (waits for time), or a fresh token (never: tokens expire at once).
            _ => None,
        }
    }

    /// Whether `r{token}` has been rotated at the provider and that rotation was lost to a
    /// fault (see [`State::fault_lost`]).
    fn rotation_lost(&self, s: &State, token: u8) -> bool {
        s.provider.current > token && s.fault_lost & (1 << token) != 0
    }

    /// A takeover: a holder that was paused past its lease with a rotated reply in hand has
    /// lost that rotation to the pause.
    fn note_paused_holders(&self, s: &mut State) {
        for q in 0..s.procs.len() {
            if let Phase::Replied {
                flight,
                answer:
                    Some(Answer::Tokens {
                        new, rotated: true, ..
                    }),
            } = &s.procs[q].phase
                && s.tick >= flight.confirmed + TTL
            {
                s.fault_lost |= 1 << (new - 1);
            }
        }
    }

    /// Records a failed attempt whose request may have reached the provider.
    fn defer(&self, s: &mut State, p: usize, held: &Rec) {
        let fence = held.0.state().lease().map_or(0, |l| l.fence);
        let now = self.wall(s, p);
        let event = Event::RefreshDeferred {
            fence,
            retry_at: now.saturating_add(Duration::from_secs(1)),
            cause: BackoffCause::Transient,
            error: ErrorDetail::new(FailureClass::Transient),
            commit: tokenkeeper_core::CommitEvidence::ReplyLost,
        };
        if let Ok(next) = held.0.apply(event, now) {
            let _ = self.cas(s, next, held.0.version());
        }
    }

    /// Writes a refresh result: under the lease, or as a late result over a record that still
    /// holds the presented token. Returns whether it was stored.
    fn land(&self, s: &mut State, p: usize, held: &Rec, new: u8) -> bool {
        let now = self.wall(s, p);
        let fence = held.0.state().lease().map_or(0, |l| l.fence);
        let Ok(next) = held.0.apply(
            Event::Refreshed {
                fence,
                tokens: tokens(new, now),
                refresh_at: now,
                anomaly: None,
            },
            now,
        ) else {
            return false;
        };
        match self.cas(s, next, held.0.version()) {
            Ok(()) => true,
            Err(stored) => {
                let late = Event::LateRefreshed {
                    presented: RefreshToken::new(format!("r{}", held.token())),
                    tokens: tokens(new, now),
                    refresh_at: now,
                };
                match stored.apply(late, now) {
                    Ok(revived) => self.cas(s, revived, stored.version()).is_ok(),
                    Err(_) => false,
                }
            }
        }
    }

    /// The provider refused: re-read, then condemn with the real reason, and judge its truth.
    fn reject(&self, s: &mut State, p: usize, held: &Rec, takeover: bool) {
        if s.store.0.version() != held.0.version() {
            return; // someone else wrote: re-read
        }
        let now = self.wall(s, p);
        let leeway = self
            .config
            .leeway
            .map(|ticks| Duration::from_secs(u64::from(ticks)));
        let reason = rejection_reason(false, true, takeover, &held.0, now, leeway);
        let fence = held.0.state().lease().map_or(0, |l| l.fence);
        let event = Event::RefreshRejected {
            fence,
            reason,
            error: None,
        };
        let Ok(next) = held.0.apply(event, now) else {
            return;
        };
        // The reason is true if the token it condemns is really dead at the provider (in the
        // model the only way a grant dies is a lost rotation: retired, or revoked by the reuse
        // detection a lost rotation leads to, so `RotatedTokenLost` and
        // `RefreshTokenRejected` are both true of a dead token).
        if self.cas(s, next, held.0.version()).is_ok() && s.provider.accepts(held.token()) {
            s.untruthful = true;
        }
    }

    /// Process `p`'s next step, if it has one that changes anything.
    fn step(&self, s: &mut State, p: usize) -> Option<()> {
        match s.procs[p].phase.clone() {
            Phase::Idle if !s.procs[p].done => self.step_idle(s, p),
            Phase::Holding(flight) => {
                if s.tick + BOUND < flight.confirmed + TTL {
                    s.procs[p].phase = Phase::Sent {
                        flight,
                        deadline: s.tick + BOUND,
                    };
                } else {
                    // Stalled past the send window: nothing is sent. The engine renews first
                    // (a separate action here) or takes its own lease back at once.
                    let version = flight.held.0.version();
                    s.procs[p].phase = Phase::Idle;
                    s.procs[p].watch = Some((version, s.tick.saturating_sub(TTL)));
                }
                Some(())
            }
            Phase::Sent { flight, deadline } if s.tick > deadline => {
                // Timed out; the request may have been handled at the last moment.
                self.defer(s, p, &flight.held);
                s.procs[p].phase = Phase::Idle;
                Some(())
            }
            Phase::Replied { flight, answer } => {
                s.procs[p].phase = Phase::Idle;
                let held = flight.held;
                match answer {
                    None => self.defer(s, p, &held),
                    Some(Answer::Rejected) => self.reject(s, p, &held, flight.takeover),
                    Some(Answer::Tokens { new, .. }) => {
                        if self.config.mutation == Mutation::UseBeforeWrite {
                            s.used |= 1 << new;
                            s.procs[p].phase = Phase::Using { held, new };
                        } else if self.land(s, p, &held, new) {
                            s.used |= 1 << new;
                        }
                    }
                }
                Some(())
            }
            Phase::Using { held, new, .. } => {
                self.land(s, p, &held, new);
                s.procs[p].phase = Phase::Idle;
                Some(())
            }
            _ => None,
        }
    }

    /// The provider handles process `p`'s request.
    fn handle(&self, s: &mut State, p: usize) -> Option<()> {
        let Phase::Sent { flight, deadline } = s.procs[p].phase.clone() else {
            return None;
        };
        if s.tick > deadline {
            return None;
        }
        let token = flight.held.token();
        let (answer, reuse) = s.provider.refresh(token, s.tick, self.config.leeway);
        // Inside the inherent window only if the token's rotation was already lost (crash,
        // lost reply, pause past the lease) when this flight took its lease.
        if reuse && !flight.inherited_loss {
            s.unexcused_reuse = true;
        }
        s.procs[p].phase = Phase::Replied {
            flight,
            answer: Some(answer),
        };
        Some(())
    }

    /// Process `p` renews its lease (due a third of the TTL after it was confirmed).
    fn renew(&self, s: &mut State, p: usize) -> Option<()> {
        let flight = match &mut s.procs[p].phase {
            Phase::Holding(flight) | Phase::Sent { flight, .. } | Phase::Replied { flight, .. } => {
                flight.clone()
            }
            _ => return None,
        };
        if s.tick <= flight.confirmed {
            return None;
        }
        let held = flight.held;
        let fence = held.0.state().lease()?.fence;
        let until = self.lease_until(s, p);
        let next = held
            .0
            .apply(Event::LeaseRenewed { fence, until }, self.wall(s, p))
            .ok()?;
        self.cas(s, next.clone(), held.0.version()).ok()?;
        let tick = s.tick;
        if let Phase::Holding(flight) | Phase::Sent { flight, .. } | Phase::Replied { flight, .. } =
            &mut s.procs[p].phase
        {
            flight.held = Rec(next);
            flight.confirmed = tick;
        }
        Some(())
    }

    fn apply(&self, s: &mut State, action: Action) -> Option<()> {
        match action {
            Action::Tick => {
                s.tick += 1;
                Some(())
            }
            Action::Step(p) => self.step(s, p),
            Action::Renew(p) => self.renew(s, p),
            Action::Handle(p) => self.handle(s, p),
            Action::Lose(p) => match &mut s.procs[p].phase {
                Phase::Replied { answer, .. }
                    if answer.is_some() && s.losses < self.config.max_losses =>
                {
                    if let Some(Answer::Tokens {
                        new, rotated: true, ..
                    }) = answer
                    {
                        s.fault_lost |= 1 << (*new - 1);
                    }
                    *answer = None;
                    s.losses += 1;
                    Some(())
                }
                _ => None,
            },
            Action::Crash(p) => {
                if s.procs[p].phase == Phase::Crashed || s.crashes >= self.config.max_crashes {
                    return None;
                }
                match &s.procs[p].phase {
                    Phase::Replied {
                        answer:
                            Some(Answer::Tokens {
                                new, rotated: true, ..
                            }),
                        ..
                    }
                    | Phase::Using { new, .. } => s.fault_lost |= 1 << (*new - 1),
                    _ => {}
                }
                s.procs[p].phase = Phase::Crashed;
                s.crashes += 1;
                Some(())
            }
        }
    }

    /// Whether some process can still make progress without time passing.
    fn can_progress(&self, s: &State) -> bool {
        (0..s.procs.len()).any(|p| {
            let mut t = s.clone();
            self.step(&mut t, p).is_some() || self.handle(&mut t, p).is_some()
        })
    }

    /// `a{k}` for every used access token is backed by a stored refresh token `r{k}` or is
    /// being written by a live process.
    fn used_tokens_are_stored(&self, s: &State) -> bool {
        let writing = s.procs.iter().fold(0u32, |acc, p| match p.phase {
            Phase::Using { new, .. } => acc | (1 << new),
            _ => acc,
        });
        s.used & !(s.landed | writing) == 0
    }
}

impl Model for ProtocolModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let record = Record::new(
            InstallationId::new("model-installation").unwrap_or_else(|_| unreachable!()),
            CONSUMER,
            tokens(0, secs(0)),
            secs(0),
            secs(0),
        );
        vec![State {
            tick: 0,
            store: Rec(record),
            provider: Provider::new(),
            procs: vec![
                Process {
                    phase: Phase::Idle,
                    watch: None,
                    done: false,
                };
                self.config.skews.len()
            ],
            crashes: 0,
            losses: 0,
            landed: 1,
            used: 0,
            fault_lost: 0,
            regressed: false,
            unexcused_reuse: false,
            untruthful: false,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for p in 0..s.procs.len() {
            if s.procs[p].phase == Phase::Crashed {
                continue;
            }
            actions.push(Action::Step(p));
            actions.push(Action::Renew(p));
            actions.push(Action::Handle(p));
            if s.losses < self.config.max_losses {
                actions.push(Action::Lose(p));
            }
            if s.crashes < self.config.max_crashes {
                actions.push(Action::Crash(p));
            }
        }
        if s.tick < self.config.max_tick && !(self.config.fair_time && self.can_progress(s)) {
            actions.push(Action::Tick);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        self.apply(&mut s, action)?;
        Some(s)
    }

    fn within_boundary(&self, s: &State) -> bool {
        s.provider.rotations <= self.config.max_rotations
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always(
                "no retired token presented outside the inherent window",
                |_: &Self, s: &State| !s.unexcused_reuse,
            ),
            Property::always(
                "no stale writer over newer tokens",
                |_: &Self, s: &State| !s.regressed,
            ),
            Property::always(
                "every condemnation names a true reason",
                |_: &Self, s: &State| !s.untruthful,
            ),
            Property::always("a used token is stored first", |m: &Self, s: &State| {
                m.used_tokens_are_stored(s)
            }),
            Property::sometimes("a refresh lands", |_: &Self, s: &State| {
                s.store.token() >= 1
            }),
        ];
        if self.config.fair_time {
            properties.push(Property::eventually(
                "a due installation is refreshed or truthfully condemned",
                |_: &Self, s: &State| s.store.token() >= 1 || s.store.0.state().is_terminal(),
            ));
        }
        properties
    }
}
