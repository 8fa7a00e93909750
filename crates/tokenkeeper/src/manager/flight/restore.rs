//! Putting back what the unsaved-tokens place holds: rotated tokens a flight could not store
//! (the store failed past its patience, or refused the write). Until they land, the store
//! holds the refresh token they retired, and presenting that one is a reuse (a lost
//! installation on a provider without a reuse leeway). So the manager restores them itself:
//! at start, and before any flight takes a lease while the place holds something; the
//! public `restore_unsaved*` methods do the same on demand.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokenkeeper_core::{Event, InstallationId, StoreError};
use tokio::time::Instant;

use crate::error::Error;
use crate::manager::Engine;
use crate::manager::events::LocalEventKind;
use crate::manager::unsaved::{UnsavedRestore, UnsavedTokens};

/// How long results a restore could not land wait before another restore tries them (a
/// flight of their own installation is refused meanwhile; others go on).
const KEPT_RETRY: Duration = Duration::from_secs(5);

/// What the last restore could not land.
#[derive(Debug, Default)]
pub(crate) struct KeptResults {
    /// Installations with a held result the store would not take.
    ids: HashSet<InstallationId>,
    /// When to try them again.
    retry_at: Option<Instant>,
}

fn lock(kept: &Mutex<KeptResults>) -> MutexGuard<'_, KeptResults> {
    kept.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine {
    /// Lands one held result on its installation (`LateRefreshed`: only over the refresh
    /// token it was obtained with).
    pub(crate) async fn restore_one(&self, unsaved: UnsavedTokens) -> Result<(), Error> {
        let id = unsaved.installation.clone();
        let revoked = std::sync::atomic::AtomicBool::new(false);
        let written = self
            .update(&id, |current, now| {
                self.owns(current)?;
                let is_revoked = matches!(current.state(), tokenkeeper_core::State::Revoked { .. });
                revoked.store(is_revoked, Ordering::Relaxed);
                let refresh_at = self.policy.refresh_at(&unsaved.tokens, now);
                let event = Event::LateRefreshed {
                    presented: unsaved.presented.clone(),
                    tokens: unsaved.tokens.clone(),
                    refresh_at,
                    obtained_under: unsaved.obtained_under.clone(),
                };
                current
                    .apply(event, now)
                    .map_err(|e| Error::transition(&id, e))
            })
            .await;
        let written = match written {
            Ok(written) => written,
            Err(e) => {
                if revoked.load(Ordering::Relaxed) {
                    self.revoke_held(&unsaved);
                }
                return Err(e);
            }
        };
        self.cache.forget(&id, Some(&written));
        self.emit(
            &id,
            LocalEventKind::Refreshed {
                expires_at: written.tokens().expires_at,
            },
        );
        Ok(())
    }

    /// A held result of an installation the application revoked can never land, and its
    /// tokens are live at a provider for which the retired token revoked with the
    /// installation was merely invalid: they are revoked too (best effort, in the background
    /// so no restore waits on the provider), as a late result meeting a revoked record is.
    fn revoke_held(&self, unsaved: &UnsavedTokens) {
        let client = self.client.clone();
        let id = unsaved.installation.clone();
        let tokens = unsaved.tokens.clone();
        tokio::spawn(async move {
            if let Err(e) = client.revoke_tokens(Some(&id), &tokens).await {
                tracing::warn!(installation = %id, error = %e, "could not revoke the held tokens of a revoked installation");
            }
        });
    }

    /// Notes that the place holds something new to put back.
    pub(crate) fn unsaved_held(&self) {
        self.unsaved_waiting.store(true, Ordering::SeqCst);
    }

    /// Before a flight takes `id`'s lease: puts back what the place holds if something new
    /// was kept there, a restore is running (waits for it), or results a restore could not
    /// land are due for another try (every [`KEPT_RETRY`]). True when a restore ran (the
    /// caller reads the record again).
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the place still holds a result of `id` that could not be stored:
    /// its retired refresh token must not be presented.
    pub(crate) async fn restore_waiting(&self, id: &InstallationId) -> Result<bool, Error> {
        let running = self.restoring.try_lock().is_err();
        let mut ran = false;
        if running || self.unsaved_waiting.load(Ordering::SeqCst) || self.kept_retry_due() {
            let _one = self.restoring.lock().await;
            // The flag is cleared with the lock held: a flight that finds it clear either
            // finds no restore running, or waits on the lock for the one that runs.
            if self.unsaved_waiting.swap(false, Ordering::SeqCst) || self.kept_retry_due() {
                let report = self.restore_all().await;
                if report != UnsavedRestore::default() {
                    tracing::warn!(?report, "put back what the unsaved-tokens place held");
                }
                ran = true;
            }
        }
        if lock(&self.unsaved_kept).ids.contains(id) {
            return Err(Error::store(
                id,
                StoreError::unavailable(
                    "unsaved-tokens place",
                    "restore",
                    "a rotated result of this installation is held and the store would not take it yet; its retired refresh token is not presented until it lands",
                ),
            ));
        }
        Ok(ran)
    }

    /// Whether results a restore could not land are due for another try.
    fn kept_retry_due(&self) -> bool {
        let kept = lock(&self.unsaved_kept);
        !kept.ids.is_empty() && kept.retry_at.is_none_or(|at| Instant::now() >= at)
    }

    /// Puts back everything the place holds, oldest first (see
    /// `TokenManager::restore_unsaved_files`).
    pub(crate) async fn restore_all(&self) -> UnsavedRestore {
        let place = &self.unsaved;
        let mut report = UnsavedRestore::default();
        let mut pending = place.pending(&self.seal).await;
        let mut kept = HashSet::new();
        // Passes until one lands nothing: a result whose predecessor lands later in the same
        // pass (the writers' clocks disagreed on `at`) lands in the next one.
        let mut obsolete = Vec::new();
        loop {
            let mut landed = false;
            for (file, read) in std::mem::take(&mut pending) {
                let unsaved = match read {
                    Ok(unsaved) => unsaved,
                    Err(e) => {
                        tracing::error!(file = ?file, error = %e, "an unsaved-tokens file could not be read; it is kept");
                        report.kept += 1;
                        continue;
                    }
                };
                match self.restore_one(unsaved.clone()).await {
                    Ok(()) => {
                        report.restored += 1;
                        landed = true;
                        place.remove(file).await;
                    }
                    Err(Error::Transition { .. }) => pending.push((file, Ok(unsaved))),
                    Err(e) => {
                        // The store failed, the installation is not in this store (a
                        // directory shared by several), or belongs to another consumer.
                        tracing::error!(installation = %unsaved.installation, error = %e, "unsaved tokens could not be restored; kept");
                        report.kept += 1;
                        kept.insert(unsaved.installation.clone());
                        place.keep_pending(file, unsaved);
                    }
                }
            }
            if !landed || pending.is_empty() {
                // A result waits on a predecessor that was kept (the store failed for it):
                // kept as well, not set aside (it lands after its predecessor does).
                for (file, read) in std::mem::take(&mut pending) {
                    match read {
                        Ok(unsaved) if kept.contains(&unsaved.installation) => {
                            report.kept += 1;
                            place.keep_pending(file, unsaved);
                        }
                        read => obsolete.push((file, read)),
                    }
                }
                break;
            }
        }
        *lock(&self.unsaved_kept) = KeptResults {
            retry_at: (!kept.is_empty()).then(|| Instant::now() + KEPT_RETRY),
            ids: kept,
        };
        for (file, read) in obsolete {
            if let Ok(unsaved) = read {
                tracing::warn!(installation = %unsaved.installation, "unsaved tokens are obsolete (the installation holds other tokens, or was authorized again or revoked); set aside");
            }
            report.obsolete += 1;
            place.set_aside(file).await;
        }
        // Flights that wait for the startup restore go on (whoever called this).
        self.restored.send_replace(true);
        report
    }
}
