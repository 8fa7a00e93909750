//! The shared state behind every clone of a [`TokenManager`](super::TokenManager): the OAuth
//! client, the store, the clock, the policy, the cache, the flights in progress, the consumer
//! breaker and this process's holds, with the few operations every room uses (load, update,
//! emit).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use tokenkeeper_core::{
    CasOutcome, Clock, ErrorDetail, InstallationId, Record, Timestamp, TokenStore,
};
use tokio::sync::broadcast;

use super::cache::Cache;
use super::events::{LocalEvent, LocalEventKind};
use super::flight::retry::{applied, is_own_write};
use super::flight::single::Flights;
use super::{RefreshPolicy, flight, metrics, unsaved};
use crate::error::Error;
use crate::oauth::OAuthClient;

/// The engine every clone of a [`TokenManager`] shares: the OAuth client, the store, the
/// clock, the policy, the cache, the flights in progress and the consumer breaker.
pub(crate) struct Engine {
    pub(crate) client: OAuthClient,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) policy: RefreshPolicy,
    pub(crate) cache: Cache,
    pub(crate) flights: Flights,
    pub(crate) events: broadcast::Sender<LocalEvent>,
    pub(crate) process_tag: String,
    pub(crate) flight_seq: AtomicU64,
    /// This manager's consumer as recorded in its installations (`profile/client_id`).
    pub(crate) consumer: String,
    /// `consumer` as the metrics label (shared, so recording allocates nothing).
    pub(crate) consumer_label: Arc<str>,
    /// The cache's hit and miss counters of this consumer (keys built once).
    pub(crate) cache_counters: super::metrics::CacheCounters,
    pub(crate) in_flight: unsaved::InFlight,
    pub(crate) unsaved: unsaved::Place,
    pub(crate) seal: unsaved::Seal,
    breaker: Mutex<Option<(Timestamp, ErrorDetail)>>,
    /// Installations this process holds back after a malformed request (see `hold_back`).
    holds: Mutex<std::collections::HashMap<InstallationId, (Timestamp, ErrorDetail)>>,
    pub(crate) guard: flight::guard::Guard,
    /// This process's lapsed leases under which nothing rotated.
    pub(crate) quiet_leases: flight::lease::QuietLeases,
    /// False while the startup restore of unsaved tokens runs.
    pub(crate) restored: tokio::sync::watch::Sender<bool>,
    /// The cache's event watcher, once started (`events::ensure_watch`).
    pub(crate) watch: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Permits for rotating refreshes in flight (`RefreshPolicy::max_rotations_in_flight`),
    /// when the provider rotates without a reuse leeway.
    pub(crate) rotations: Option<Arc<tokio::sync::Semaphore>>,
    /// Set when the unsaved-tokens place may hold something to put back (see `restore.rs`).
    pub(crate) unsaved_waiting: std::sync::atomic::AtomicBool,
    /// One restore of the unsaved-tokens place at a time.
    pub(crate) restoring: tokio::sync::Mutex<()>,
    /// What the last restore could not land (those installations' flights are refused).
    pub(crate) unsaved_kept: Mutex<flight::restore::KeptResults>,
}

/// What [`Engine::new`] is built from (checked by the builder).
pub(crate) struct EngineParts {
    pub(crate) client: OAuthClient,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) policy: RefreshPolicy,
    pub(crate) unsaved: unsaved::Place,
    pub(crate) seal: unsaved::Seal,
    pub(crate) event_capacity: usize,
}

impl Engine {
    pub(crate) fn new(parts: EngineParts) -> Self {
        let EngineParts {
            client,
            store,
            clock,
            policy,
            unsaved,
            seal,
            event_capacity,
        } = parts;
        let consumer = crate::oauth::consumer_name(&client);
        let consumer_label: Arc<str> = Arc::from(consumer.as_str());
        let (events, _) = broadcast::channel(event_capacity);
        let cache = Cache::new(policy.cache_capacity, policy.cache_revalidate);
        let rotation = client.consumer().profile().rotation;
        let rotations = policy
            .max_rotations_in_flight
            .filter(|_| rotation.rotates() && rotation.reuse_leeway().is_none())
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        Self {
            client,
            store,
            clock,
            policy,
            cache,
            flights: Flights::default(),
            events,
            process_tag: process_tag(),
            flight_seq: AtomicU64::new(0),
            cache_counters: super::metrics::CacheCounters::new(&consumer_label),
            consumer_label,
            consumer,
            in_flight: unsaved::InFlight::default(),
            unsaved,
            seal,
            breaker: Mutex::new(None),
            holds: Mutex::default(),
            guard: flight::guard::Guard::default(),
            quiet_leases: flight::lease::QuietLeases::default(),
            restored: tokio::sync::watch::Sender::new(true),
            watch: tokio::sync::Mutex::new(None),
            rotations,
            unsaved_waiting: std::sync::atomic::AtomicBool::new(false),
            restoring: tokio::sync::Mutex::new(()),
            unsaved_kept: Mutex::default(),
        }
    }
    /// Waits (at most 30 s) for the startup restore of unsaved tokens, if one runs.
    pub(crate) async fn restore_done(&self) {
        let mut done = self.restored.subscribe();
        let wait = std::time::Duration::from_secs(30);
        let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
    }

    pub(crate) fn emit(&self, id: &InstallationId, kind: LocalEventKind) {
        match &kind {
            LocalEventKind::Backoff { cause, .. } => metrics::backoff(&self.consumer_label, *cause),
            LocalEventKind::ReauthorizationRequired { reason, .. } => {
                metrics::reauthorization(&self.consumer_label, *reason)
            }
            _ => {}
        }
        let _ = self.events.send(LocalEvent {
            installation: id.clone(),
            at: self.clock.now(),
            kind,
        });
    }

    /// The consumer breaker, or this installation's hold in this process, while open.
    pub(crate) fn breaker_open(
        &self,
        id: &InstallationId,
        now: Timestamp,
    ) -> Option<(Timestamp, ErrorDetail)> {
        let consumer = self
            .breaker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|(until, _)| now < *until);
        consumer.or_else(|| {
            let holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
            holds.get(id).filter(|(until, _)| now < *until).cloned()
        })
    }

    /// Holds installation `id` back in this process until `until` (a malformed request).
    pub(crate) fn hold_back(&self, id: &InstallationId, until: Timestamp, detail: ErrorDetail) {
        let now = self.clock.now();
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        if holds.len() >= 4096 {
            holds.retain(|_, (u, _)| *u > now);
        }
        holds.insert(id.clone(), (until, detail));
    }

    pub(crate) fn trip_breaker(&self, until: Timestamp, detail: ErrorDetail) {
        metrics::breaker_trip(&self.consumer_label);
        *self.breaker.lock().unwrap_or_else(PoisonError::into_inner) = Some((until, detail));
    }

    /// Refuses a record that belongs to another consumer.
    pub(crate) fn owns(&self, record: &Record) -> Result<(), Error> {
        if record.consumer() == self.consumer {
            return Ok(());
        }
        Err(Error::ForeignConsumer {
            id: record.id().clone(),
            owner: record.consumer().to_owned(),
            this: self.consumer.clone(),
        })
    }

    /// The stored record of `id`: `NotFound` when there is none. A read the store could not
    /// answer is tried twice more (50 ms, then 200 ms later): the first command on a
    /// connection the server dropped (a restart, a failover) fails while it reconnects.
    pub(crate) async fn load(&self, id: &InstallationId) -> Result<Record, Error> {
        let mut retries = [50u64, 200].into_iter();
        loop {
            match self.store.get(id).await {
                Ok(Some(record)) => return Ok(record),
                Ok(None) => return Err(Error::NotFound { id: id.clone() }),
                Err(tokenkeeper_core::StoreError::Unavailable { .. })
                    if let Some(ms) = retries.next() =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(Error::store(id, e)),
            }
        }
    }

    /// Applies `change` to the stored record by compare-and-swap, re-reading and re-applying
    /// on conflicts, and returns the written record. `change` may end the loop with an error
    /// (e.g. the record is already in the target state). A write whose acknowledgement was
    /// lost and that the store holds is taken as written (the application's revocation then
    /// goes on to revoke the tokens at the provider).
    pub(crate) async fn update(
        &self,
        id: &InstallationId,
        mut change: impl FnMut(&Record, Timestamp) -> Result<Record, Error>,
    ) -> Result<Record, Error> {
        let mut current = self.load(id).await?;
        loop {
            let next = change(&current, self.clock.now())?;
            match self.store.compare_and_swap(&next, current.version()).await {
                Ok(CasOutcome::Swapped) => return Ok(next),
                // Our own write, applied by an attempt whose reply was lost and resent.
                Ok(CasOutcome::Conflict(stored)) if is_own_write(&stored, &next) => {
                    return Ok(next);
                }
                Ok(CasOutcome::Conflict(stored)) => current = *stored,
                Ok(CasOutcome::Missing) => return Err(Error::NotFound { id: id.clone() }),
                // Applied, its acknowledgement lost: as good as acknowledged.
                Err(e) if applied(self, &next, &e).await => return Ok(next),
                Err(e) => return Err(Error::store(id, e)),
            }
        }
    }
}

/// This process's name in the leases it takes: its pid and 4 random bytes (a restarted
/// process with a reused pid is another holder).
fn process_tag() -> String {
    let mut tag = [0u8; 4];
    let _ = getrandom::fill(&mut tag);
    format!(
        "{}-{:02x}{:02x}{:02x}{:02x}",
        std::process::id(),
        tag[0],
        tag[1],
        tag[2],
        tag[3]
    )
}
