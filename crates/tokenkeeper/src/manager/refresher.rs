//! The background refresher: pages through its consumer's part of the store's due index and
//! refreshes what is due (proactive refresh-ahead, keep-alive of idle installations, retries
//! after backoff), with bounded concurrency and a provider rate limit, through the same single
//! flight as callers, so it never runs two refreshes of one installation. Shutdown stops
//! scheduling and awaits the refreshes in flight.
//!
//! Processes share the work rather than repeat it: each walks every page in its own random
//! order, and before spending a rate slot it re-reads the entry and skips it when a peer has
//! just leased or refreshed it, so N processes refresh about N times as fast. An entry it
//! cannot act on (a corrupt record, a ghost index entry, one still due after its flight, such
//! as while the consumer's credentials are refused) rests for `max_idle` before it is looked
//! at again, so nothing makes the refresher spin.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokenkeeper_core::{DueEntry, InstallationId, StoreError};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::TokenManager;
use super::flight::decide::Mode;

/// How the refresher paces itself.
#[derive(Debug, Clone, PartialEq)]
pub struct RefresherConfig {
    /// Refreshes in flight at once (default 16).
    pub concurrency: usize,
    /// Refreshes started per second at most (default 50; `None`: unlimited).
    pub rate_per_second: Option<u32>,
    /// Due entries read per store call (default 500).
    pub page_size: usize,
    /// Longest sleep between sweeps (default 5 s); shorter when something falls due sooner.
    pub max_idle: Duration,
    /// How often the refresher counts the store's installations by state for the
    /// `tokenkeeper_installations` gauge (default every 60 s; `None`: never), with
    /// [`TokenStore::count_states`](tokenkeeper_core::TokenStore::count_states): one
    /// statement or a `ZCARD` per index on the stores of this workspace.
    pub state_count_every: Option<Duration>,
    /// The most installations the gauge reports per state (default 100 000); a store
    /// without a counting of its own (the trait's default pages `list`) stops counting there.
    pub state_count_limit: u64,
}

impl Default for RefresherConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            rate_per_second: Some(50),
            page_size: 500,
            max_idle: Duration::from_secs(5),
            state_count_every: Some(Duration::from_secs(60)),
            state_count_limit: 100_000,
        }
    }
}

/// The refresher's live counters (shared with its task).
#[derive(Debug, Default)]
struct RefresherStats {
    sweeps: AtomicU64,
    attempted: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
}

impl RefresherStats {
    fn snapshot(&self) -> RefresherCounts {
        RefresherCounts {
            sweeps: self.sweeps.load(Ordering::Relaxed),
            attempted: self.attempted.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

/// What the refresher has done so far: a snapshot of its counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefresherCounts {
    /// Sweeps over the due index.
    pub sweeps: u64,
    /// Installations handed to a refresh.
    pub attempted: u64,
    /// Refreshes that ended with a usable token.
    pub succeeded: u64,
    /// Refreshes that ended with an error.
    pub failed: u64,
    /// Due entries passed over without a flight: a peer had just leased or refreshed them, or
    /// their record is gone or unreadable.
    pub skipped: u64,
}

/// A running refresher. Dropping it leaves it running; call [`RefresherHandle::shutdown`].
#[derive(Debug)]
pub struct RefresherHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<RefresherStats>,
}

impl RefresherHandle {
    /// The counters so far.
    pub fn stats(&self) -> RefresherCounts {
        self.stats.snapshot()
    }

    /// Stops scheduling new refreshes, waits for those in flight and returns the final
    /// counters.
    pub async fn shutdown(self) -> RefresherCounts {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.stats.snapshot()
    }
}

pub(crate) fn spawn(manager: TokenManager, config: RefresherConfig) -> RefresherHandle {
    let (stop, stopped) = watch::channel(false);
    let stats = Arc::new(RefresherStats::default());
    let sweeper = Sweeper::new(manager, config, stats.clone(), stopped);
    let task = tokio::spawn(sweeper.run());
    RefresherHandle { stop, task, stats }
}

/// The refresher's task: sweeps over the due index, each followed by an idle wait, until
/// stopped; then it waits for the refreshes it started.
struct Sweeper {
    manager: TokenManager,
    config: RefresherConfig,
    stats: Arc<RefresherStats>,
    stopped: watch::Receiver<bool>,
    /// Whether the handle is still there to stop us: once it is dropped, its channel closes
    /// and `changed()` would return at once forever (a busy loop), so stop listening.
    listening: bool,
    permits: Arc<Semaphore>,
    /// The least time between two refreshes started (`rate_per_second`), and when the next
    /// may start.
    pace: Option<Duration>,
    next_slot: tokio::time::Instant,
    running: JoinSet<()>,
    /// Installations whose refresh is still running: a slow one is left to finish while the
    /// next sweeps go on with everything else (no sweep waits for its slowest refresh).
    in_flight: Arc<Mutex<HashSet<InstallationId>>>,
    /// Entries that just had a flight or could not be acted on rest until then.
    resting: Arc<Resting>,
}

/// How a sweep ended.
#[derive(Debug, PartialEq, Eq)]
enum Swept {
    /// It went through the due index, starting this many refreshes.
    Dispatched(usize),
    /// It was told to stop.
    Stopped,
}

/// What became of one due entry.
#[derive(Debug, PartialEq, Eq)]
enum Considered {
    Dispatched,
    Passed,
    Stop,
}

impl Sweeper {
    fn new(
        manager: TokenManager,
        config: RefresherConfig,
        stats: Arc<RefresherStats>,
        stopped: watch::Receiver<bool>,
    ) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
            pace: config
                .rate_per_second
                .filter(|r| *r > 0)
                .map(|r| Duration::from_secs_f64(1.0 / f64::from(r))),
            next_slot: tokio::time::Instant::now(),
            running: JoinSet::new(),
            in_flight: Arc::default(),
            resting: Arc::default(),
            listening: true,
            manager,
            config,
            stats,
            stopped,
        }
    }

    async fn run(mut self) {
        let counting = self.spawn_counting();
        // TokenManager::shutdown stops the refresher too: no refresh can start any more.
        while !self.manager.engine.in_flight.is_closing() {
            let Swept::Dispatched(dispatched) = self.sweep().await else {
                break;
            };
            if !self.idle(dispatched).await {
                break;
            }
        }
        while self.running.join_next().await.is_some() {}
        if let Some(counting) = counting {
            counting.abort();
        }
    }

    /// The state count pages through the whole store: its own task, so it never delays a
    /// sweep; it ends with the refresher.
    fn spawn_counting(&self) -> Option<JoinHandle<()>> {
        let every = self.config.state_count_every?;
        let (manager, limit) = (self.manager.clone(), self.config.state_count_limit);
        let mut stop = self.stopped.clone();
        Some(tokio::spawn(async move {
            loop {
                count_states(&manager, limit).await;
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                if manager.engine.in_flight.is_closing() {
                    return;
                }
            }
        }))
    }

    /// One pass over the consumer's due entries, page by page, each page in random order.
    async fn sweep(&mut self) -> Swept {
        self.stats.sweeps.fetch_add(1, Ordering::Relaxed);
        let engine = &self.manager.engine;
        let (now, page_size) = (engine.clock.now(), self.config.page_size.max(1));
        let mut dispatched = 0usize;
        let mut cursor: Option<DueEntry> = None;
        loop {
            let engine = &self.manager.engine;
            let due = engine
                .store
                .due(&engine.consumer, now, cursor.as_ref(), page_size);
            let page = match due.await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "the refresher could not read the due index");
                    break;
                }
            };
            let mut entries = page.entries;
            if cursor.is_none() {
                // The first page starts at the oldest due entry.
                let lag = entries
                    .first()
                    .map_or(Duration::ZERO, |e| now.duration_since(e.due_at));
                super::metrics::refresher_lag(&engine.consumer_label, lag);
            }
            fastrand::shuffle(&mut entries);
            for entry in entries {
                match self.consider(entry).await {
                    Considered::Dispatched => dispatched += 1,
                    Considered::Passed => {}
                    Considered::Stop => return Swept::Stopped,
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        Swept::Dispatched(dispatched)
    }

    /// One due entry: passed over while it rests or runs; otherwise, after a rate slot and a
    /// permit, looked at again (a peer may have taken it meanwhile, and a skipped entry costs
    /// no slot) and refreshed if still worth a flight.
    async fn consider(&mut self, entry: DueEntry) -> Considered {
        if *self.stopped.borrow() {
            return Considered::Stop;
        }
        let running = |id| {
            self.in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(id)
        };
        if self.resting.rests(&entry.id) || running(&entry.id) {
            return Considered::Passed;
        }
        if self.pace.is_some() {
            tokio::time::sleep_until(self.next_slot).await;
        }
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return Considered::Stop;
        };
        if !actionable(&self.manager, &entry.id).await {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            self.resting.rest(&entry.id, self.config.max_idle);
            return Considered::Passed;
        }
        if let Some(pace) = self.pace {
            self.next_slot = self.next_slot.max(tokio::time::Instant::now()) + pace;
        }
        self.dispatch(entry.id, permit);
        Considered::Dispatched
    }

    /// Starts a proactive refresh of `id`, holding `permit` until it ends.
    fn dispatch(&mut self, id: InstallationId, permit: tokio::sync::OwnedSemaphorePermit) {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone());
        self.stats.attempted.fetch_add(1, Ordering::Relaxed);
        let (manager, stats, flying) = (
            self.manager.clone(),
            self.stats.clone(),
            self.in_flight.clone(),
        );
        let (resting, idle) = (self.resting.clone(), self.config.max_idle);
        self.running.spawn(async move {
            match manager.refresh(&id, Mode::Proactive).await {
                Ok(_) => stats.succeeded.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.failed.fetch_add(1, Ordering::Relaxed),
            };
            // Whatever happened, the entry's due time has moved or it cannot be acted on
            // yet: it rests before this refresher looks at it again.
            resting.rest(&id, idle);
            flying
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            drop(permit);
        });
        while self.running.try_join_next().is_some() {}
    }

    /// Waits before the next sweep: until something falls due (at most `max_idle`), or, when
    /// nothing new could start (every due entry is running or resting), until a refresh ends
    /// or `max_idle` passes, rather than spinning over them. False when told to stop.
    async fn idle(&mut self, dispatched: usize) -> bool {
        let max_idle = self.config.max_idle;
        let idle = if dispatched == 0 {
            max_idle
        } else {
            next_due_in(&self.manager, max_idle).await
        };
        tokio::select! {
            biased;
            _ = tokio::time::sleep(idle) => {}
            _ = self.running.join_next(), if !self.running.is_empty() => {}
            changed = self.stopped.changed(), if self.listening => {
                self.listening = changed.is_ok();
            }
        }
        !*self.stopped.borrow()
    }
}

/// Entries resting until an instant, after a flight or when they could not be acted on.
#[derive(Debug, Default)]
struct Resting(Mutex<HashMap<InstallationId, tokio::time::Instant>>);

impl Resting {
    /// Whether `id` is resting, forgetting rests that are over.
    fn rests(&self, id: &InstallationId) -> bool {
        let mut resting = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match resting.get(id) {
            Some(until) if *until > tokio::time::Instant::now() => true,
            Some(_) => {
                resting.remove(id);
                false
            }
            None => false,
        }
    }

    /// `id` rests for `time`.
    fn rest(&self, id: &InstallationId, time: Duration) {
        let mut resting = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        // Bounded by the due entries seen within `time`; drop the expired ones now and then.
        if resting.len() > 10_000 {
            resting.retain(|_, until| *until > now);
        }
        resting.insert(id.clone(), now + time);
    }
}

/// Re-reads a due entry before spending a rate slot on it: it is worth a flight only if the
/// flight's own decision would take the lease now (not when a peer has since refreshed it or
/// holds a live lease, nor while the consumer breaker is open), and not when its record is
/// gone or unreadable. A store that fails to answer leaves it to the flight, which reports
/// why.
async fn actionable(manager: &TokenManager, id: &InstallationId) -> bool {
    match manager.engine.store.get(id).await {
        Ok(Some(record)) => super::flight::would_take_lease(&manager.engine, &record),
        Ok(None) => false,
        Err(StoreError::Corrupt { .. }) => {
            tracing::warn!(installation = %id, "a due installation's record is unreadable; the refresher passes over it");
            false
        }
        Err(_) => true,
    }
}

/// How long until the earliest due entry (at most `max`).
async fn next_due_in(manager: &TokenManager, max: Duration) -> Duration {
    let now = manager.engine.clock.now();
    match manager
        .engine
        .store
        .due(
            &manager.engine.consumer,
            tokenkeeper_core::Timestamp::MAX,
            None,
            1,
        )
        .await
    {
        Ok(page) => page
            .entries
            .first()
            .map_or(max, |e| e.due_at.duration_since(now).min(max))
            .max(Duration::from_millis(5)),
        Err(_) => max,
    }
}

/// Counts the store's installations by state for the metrics gauge, `limit` at most per
/// state (the stores of this workspace count in the backend, exactly: review E10).
async fn count_states(manager: &TokenManager, limit: u64) {
    match manager.engine.store.count_states(limit).await {
        Ok(counts) => {
            for (state, count) in counts.iter() {
                super::metrics::installations(state, count.min(limit));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the refresher could not count installations by state");
        }
    }
}

/// The sweeper's steps, each on paused Tokio time over a memory store and a manual clock;
/// the provider is an unreachable local port, so a dispatched flight fails.
#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::{ConsumerConfig, ProviderProfile};
    use tokenkeeper_core::{AccessToken, ManualClock, Record, RefreshToken, Timestamp, TokenSet};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_unix_secs(1_800_000_000 + secs)
    }

    fn manager(clock: &ManualClock) -> TokenManager {
        let url = |path: &str| reqwest::Url::parse(&format!("http://127.0.0.1:9/{path}")).unwrap();
        let profile = ProviderProfile {
            identity: crate::oauth::IdentityCheck::Disabled,
            ..ProviderProfile::generic("local", url("authorize"), url("token"))
        };
        let consumer = ConsumerConfig::builder(profile)
            .client_id("k")
            .client_secret("s")
            .redirect_uri("http://127.0.0.1/cb")
            .build()
            .unwrap();
        let store = tokenkeeper_memory::MemoryStore::new();
        TokenManager::builder(consumer, store)
            .clock(clock.clone())
            .build()
            .unwrap()
    }

    fn sweeper(manager: &TokenManager) -> (Sweeper, watch::Sender<bool>) {
        let (stop, stopped) = watch::channel(false);
        let config = RefresherConfig {
            rate_per_second: None,
            state_count_every: None,
            ..RefresherConfig::default()
        };
        let stats = Arc::new(RefresherStats::default());
        (Sweeper::new(manager.clone(), config, stats, stopped), stop)
    }

    /// An installation of `manager`'s consumer whose access token expired: due now.
    async fn due(manager: &TokenManager, id: &str) -> InstallationId {
        let id = InstallationId::new(id).unwrap();
        let tokens = TokenSet::bearer(
            AccessToken::new("a"),
            Some(RefreshToken::new("r")),
            at(-7200),
            at(-60),
        );
        let consumer = manager.engine.consumer.clone();
        let record = Record::new(id.clone(), consumer, tokens, at(-120), at(-7200));
        manager.store().create(&record).await.unwrap();
        id
    }

    #[tokio::test(start_paused = true)]
    async fn a_rest_lasts_its_time() {
        let resting = Resting::default();
        let id = InstallationId::new("i").unwrap();
        assert!(!resting.rests(&id));
        resting.rest(&id, Duration::from_secs(5));
        assert!(resting.rests(&id));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!resting.rests(&id), "over at its end");
        assert!(resting.0.lock().unwrap().is_empty(), "and forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_sweep_starts_nothing_and_idles_for_max_idle() {
        let clock = ManualClock::new(at(0));
        let manager = manager(&clock);
        let (mut sweeper, _stop) = sweeper(&manager);
        assert_eq!(sweeper.sweep().await, Swept::Dispatched(0));
        assert_eq!(sweeper.stats.snapshot().sweeps, 1);
        let before = tokio::time::Instant::now();
        assert!(sweeper.idle(0).await, "not stopped");
        assert_eq!(before.elapsed(), sweeper.config.max_idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_whose_record_is_gone_is_skipped_and_rests() {
        let clock = ManualClock::new(at(0));
        let manager = manager(&clock);
        let (mut sweeper, _stop) = sweeper(&manager);
        let id = InstallationId::new("ghost").unwrap();
        let entry = DueEntry {
            due_at: at(-1),
            id: id.clone(),
        };
        assert_eq!(sweeper.consider(entry).await, Considered::Passed);
        assert_eq!(sweeper.stats.snapshot().skipped, 1);
        assert!(sweeper.resting.rests(&id));
        assert_eq!(
            sweeper.permits.available_permits(),
            16,
            "its permit is back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_installation_is_refreshed_once_then_rests() {
        let clock = ManualClock::new(at(0));
        let manager = manager(&clock);
        let id = due(&manager, "due").await;
        let (mut sweeper, _stop) = sweeper(&manager);
        assert_eq!(sweeper.sweep().await, Swept::Dispatched(1));
        // While its flight runs (or once it rests) a second sweep passes it over.
        assert_eq!(sweeper.sweep().await, Swept::Dispatched(0));
        while sweeper.running.join_next().await.is_some() {}
        let counts = sweeper.stats.snapshot();
        assert_eq!((counts.attempted, counts.failed), (1, 1), "{counts:?}");
        assert!(sweeper.resting.rests(&id));
        assert_eq!(sweeper.permits.available_permits(), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_sweep_and_the_idle_wait() {
        let clock = ManualClock::new(at(0));
        let manager = manager(&clock);
        due(&manager, "due").await;
        let (mut sweeper, stop) = sweeper(&manager);
        stop.send(true).unwrap();
        assert_eq!(sweeper.sweep().await, Swept::Stopped);
        assert_eq!(sweeper.stats.snapshot().attempted, 0);
        assert!(!sweeper.idle(0).await);
    }
}
