//! Single-flight: at most one refresh per installation in this process, whatever the number
//! of callers. The first caller (the leader) drives the refresh inline, which saves a task hop
//! on every refresh; if the leader is dropped mid-flight, the rest of the refresh is handed to
//! a spawned task ([`Detachable`]), so a caller that gives up can never cancel a refresh
//! between the provider's reply and the store write. Every other caller awaits the published
//! outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokenkeeper_core::{AccessToken, InstallationId};
use tokio::sync::watch;

use crate::error::Error;

pub(crate) type Outcome = Result<AccessToken, Error>;

type Map = Arc<Mutex<HashMap<InstallationId, watch::Receiver<Option<Outcome>>>>>;

/// The flights in progress.
#[derive(Default)]
pub(crate) struct Flights {
    map: Map,
}

impl Flights {
    /// Whether a flight for `id` is in progress (it may have read the record already and be
    /// about to cache it).
    pub(crate) fn in_progress(&self, id: &InstallationId) -> bool {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(id)
    }

    /// Joins the flight for `id`, or becomes its leader (who must start the work and land
    /// the outcome). Synchronous and allocation-light, so a thousand followers cost little.
    pub(crate) fn join(&self, id: &InstallationId) -> Joined {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = map.get(id) {
            return Joined::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(id.clone(), rx.clone());
        Joined::Leader(
            Landing {
                id: id.clone(),
                tx: Some(tx),
                map: self.map.clone(),
            },
            rx,
        )
    }
}

/// Waits for the outcome published on `rx`.
pub(crate) async fn wait(id: &InstallationId, mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or_else(|| unreachable_outcome(id)),
        Err(_) => Err(Error::Internal {
            id: id.clone(),
            reason: "the refresh task stopped without an answer".into(),
        }),
    }
}

/// A flight the leader drives inline; dropped before it finishes, it finishes in a spawned
/// task instead (or, with no runtime left, is abandoned and its lease lapses).
pub(crate) struct Detachable {
    work: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl Detachable {
    pub(crate) fn new(work: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self {
            work: Some(Box::pin(work)),
        }
    }
}

impl std::future::Future for Detachable {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let Some(work) = self.work.as_mut() else {
            return std::task::Poll::Ready(());
        };
        match work.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.work = None;
                std::task::Poll::Ready(())
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl Drop for Detachable {
    fn drop(&mut self) {
        if let Some(work) = self.work.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(work);
        }
    }
}

/// The caller's part in a flight.
pub(crate) enum Joined {
    /// Start the work, land the outcome, and wait like everyone else.
    Leader(Landing, watch::Receiver<Option<Outcome>>),
    /// Wait for the leader's outcome.
    Follower(watch::Receiver<Option<Outcome>>),
}

fn unreachable_outcome(id: &InstallationId) -> Outcome {
    Err(Error::Internal {
        id: id.clone(),
        reason: "a flight published no outcome".into(),
    })
}

/// The right (and duty) to publish one flight's outcome. Dropped unlanded (the task
/// panicked), it still ends the flight, so the next caller starts a fresh one.
pub(crate) struct Landing {
    id: InstallationId,
    tx: Option<watch::Sender<Option<Outcome>>>,
    map: Map,
}

impl Landing {
    /// Ends the flight: later callers start a new one, current ones get `outcome`.
    pub(crate) fn land(mut self, outcome: Outcome) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(outcome));
        }
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.map
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
        }
    }
}
