//! # tokenkeeper-memory
//!
//! [`MemoryStore`]: a [`TokenStore`] held in this process's memory. It is the reference
//! backend (the simplest code that passes the conformance suite), the default of the facade for
//! single-process applications and tests, and the baseline the other backends are benchmarked
//! against. Nothing survives the process: use the SQLite or Redis backend for anything that
//! must outlive a restart.
//!
//! All state sits behind one mutex held only for in-memory map operations (never across an
//! `.await`), which makes every operation atomic: compare-and-swap, the record and its index
//! entries change together. The due index is a `BTreeSet<(due_at, id)>` per consumer, so `due`
//! is a range scan of one consumer's entries, not a full scan.
//!
//! ```
//! use tokenkeeper_core::{TokenStore, InstallationId};
//! use tokenkeeper_memory::MemoryStore;
//!
//! # tokio_test_block_on(async {
//! let store = MemoryStore::new();
//! assert!(store.get(&InstallationId::new("nobody").unwrap()).await.unwrap().is_none());
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventCursor, EventPage, EventRetention,
    InstallationId, ListEntry, ListFilter, ListPage, LogPosition, Record, StateCounts, StoreError,
    Timestamp, TokenStore, backend::EventRow, backend::check_cas_arguments,
    backend::check_sequence_cursor, backend::delete_event_payload, backend::new_log_id,
    backend::sequence_event, backend::write_event_payload,
};

const BACKEND: &str = "memory";

#[derive(Debug, Default)]
struct Tables {
    records: BTreeMap<InstallationId, Record>,
    due: BTreeMap<String, BTreeSet<(Timestamp, InstallationId)>>,
    /// Authorization flow claims: value and the instant it expires.
    flows: HashMap<String, (Vec<u8>, Instant)>,
    /// The claims by expiry, soonest first (an entry whose claim was settled since, with a
    /// later expiry, is stale and skipped): a claim removes only what expired, instead of
    /// scanning every live claim under the lock every `access_token` needs (review N8).
    flow_expiry: BinaryHeap<Reverse<(Instant, String)>>,
    /// The event log, oldest first, appended under the same lock as the write it tells.
    events: VecDeque<StoredEvent>,
    /// The sequence number of the last event appended.
    last_seq: u64,
    /// The newest sequence number retention removed.
    trimmed_through: u64,
    retention: EventRetention,
}

impl Tables {
    /// Removes the claims that expired by `now`, soonest first.
    fn purge_flows(&mut self, now: Instant) {
        while let Some(Reverse((until, _))) = self.flow_expiry.peek() {
            if *until > now {
                break;
            }
            let Some(Reverse((until, flow))) = self.flow_expiry.pop() else {
                break;
            };
            // Only if the claim still expires then (settling it may have moved it later).
            if self.flows.get(&flow).is_some_and(|(_, u)| *u == until) {
                self.flows.remove(&flow);
            }
        }
    }

    /// Stores a claim's value until `until`.
    fn put_flow(&mut self, flow: &str, value: &[u8], until: Instant) {
        self.flows.insert(flow.to_owned(), (value.to_vec(), until));
        self.flow_expiry.push(Reverse((until, flow.to_owned())));
    }
}

#[derive(Debug)]
struct StoredEvent {
    seq: u64,
    /// When the store appended it (its clock, for retention by age).
    stored_at: Instant,
    id: InstallationId,
    consumer: String,
    version: u64,
    at: Timestamp,
    body: Vec<u8>,
}

impl Tables {
    fn index(&mut self, record: &Record) {
        if let Some(due_at) = record.due_at() {
            self.due
                .entry(record.consumer().to_owned())
                .or_default()
                .insert((due_at, record.id().clone()));
        }
    }

    /// Appends the event of a write and trims what retention no longer keeps (at most two
    /// events per write, oldest first, never the new one).
    fn append(&mut self, id: &InstallationId, consumer: &str, version: u64, body: Vec<u8>) {
        let now = Instant::now();
        self.last_seq += 1;
        self.events.push_back(StoredEvent {
            seq: self.last_seq,
            stored_at: now,
            id: id.clone(),
            consumer: consumer.to_owned(),
            version,
            at: wall_clock(),
            body,
        });
        for _ in 0..2 {
            let Some(oldest) = self.events.front() else {
                break;
            };
            let too_many = self.events.len() as u64 > self.retention.event_limit();
            let too_old = now.duration_since(oldest.stored_at) > self.retention.age_limit();
            if oldest.seq == self.last_seq || !(too_many || too_old) {
                break;
            }
            self.trimmed_through = oldest.seq;
            self.events.pop_front();
        }
    }

    fn unindex(&mut self, record: &Record) {
        if let Some(due_at) = record.due_at()
            && let Some(set) = self.due.get_mut(record.consumer())
        {
            set.remove(&(due_at, record.id().clone()));
        }
    }
}

fn wall_clock() -> Timestamp {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Timestamp::from_unix_nanos(nanos)
}

/// An in-memory [`TokenStore`]. Cheap to create; not shared between processes.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Tables>,
    /// This store's event log id: a cursor of another store (or of a previous process's
    /// memory store) is refused.
    log: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            log: new_log_id(),
        }
    }
}

impl MemoryStore {
    /// An empty store keeping events by the default [`EventRetention`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping events by `retention`.
    pub fn with_event_retention(retention: EventRetention) -> Self {
        let store = Self::default();
        store.lock().retention = retention;
        store
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// True when it holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // Nothing panics while the lock is held, so a poisoned lock still guards
        // consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl TokenStore for MemoryStore {
    fn unsaved_tokens_home(&self) -> tokenkeeper_core::UnsavedHome {
        tokenkeeper_core::UnsavedHome::Ephemeral
    }

    async fn claim_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        // Expired claims go on every claim, soonest first: the map holds only live flows.
        inner.purge_flows(now);
        if let Some((existing, _)) = inner.flows.get(flow) {
            return Ok(Some(existing.clone()));
        }
        inner.put_flow(flow, value, now + ttl);
        Ok(None)
    }

    async fn settle_flow(&self, flow: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.purge_flows(now);
        inner.put_flow(flow, value, now + ttl);
        Ok(())
    }

    async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .flows
            .get(flow)
            .filter(|(_, until)| *until > now)
            .map(|(value, _)| value.clone()))
    }

    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        Ok(self.lock().records.get(id).cloned())
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.records.contains_key(record.id()) {
            return Err(StoreError::AlreadyExists {
                id: record.id().clone(),
                backend: BACKEND,
            });
        }
        inner.index(record);
        inner.records.insert(record.id().clone(), record.clone());
        inner.append(
            record.id(),
            record.consumer(),
            record.version(),
            write_event_payload(record),
        );
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<CasOutcome, StoreError> {
        check_cas_arguments(BACKEND, record, expected_version)?;
        let mut inner = self.lock();
        let current = match inner.records.get(record.id()) {
            None => return Ok(CasOutcome::Missing),
            Some(current)
                if current.version() != expected_version || !record.lease_matches(current) =>
            {
                return Ok(CasOutcome::Conflict(Box::new(current.clone())));
            }
            Some(current) => current.clone(),
        };
        inner.unindex(&current);
        inner.index(record);
        inner.records.insert(record.id().clone(), record.clone());
        inner.append(
            record.id(),
            record.consumer(),
            record.version(),
            write_event_payload(record),
        );
        Ok(CasOutcome::Swapped)
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected_version: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        let mut inner = self.lock();
        match inner.records.get(id) {
            None => Ok(DeleteOutcome::Missing),
            Some(current) if current.version() != expected_version => {
                Ok(DeleteOutcome::Conflict(Box::new(current.clone())))
            }
            Some(_) => {
                if let Some(removed) = inner.records.remove(id) {
                    inner.unindex(&removed);
                    inner.append(
                        id,
                        removed.consumer(),
                        removed.version() + 1,
                        delete_event_payload(&removed),
                    );
                }
                Ok(DeleteOutcome::Deleted)
            }
        }
    }

    async fn due(
        &self,
        consumer: &str,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        let inner = self.lock();
        let Some(set) = inner.due.get(consumer) else {
            return Ok(DuePage::default());
        };
        let start = match after {
            Some(c) => Bound::Excluded((c.due_at, c.id.clone())),
            None => Bound::Unbounded,
        };
        let entries = set
            .range((start, Bound::Unbounded))
            .take_while(|(due_at, _)| *due_at < before)
            .take(limit)
            .map(|(due_at, id)| DueEntry {
                due_at: *due_at,
                id: id.clone(),
            })
            .collect();
        Ok(DuePage::from_entries(entries, limit))
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let inner = self.lock();
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        let entries = inner
            .records
            .range::<InstallationId, _>((start, Bound::Unbounded))
            .filter(|(_, r)| filter.matches(r.state().kind()))
            .take(limit)
            .map(|(id, r)| ListEntry {
                id: id.clone(),
                state: r.state().kind(),
            })
            .collect();
        Ok(ListPage::from_entries(entries, limit))
    }

    async fn count_states(&self, _cap: u64) -> Result<StateCounts, StoreError> {
        let mut counts = StateCounts::default();
        for record in self.lock().records.values() {
            counts.add(record.state().kind(), 1);
        }
        Ok(counts)
    }

    async fn read_events(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let inner = self.lock();
        let after_seq = check_sequence_cursor(
            BACKEND,
            after,
            self.log,
            inner.trimmed_through,
            inner.last_seq,
        )?;
        let events: Vec<_> = inner
            .events
            .iter()
            .filter(|e| e.seq > after_seq)
            .take(limit)
            .map(|stored| {
                sequence_event(
                    self.log,
                    stored.seq,
                    EventRow {
                        installation: stored.id.clone(),
                        consumer: stored.consumer.clone(),
                        version: stored.version,
                        at: stored.at,
                        body: &stored.body,
                    },
                )
            })
            .collect();
        let next = events
            .last()
            .map_or_else(|| after.clone(), |e| e.cursor.clone());
        Ok(EventPage { events, next })
    }

    async fn event_head(&self) -> Result<EventCursor, StoreError> {
        Ok(EventCursor::from_positions(
            self.log,
            vec![LogPosition::seq(self.lock().last_seq)],
        ))
    }
}

#[cfg(test)]
mod flow_tests {
    use super::*;

    /// The expiry index removes only claims that expired: a claim settled with a later expiry
    /// outlives its first one, an expired one goes, and many expired claims go in one pass.
    #[tokio::test]
    async fn claims_expire_by_their_latest_expiry() {
        let store = MemoryStore::new();
        let short = Duration::from_millis(30);
        assert_eq!(store.claim_flow("kept", b"1", short).await.unwrap(), None);
        store
            .settle_flow("kept", b"2", Duration::from_secs(60))
            .await
            .unwrap();
        for n in 0..1000 {
            store
                .claim_flow(&format!("f{n}"), b"x", short)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            store.claim_flow("kept", b"3", short).await.unwrap(),
            Some(b"2".to_vec()),
            "settled later: still live"
        );
        assert_eq!(store.lock().flows.len(), 1, "the expired ones went");
        assert_eq!(store.claim_flow("f1", b"y", short).await.unwrap(), None);
    }
}
