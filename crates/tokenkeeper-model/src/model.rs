//! The protocol model: its configuration and state, the actions of processes, the provider,
//! the store's faults and time, and the properties the checker verifies. The processes'
//! steps are in `steps.rs`, the store in `store.rs`.
//!
//! Time is in ticks of one second. A lease lasts [`TTL`] ticks of silence; its written expiry
//! adds [`MARGIN`] (the clock skew tolerated; process skews stay within it); a sent request is
//! handled by the provider within [`BOUND`] ticks, or becomes a stray the provider may still
//! handle any time later (review SU1: a provider or balancer that queues a request past the
//! client's deadline); a request is sent only while `tick + BOUND + 1 <= confirmed + TTL` (one
//! tick of transit), and a lease is renewed once a tick has passed since it was confirmed.

use std::time::Duration;

use stateright::{Model, Property};
use tokenkeeper::__protocol::{Safeguard, switch_off};
use tokenkeeper::policy::RefreshPolicy;
use tokenkeeper::{ConsumerConfig, ProviderProfile, oauth::IdentityCheck, oauth::Rotation};
use tokenkeeper_core::{
    AccessToken, InstallationId, ReauthReason, Record, RefreshToken, State as RecordState,
    Timestamp, TokenSet,
};

use crate::process::{Phase, Process};
use crate::provider::{Answer, Provider};
use crate::record::Rec;
use crate::store::Fault;

/// Ticks of silence after which a watched lease is taken over.
pub const TTL: u8 = 3;
/// The clock-skew margin added to a lease's written expiry.
pub const MARGIN: u8 = 2;
/// Ticks within which the provider handles a sent request, or the client gives up on it.
pub const BOUND: u8 = 1;

const T0: i64 = 1_800_000_000;
pub(crate) const CONSUMER: &str = "model/client";

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
    /// A write whose acknowledgement was lost is not recognised as the writer's own.
    NoOwnWrite,
    /// A late result lands whatever refresh token the stored record holds (the presented-token
    /// check of `LateRefreshed` removed).
    NoPresentedCheck,
    /// A holder presents the token however long it stalled since its lease was confirmed.
    NoSendWindow,
    /// A watched lease is taken over one tick before a whole TTL of silence.
    EarlyTakeover,
}

impl Mutation {
    /// The engine safeguard this mutation switches off in the engine's own code, if it is one
    /// (the others change what the model does around the engine's code).
    fn safeguard(self) -> Option<Safeguard> {
        match self {
            Mutation::NoOwnWrite => Some(Safeguard::OwnWrite),
            Mutation::NoPresentedCheck => Some(Safeguard::PresentedCheck),
            Mutation::NoSendWindow => Some(Safeguard::SendWindow),
            Mutation::EarlyTakeover => Some(Safeguard::SilenceThreshold),
            Mutation::None | Mutation::NoFence | Mutation::NoLease | Mutation::UseBeforeWrite => {
                None
            }
        }
    }
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
    /// The provider issues at most this many new tokens.
    pub max_rotations: u8,
    /// At most this many processes crash.
    pub max_crashes: u8,
    /// At most this many replies go wrong: lost on the way back, a 5xx after the provider
    /// committed, a 429 without processing, or a request handled after the client gave up on
    /// it.
    pub max_losses: u8,
    /// At most this many store writes fail or are applied but reported failed.
    pub max_store_faults: u8,
    /// The user may revoke the grant (at most once).
    pub user_revokes: bool,
    /// The failure budget: the installation is condemned at this many consecutive transient
    /// failures (`None`: never within the model's time).
    pub budget_attempts: Option<u32>,
    /// The grant's absolute lifetime in ticks (the provider refuses it from then on, and the
    /// profile knows it).
    pub absolute_expiry: Option<u8>,
    /// Time passes only when no process can make progress (a fair scheduler, for liveness);
    /// otherwise time passes any time, which is how pauses are modelled.
    pub fair_time: bool,
    /// The safeguard removed, if any.
    pub mutation: Mutation,
}

impl Config {
    /// `processes` processes (skews -1, +1, 0 ticks), at most one crash, two reply faults and
    /// one store fault, a user who may revoke, time to tick 5, two rotations, the protocol as
    /// built.
    pub fn new(processes: usize, leeway: Option<u8>) -> Self {
        Self {
            skews: [-1, 1, 0][..processes.clamp(1, 3)].to_vec(),
            leeway,
            max_tick: 5,
            max_rotations: 2,
            max_crashes: 1,
            max_losses: 2,
            max_store_faults: 1,
            user_revokes: true,
            budget_attempts: None,
            absolute_expiry: None,
            fair_time: false,
            mutation: Mutation::None,
        }
    }
}

/// The model: its configuration, and the provider profile and refresh policy the engine's
/// pure functions are called with.
#[derive(Debug, Clone)]
pub struct ProtocolModel {
    /// What it explores.
    pub config: Config,
    pub(crate) profile: ProviderProfile,
    pub(crate) policy: RefreshPolicy,
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
    /// Reply faults so far.
    pub losses: u8,
    /// Store faults so far.
    pub store_faults: u8,
    /// Requests the client gave up on that the provider may still handle (their tokens).
    pub strays: Vec<u8>,
    /// The fault the current step's first write meets (set by the action, taken by the write).
    pub pending_fault: Option<Fault>,
    /// Bit `k`: the store has held refresh token `r{k}`.
    pub landed: u32,
    /// Bit `k`: access token `a{k}` was handed to a caller.
    pub used: u32,
    /// Bit `k`: the rotation of the presented `r{k}` was lost to a fault (its holder crashed or
    /// lost the reply, or was paused past its lease and taken over), not to the protocol.
    pub fault_lost: u32,
    /// Bit `k`: a request presenting `r{k}` was handled after its client gave up (SU1).
    pub stray_handled: u32,
    /// Such a request presented a retired token and reuse detection revoked the grant.
    pub stray_killed: bool,
    /// The provider handled a request presenting a token it had already retired.
    pub reuse_attempted: bool,
    /// A lease was taken over a record holding a token the provider had already retired (its
    /// holder may present it).
    pub retired_leased: bool,
    /// Bit `k`: whether `r{k}` was rotated is unknown to the fleet: a request presenting it
    /// got no definite answer (a timeout, a lost reply, a 5xx), or a lease over it ended
    /// without its holder giving it back (taken over; its holder crashed, stalled, or could
    /// not learn whether its lease write landed).
    pub unknown: u32,
    /// A write replaced the stored refresh token with an older one.
    pub regressed: bool,
    /// A retired token was presented although its successor had been stored.
    pub unexcused_reuse: bool,
    /// A condemnation whose reason the provider's state contradicts.
    pub untruthful: bool,
    /// A condemnation was stored but its writer took it as not recorded (never announced).
    pub unannounced: bool,
    /// A result was set aside as obsolete although the stored record held the refresh token it
    /// presented and was not revoked (it should have landed), or held the result itself (its
    /// writer did not recognise its own write).
    pub sunk_landable: bool,
}

/// What happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// A tick of time passes.
    Tick,
    /// Process `p` takes its next step; its first store write meets the fault, if any.
    Step(usize, Option<Fault>),
    /// Process `p` renews its lease; the write meets the fault, if any.
    Renew(usize, Option<Fault>),
    /// The provider handles process `p`'s request.
    Handle(usize),
    /// The provider commits process `p`'s request and answers 5xx.
    ServerError(usize),
    /// The provider refuses process `p`'s request unprocessed (429).
    Throttle(usize),
    /// Process `p`'s reply is lost.
    Lose(usize),
    /// Process `p` crashes.
    Crash(usize),
    /// The provider handles the `i`-th stray request.
    HandleStray(usize),
    /// The user revokes the grant.
    UserRevokes,
}

/// The tokens of rotation `k`, obtained at `at`.
pub(crate) fn tokens(k: u8, at: Timestamp) -> TokenSet {
    // Expired before the model's time begins, whatever a process's skew: every process
    // always wants a refresh, so flights keep contending.
    TokenSet::bearer(
        AccessToken::new(format!("a{k}")),
        Some(RefreshToken::new(format!("r{k}"))),
        at,
        secs(-100),
    )
}

/// Model time `t` as a timestamp.
pub(crate) fn secs(t: i64) -> Timestamp {
    Timestamp::from_unix_secs(T0 + t)
}

fn ticks(t: u8) -> Duration {
    Duration::from_secs(u64::from(t))
}

impl ProtocolModel {
    /// The model for `config`, with a rotating profile of its leeway and expiry, and the
    /// engine's default policy but for the budget (and no mass-rejection guard: one
    /// installation is never a wave).
    pub fn new(config: Config) -> Self {
        let mut profile = ProviderProfile::generic(
            "model",
            "https://provider.example/authorize"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
            "https://provider.example/token"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        profile.rotation = Rotation::Rotates {
            reuse_leeway: config.leeway.map(ticks),
        };
        profile.refresh_inactivity_expiry = None;
        profile.refresh_absolute_expiry = config.absolute_expiry.map(ticks);
        profile.timing.skew = ticks(MARGIN / 2);
        profile.identity = IdentityCheck::Disabled;
        let consumer = ConsumerConfig::builder(profile.clone())
            .client_id("model")
            .client_secret("secret")
            .redirect_uri("https://app.example/cb")
            .build()
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut policy = RefreshPolicy::for_consumer(&consumer);
        policy.failure_budget = Duration::ZERO;
        policy.failure_budget_attempts = config.budget_attempts.unwrap_or(u32::MAX);
        policy.backoff_base = Duration::from_secs(1);
        policy.lease_margin = ticks(MARGIN);
        policy.mass_rejection = None;
        Self {
            config,
            profile,
            policy,
        }
    }

    /// Switches this model's mutation, if it is an engine safeguard, off in the engine's code
    /// on the calling thread (the checker may explore on several threads: every entry point
    /// arms its own).
    pub(crate) fn arm(&self) {
        switch_off(self.config.mutation.safeguard());
    }

    /// Process `p`'s wall clock.
    pub(crate) fn wall(&self, s: &State, p: usize) -> Timestamp {
        secs(i64::from(s.tick) + i64::from(self.config.skews[p]))
    }

    /// Whether the grant's absolute lifetime has passed at the provider.
    pub(crate) fn grant_expired(&self, tick: u8) -> bool {
        self.config.absolute_expiry.is_some_and(|e| tick >= e)
    }

    fn apply(&self, s: &mut State, action: Action) -> Option<()> {
        match action {
            Action::Tick => {
                s.tick += 1;
                Some(())
            }
            Action::Step(p, fault) => {
                s.pending_fault = fault;
                let stepped = self.step(s, p);
                // A fault the step's writes did not meet changes nothing: not a new state.
                (s.pending_fault.take().is_none() || fault.is_none()).then_some(())?;
                stepped
            }
            Action::Renew(p, fault) => {
                s.pending_fault = fault;
                let renewed = self.renew(s, p);
                (s.pending_fault.take().is_none() || fault.is_none()).then_some(())?;
                renewed
            }
            Action::Handle(p) => self.handle(s, p, false),
            Action::ServerError(p) => self.handle(s, p, true),
            Action::Throttle(p) => self.throttle(s, p),
            Action::Lose(p) => self.lose(s, p),
            Action::Crash(p) => self.crash(s, p),
            Action::HandleStray(i) => self.handle_stray(s, i),
            Action::UserRevokes => {
                if s.provider.dead.is_some() {
                    return None;
                }
                s.provider.dead = Some(crate::provider::Death::User);
                Some(())
            }
        }
    }

    /// Process `p`'s reply is lost on its way back.
    fn lose(&self, s: &mut State, p: usize) -> Option<()> {
        let Phase::Replied { flight, answer } = &mut s.procs[p].phase else {
            return None;
        };
        if answer.is_none() || s.losses >= self.config.max_losses {
            return None;
        }
        if let Some(Answer::Tokens { rotated: true, .. }) = answer {
            s.fault_lost |= 1 << flight.held.token();
        }
        s.unknown |= 1 << flight.held.token();
        *answer = None;
        s.losses += 1;
        Some(())
    }

    /// Process `p` crashes: what it held in memory is gone.
    fn crash(&self, s: &mut State, p: usize) -> Option<()> {
        if s.procs[p].phase == Phase::Crashed || s.crashes >= self.config.max_crashes {
            return None;
        }
        match &s.procs[p].phase {
            Phase::Replied {
                flight,
                answer: Some(Answer::Tokens { rotated: true, .. }),
            } => s.fault_lost |= 1 << flight.held.token(),
            Phase::Using { held, .. } => s.fault_lost |= 1 << held.token(),
            Phase::Holding(flight) | Phase::Replied { flight, .. } => {
                s.unknown |= 1 << flight.held.token();
            }
            // Its request may still reach the provider.
            Phase::Sent { flight, .. } => {
                let token = flight.held.token();
                s.unknown |= 1 << token;
                s.strays.push(token);
            }
            _ => {}
        }
        // What its unsaved-tokens place holds is put back only when it starts again, which
        // the model does not do: lost to the crash.
        for (presented, _) in std::mem::take(&mut s.procs[p].unsaved) {
            s.fault_lost |= 1 << presented;
        }
        s.procs[p].phase = Phase::Crashed;
        s.crashes += 1;
        Some(())
    }

    /// Whether some process can still make progress without time passing.
    fn can_progress(&self, s: &State) -> bool {
        (0..s.procs.len()).any(|p| {
            let mut t = s.clone();
            self.step(&mut t, p).is_some() || self.handle(&mut t, p, false).is_some()
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

    fn push_fault_variants(
        &self,
        s: &State,
        actions: &mut Vec<Action>,
        make: fn(Option<Fault>) -> Action,
    ) {
        actions.push(make(None));
        if s.store_faults < self.config.max_store_faults {
            actions.push(make(Some(Fault::Refused)));
            actions.push(make(Some(Fault::AppliedLost)));
        }
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
        let idle = Process {
            phase: Phase::Idle,
            watch: None,
            done: false,
            quiet: None,
            unsaved: Vec::new(),
        };
        vec![State {
            tick: 0,
            store: Rec(record),
            provider: Provider::new(),
            procs: vec![idle; self.config.skews.len()],
            crashes: 0,
            losses: 0,
            store_faults: 0,
            strays: Vec::new(),
            pending_fault: None,
            landed: 1,
            used: 0,
            fault_lost: 0,
            stray_handled: 0,
            stray_killed: false,
            reuse_attempted: false,
            retired_leased: false,
            unknown: 0,
            regressed: false,
            unexcused_reuse: false,
            untruthful: false,
            unannounced: false,
            sunk_landable: false,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        self.arm();
        for p in 0..s.procs.len() {
            if s.procs[p].phase == Phase::Crashed {
                continue;
            }
            let step: [fn(Option<Fault>) -> Action; 3] = [
                |f| Action::Step(0, f),
                |f| Action::Step(1, f),
                |f| Action::Step(2, f),
            ];
            let renew: [fn(Option<Fault>) -> Action; 3] = [
                |f| Action::Renew(0, f),
                |f| Action::Renew(1, f),
                |f| Action::Renew(2, f),
            ];
            self.push_fault_variants(s, actions, step[p]);
            self.push_fault_variants(s, actions, renew[p]);
            actions.push(Action::Handle(p));
            if s.losses < self.config.max_losses {
                actions.push(Action::ServerError(p));
                actions.push(Action::Throttle(p));
                actions.push(Action::Lose(p));
            }
            if s.crashes < self.config.max_crashes {
                actions.push(Action::Crash(p));
            }
        }
        if s.losses < self.config.max_losses {
            actions.extend((0..s.strays.len()).map(Action::HandleStray));
        }
        if self.config.user_revokes && s.provider.dead.is_none() {
            actions.push(Action::UserRevokes);
        }
        if s.tick < self.config.max_tick && !(self.config.fair_time && self.can_progress(s)) {
            actions.push(Action::Tick);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        self.arm();
        let mut s = last.clone();
        self.apply(&mut s, action)?;
        if let Action::Step(_, Some(_)) | Action::Renew(_, Some(_)) = action {
            s.store_faults += 1;
        }
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
            Property::always(
                "a recorded condemnation is announced",
                |_: &Self, s: &State| !s.unannounced,
            ),
            Property::always(
                "a result that can land, or landed, is not set aside",
                |_: &Self, s: &State| !s.sunk_landable,
            ),
            Property::always("a used token is stored first", |m: &Self, s: &State| {
                m.used_tokens_are_stored(s)
            }),
            Property::sometimes("a refresh lands", |_: &Self, s: &State| {
                s.store.token() >= 1
            }),
        ];
        // The verdicts a configuration can reach must be reached (or the model cannot judge
        // them): a lost rotation and a revocation by the user, a spent budget, an expiry.
        if self.config.user_revokes {
            properties.push(Property::sometimes(
                "sometimes: a revocation by the user is recorded",
                |_: &Self, s: &State| s.recorded(ReauthReason::RefreshTokenRejected),
            ));
        }
        if self.config.max_crashes + self.config.max_losses > 0 {
            properties.push(Property::sometimes(
                "sometimes: a lost rotation is recorded",
                |_: &Self, s: &State| s.recorded(ReauthReason::RotatedTokenLost),
            ));
        }
        if self.config.budget_attempts.is_some() {
            properties.push(Property::sometimes(
                "sometimes: a spent failure budget is recorded",
                |_: &Self, s: &State| s.recorded(ReauthReason::FailureBudgetExhausted),
            ));
        }
        if self.config.absolute_expiry.is_some() {
            properties.push(Property::sometimes(
                "sometimes: an expiry is recorded",
                |_: &Self, s: &State| s.recorded(ReauthReason::RefreshTokenExpired),
            ));
        }
        if self.config.fair_time {
            properties.push(Property::eventually(
                "a due installation is refreshed or truthfully condemned",
                |_: &Self, s: &State| s.store.token() >= 1 || s.store.0.state().is_terminal(),
            ));
        }
        properties
    }
}

impl State {
    /// Whether the store holds a condemnation for `reason`.
    fn recorded(&self, reason: ReauthReason) -> bool {
        matches!(self.store.0.state(), RecordState::ReauthorizationRequired { reason: r, .. } if *r == reason)
    }

    /// One line on what a state holds, for printed counterexamples.
    pub fn summary(&self) -> String {
        let record = &self.store.0;
        let state = match record.state() {
            tokenkeeper_core::State::ReauthorizationRequired { reason, .. } => {
                format!("{reason:?}")
            }
            other => format!("{:?}", other.kind()),
        };
        let lease = record.state().lease().map(|l| l.holder.to_string());
        let streak = record.failures().map(|f| {
            (
                f.consecutive,
                f.possibly_committed_since.is_some(),
                f.server_error_since.is_some(),
                f.revived_after_verdict.is_some(),
            )
        });
        let procs: Vec<String> = self
            .procs
            .iter()
            .map(|p| {
                let flight = match &p.phase {
                    Phase::Holding(f)
                    | Phase::Sent { flight: f, .. }
                    | Phase::Replied { flight: f, .. } => {
                        format!(
                            "(r{} to{} d{})",
                            f.held.token(),
                            u8::from(f.takeover),
                            u8::from(f.doubt)
                        )
                    }
                    _ => String::new(),
                };
                format!(
                    "{}{flight}{}",
                    p.phase.name(),
                    if p.unsaved.is_empty() { "" } else { "+unsaved" }
                )
            })
            .collect();
        format!(
            "t={} store v{} r{} {state} lease {lease:?} streak {streak:?} | provider issued {} spent {:#b} dead {:?} | {procs:?} | unknown {:#b} fault_lost {:#b}",
            self.tick,
            record.version(),
            self.store.token(),
            self.provider.issued,
            self.provider.spent,
            self.provider.dead,
            self.unknown,
            self.fault_lost,
        )
    }
}
