//! The processes' steps in the model, each calling the engine's real code for what it
//! decides: [`decide`] for the next step, [`retired_past_leeway`] and [`unpresentable`]
//! before presenting, [`plan_failure`] after a failure (the refusal's reason, the failure
//! budget, the retry inside a reuse leeway), the real transitions for every write, the
//! engine's write sequences ([`ResultWrite`], [`settle_next`], [`settle_conflict`], retries
//! included) and its lease timing ([`may_send`], [`silent`]). What the model writes itself is
//! the I/O around them (`store.rs`).

use std::time::Duration;

use tokenkeeper::__protocol::{
    Context, Decision, Failure, Mode, Plan, ResultConflict, ResultWrite, Rules, SettleConflict,
    decide, holds_own_lease, may_send, plan_failure, refresh_token_deadline, retired_past_leeway,
    settle_conflict, settle_next, silent, unpresentable,
};
use tokenkeeper_core::{
    BackoffCause, CommitEvidence, ErrorDetail, Event, FailureClass, LeaseHolder, ReauthReason,
    Record, RefreshToken, State as RecordState,
};

use crate::model::{BOUND, CONSUMER, MARGIN, Mutation, ProtocolModel, State, TTL, tokens};
use crate::process::{Flight, Phase, Quiet};
use crate::provider::{Answer, Death};
use crate::record::{Rec, token_index};
use crate::store::Wrote;

fn holder(p: usize) -> LeaseHolder {
    LeaseHolder::new(format!("p{p}"))
}

fn fence(held: &Record) -> u64 {
    held.state().lease().map_or(0, |l| l.fence)
}

/// How long the engine pauses before retrying a store write that errored (its
/// `retry::Patience` starts at 50 ms): the retry's record, if recomputed, carries a later time.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// `t` ticks as time.
fn ticks(t: u8) -> Duration {
    Duration::from_secs(u64::from(t))
}

impl ProtocolModel {
    fn rules(&self) -> Rules<'_> {
        Rules {
            profile: &self.profile,
            policy: &self.policy,
        }
    }

    /// The real decision step for process `p` over the stored record.
    fn decide(&self, s: &State, p: usize) -> Decision {
        let record = &s.store.0;
        let own_unsent = record
            .state()
            .lease()
            .is_some_and(|l| l.holder == holder(p))
            && s.procs[p].quiet.is_some_and(|q| q.unsent);
        let silent = match s.procs[p].watch {
            _ if own_unsent => Some(record.version()),
            Some((v, since))
                if v == record.version()
                    && silent(ticks(s.tick.saturating_sub(since)), ticks(TTL)) =>
            {
                Some(v)
            }
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
                forced_min_interval: Duration::ZERO,
                refresh_deadline: refresh_token_deadline(record, &self.profile).map(|(at, _)| at),
                min_refresh_interval: Duration::ZERO,
                lifts_holds_before: None,
            },
        )
    }

    /// Process `p`'s next step, if it has one that changes anything.
    pub(crate) fn step(&self, s: &mut State, p: usize) -> Option<()> {
        match s.procs[p].phase.clone() {
            Phase::Idle if !s.procs[p].done => self.step_idle(s, p),
            Phase::Holding(flight) => {
                self.step_holding(s, p, flight);
                Some(())
            }
            Phase::Sent { flight, deadline } if s.tick > deadline => {
                // Timed out: the request may still be handled (a stray), and may have been.
                s.strays.push(flight.held.token());
                s.unknown |= 1 << flight.held.token();
                s.procs[p].phase = Phase::Idle;
                self.fail(
                    s,
                    p,
                    flight,
                    FailureClass::Transient,
                    CommitEvidence::ReplyLost,
                );
                Some(())
            }
            Phase::Replied { flight, answer } => {
                s.procs[p].phase = Phase::Idle;
                self.on_reply(s, p, flight, answer);
                Some(())
            }
            Phase::Using { held, new } => {
                s.procs[p].phase = Phase::Idle;
                self.land(s, p, held, new);
                Some(())
            }
            _ => None,
        }
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
            Decision::TakeLease { .. } if !s.procs[p].unsaved.is_empty() => self.restore(s, p),
            Decision::TakeLease {
                takeover, watched, ..
            } => self.take_lease(s, p, takeover, watched),
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

    /// Puts back what process `p`'s unsaved-tokens place holds (the engine's `restore_one`: a
    /// `LateRefreshed` write, accepted only over the refresh token the result presented); a
    /// result the record refuses is obsolete and set aside, one the store does not take is
    /// kept (and the flight presents nothing).
    fn restore(&self, s: &mut State, p: usize) -> Option<()> {
        let now = self.wall(s, p);
        let mut kept = Vec::new();
        let mut changed = false;
        for (presented, new) in std::mem::take(&mut s.procs[p].unsaved) {
            let stored = s.store.0.clone();
            let late = Event::LateRefreshed {
                presented: RefreshToken::new(format!("r{presented}")),
                tokens: tokens(new, now),
                refresh_at: now,
                obtained_under: Some(holder(p)),
            };
            let Ok(revived) = stored.apply(late, now) else {
                // Obsolete: set aside. Judged like a late result's refusal.
                changed = true;
                if token_index(&stored) == presented
                    && !matches!(stored.state(), RecordState::Revoked { .. })
                {
                    s.sunk_landable = true;
                }
                continue;
            };
            match self.write(s, &revived, stored.version()) {
                Wrote::Ok => changed = true,
                Wrote::Errored if self.applied(s, &revived) => changed = true,
                Wrote::Conflict(_) | Wrote::Errored | Wrote::Failed => kept.push((presented, new)),
            }
        }
        s.procs[p].unsaved = kept;
        changed.then_some(())
    }

    /// Takes the lease (the engine's `take_lease`, with `takeover_evidence`).
    fn take_lease(
        &self,
        s: &mut State,
        p: usize,
        takeover: bool,
        watched: Option<u64>,
    ) -> Option<()> {
        let (until, now) = (self.lease_until(s, p), self.wall(s, p));
        let event = match watched {
            Some(watched) => Event::LeaseTakenOver {
                holder: holder(p),
                until,
                watched,
            },
            None => Event::LeaseAcquired {
                holder: holder(p),
                until,
            },
        };
        let record = s.store.0.clone();
        let leased = record.apply(event, now).ok()?;
        // A lapsed lease of this process's own under which nothing was sent is no evidence,
        // unless it was itself a takeover.
        let own_lapsed = record
            .state()
            .lease()
            .is_some_and(|l| l.holder == holder(p));
        let evidence = match s.procs[p].quiet {
            Some(q) if own_lapsed => q.was_takeover,
            _ => takeover,
        };
        if takeover {
            // Whoever held the lapsed lease may have sent a request presenting the token.
            s.unknown |= 1 << token_index(&record);
            self.note_paused_holders(s);
        }
        let inherited_loss = self.rotation_lost(s, token_index(&record));
        s.retired_leased |= s.provider.was_spent(token_index(&record));
        match self.write(s, &leased, record.version()) {
            Wrote::Ok => {}
            Wrote::Errored if self.applied(s, &leased) => {}
            Wrote::Conflict(_) => return Some(()),
            Wrote::Errored | Wrote::Failed => {
                // Perhaps applied all the same: nothing will be sent under it (the engine
                // notes it quiet); a peer cannot know that.
                if s.store.0 == leased {
                    s.unknown |= 1 << token_index(&record);
                }
                s.procs[p].quiet = Some(Quiet {
                    was_takeover: false,
                    unsent: false,
                });
                return Some(());
            }
        }
        s.procs[p].quiet = None;
        s.procs[p].watch = None;
        s.procs[p].phase = Phase::Holding(Flight {
            held: Rec(leased),
            confirmed: s.tick,
            takeover: evidence,
            doubt: evidence,
            inherited_loss,
        });
        Some(())
    }

    fn lease_until(&self, s: &State, p: usize) -> tokenkeeper_core::Timestamp {
        self.wall(s, p)
            .saturating_add(Duration::from_secs(u64::from(TTL + MARGIN)))
    }

    /// Whether `r{token}` has been used at the provider and that rotation was lost to a fault.
    fn rotation_lost(&self, s: &State, token: u8) -> bool {
        s.provider.was_spent(token) && s.fault_lost & (1 << token) != 0
    }

    /// A takeover: a holder paused past its lease with a rotated reply in hand has lost that
    /// rotation to the pause.
    fn note_paused_holders(&self, s: &mut State) {
        for q in 0..s.procs.len() {
            if let Phase::Replied {
                flight,
                answer: Some(Answer::Tokens { rotated: true, .. }),
            } = &s.procs[q].phase
                && s.tick >= flight.confirmed + TTL
            {
                s.fault_lost |= 1 << flight.held.token();
            }
        }
    }

    /// A holder about to present its token: the engine's checks before sending (a token past
    /// the leeway after a possible rotation, an expired one), then the send window.
    fn step_holding(&self, s: &mut State, p: usize, flight: Flight) {
        let now = self.wall(s, p);
        let held = &flight.held.0;
        if retired_past_leeway(held, self.rules(), now).is_some() {
            s.procs[p].phase = Phase::Idle;
            return self.condemn(s, p, &flight, ReauthReason::RotatedTokenLost);
        }
        if let Some((reason, ..)) = unpresentable(held, &self.profile, &Mode::OnDemand, now) {
            s.procs[p].phase = Phase::Idle;
            return self.condemn(s, p, &flight, reason);
        }
        let since = ticks(s.tick.saturating_sub(flight.confirmed));
        if may_send(since, ticks(BOUND), ticks(TTL)) {
            s.procs[p].phase = Phase::Sent {
                flight,
                deadline: s.tick + BOUND,
            };
            return;
        }
        // Stalled past the send window: nothing is sent. The engine renews first (a separate
        // action here) or takes its own lease back at once.
        s.unknown |= 1 << flight.held.token();
        s.procs[p].phase = Phase::Idle;
        s.procs[p].quiet = Some(Quiet {
            was_takeover: flight.takeover,
            unsent: true,
        });
    }

    /// The provider's answer reached process `p`.
    fn on_reply(&self, s: &mut State, p: usize, flight: Flight, answer: Option<Answer>) {
        match answer {
            None => self.fail(
                s,
                p,
                flight,
                FailureClass::Transient,
                CommitEvidence::ReplyLost,
            ),
            Some(Answer::ServerError) => {
                let commit = CommitEvidence::ServerError;
                self.fail(s, p, flight, FailureClass::Transient, commit);
            }
            Some(Answer::Throttled) => {
                let none = CommitEvidence::None;
                self.fail(s, p, flight, FailureClass::Transient, none);
            }
            Some(Answer::Rejected) => {
                let none = CommitEvidence::None;
                self.fail(s, p, flight, FailureClass::RefreshTokenRejected, none);
            }
            Some(Answer::Tokens { new, .. }) => {
                if self.config.mutation == Mutation::UseBeforeWrite {
                    s.used |= 1 << new;
                    s.procs[p].phase = Phase::Using {
                        held: flight.held,
                        new,
                    };
                } else if self.land(s, p, flight.held, new) {
                    s.used |= 1 << new;
                }
            }
        }
    }

    /// The engine's `land`, driving its very [`ResultWrite`]: a `Refreshed` write under the
    /// lease; after a conflict with another's write, a `LateRefreshed` write on top of it; a
    /// result the stored record refuses, or the store does not take, goes to the sink.
    /// Returns whether it was stored.
    pub(crate) fn land(&self, s: &mut State, p: usize, held: Rec, new: u8) -> bool {
        let now = self.wall(s, p);
        let presented_k = held.token();
        let presented = RefreshToken::new(format!("r{presented_k}"));
        let mut held = held.0;
        let mut write = ResultWrite::new(&held, presented, tokens(new, now), now, None);
        let mut now = now;
        for _ in 0..6 {
            let Ok((candidate, expected)) = write.next_write(&held, now) else {
                return false;
            };
            match self.write(s, &candidate, expected) {
                Wrote::Ok => return true,
                // The engine pauses and writes the same record again (and, had the held
                // record moved meanwhile, a new one at a later time).
                Wrote::Errored => {
                    write.retry(candidate, expected);
                    now = now.saturating_add(RETRY_PAUSE);
                }
                // Not taken within the patience (the holder cut off from the store): to the
                // sink, put back before this process's next lease. Its peers cannot know: to
                // them the rotation is lost, as if the holder had crashed.
                Wrote::Failed => {
                    s.fault_lost |= 1 << presented_k;
                    s.procs[p].unsaved.push((presented_k, new));
                    return false;
                }
                Wrote::Conflict(stored) => {
                    match write.on_conflict(&held, &stored, &candidate, now) {
                        ResultConflict::Written => return true,
                        ResultConflict::Adopt => held = *stored,
                        ResultConflict::Late => {}
                        ResultConflict::Obsolete => {
                            return self.obsolete(s, &stored, write.presented(), new);
                        }
                    }
                }
            }
        }
        unreachable!(
            "a write errs once, and conflicts at most with one late result and one adoption"
        )
    }

    /// A result the stored record refused: to the sink unless the installation was revoked
    /// (its tokens are then revoked at the provider). Judged: it should have landed if the
    /// record holds the token it presented and is not revoked, and it did land if the record
    /// holds the token it carries (the write was applied and not recognised).
    fn obsolete(&self, s: &mut State, stored: &Record, presented: &RefreshToken, new: u8) -> bool {
        let revoked = matches!(stored.state(), RecordState::Revoked { .. });
        if !revoked {
            // Set aside: the stored record holds another refresh token, so this one can never
            // land (the engine keeps the file among the obsolete ones).
            if stored.tokens().refresh_token.as_ref() == Some(presented)
                || token_index(stored) == new
            {
                s.sunk_landable = true;
            }
        }
        false
    }

    /// A failed attempt: re-read before condemning a refusal, then the engine's plan.
    fn fail(
        &self,
        s: &mut State,
        p: usize,
        mut flight: Flight,
        class: FailureClass,
        commit: CommitEvidence,
    ) {
        flight.doubt |= commit != CommitEvidence::None;
        if class == FailureClass::RefreshTokenRejected {
            let stored = &s.store.0;
            if stored.version() != flight.held.0.version() {
                if !holds_own_lease(&flight.held.0, stored) {
                    return; // someone else wrote: re-read
                }
                flight.held = Rec(stored.clone());
            }
        }
        let failure = Failure {
            class,
            commit,
            retry_after: None,
            takeover: flight.takeover,
            in_doubt: flight.doubt,
            jitter: 0.0,
        };
        let now = self.wall(s, p);
        match plan_failure(&flight.held.0, &failure, self.rules(), now) {
            Plan::Condemn(reason) => self.condemn(s, p, &flight, reason),
            Plan::Defer { retry_at, commit } => {
                let event = Event::RefreshDeferred {
                    fence: fence(&flight.held.0),
                    retry_at,
                    cause: BackoffCause::Transient,
                    error: ErrorDetail::new(FailureClass::Transient),
                    commit,
                };
                if self.settle(s, p, &flight.held.0, event).is_none() && !flight.doubt {
                    s.procs[p].quiet = Some(Quiet {
                        was_takeover: false,
                        unsent: false,
                    });
                }
            }
            Plan::ProcessLocal { .. } => unreachable!("the model's provider refuses no client"),
        }
    }

    /// Writes `event` under the lease held as `held` (the engine's `settle`, with its
    /// [`settle_next`] and [`settle_conflict`]): adopts its own unacknowledged writes; `None`
    /// when not known to be recorded.
    fn settle(&self, s: &mut State, p: usize, held: &Record, event: Event) -> Option<Record> {
        let mut now = self.wall(s, p);
        let mut held = held.clone();
        let mut sent = None;
        for _ in 0..4 {
            let next = settle_next(&held, &event, sent.take(), now).ok()?;
            match self.write(s, &next, held.version()) {
                Wrote::Ok => return Some(next),
                Wrote::Conflict(stored) => match settle_conflict(&held, &next, &stored) {
                    SettleConflict::Written => return Some(next),
                    SettleConflict::Adopt => held = *stored,
                    SettleConflict::Lost => return None,
                },
                // The engine pauses and writes what it sent again.
                Wrote::Errored => {
                    sent = Some(next);
                    now = now.saturating_add(RETRY_PAUSE);
                }
                Wrote::Failed => return None,
            }
        }
        None
    }

    /// Condemns for `reason` (the engine's `condemn`; no mass-rejection guard for one
    /// installation), and judges the reason against the provider's state.
    fn condemn(&self, s: &mut State, p: usize, flight: &Flight, reason: ReauthReason) {
        let held = &flight.held.0;
        let event = Event::RefreshRejected {
            fence: fence(held),
            reason,
            error: None,
        };
        let before = s.store.0.version();
        let recorded = self.settle(s, p, held, event).is_some();
        if !recorded && !flight.doubt {
            // Not recorded: the lease lapses, and nothing rotated under it.
            s.procs[p].quiet = Some(Quiet {
                was_takeover: false,
                unsent: false,
            });
        }
        let stored = s.store.0.version() != before
            && matches!(
                s.store.0.state(),
                RecordState::ReauthorizationRequired { .. }
            );
        if !stored {
            return;
        }
        if !recorded {
            s.unannounced = true;
        }
        if !self.truthful(s, flight.held.token(), reason) {
            s.untruthful = true;
        }
    }

    /// Whether `reason` is true of `r{token}` by what happened: a lost rotation needs one that
    /// may have been lost (the token was used, or the fleet cannot know whether it was: see
    /// `State::unknown`) or a retired token presented or about to be (reuse detection may
    /// have revoked the grant: it did, a request presenting one was handled, a lease was taken
    /// over a record holding one, or a request its client gave up on presents one); a plain
    /// rejection needs the user's revocation, not reuse detection, unless a request its client
    /// had given up on set it off (SU1: no process can know); an expiry needs the grant's
    /// lifetime to be over (within the clock-skew margin).
    fn truthful(&self, s: &State, token: u8, reason: ReauthReason) -> bool {
        match reason {
            ReauthReason::RotatedTokenLost => {
                s.provider.dead == Some(Death::Reuse)
                    || s.provider.was_spent(token)
                    || s.unknown & (1 << token) != 0
                    || s.reuse_attempted
                    || s.retired_leased
                    || s.strays.iter().any(|&t| s.provider.was_spent(t))
            }
            ReauthReason::RefreshTokenRejected => match s.provider.dead {
                Some(Death::User) => true,
                Some(Death::Reuse) => s.stray_killed,
                None => false,
            },
            ReauthReason::RefreshTokenExpired => self.grant_expired(s.tick + MARGIN),
            ReauthReason::FailureBudgetExhausted => true,
            _ => false,
        }
    }

    /// The provider handles process `p`'s request (answering 5xx after committing it when
    /// `server_error`).
    pub(crate) fn handle(&self, s: &mut State, p: usize, server_error: bool) -> Option<()> {
        let Phase::Sent { flight, deadline } = s.procs[p].phase.clone() else {
            return None;
        };
        if s.tick > deadline || (server_error && s.losses >= self.config.max_losses) {
            return None;
        }
        let token = flight.held.token();
        let expired = self.grant_expired(s.tick);
        s.reuse_attempted |= s.provider.was_spent(token);
        let handled = s
            .provider
            .refresh(token, s.tick, self.config.leeway, expired);
        // Inside the inherent window only if the token's rotation was already lost (crash,
        // lost reply, pause past the lease) when this flight took its lease, or a request the
        // client had given up on used it (SU1).
        if handled.reuse && !flight.inherited_loss && s.stray_handled & (1 << token) == 0 {
            s.unexcused_reuse = true;
        }
        let mut answer = handled.answer;
        if server_error {
            s.losses += 1;
            s.unknown |= 1 << token;
            if matches!(answer, Answer::Tokens { rotated: true, .. }) {
                s.fault_lost |= 1 << token;
            }
            answer = Answer::ServerError;
        }
        s.procs[p].phase = Phase::Replied {
            flight,
            answer: Some(answer),
        };
        Some(())
    }

    /// The provider refuses process `p`'s request without processing it (a 429).
    pub(crate) fn throttle(&self, s: &mut State, p: usize) -> Option<()> {
        let Phase::Sent { flight, deadline } = s.procs[p].phase.clone() else {
            return None;
        };
        if s.tick > deadline || s.losses >= self.config.max_losses {
            return None;
        }
        s.losses += 1;
        s.procs[p].phase = Phase::Replied {
            flight,
            answer: Some(Answer::Throttled),
        };
        Some(())
    }

    /// The provider handles a request its client gave up on: whatever it does is lost.
    pub(crate) fn handle_stray(&self, s: &mut State, i: usize) -> Option<()> {
        let token = s.strays.remove(i);
        let expired = self.grant_expired(s.tick);
        s.reuse_attempted |= s.provider.was_spent(token);
        let handled = s
            .provider
            .refresh(token, s.tick, self.config.leeway, expired);
        s.losses += 1;
        s.stray_handled |= 1 << token;
        s.stray_killed |= handled.reuse;
        if matches!(handled.answer, Answer::Tokens { rotated: true, .. }) {
            s.fault_lost |= 1 << token;
        }
        Some(())
    }

    /// Process `p` renews its lease (due a tick after it was confirmed). A renewal whose
    /// acknowledgement was lost is recognised by one read, as the engine's `renew` does.
    pub(crate) fn renew(&self, s: &mut State, p: usize) -> Option<()> {
        let flight = match &s.procs[p].phase {
            Phase::Holding(flight) | Phase::Sent { flight, .. } | Phase::Replied { flight, .. } => {
                flight.clone()
            }
            _ => return None,
        };
        if s.tick <= flight.confirmed {
            return None;
        }
        let held = flight.held.0;
        let until = self.lease_until(s, p);
        let event = Event::LeaseRenewed {
            fence: held.state().lease()?.fence,
            until,
        };
        let next = held.apply(event, self.wall(s, p)).ok()?;
        match self.write(s, &next, held.version()) {
            Wrote::Ok => {}
            // Not renewed (or not known to be): the flight goes on under the lease it has; a
            // renewal applied unacknowledged is adopted by its next write.
            Wrote::Errored | Wrote::Failed => return Some(()),
            Wrote::Conflict(_) => return None,
        }
        let tick = s.tick;
        if let Phase::Holding(flight) | Phase::Sent { flight, .. } | Phase::Replied { flight, .. } =
            &mut s.procs[p].phase
        {
            flight.held = Rec(next);
            flight.confirmed = tick;
        }
        Some(())
    }
}
