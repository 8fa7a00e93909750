//! The success path of a flight: the provider rotated the tokens, and they are written to
//! the store before anyone uses them (the rotated refresh token exists nowhere else). A result
//! the lease can no longer write lands as `LateRefreshed` on whatever is stored, or goes to the
//! unsaved-tokens place; it is never dropped.

use tokenkeeper_core::{
    CasOutcome, ErrorDetail, FailureClass, InstallationId, LeaseHolder, Record, RefreshToken,
    StoreError, Timestamp, TokenSet,
};

use super::decide::Mode;
use super::lease::HeldLease;
use super::retry::{self, applied};
use super::writes::{ResultConflict, ResultWrite};
use super::{Step, cache_insert};
use crate::error::Error;
use crate::manager::Engine;
use crate::manager::events::LocalEventKind;
use crate::manager::unsaved::UnsavedTokens;
use crate::oauth::Probe;

/// The provider rotated the tokens: write them before anyone uses them (the rotated refresh
/// token exists nowhere else), then cache, announce and serve them.
pub(super) async fn on_refreshed(
    engine: &Engine,
    id: &InstallationId,
    mode: &Mode,
    held: &mut HeldLease,
    tokens: TokenSet,
    now: Timestamp,
) -> Step {
    let Some(presented) = held.record().tokens().refresh_token.clone() else {
        // Unreachable: the client refuses to refresh without a refresh token.
        return Step::Done(Err(Error::Internal {
            id: id.clone(),
            reason: "refreshed without a refresh token".into(),
        }));
    };
    let refresh_at = engine.policy.refresh_at(&tokens, now);
    let anomaly = reply_anomaly(engine, &presented, &tokens);
    // What the write lands is newer than anything this cache saw before it.
    let written = (now, engine.cache.generation());
    if let Some(anomaly) = &anomaly {
        tracing::error!(anomaly = %anomaly, "the provider's refresh reply is irregular; it is kept and the anomaly recorded");
    }
    match land(engine, held, presented, tokens, refresh_at, anomaly).await {
        Landed::Written(next) if next.tokens().access_token.secret().is_empty() => {
            // The rotated refresh token is stored; there is just no access token to serve.
            Step::Done(Err(Error::TemporarilyUnavailable {
                id: id.clone(),
                retry_at: now,
                detail: ErrorDetail {
                    description: Some(
                        "the provider rotated the refresh token but sent no access token; the new refresh token is stored and the next call refreshes again".into(),
                    ),
                    ..ErrorDetail::new(FailureClass::Transient)
                },
            }))
        }
        Landed::Written(next) => {
            engine.guard.succeeded(now);
            let stale_at = engine.policy.stale_at(next.tokens());
            engine
                .cache
                .put(&next, stale_at, written, cache_insert(mode));
            engine.emit(
                id,
                LocalEventKind::Refreshed {
                    expires_at: next.tokens().expires_at,
                },
            );
            tracing::info!(expires_at = %next.tokens().expires_at, "refreshed");
            Step::Done(Ok(next.tokens().access_token.clone()))
        }
        Landed::Superseded => {
            tracing::warn!(
                "a peer stored newer tokens while this refresh was in flight; its result is discarded"
            );
            Step::Reread
        }
        Landed::Failed(e) => Step::Done(Err(e)),
    }
}

/// What is irregular about a refresh reply that is kept anyway (the reply has already been
/// merged onto the previous tokens, so a missing refresh token shows as an unrotated one).
fn reply_anomaly(
    engine: &Engine,
    presented: &RefreshToken,
    tokens: &TokenSet,
) -> Option<ErrorDetail> {
    let mut notes = Vec::new();
    if engine.client.consumer().profile().rotation.rotates() && !tokens.rotated_from(presented) {
        notes.push(
            "the reply carried no new refresh token although this provider rotates them; the previous one is kept but the provider has likely retired it, so the next refresh may be refused",
        );
    }
    if tokens.access_token.secret().is_empty() {
        notes.push("the reply carried no access token");
    }
    if !tokens.token_type.eq_ignore_ascii_case("bearer") {
        notes.push("the reply's token type is not bearer");
    }
    (!notes.is_empty()).then(|| ErrorDetail {
        description: Some(notes.join("; ")),
        ..ErrorDetail::new(FailureClass::Configuration)
    })
}

/// How writing a refresh result ended.
enum Landed {
    /// Stored (under the lease, or on top of a peer's record as a late result).
    Written(Box<Record>),
    /// A peer holds newer tokens (or the installation was re-authorized, revoked or deleted):
    /// this result is obsolete.
    Superseded,
    /// Not written: the store refused for longer than `result_write_patience` (the tokens
    /// went to the unsaved-tokens sink), or the state machine refused the write.
    Failed(Error),
}

/// Writes a refresh result; never drops it while the stored record still holds the refresh
/// token this flight presented. Under the lease it is a `Refreshed` write; once the lease is
/// lost (a conflict), it is a `LateRefreshed` write on top of whatever is stored, which the
/// state machine accepts only while that record still holds `presented`. Store errors are
/// retried for `result_write_patience` (a short grace while shutting down), renewing the
/// lease meanwhile (so no peer takes it over and presents the rotated-away token); after that
/// the tokens go to the unsaved-tokens sink, as do rotated tokens that can no longer land (a
/// new grant is stored): they are live at the provider and exist nowhere else.
async fn land(
    engine: &Engine,
    held: &mut HeldLease,
    presented: RefreshToken,
    tokens: TokenSet,
    refresh_at: Timestamp,
    anomaly: Option<ErrorDetail>,
) -> Landed {
    let id = held.record().id().clone();
    let mut landing = Landing::new(held, presented, tokens, refresh_at, anomaly);
    let mut retry = retry::Patience::new(engine, engine.policy.result_write_patience);
    let (last_error, last) = loop {
        let (next, expected) = match landing.write.next_write(held.record(), engine.clock.now()) {
            Ok(write) => write,
            Err(e) => return Landed::Failed(Error::transition(&id, e)),
        };
        match engine.store.compare_and_swap(&next, expected).await {
            Ok(CasOutcome::Swapped) => return Landed::Written(Box::new(next)),
            Ok(CasOutcome::Missing) => return Landed::Superseded,
            Ok(CasOutcome::Conflict(stored)) => {
                if let Some(landed) = landing.on_conflict(engine, held, &stored, next).await {
                    return landed;
                }
            }
            Err(e) => {
                landing.not_durable |= e.is_not_durable();
                if !retry.wait(&e).await {
                    break (e, next);
                }
                landing.write.retry(next, expected);
                if !landing.write.lease_lost() {
                    held.renew_if_due(engine).await;
                }
            }
        }
    };
    landing.unwritten(engine, last, last_error).await
}

/// One result on its way to the store, across the write attempts of [`land`]: the pure
/// sequence ([`ResultWrite`], which the model checker drives too) and what the engine adds
/// around it (the sink, the provider check of review E7).
struct Landing {
    id: InstallationId,
    /// The lease the result was obtained under.
    under: Option<LeaseHolder>,
    tokens: TokenSet,
    write: ResultWrite,
    /// A write the store applied without its configured durability (a Redis `WAIT`
    /// shortfall) may vanish in a failover even once we see it stored: then a copy goes to
    /// the unsaved place as well (a restore sets it aside as obsolete if the write survived).
    not_durable: bool,
}

impl Landing {
    fn new(
        held: &HeldLease,
        presented: RefreshToken,
        tokens: TokenSet,
        refresh_at: Timestamp,
        anomaly: Option<ErrorDetail>,
    ) -> Self {
        let record = held.record();
        Self {
            id: record.id().clone(),
            under: record.state().lease().map(|l| l.holder.clone()),
            write: ResultWrite::new(record, presented, tokens.clone(), refresh_at, anomaly),
            tokens,
            not_durable: false,
        }
    }

    fn presented(&self) -> &RefreshToken {
        self.write.presented()
    }

    /// Another version is stored: ours after all (applied, reported failed), a renewal of
    /// ours, or a peer's, on which the result lands late while it still holds the presented
    /// token. `Some` ends the landing.
    async fn on_conflict(
        &mut self,
        engine: &Engine,
        held: &mut HeldLease,
        stored: &Record,
        next: Record,
    ) -> Option<Landed> {
        let now = engine.clock.now();
        match self.write.on_conflict(held.record(), stored, &next, now) {
            // Our own write is there: the store applied it but reported a failure (e.g.
            // replicas did not confirm it in time).
            ResultConflict::Written => {
                if self.not_durable && self.tokens.rotated_from(self.presented()) {
                    let why = "written, but without the store's configured durability at first";
                    self.sink(engine, why.to_owned()).await;
                }
                Some(Landed::Written(Box::new(next)))
            }
            // One of our renewals landed unacknowledged: still our lease; recompute.
            ResultConflict::Adopt => {
                held.adopt_if_ours(stored);
                None
            }
            ResultConflict::Late if self.grant_revoked_under_verdict(engine, stored).await => {
                Some(Landed::Superseded)
            }
            ResultConflict::Late => {
                tracing::warn!(
                    stored = %stored.state().kind(),
                    "the lease was lost before the result was written; the stored record still holds the presented refresh token, so the result lands on top of it"
                );
                None
            }
            ResultConflict::Obsolete => {
                let held_by = (self.presented().clone(), self.under.clone());
                let tokens = self.tokens.clone();
                Some(obsolete(engine, &self.id, stored, held_by, tokens).await)
            }
        }
    }

    /// Whether a peer's verdict on the presented token is to stand although this result could
    /// revive it (review E7): on a rotating provider the verdict may have come from presenting
    /// the retired token, and reuse detection then revoked the whole grant, this result's
    /// tokens with it. One harmless call with the result's access token (the profile's
    /// identity endpoint) tells: refused, the verdict stands and the dead tokens are dropped;
    /// accepted or no answer, the result lands (in doubt, as the revival records).
    async fn grant_revoked_under_verdict(&self, engine: &Engine, stored: &Record) -> bool {
        let verdict = matches!(
            stored.state(),
            tokenkeeper_core::State::ReauthorizationRequired { .. }
        );
        let holds_presented = stored.tokens().refresh_token.as_ref() == Some(self.presented());
        if !verdict || !holds_presented || !engine.client.consumer().profile().rotation.rotates() {
            return false;
        }
        let probe = engine.client.probe(&self.tokens.access_token).await;
        let Probe::Refused(status) = probe else {
            return false;
        };
        tracing::warn!(
            status,
            "a late result would revive a condemned installation, but the provider refuses its access token: the grant was revoked (reuse detection), so the verdict stands"
        );
        true
    }

    /// The store would not take the result within the patience: applied after all, or to
    /// the unsaved-tokens sink if it rotated the refresh token.
    async fn unwritten(self, engine: &Engine, last: Record, error: StoreError) -> Landed {
        if applied(engine, &last, &error).await {
            return Landed::Written(Box::new(last));
        }
        if self.tokens.rotated_from(self.presented()) {
            tracing::error!(error = %error, "the store did not take the rotated tokens; handing them to the unsaved-tokens sink");
            self.sink(engine, error.to_string()).await;
        } else {
            // Nothing rotated: the stored refresh token still works; nothing to keep.
            tracing::warn!(error = %error, "the store did not take the refreshed access token; the stored refresh token still works");
        }
        Landed::Failed(Error::store(&self.id, error))
    }

    async fn sink(&self, engine: &Engine, why: String) {
        let held_by = (self.presented().clone(), self.under.clone());
        sink(engine, &self.id, held_by, self.tokens.clone(), why).await;
    }
}

/// A result the stored record refuses: revoked (its live tokens are revoked at the provider
/// too), or holding another refresh token (a peer rotated inside a reuse leeway, or a new
/// grant was stored). A rotated result is still live at the provider and stored nowhere
/// else, so it goes to the unsaved-tokens sink rather than vanishing.
async fn obsolete(
    engine: &Engine,
    id: &InstallationId,
    stored: &Record,
    obtained: (RefreshToken, Option<LeaseHolder>),
    tokens: TokenSet,
) -> Landed {
    if matches!(stored.state(), tokenkeeper_core::State::Revoked { .. }) {
        revoke_orphan(engine, id, &tokens).await;
    } else if tokens.rotated_from(&obtained.0) {
        tracing::warn!(
            stored = %stored.state().kind(),
            "the stored record holds another refresh token; this result's rotated tokens go to the unsaved-tokens sink"
        );
        let why =
            "the stored record holds another refresh token (a new grant, or a peer's rotation)";
        sink(engine, id, obtained, tokens, why.to_owned()).await;
    }
    Landed::Superseded
}

/// Hands rotated tokens that could not be stored to the unsaved-tokens place, with the
/// refresh token presented and the lease they were obtained under.
async fn sink(
    engine: &Engine,
    id: &InstallationId,
    (presented, obtained_under): (RefreshToken, Option<LeaseHolder>),
    tokens: TokenSet,
    error: String,
) {
    let unsaved = UnsavedTokens {
        installation: id.clone(),
        presented,
        obtained_under,
        tokens,
        at: engine.clock.now(),
        error,
    };
    engine.unsaved.keep(&engine.seal, unsaved).await;
    // The next flight puts it back before presenting anything (`restore.rs`).
    engine.unsaved_held();
}

/// The application revoked the installation while this flight's refresh was on its way: the
/// provider's new tokens are live but nowhere stored. Revoke them at the provider too (best
/// effort), or the grant would survive the revocation.
async fn revoke_orphan(engine: &Engine, id: &InstallationId, tokens: &TokenSet) {
    if let Err(e) = engine.client.revoke_tokens(Some(id), tokens).await {
        tracing::warn!(error = %e, "could not revoke the tokens of a refresh that raced the revocation");
    }
}
