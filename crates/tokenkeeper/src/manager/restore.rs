//! Putting back what the unsaved-tokens place holds: rotated tokens a flight could not store
//! (the store failed past its patience, or refused the write). Until they land, the store
//! holds the refresh token they retired, and presenting that one is a reuse (a lost
//! installation on a provider without a reuse leeway). So the manager restores them itself:
//! at start, and before any flight takes a lease while the place holds something; the
//! public `restore_unsaved*` methods do the same on demand.

use std::sync::atomic::Ordering;

use tokenkeeper_core::Event;

use super::Engine;
use super::events::LocalEventKind;
use super::unsaved::{UnsavedRestore, UnsavedTokens};
use crate::error::Error;

impl Engine {
    /// Lands one held result on its installation (`LateRefreshed`: only over the refresh
    /// token it was obtained with).
    pub(crate) async fn restore_one(&self, unsaved: UnsavedTokens) -> Result<(), Error> {
        let id = unsaved.installation.clone();
        let written = self
            .update(&id, |current, now| {
                self.owns(current)?;
                let refresh_at = self.policy.refresh_at(&unsaved.tokens, now);
                let event = Event::LateRefreshed {
                    presented: unsaved.presented.clone(),
                    tokens: unsaved.tokens.clone(),
                    refresh_at,
                };
                current
                    .apply(event, now)
                    .map_err(|e| Error::transition(&id, e))
            })
            .await?;
        self.cache.forget(&id, Some(&written));
        self.emit(
            &id,
            LocalEventKind::Refreshed {
                expires_at: written.tokens().expires_at,
            },
        );
        Ok(())
    }

    /// Notes that the place holds something to put back.
    pub(crate) fn unsaved_held(&self) {
        self.unsaved_waiting.store(true, Ordering::SeqCst);
    }

    /// Before a flight takes a lease: if the place may hold something, put it back first
    /// (one restore at a time; a flight that finds one running waits for it).
    pub(crate) async fn restore_waiting(&self) {
        if !self.unsaved_waiting.load(Ordering::SeqCst) {
            return;
        }
        let _one = self.restoring.lock().await;
        if self.unsaved_waiting.swap(false, Ordering::SeqCst) {
            let report = self.restore_all().await;
            if report.kept > 0 {
                // The store still fails (or a file cannot be read): try again next time.
                self.unsaved_held();
            }
            if report != UnsavedRestore::default() {
                tracing::warn!(?report, "put back what the unsaved-tokens place held");
            }
        }
    }

    /// Puts back everything the place holds, oldest first (see
    /// `TokenManager::restore_unsaved_files`).
    pub(crate) async fn restore_all(&self) -> UnsavedRestore {
        let place = &self.unsaved;
        let mut report = UnsavedRestore::default();
        let mut pending = place.pending(&self.seal).await;
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
                        place.keep_pending(file, unsaved);
                    }
                }
            }
            if !landed || pending.is_empty() {
                obsolete.append(&mut pending);
                break;
            }
        }
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
