//! The background refresher: pages through the store's due index and refreshes what is due
//! (proactive refresh-ahead, keep-alive of idle installations, retries after backoff), with
//! bounded concurrency and a provider rate limit, through the same single flight as callers,
//! so it never runs two refreshes of one installation. Shutdown stops scheduling and awaits
//! the refreshes in flight.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokenkeeper_core::{DueEntry, InstallationId};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::TokenManager;
use super::decide::Mode;
use crate::error::Error;

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
}

impl Default for RefresherConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            rate_per_second: Some(50),
            page_size: 500,
            max_idle: Duration::from_secs(5),
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
}

impl RefresherStats {
    fn snapshot(&self) -> RefresherCounts {
        RefresherCounts {
            sweeps: self.sweeps.load(Ordering::Relaxed),
            attempted: self.attempted.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
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
        // Whether the handle is still there to stop us: once it is dropped, its channel closes
        // and `changed()` would return at once forever (a busy loop), so stop listening.
        let mut listening = true;
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
                    .due(now, cursor.as_ref(), config.page_size.max(1))
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "the refresher could not read the due index");
                        break;
                    }
                };
                for entry in page.entries {
                    if *stopped.borrow() {
                        break 'sweeps;
                    }
                    if !in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(entry.id.clone())
                    {
                        continue;
                    }
                    dispatched += 1;
                    if let Some(pace) = pace {
                        tokio::time::sleep_until(next_slot).await;
                        next_slot = next_slot.max(tokio::time::Instant::now()) + pace;
                    }
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        break 'sweeps;
                    };
                    let (m, s, flying) = (manager.clone(), task_stats.clone(), in_flight.clone());
                    s.attempted.fetch_add(1, Ordering::Relaxed);
                    running.spawn(async move {
                        let outcome = m.refresh(&entry.id, Mode::Proactive).await;
                        let foreign = matches!(outcome, Err(Error::ForeignConsumer { .. }));
                        match outcome {
                            Ok(_) => s.succeeded.fetch_add(1, Ordering::Relaxed),
                            Err(_) => s.failed.fetch_add(1, Ordering::Relaxed),
                        };
                        // Another consumer's installation stays marked as in flight, so no
                        // later sweep of this refresher touches it again.
                        if !foreign {
                            flying
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .remove(&entry.id);
                        }
                        drop(permit);
                    });
                    while running.try_join_next().is_some() {}
                }
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            // Only refreshes still running were due: wait for one of them to end (or for
            // `max_idle`) rather than spinning over entries nothing can be done about yet.
            // Nothing new to start (all due entries are running or another consumer's): wait
            // for a refresh to end or for `max_idle`, rather than spinning over them.
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
    });
    RefresherHandle { stop, task, stats }
}

/// How long until the earliest due entry (at most `max`).
async fn next_due_in(manager: &TokenManager, max: Duration) -> Duration {
    let now = manager.engine.clock.now();
    match manager
        .engine
        .store
        .due(tokenkeeper_core::Timestamp::MAX, None, 1)
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
