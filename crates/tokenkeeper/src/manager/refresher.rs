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
    let (stop, mut stopped) = watch::channel(false);
    let stats = Arc::new(RefresherStats::default());
    let task_stats = stats.clone();
    let task = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
        let pace = config
            .rate_per_second
            .filter(|r| *r > 0)
            .map(|r| Duration::from_secs_f64(1.0 / f64::from(r)));
        let mut next_slot = tokio::time::Instant::now();
        let mut running = JoinSet::new();
        // Installations whose refresh is still running: a slow one is left to finish while
        // the next sweeps go on with everything else (no sweep waits for its slowest refresh).
        let in_flight: Arc<Mutex<HashSet<InstallationId>>> = Arc::default();
        // Entries that just had a flight or could not be acted on rest until then.
        let resting: Arc<Mutex<HashMap<InstallationId, tokio::time::Instant>>> = Arc::default();
        // Whether the handle is still there to stop us: once it is dropped, its channel closes
        // and `changed()` would return at once forever (a busy loop), so stop listening.
        let mut listening = true;
        // The state count pages through the whole store: its own task, so it never delays a
        // sweep; it ends with the refresher.
        let counting = config.state_count_every.map(|every| {
            let (manager, limit, mut stop) =
                (manager.clone(), config.state_count_limit, stopped.clone());
            tokio::spawn(async move {
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
            })
        });
        'sweeps: loop {
            if manager.engine.in_flight.is_closing() {
                // TokenManager::shutdown was called: no refresh can start any more.
                break;
            }
            task_stats.sweeps.fetch_add(1, Ordering::Relaxed);
            let mut dispatched = 0usize;
            let now = manager.engine.clock.now();
            let mut cursor: Option<DueEntry> = None;
            loop {
                let page = match manager
                    .engine
                    .store
                    .due(
                        &manager.engine.consumer,
                        now,
                        cursor.as_ref(),
                        config.page_size.max(1),
                    )
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "the refresher could not read the due index");
                        break;
                    }
                };
                let next = page.next;
                let mut entries = page.entries;
                if cursor.is_none() {
                    // The first page starts at the oldest due entry.
                    let lag = entries
                        .first()
                        .map_or(Duration::ZERO, |e| now.duration_since(e.due_at));
                    super::metrics::refresher_lag(&manager.engine.consumer_label, lag);
                }
                fastrand::shuffle(&mut entries);
                for entry in entries {
                    if *stopped.borrow() {
                        break 'sweeps;
                    }
                    if rests(&resting, &entry.id) {
                        continue;
                    }
                    if in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .contains(&entry.id)
                    {
                        continue;
                    }
                    // Wait for a rate slot and a permit first, then look again: a peer may
                    // have taken the entry meanwhile, and a skipped entry costs no slot.
                    if pace.is_some() {
                        tokio::time::sleep_until(next_slot).await;
                    }
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        break 'sweeps;
                    };
                    if !actionable(&manager, &entry.id).await {
                        task_stats.skipped.fetch_add(1, Ordering::Relaxed);
                        rest(&resting, &entry.id, config.max_idle);
                        continue;
                    }
                    if let Some(pace) = pace {
                        next_slot = next_slot.max(tokio::time::Instant::now()) + pace;
                    }
                    in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(entry.id.clone());
                    dispatched += 1;
                    let (m, s, flying) = (manager.clone(), task_stats.clone(), in_flight.clone());
                    let (resting, idle) = (resting.clone(), config.max_idle);
                    s.attempted.fetch_add(1, Ordering::Relaxed);
                    running.spawn(async move {
                        let outcome = m.refresh(&entry.id, Mode::Proactive).await;
                        match outcome {
                            Ok(_) => s.succeeded.fetch_add(1, Ordering::Relaxed),
                            Err(_) => s.failed.fetch_add(1, Ordering::Relaxed),
                        };
                        // Whatever happened, the entry's due time has moved or it cannot be
                        // acted on yet: it rests before this refresher looks at it again.
                        rest(&resting, &entry.id, idle);
                        flying
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&entry.id);
                        drop(permit);
                    });
                    while running.try_join_next().is_some() {}
                }
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            // Nothing new to start (every due entry is running or resting): wait for a refresh
            // to end or for `max_idle`, rather than spinning over them.
            let idle = if dispatched == 0 {
                config.max_idle
            } else {
                next_due_in(&manager, config.max_idle).await
            };
            tokio::select! {
                biased;
                _ = tokio::time::sleep(idle) => {}
                _ = running.join_next(), if !running.is_empty() => {}
                changed = stopped.changed(), if listening => listening = changed.is_ok(),
            }
            if *stopped.borrow() {
                break;
            }
        }
        while running.join_next().await.is_some() {}
        if let Some(counting) = counting {
            counting.abort();
        }
    });
    RefresherHandle { stop, task, stats }
}

/// Whether `id` is resting, forgetting rests that are over.
fn rests(
    resting: &Mutex<HashMap<InstallationId, tokio::time::Instant>>,
    id: &InstallationId,
) -> bool {
    let mut resting = resting.lock().unwrap_or_else(PoisonError::into_inner);
    match resting.get(id) {
        Some(until) if *until > tokio::time::Instant::now() => true,
        Some(_) => {
            resting.remove(id);
            false
        }
        None => false,
    }
}

fn rest(
    resting: &Mutex<HashMap<InstallationId, tokio::time::Instant>>,
    id: &InstallationId,
    time: Duration,
) {
    let mut resting = resting.lock().unwrap_or_else(PoisonError::into_inner);
    let now = tokio::time::Instant::now();
    // Bounded by the due entries seen within `time`; drop the expired ones now and then.
    if resting.len() > 10_000 {
        resting.retain(|_, until| *until > now);
    }
    resting.insert(id.clone(), now + time);
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
