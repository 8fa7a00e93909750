//! The last resort for rotated tokens the store would not take, and the drain that lets a
//! process stop without abandoning a refresh between the provider's reply and its write.
//!
//! Once the provider has rotated an installation's refresh token, the new one exists only in
//! this process's memory. A flight retries the write for `RefreshPolicy::result_write_patience`;
//! if the store still refuses, the tokens go to the [`UnsavedTokens`] sink instead of being
//! dropped, and [`TokenManager::restore_unsaved`](super::TokenManager::restore_unsaved) puts
//! them back once the store works again.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokenkeeper_core::{InstallationId, RefreshToken, Timestamp, TokenSet};
use tokio::sync::Notify;

/// Rotated tokens the store would not take: the only copy of an installation's new refresh
/// token. `Debug` shows no secret; keep the value itself as carefully as the store.
#[derive(Clone)]
pub struct UnsavedTokens {
    /// The installation.
    pub installation: InstallationId,
    /// The refresh token the flight presented (what the store still holds, unless a peer
    /// changed it since): restoring needs it to prove no peer rotated in between.
    pub presented: RefreshToken,
    /// The tokens the provider issued.
    pub tokens: TokenSet,
    /// When the flight gave up writing them.
    pub at: Timestamp,
    /// The store's last error, in words (no secret).
    pub error: String,
}

impl fmt::Debug for UnsavedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsavedTokens")
            .field("installation", &self.installation)
            .field("tokens", &self.tokens)
            .field("at", &self.at)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// Where unsaved tokens go (see `TokenManagerBuilder::on_unsaved_tokens`).
pub(crate) type UnsavedSink = Arc<dyn Fn(UnsavedTokens) + Send + Sync>;

/// The default sink: says loudly which installation lost its rotated tokens, and how to keep
/// them next time. (It cannot keep them itself without a place the operator chose.)
pub(crate) fn log_sink() -> UnsavedSink {
    Arc::new(|unsaved: UnsavedTokens| {
        tracing::error!(
            installation = %unsaved.installation,
            error = %unsaved.error,
            "the provider rotated this installation's tokens but the store would not take them; \
             they are lost unless TokenManagerBuilder::on_unsaved_tokens keeps them for \
             TokenManager::restore_unsaved"
        );
    })
}

/// Counts the flights that hold a lease (from taking it to their last write) and refuses new
/// ones once the manager is shutting down.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    closing: AtomicBool,
    idle: Notify,
}

/// One flight under a lease; dropping it ends the flight's share of the drain.
pub(crate) struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    /// Enters a flight, unless the manager is shutting down.
    pub(crate) fn enter(&self) -> Option<InFlightGuard<'_>> {
        self.count.fetch_add(1, Ordering::SeqCst);
        let guard = InFlightGuard(self);
        (!self.closing.load(Ordering::SeqCst)).then_some(guard)
    }

    /// Refuses new flights and waits until every flight in progress has written its result.
    pub(crate) async fn drain(&self) {
        self.closing.store(true, Ordering::SeqCst);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
