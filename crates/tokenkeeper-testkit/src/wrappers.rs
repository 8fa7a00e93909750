//! Store wrappers for adversarial tests: a store that fails on command ([`FlakyStore`]), one
//! that holds a chosen write (before it runs, or after it landed) until the test lets it
//! through ([`GatedStore`]), one that counts writes ([`CountingStore`]), and one that counts
//! reads and can pause a reader between its read and its use of it ([`ReadStore`]).
//!
//! All three are one [`Hooked`] store: it delegates everything to the wrapped store after
//! asking its [`Hook`] (and tells the hook about every compare-and-swap that landed), so the contract under test is the real backend's. A write is
//! recognised by the last history event of the record being written (`Refreshed`,
//! `LeaseAcquired`, ...), which is how the engine's steps differ on the wire.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventKind, InstallationId, ListFilter, ListPage,
    Record, StateCounts, StoreError, Timestamp, TokenStore,
};
use tokio::sync::{Notify, watch};

/// A store operation, as a [`Hook`] sees it before it runs.
#[derive(Debug, Clone, Copy)]
pub enum Operation<'a> {
    /// `get`.
    Get,
    /// `create` of this record.
    Create(&'a Record),
    /// `compare_and_swap` writing this record.
    CompareAndSwap(&'a Record),
    /// `delete`.
    Delete,
    /// `due`.
    Due,
    /// `list`.
    List,
    /// `claim_flow`, `settle_flow` or `get_flow`.
    Flow,
    /// `read_events`.
    Events,
}

impl Operation<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Create(_) => "create",
            Self::CompareAndSwap(_) => "compare_and_swap",
            Self::Delete => "delete",
            Self::Due => "due",
            Self::Flow => "flow",
            Self::List => "list",
            Self::Events => "read_events",
        }
    }

    fn is_write(&self) -> bool {
        matches!(
            self,
            Self::Create(_) | Self::CompareAndSwap(_) | Self::Delete
        )
    }

    /// The event that produced the record being written (its newest history entry).
    fn event(&self) -> Option<EventKind> {
        match self {
            Self::Create(r) | Self::CompareAndSwap(r) => r.history().last().map(|h| h.event),
            _ => None,
        }
    }
}

/// What a [`Hooked`] store asks before each operation: an error fails it, a pending future
/// holds it.
#[async_trait]
pub trait Hook: Send + Sync + std::fmt::Debug + 'static {
    /// Runs before `operation`; an error is returned instead of running it.
    async fn before(&self, operation: Operation<'_>) -> Result<(), StoreError>;

    /// Runs after a write of `record` (a create or a compare-and-swap) landed, before its
    /// caller hears so; a pending future holds the caller (a process paused right after a
    /// write), an error is returned instead of the success (an acknowledgement lost on the
    /// way back).
    async fn written(&self, record: &Record) -> Result<(), StoreError> {
        let _ = record;
        Ok(())
    }

    /// Runs after a `get` returned, before its caller hears the answer; a pending future
    /// holds the caller (a process paused between reading a record and using it).
    async fn got(&self) {}

    /// Runs after a `claim_flow` stored its claim, before its caller hears so; an error is
    /// returned instead (the claim's acknowledgement lost on the way back).
    async fn flow_claimed(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A store that asks its hook before every operation.
#[derive(Debug)]
pub struct Hooked<S, H> {
    inner: S,
    hook: Arc<H>,
    home: Option<tokenkeeper_core::UnsavedHome>,
}

impl<S: TokenStore, H: Hook> Hooked<S, H> {
    /// Wraps `inner` with `hook`; the hook is returned for the test to drive.
    pub fn new(inner: S, hook: H) -> (Self, Arc<H>) {
        let hook = Arc::new(hook);
        (
            Self {
                inner,
                hook: hook.clone(),
                home: None,
            },
            hook,
        )
    }

    /// Answers `unsaved_tokens_home` with `home` instead of the inner store's answer (a
    /// memory store posing as a network store, whose home is unknown).
    pub fn with_unsaved_home(mut self, home: tokenkeeper_core::UnsavedHome) -> Self {
        self.home = Some(home);
        self
    }
}

#[async_trait]
impl<S: TokenStore, H: Hook> TokenStore for Hooked<S, H> {
    fn unsaved_tokens_home(&self) -> tokenkeeper_core::UnsavedHome {
        self.home
            .clone()
            .unwrap_or_else(|| self.inner.unsaved_tokens_home())
    }

    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        self.hook.before(Operation::Get).await?;
        let read = self.inner.get(id).await;
        self.hook.got().await;
        read
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.hook.before(Operation::Create(record)).await?;
        self.inner.create(record).await?;
        self.hook.written(record).await
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected: u64,
    ) -> Result<CasOutcome, StoreError> {
        self.hook.before(Operation::CompareAndSwap(record)).await?;
        let outcome = self.inner.compare_and_swap(record, expected).await;
        if let Ok(CasOutcome::Swapped) = outcome {
            self.hook.written(record).await?;
        }
        outcome
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        self.hook.before(Operation::Delete).await?;
        self.inner.delete(id, expected).await
    }

    async fn due(
        &self,
        consumer: &str,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        self.hook.before(Operation::Due).await?;
        self.inner.due(consumer, before, after, limit).await
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.hook.before(Operation::List).await?;
        self.inner.list(filter, after, limit).await
    }

    /// A count is a listing read: it goes through the hook as [`Operation::List`].
    async fn count_states(&self, cap: u64) -> Result<StateCounts, StoreError> {
        self.hook.before(Operation::List).await?;
        self.inner.count_states(cap).await
    }

    async fn claim_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.hook.before(Operation::Flow).await?;
        let claimed = self.inner.claim_flow(flow, value, ttl).await?;
        if claimed.is_none() {
            self.hook.flow_claimed().await?;
        }
        Ok(claimed)
    }

    async fn settle_flow(&self, flow: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        self.hook.before(Operation::Flow).await?;
        self.inner.settle_flow(flow, value, ttl).await
    }

    async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.hook.before(Operation::Flow).await?;
        self.inner.get_flow(flow).await
    }

    async fn read_events(
        &self,
        after: &tokenkeeper_core::EventCursor,
        limit: usize,
    ) -> Result<tokenkeeper_core::EventPage, StoreError> {
        self.hook.before(Operation::Events).await?;
        self.inner.read_events(after, limit).await
    }

    async fn event_head(&self) -> Result<tokenkeeper_core::EventCursor, StoreError> {
        self.hook.before(Operation::Events).await?;
        self.inner.event_head().await
    }
}

/// What a [`FlakyStore`] fails while its switch is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultTarget {
    /// Every operation.
    Everything,
    /// Writes (`create`, `compare_and_swap`, `delete`).
    Writes,
    /// Writes of a record produced by this event.
    WritesOf(EventKind),
}

/// How a [`FlakyStore`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `StoreError::Unavailable` (retryable).
    Unavailable,
    /// `StoreError::Backend` (not retryable by kind).
    Backend,
    /// The write is applied, then reported `StoreError::Unavailable`: an acknowledgement
    /// lost on the way back (a timeout after the server committed). Creates and
    /// compare-and-swaps are hit; other operations pass.
    LostAck,
}

/// What runs after each lost acknowledgement (see [`FaultSwitch::after_lost_ack`]).
type AfterLostAck = Arc<dyn Fn() + Send + Sync>;

/// The switch of a [`FlakyStore`], shared with the test.
#[derive(Default)]
pub struct FaultSwitch {
    rule: Mutex<Option<(FaultTarget, FaultKind)>>,
    injected: AtomicU64,
    after_lost_ack: Mutex<Option<AfterLostAck>>,
}

impl std::fmt::Debug for FaultSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultSwitch")
            .field("rule", &self.rule)
            .field("injected", &self.injected)
            .finish_non_exhaustive()
    }
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

    /// Runs `then` after each lost acknowledgement, before the writer hears the error: a
    /// test moves its manual clock on by the time a real timeout takes, so a writer that
    /// recomputed its record instead of resending it would write a different one.
    pub fn after_lost_ack(&self, then: impl Fn() + Send + Sync + 'static) {
        *self
            .after_lost_ack
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(then));
    }

    /// How many operations were failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }
}

impl FaultSwitch {
    /// The fault to inject into `operation` now, if any.
    fn hit(&self, operation: Operation<'_>) -> Option<FaultKind> {
        let (target, kind) = (*self.rule.lock().unwrap_or_else(PoisonError::into_inner))?;
        let hit = match target {
            FaultTarget::Everything => true,
            FaultTarget::Writes => operation.is_write(),
            FaultTarget::WritesOf(event) => operation.event() == Some(event),
        };
        hit.then_some(kind)
    }
}

#[async_trait]
impl Hook for FaultSwitch {
    async fn written(&self, record: &Record) -> Result<(), StoreError> {
        if self.hit(Operation::CompareAndSwap(record)) != Some(FaultKind::LostAck) {
            return Ok(());
        }
        self.injected.fetch_add(1, Ordering::SeqCst);
        let then = self
            .after_lost_ack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(then) = then {
            then();
        }
        Err(StoreError::unavailable(
            "flaky",
            "compare_and_swap",
            "injected fault: the write was applied, its acknowledgement lost",
        ))
    }

    async fn before(&self, operation: Operation<'_>) -> Result<(), StoreError> {
        // A lost acknowledgement lets the write run (and fails it in `swapped`).
        let Some(kind) = self.hit(operation).filter(|k| *k != FaultKind::LostAck) else {
            return Ok(());
        };
        self.injected.fetch_add(1, Ordering::SeqCst);
        let (name, source) = (
            operation.name(),
            format!("injected fault on {}", operation.name()),
        );
        Err(match kind {
            FaultKind::Unavailable | FaultKind::LostAck => {
                StoreError::unavailable("flaky", name, source)
            }
            FaultKind::Backend => StoreError::backend("flaky", name, source),
        })
    }
}

/// A store that fails on command (see [`FaultSwitch`]).
pub type FlakyStore<S> = Hooked<S, FaultSwitch>;

impl<S: TokenStore> FlakyStore<S> {
    /// Wraps `inner`; the switch starts off.
    pub fn flaky(inner: S) -> (Self, Arc<FaultSwitch>) {
        Self::new(inner, FaultSwitch::default())
    }
}

/// The gate of a [`GatedStore`], shared with the test.
#[derive(Debug)]
pub struct Gate {
    event: EventKind,
    /// Hold the caller after its write landed instead of before it runs.
    after: bool,
    armed: AtomicBool,
    held: watch::Sender<bool>,
    release: Notify,
    released: AtomicBool,
}

impl Gate {
    /// A gate that holds the first write of a record produced by `event`.
    pub fn on(event: EventKind) -> Self {
        Self {
            event,
            after: false,
            armed: AtomicBool::new(true),
            held: watch::Sender::new(false),
            release: Notify::new(),
            released: AtomicBool::new(false),
        }
    }

    /// A gate that lets the first write of a record produced by `event` land, then holds its
    /// caller: a process paused right after that write.
    pub fn after(event: EventKind) -> Self {
        Self {
            after: true,
            ..Self::on(event)
        }
    }

    /// Holds the caller until [`Gate::release`], if this write is the one to hold.
    async fn hold(&self, event: Option<EventKind>) {
        if event == Some(self.event) && self.armed.swap(false, Ordering::SeqCst) {
            let released = self.release.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            self.held.send_replace(true);
            if !self.released.load(Ordering::SeqCst) {
                released.await;
            }
        }
    }

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

#[async_trait]
impl Hook for Gate {
    async fn before(&self, operation: Operation<'_>) -> Result<(), StoreError> {
        if !self.after && matches!(operation, Operation::CompareAndSwap(_)) {
            self.hold(operation.event()).await;
        }
        Ok(())
    }

    async fn written(&self, record: &Record) -> Result<(), StoreError> {
        if self.after {
            self.hold(record.history().last().map(|h| h.event)).await;
        }
        Ok(())
    }
}

/// A store that holds the first compare-and-swap of a record produced by a chosen event
/// until [`Gate::release`]: a process paused between two steps of the protocol.
pub type GatedStore<S> = Hooked<S, Gate>;

impl<S: TokenStore> GatedStore<S> {
    /// Wraps `inner`, holding the first write of an `event` record.
    pub fn gated(inner: S, event: EventKind) -> (Self, Arc<Gate>) {
        Self::new(inner, Gate::on(event))
    }

    /// Wraps `inner`, letting the first write of an `event` record land and then holding
    /// its caller.
    pub fn gated_after(inner: S, event: EventKind) -> (Self, Arc<Gate>) {
        Self::new(inner, Gate::after(event))
    }
}

/// Counts compare-and-swaps (every lease, result and failure write).
#[derive(Debug, Default)]
pub struct SwapCounter(AtomicU64);

impl SwapCounter {
    /// How many compare-and-swaps ran so far.
    pub fn swaps(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Hook for SwapCounter {
    async fn before(&self, operation: Operation<'_>) -> Result<(), StoreError> {
        if matches!(operation, Operation::CompareAndSwap(_)) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A store that counts compare-and-swaps, so a test can bound how many writes a fleet
/// member made.
pub type CountingStore<S> = Hooked<S, SwapCounter>;

impl<S: TokenStore> CountingStore<S> {
    /// Wraps `inner`; the counter starts at zero.
    pub fn counting(inner: S) -> (Self, Arc<SwapCounter>) {
        Self::new(inner, SwapCounter::default())
    }
}

/// Counts `get`s, and holds the caller of the next one after its read when asked.
#[derive(Debug, Default)]
pub struct ReadCounter {
    reads: AtomicU64,
    /// Which read from now to hold (1: the next), 0 for none.
    hold_in: AtomicU64,
    held: Notify,
    release: Notify,
}

impl ReadCounter {
    /// How many `get`s ran so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Holds the caller of the next `get` after it read, until [`ReadCounter::release`].
    pub fn hold_next(&self) {
        self.hold_nth(1);
    }

    /// Holds the caller of the `n`-th `get` from now (1: the next) after it read.
    pub fn hold_nth(&self, n: u64) {
        self.hold_in.store(n, Ordering::SeqCst);
    }

    /// Waits until a reader is being held.
    pub async fn held(&self) {
        self.held.notified().await;
    }

    /// Lets the held reader go on.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

#[async_trait]
impl Hook for ReadCounter {
    async fn before(&self, operation: Operation<'_>) -> Result<(), StoreError> {
        if matches!(operation, Operation::Get) {
            self.reads.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn got(&self) {
        let countdown = self
            .hold_in
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if countdown == Ok(1) {
            self.held.notify_one();
            self.release.notified().await;
        }
    }
}

/// A store that counts reads and can pause a reader after its read ([`ReadCounter`]).
pub type ReadStore<S> = Hooked<S, ReadCounter>;

impl<S: TokenStore> ReadStore<S> {
    /// Wraps `inner`; the counter starts at zero.
    pub fn reading(inner: S) -> (Self, Arc<ReadCounter>) {
        Self::new(inner, ReadCounter::default())
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
        let (store, switch) = FlakyStore::flaky(MemoryStore::new());
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
        let (store, gate) = GatedStore::gated(MemoryStore::new(), EventKind::LeaseAcquired);
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
