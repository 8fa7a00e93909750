//! The mass-rejection guard: a provider that suddenly refuses *every* refresh token (an
//! incident answering `invalid_grant` to everyone, a token URL pointed at another
//! authorization server) would otherwise condemn the whole fleet in minutes, irreversibly.
//!
//! The guard counts the distinct installations whose refresh token the provider refused since
//! this process's last successful refresh (within `window`). Once `threshold` of them were
//! refused, further refusals are not condemned: the installation goes to
//! `Backoff { MassRejection }` with its tokens kept and an explanation, for `hold`. Any
//! successful refresh proves the provider and the configuration work and ends the episode
//! (each held installation is then judged on its own at its next attempt). An episode whose
//! hold ran out without a single success is believed (a consumer scope change really does
//! revoke every token): condemnation resumes until the next success. But not when other
//! processes of the fleet refreshed successfully during the hold (review E2): the store's
//! event log, read from where it stood when the guard tripped, shows their `Refreshed`
//! events, and then the provider works and this process's wave is suspect (its
//! configuration, its clock): it is held for another whole hold instead.
//!
//! A success lifts the holds written at least a lease span before it (`decide`'s
//! `lifts_holds_before`): a refusal right after a takeover is held like any other, and a
//! success at once would otherwise present its retired token again before the stalled
//! holder's late result lands.
//!
//! The guard is per process: each process of a fleet trips on its own evidence. Any single
//! success ends an episode, so a partial incident (some installations refused, others not)
//! is not held: each refusal is then judged on its own.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokenkeeper_core::{EventCursor, EventKind, InstallationId, StoreError, Timestamp, TokenStore};

/// When to stop condemning (see the module docs); `RefreshPolicy::mass_rejection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MassRejectionGuard {
    /// Distinct installations refused since the last success that trip the guard (default 10).
    pub threshold: usize,
    /// Only refusals this recent count (default 10 minutes).
    pub window: Duration,
    /// How long refusals are held in backoff before a tripped guard believes them (default
    /// 24 hours).
    pub hold: Duration,
}

impl Default for MassRejectionGuard {
    fn default() -> Self {
        Self {
            threshold: 10,
            window: Duration::from_secs(600),
            hold: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Default)]
struct Episode {
    refused: VecDeque<(Timestamp, InstallationId)>,
    tripped_at: Option<Timestamp>,
    /// Where the store's event log stood when the hold began: fleet successes after it
    /// keep the hold from being believed.
    log_at_trip: Option<EventCursor>,
    believed: bool,
}

/// The guard's state in one process.
#[derive(Debug, Default)]
pub(crate) struct Guard {
    episode: Mutex<Episode>,
    /// When this process last refreshed successfully.
    last_success: Mutex<Option<Timestamp>>,
}

/// What to do with one refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Condemn the installation as usual.
    Condemn,
    /// Hold it in backoff until then: `refused` installations were refused since `since`.
    /// `began` when this refusal started the hold (note where the event log stands:
    /// [`Guard::began_at`]).
    Hold {
        until: Timestamp,
        refused: usize,
        since: Timestamp,
        began: bool,
    },
    /// A whole hold passed without a success in this process: believe it
    /// ([`Guard::believe`]) unless the fleet refreshed since the log stood at `log_at_trip`
    /// ([`fleet_refreshed_since`]), and then hold again ([`Guard::hold_again`]).
    HoldOver { log_at_trip: Option<EventCursor> },
}

impl Guard {
    /// Records that the provider refused `id`'s refresh token at `now`, and says whether to
    /// condemn it.
    pub(crate) fn refused(
        &self,
        config: Option<&MassRejectionGuard>,
        id: &InstallationId,
        now: Timestamp,
    ) -> Verdict {
        let Some(config) = config else {
            return Verdict::Condemn;
        };
        let mut e = self.episode.lock().unwrap_or_else(PoisonError::into_inner);
        if e.believed {
            return Verdict::Condemn;
        }
        if e.tripped_at.is_none() {
            // Below the threshold the list is short (under `threshold` entries); once tripped
            // it is no longer needed.
            let horizon = now.saturating_sub(config.window);
            while e.refused.front().is_some_and(|(at, _)| *at < horizon) {
                e.refused.pop_front();
            }
            if !e.refused.iter().any(|(_, seen)| seen == id) {
                e.refused.push_back((now, id.clone()));
            }
        }
        let mut began = false;
        let tripped_at = match e.tripped_at {
            // Tripped while the clock ran ahead: the hold counts from now.
            Some(at) if now < at => {
                e.tripped_at = Some(now);
                now
            }
            Some(at) => at,
            None if e.refused.len() >= config.threshold => {
                tracing::error!(
                    refused = e.refused.len(),
                    "the provider refused the refresh tokens of many installations since the last successful refresh; condemnation is paused (a provider incident, or a token URL pointed at another server?)"
                );
                e.tripped_at = Some(now);
                began = true;
                now
            }
            None => return Verdict::Condemn,
        };
        let until = tripped_at.saturating_add(config.hold);
        if now >= until {
            // A whole hold without one success here: real, unless the fleet says otherwise.
            return Verdict::HoldOver {
                log_at_trip: e.log_at_trip.clone(),
            };
        }
        Verdict::Hold {
            until,
            refused: e.refused.len(),
            since: e.refused.front().map_or(now, |(at, _)| *at),
            began,
        }
    }

    /// Notes where the event log stood when the hold began.
    pub(crate) fn began_at(&self, log: EventCursor) {
        let mut e = self.episode.lock().unwrap_or_else(PoisonError::into_inner);
        if e.tripped_at.is_some() && e.log_at_trip.is_none() {
            e.log_at_trip = Some(log);
        }
    }

    /// A whole hold passed without a success anywhere in the fleet: the refusals are real.
    pub(crate) fn believe(&self) {
        let mut e = self.episode.lock().unwrap_or_else(PoisonError::into_inner);
        if e.tripped_at.is_some() {
            e.believed = true;
        }
    }

    /// The fleet refreshed during the hold: hold for another whole hold from `now`, watching
    /// the log from `log` (where it stands now, when known).
    pub(crate) fn hold_again(&self, now: Timestamp, log: Option<EventCursor>) {
        let mut e = self.episode.lock().unwrap_or_else(PoisonError::into_inner);
        if e.tripped_at.is_some() && !e.believed {
            e.tripped_at = Some(now);
            e.log_at_trip = log;
        }
    }

    /// When this process last refreshed successfully, if it has.
    pub(crate) fn last_success(&self) -> Option<Timestamp> {
        *self
            .last_success
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A refresh succeeded at `now`: the provider and the configuration work; the episode is
    /// over.
    pub(crate) fn succeeded(&self, now: Timestamp) {
        *self
            .last_success
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(now);
        let mut e = self.episode.lock().unwrap_or_else(PoisonError::into_inner);
        if e.tripped_at.is_some() || e.believed || !e.refused.is_empty() {
            *e = Episode::default();
        }
    }
}

/// How many events [`fleet_refreshed_since`] reads at most: a day's hold in a fleet where
/// nothing succeeds writes few (holds, condemnations), and a healthy fleet's first success
/// comes within the first page.
const FLEET_SCAN_EVENTS: usize = 50_000;

/// Whether any process refreshed an installation of `consumer` successfully after the log
/// stood at `from` (a `Refreshed` event: a late result or a restored file proves nothing about
/// the provider now). Reads at most [`FLEET_SCAN_EVENTS`]; when the log was trimmed past
/// `from`, what it retains (all of it newer than `from`) is read instead. An error is the
/// store's (the caller then holds on).
pub(crate) async fn fleet_refreshed_since(
    store: &dyn TokenStore,
    consumer: &str,
    from: &EventCursor,
) -> Result<bool, StoreError> {
    const PAGE: usize = 1000;
    let mut cursor = from.clone();
    for _ in 0..FLEET_SCAN_EVENTS / PAGE {
        let page = match store.read_events(&cursor, PAGE).await {
            Err(StoreError::EventsTrimmed { .. }) if !cursor.is_beginning() => {
                cursor = EventCursor::beginning();
                continue;
            }
            page => page?,
        };
        let succeeded = page
            .events
            .iter()
            .any(|e| e.consumer == consumer && e.kind == EventKind::Refreshed);
        if succeeded {
            return Ok(true);
        }
        if page.events.len() < PAGE {
            return Ok(false);
        }
        cursor = page.next;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_unix_secs(1_800_000_000);

    fn at(secs: u64) -> Timestamp {
        T0.saturating_add(Duration::from_secs(secs))
    }

    fn id(n: usize) -> InstallationId {
        InstallationId::new(format!("i{n}")).unwrap()
    }

    #[test]
    fn trips_at_the_threshold_of_distinct_refusals_and_a_success_ends_it() {
        let g = Guard::default();
        let c = MassRejectionGuard {
            threshold: 3,
            ..MassRejectionGuard::default()
        };
        assert_eq!(g.refused(Some(&c), &id(1), at(0)), Verdict::Condemn);
        assert_eq!(
            g.refused(Some(&c), &id(1), at(1)),
            Verdict::Condemn,
            "same id"
        );
        assert_eq!(g.refused(Some(&c), &id(2), at(2)), Verdict::Condemn);
        assert!(matches!(
            g.refused(Some(&c), &id(3), at(3)),
            Verdict::Hold { refused: 3, .. }
        ));
        assert!(matches!(
            g.refused(Some(&c), &id(4), at(4)),
            Verdict::Hold { .. }
        ));
        g.succeeded(at(1));
        assert_eq!(g.refused(Some(&c), &id(5), at(5)), Verdict::Condemn);
        assert_eq!(g.refused(None, &id(6), at(5)), Verdict::Condemn, "off");
    }

    #[test]
    fn old_refusals_do_not_count_and_a_hold_without_success_is_believed() {
        let g = Guard::default();
        let c = MassRejectionGuard {
            threshold: 2,
            window: Duration::from_secs(60),
            hold: Duration::from_secs(3600),
        };
        assert_eq!(g.refused(Some(&c), &id(1), at(0)), Verdict::Condemn);
        assert_eq!(
            g.refused(Some(&c), &id(2), at(120)),
            Verdict::Condemn,
            "outside"
        );
        assert!(matches!(
            g.refused(Some(&c), &id(3), at(150)),
            Verdict::Hold { .. }
        ));
        assert_eq!(
            g.refused(Some(&c), &id(4), at(150 + 3600)),
            Verdict::HoldOver { log_at_trip: None },
            "held a whole hour without a success here: the fleet decides"
        );
        g.hold_again(at(150 + 3600), None);
        assert!(matches!(
            g.refused(Some(&c), &id(5), at(150 + 3601)),
            Verdict::Hold { began: false, .. }
        ));
        assert!(matches!(
            g.refused(Some(&c), &id(5), at(150 + 7200)),
            Verdict::HoldOver { .. }
        ));
        g.believe();
        assert_eq!(
            g.refused(Some(&c), &id(6), at(150 + 7201)),
            Verdict::Condemn,
            "believed"
        );
    }
}
