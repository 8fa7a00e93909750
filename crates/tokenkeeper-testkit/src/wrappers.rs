//! Store wrappers for adversarial tests: a store that fails on command ([`FlakyStore`]) and
//! one that holds a chosen write until the test lets it through ([`GatedStore`]).
//!
//! Both delegate everything else to the wrapped store, so the contract under test is the real
//! backend's. A write is recognised by the last history event of the record being written
//! (`Refreshed`, `LeaseAcquired`, ...), which is how the engine's steps differ on the wire.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventKind, InstallationId, ListFilter, ListPage,
    Record, StoreError, Timestamp, TokenStore,
};
use tokio::sync::{Notify, watch};

const BACKEND: &str = "flaky";

/// The event that produced `record` (its newest history entry).
fn last_event(record: &Record) -> Option<EventKind> {
    record.history().last().map(|h| h.event)
}

/// What a [`FlakyStore`] fails while its switch is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultTarget {
    /// Every operation.
    Everything,
    /// Writes (`create`, `compare_and_swap`, `delete`).
    Writes,
    /// Compare-and-swaps writing a record produced by this event.
    WritesOf(EventKind),
}

/// How a [`FlakyStore`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `StoreError::Unavailable` (retryable).
    Unavailable,
    /// `StoreError::Backend` (not retryable by kind).
    Backend,
}

/// The switch of a [`FlakyStore`], shared with the test.
#[derive(Debug, Default)]
pub struct FaultSwitch {
    rule: Mutex<Option<(FaultTarget, FaultKind)>>,
    injected: AtomicU64,
}

impl FaultSwitch {
    /// From now on, fail `target` operations with `kind`.
    pub fn fail(&self, target: FaultTarget, kind: FaultKind) {
        *self.rule.lock().unwrap_or_else(PoisonError::into_inner) = Some((target, kind));
    }

    /// Stop failing.
    pub fn heal(&self) {
        *self.rule.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// How many operations were failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn check(
        &self,
        operation: &'static str,
        write: bool,
        event: Option<EventKind>,
    ) -> Result<(), StoreError> {
        let rule = *self.rule.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((target, kind)) = rule else {
            return Ok(());
        };
        let hit = match target {
            FaultTarget::Everything => true,
            FaultTarget::Writes => write,
            FaultTarget::WritesOf(kind) => write && event == Some(kind),
        };
        if !hit {
            return Ok(());
        }
        self.injected.fetch_add(1, Ordering::SeqCst);
        let source = format!("injected fault on {operation}");
        Err(match kind {
            FaultKind::Unavailable => StoreError::unavailable(BACKEND, operation, source),
            FaultKind::Backend => StoreError::backend(BACKEND, operation, source),
        })
    }
}

/// A store that fails on command (see [`FaultSwitch`]).
#[derive(Debug)]
pub struct FlakyStore<S> {
    inner: S,
    switch: Arc<FaultSwitch>,
}

impl<S: TokenStore> FlakyStore<S> {
    /// Wraps `inner`; the switch starts off.
    pub fn new(inner: S) -> (Self, Arc<FaultSwitch>) {
        let switch = Arc::new(FaultSwitch::default());
        (
            Self {
                inner,
                switch: switch.clone(),
            },
            switch,
        )
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for FlakyStore<S> {
    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        self.switch.check("get", false, None)?;
        self.inner.get(id).await
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.switch.check("create", true, last_event(record))?;
        self.inner.create(record).await
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected: u64,
    ) -> Result<CasOutcome, StoreError> {
        self.switch
            .check("compare_and_swap", true, last_event(record))?;
        self.inner.compare_and_swap(record, expected).await
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        self.switch.check("delete", true, None)?;
        self.inner.delete(id, expected).await
    }

    async fn due(
        &self,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        self.switch.check("due", false, None)?;
        self.inner.due(before, after, limit).await
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.switch.check("list", false, None)?;
        self.inner.list(filter, after, limit).await
    }
}

/// The gate of a [`GatedStore`], shared with the test.
#[derive(Debug)]
pub struct Gate {
    event: EventKind,
    armed: AtomicBool,
    held: watch::Sender<bool>,
    release: Notify,
    released: AtomicBool,
}

impl Gate {
    /// Waits until a write is being held at the gate.
    pub async fn held(&self) {
        let mut rx = self.held.subscribe();
        let _ = rx.wait_for(|held| *held).await;
    }

    /// Lets the held write (and every later one) through.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

/// A store that holds the first compare-and-swap of a record produced by a chosen event
/// until [`Gate::release`]: a process paused between two steps of the protocol.
#[derive(Debug)]
pub struct GatedStore<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S: TokenStore> GatedStore<S> {
    /// Wraps `inner`, holding the first write of an `event` record.
    pub fn new(inner: S, event: EventKind) -> (Self, Arc<Gate>) {
        let gate = Arc::new(Gate {
            event,
            armed: AtomicBool::new(true),
            held: watch::Sender::new(false),
            release: Notify::new(),
            released: AtomicBool::new(false),
        });
        (
            Self {
                inner,
                gate: gate.clone(),
            },
            gate,
        )
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for GatedStore<S> {
    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        self.inner.get(id).await
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.inner.create(record).await
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected: u64,
    ) -> Result<CasOutcome, StoreError> {
        let gate = &self.gate;
        if last_event(record) == Some(gate.event) && gate.armed.swap(false, Ordering::SeqCst) {
            let released = gate.release.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            gate.held.send_replace(true);
            if !gate.released.load(Ordering::SeqCst) {
                released.await;
            }
        }
        self.inner.compare_and_swap(record, expected).await
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        self.inner.delete(id, expected).await
    }

    async fn due(
        &self,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        self.inner.due(before, after, limit).await
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.inner.list(filter, after, limit).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokenkeeper_core::conformance::{T0, lease, sample_record};
    use tokenkeeper_memory::MemoryStore;

    use super::*;

    fn later(secs: u64) -> Timestamp {
        T0.saturating_add(Duration::from_secs(secs))
    }

    #[tokio::test]
    async fn the_flaky_store_fails_only_what_it_is_told() {
        let (store, switch) = FlakyStore::new(MemoryStore::new());
        let id = InstallationId::new("i").unwrap();
        let r = sample_record(&id, T0);
        store.create(&r).await.unwrap();
        switch.fail(
            FaultTarget::WritesOf(EventKind::Refreshed),
            FaultKind::Unavailable,
        );
        let leased = lease(&r, "h", later(60), later(1));
        // A lease write is not a `Refreshed` write: it goes through.
        assert_eq!(
            store.compare_and_swap(&leased, 1).await.unwrap(),
            CasOutcome::Swapped
        );
        switch.fail(FaultTarget::Everything, FaultKind::Backend);
        assert!(matches!(
            store.get(&id).await,
            Err(StoreError::Backend { .. })
        ));
        assert_eq!(switch.injected(), 1);
        switch.heal();
        assert_eq!(store.get(&id).await.unwrap().unwrap().version(), 2);
    }

    #[tokio::test]
    async fn the_gated_store_holds_one_write_until_released() {
        let (store, gate) = GatedStore::new(MemoryStore::new(), EventKind::LeaseAcquired);
        let store = Arc::new(store);
        let id = InstallationId::new("i").unwrap();
        let r = sample_record(&id, T0);
        store.create(&r).await.unwrap();
        let leased = lease(&r, "h", later(60), later(1));
        let writer = {
            let (store, leased) = (store.clone(), leased.clone());
            tokio::spawn(async move { store.compare_and_swap(&leased, 1).await })
        };
        gate.held().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.get(&id).await.unwrap().unwrap().version(), 1, "held");
        gate.release();
        assert_eq!(writer.await.unwrap().unwrap(), CasOutcome::Swapped);
        // Disarmed after the first hold.
        let again = lease(&leased, "h2", later(120), later(61));
        assert_eq!(
            store.compare_and_swap(&again, 2).await.unwrap(),
            CasOutcome::Swapped
        );
    }
}

/// A store that counts compare-and-swap calls (every lease, result and failure write), so a
/// test can bound how many writes a fleet member made.
#[derive(Debug)]
pub struct CountingStore<S> {
    inner: S,
    swaps: Arc<AtomicU64>,
}

impl<S: TokenStore> CountingStore<S> {
    /// Wraps `inner`; the counter starts at zero.
    pub fn new(inner: S) -> (Self, Arc<AtomicU64>) {
        let swaps = Arc::new(AtomicU64::new(0));
        (
            Self {
                inner,
                swaps: swaps.clone(),
            },
            swaps,
        )
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for CountingStore<S> {
    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        self.inner.get(id).await
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.inner.create(record).await
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected: u64,
    ) -> Result<CasOutcome, StoreError> {
        self.swaps.fetch_add(1, Ordering::SeqCst);
        self.inner.compare_and_swap(record, expected).await
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        self.inner.delete(id, expected).await
    }

    async fn due(
        &self,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        self.inner.due(before, after, limit).await
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.inner.list(filter, after, limit).await
    }
}
