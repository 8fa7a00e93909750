//! The in-process cache of usable access tokens: the hot path of `access_token`.
//!
//! One read lock, one hash lookup and one atomic store per call, no store I/O. An entry is
//! served only while the token is fresh (`now < stale_at`) **and** the record was read from
//! (or written to) the store less than `RefreshPolicy::cache_revalidate` ago: past that, the
//! next call re-reads the record through the installation's single flight, so another
//! process's revocation, re-authorization or condemnation stops this process serving the old
//! token within that bound, at the cost of one store read per installation per bound. The
//! bound holds on the wall clock (the engine's `Clock`) and on monotonic time, so a host
//! clock stepped back cannot stretch it (review E13).
//!
//! Entries are versioned: a record older than the cached entry, or than a *tombstone* (what a
//! revocation, a terminal state or a 401 leaves behind), is never put back, so a slow flight
//! that read the record before a revocation cannot re-cache the revoked token; a tombstone's
//! own version is accepted again only from a read that started after it was laid. A record of
//! another incarnation (deleted and created again, so its versions restart) replaces what is
//! cached if it was read after that was laid. "After" is a generation counter the cache bumps
//! on every change, read before the store is: no clock involved. The cache
//! holds at most `capacity` installations; beyond that the least recently used tenth is
//! evicted in one pass (amortised O(log n) per insertion). The background refresher only
//! updates entries that callers already use: it never fills the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokenkeeper_core::{AccessToken, InstallationId, Record, Timestamp};

struct Entry {
    /// `None`: a tombstone (nothing may be served, nothing older than `version` put back).
    access: Option<AccessToken>,
    stale_at: Timestamp,
    /// Served until then without reading the store again.
    check_at: Timestamp,
    /// And until then on monotonic time (review E13): a wall clock stepped back does not
    /// stretch the bound. Counts from the cache write, one store round trip after the read.
    check_by: Instant,
    version: u64,
    /// The record's incarnation (`Record::created_at`), when known.
    created: Option<Timestamp>,
    /// The cache generation at which this entry (or tombstone) was laid.
    laid: u64,
    /// The cache's use counter at the entry's latest hit (for eviction).
    used: AtomicU64,
}

/// The monotonic instant `d` from now (a century at most: `Instant` has no maximum).
fn monotonic_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// Usable access tokens by installation, bounded and versioned.
pub(crate) struct Cache {
    map: RwLock<HashMap<InstallationId, Entry>>,
    capacity: usize,
    revalidate: Duration,
    /// The origin of the monotonic stamps (`used`, in nanoseconds since it).
    anchor: Instant,
    generation: AtomicU64,
}

/// Whether a put may add an installation the cache does not hold yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Insert {
    /// A caller asked for this token: cache it.
    Yes,
    /// The background refresher: only update an entry callers already use.
    OnlyUpdate,
}

impl Cache {
    pub(crate) fn new(capacity: usize, revalidate: Duration) -> Self {
        Self {
            map: RwLock::default(),
            capacity: capacity.max(1),
            revalidate,
            anchor: Instant::now(),
            generation: AtomicU64::new(0),
        }
    }

    /// `at` as an LRU stamp: nanoseconds since the cache was made.
    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.anchor).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The current generation: take it before reading the store, and pass it to `put`.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The cached token if it is still usable at `now` and was checked against the store
    /// recently enough.
    pub(crate) fn fresh(&self, id: &InstallationId, now: Timestamp) -> Option<AccessToken> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let entry = map.get(id)?;
        let mono = Instant::now();
        if now >= entry.stale_at || now >= entry.check_at || mono >= entry.check_by {
            return None;
        }
        let access = entry.access.clone()?;
        // The monotonic reading doubles as the LRU stamp: no counter shared by every hit.
        entry.used.store(self.stamp(mono), Ordering::Relaxed);
        Some(access)
    }

    /// Caches `record`'s access token, from a store read (or write) that started at `read_at`
    /// in generation `read_gen`, until `stale_at`; unless the entry or tombstone there is of a
    /// newer version of the same record, or was laid after the read started and is a
    /// tombstone of this version or of another incarnation (a same-version entry is renewed:
    /// the store confirmed it again).
    pub(crate) fn put(
        &self,
        record: &Record,
        stale_at: Timestamp,
        (read_at, read_gen): (Timestamp, u64),
        insert: Insert,
    ) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let created = record.created_at();
        let used = match map.get(record.id()) {
            // Another incarnation (deleted and created again): its versions restarted, so
            // only the order of reads and changes tells which is newer.
            Some(e) if e.created.is_some_and(|c| c != created) => {
                if read_gen < e.laid {
                    return;
                }
                None
            }
            Some(e) if record.version() < e.version => return,
            Some(e) if e.access.is_none() && record.version() == e.version => {
                if read_gen < e.laid {
                    return;
                }
                None
            }
            Some(e) if e.access.is_some() => Some(e.used.load(Ordering::Relaxed)),
            _ => None,
        };
        let used = match used {
            Some(used) => used,
            // Nothing served here yet (absent, or a tombstone): only callers add entries.
            None if insert == Insert::OnlyUpdate => return,
            None => self.stamp(Instant::now()),
        };
        map.insert(
            record.id().clone(),
            Entry {
                access: Some(record.tokens().access_token.clone()),
                stale_at,
                check_at: read_at.saturating_add(self.revalidate),
                check_by: monotonic_after(self.revalidate),
                version: record.version(),
                created: Some(created),
                laid: self.generation.fetch_add(1, Ordering::SeqCst) + 1,
                used: AtomicU64::new(used),
            },
        );
        self.evict_if_full(&mut map);
    }

    /// Forgets an installation's token. With `record` (a revocation, a terminal state, a new
    /// grant, as written), every older version is refused from now on, and that one unless
    /// read after this call; without (a 401), the same for the version cached so far.
    pub(crate) fn forget(&self, id: &InstallationId, record: Option<&Record>) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let (version, created) = match record {
            Some(r) => (r.version(), Some(r.created_at())),
            None => map.get(id).map_or((0, None), |e| (e.version, e.created)),
        };
        map.insert(
            id.clone(),
            Entry {
                access: None,
                stale_at: Timestamp::MIN,
                check_at: Timestamp::MIN,
                check_by: Instant::now(),
                version,
                created,
                laid: self.generation.fetch_add(1, Ordering::SeqCst) + 1,
                used: AtomicU64::new(self.stamp(Instant::now())),
            },
        );
        self.evict_if_full(&mut map);
    }

    /// Lays a tombstone for an event (read from the store's log) that ended the tokens of
    /// `id`'s incarnation `incarnation` at `version`: from now on no version of that
    /// incarnation up to `version` is put back unless read after this call, and neither is
    /// another incarnation read before it. With nothing cached, a tombstone is laid only when
    /// `flying` (a flight of `id` in progress may have read the record before the event and be
    /// about to cache it; any later flight reads the record after the event), so a burst of
    /// events about installations this process does not use evicts nothing. Nothing changes
    /// when the cache already holds that incarnation at `version` or later (this process's
    /// own writes). Returns whether a usable token was dropped.
    pub(crate) fn forget_event(
        &self,
        id: &InstallationId,
        incarnation: Timestamp,
        version: u64,
        flying: bool,
    ) -> bool {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let dropped = match map.get(id) {
            Some(e) if e.created == Some(incarnation) && e.version >= version => return false,
            Some(e) => e.access.is_some(),
            None if !flying => return false,
            None => false,
        };
        map.insert(
            id.clone(),
            Entry {
                access: None,
                stale_at: Timestamp::MIN,
                check_at: Timestamp::MIN,
                check_by: Instant::now(),
                version,
                created: Some(incarnation),
                laid: self.generation.fetch_add(1, Ordering::SeqCst) + 1,
                used: AtomicU64::new(self.stamp(Instant::now())),
            },
        );
        self.evict_if_full(&mut map);
        dropped
    }

    /// Forgets every cached token (the event log lost events this process had not read:
    /// anything may have changed). Each next call re-reads its record.
    pub(crate) fn forget_all(&self) {
        let ids: Vec<InstallationId> = {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            map.iter()
                .filter(|(_, e)| e.access.is_some())
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in ids {
            self.forget(&id, None);
        }
    }

    /// Evicts the least recently used tenth once the cache holds more than its capacity.
    fn evict_if_full(&self, map: &mut HashMap<InstallationId, Entry>) {
        if map.len() <= self.capacity {
            return;
        }
        let excess = map.len() - self.capacity;
        let mut ages: Vec<(u64, InstallationId)> = map
            .iter()
            .map(|(id, e)| (e.used.load(Ordering::Relaxed), id.clone()))
            .collect();
        let evict = (excess + self.capacity / 10).min(ages.len());
        if evict < ages.len() {
            ages.select_nth_unstable_by_key(evict, |(used, _)| *used);
        }
        for (_, id) in ages.into_iter().take(evict) {
            map.remove(&id);
        }
    }

    /// How many tokens are cached (tombstones not counted).
    pub(crate) fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|e| e.access.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use tokenkeeper_core::conformance::{T0, sample_record};
    use tokenkeeper_core::{Event, Record, Timestamp};

    use super::*;

    fn id(s: &str) -> InstallationId {
        InstallationId::new(s).unwrap()
    }

    fn at(secs: u64) -> Timestamp {
        T0.saturating_add(Duration::from_secs(secs))
    }

    /// `name`'s record at `version` (leases taken and released).
    fn rec(name: &str, version: u64) -> Record {
        let mut r = sample_record(&id(name), T0);
        while r.version() < version {
            let event = match r.state().lease() {
                Some(l) => Event::LeaseReleased {
                    fence: l.fence,
                    refresh_at: at(10),
                },
                None => Event::LeaseAcquired {
                    holder: tokenkeeper_core::LeaseHolder::new("h"),
                    until: at(100),
                },
            };
            r = r.apply(event, at(1)).unwrap();
        }
        r
    }

    #[test]
    fn served_until_stale_or_until_the_store_must_be_read_again() {
        let cache = Cache::new(10, Duration::from_secs(30));
        let r = sample_record(&id("a"), T0);
        cache.put(&r, at(3600), (T0, cache.generation()), Insert::Yes);
        assert!(cache.fresh(r.id(), at(29)).is_some());
        assert!(cache.fresh(r.id(), at(30)).is_none(), "revalidate");
        cache.put(&r, at(3600), (at(30), cache.generation()), Insert::Yes);
        assert!(cache.fresh(r.id(), at(59)).is_some(), "confirmed again");
        let short = Cache::new(10, Duration::from_secs(7200));
        short.put(&r, at(100), (T0, short.generation()), Insert::Yes);
        assert!(short.fresh(r.id(), at(100)).is_none(), "stale");
    }

    #[test]
    fn a_tombstone_refuses_the_records_it_outlived() {
        let cache = Cache::new(10, Duration::from_secs(30));
        let v1 = sample_record(&id("a"), T0);
        let v2 = v1.apply(Event::Revoked, T0).unwrap();
        cache.put(&v1, at(3600), (T0, cache.generation()), Insert::Yes);
        cache.forget(v1.id(), Some(&v2));
        // A slow flight that read v1 before the revocation puts it back: refused.
        cache.put(&v1, at(3600), (T0, cache.generation()), Insert::Yes);
        assert!(cache.fresh(v1.id(), at(1)).is_none());
        assert_eq!(cache.len(), 0);
        // Without a record, the tombstone covers what was cached, unless read again after it.
        let other = sample_record(&id("b"), T0);
        cache.put(&other, at(3600), (T0, cache.generation()), Insert::Yes);
        let before = cache.generation();
        cache.forget(other.id(), None);
        cache.put(&other, at(3600), (at(4), before), Insert::Yes);
        assert!(
            cache.fresh(other.id(), at(5)).is_none(),
            "read before the forget"
        );
        cache.put(&other, at(3600), (at(5), cache.generation()), Insert::Yes);
        assert!(
            cache.fresh(other.id(), at(6)).is_some(),
            "read after the forget"
        );
        // Deleted and created again: versions restart, the new incarnation is cached.
        let mut later = sample_record(&id("b"), at(100));
        for _ in 0..3 {
            later = later.apply(Event::Resealed, at(100)).unwrap();
        }
        let slow = cache.generation();
        cache.put(&later, at(3600), (at(100), cache.generation()), Insert::Yes);
        let reborn = Record::new(
            id("b"),
            "conformance",
            tokenkeeper_core::conformance::sample_tokens("reborn", at(200)),
            at(300),
            at(200),
        );
        // ...unless it was read before the entry there was laid (a slow flight).
        cache.put(&reborn, at(3600), (at(200), slow), Insert::Yes);
        assert_eq!(
            cache.fresh(reborn.id(), at(101)),
            Some(later.tokens().access_token.clone())
        );
        cache.put(
            &reborn,
            at(3600),
            (at(200), cache.generation()),
            Insert::Yes,
        );
        assert_eq!(
            cache.fresh(reborn.id(), at(201)),
            Some(reborn.tokens().access_token.clone())
        );
    }

    #[test]
    fn an_event_tombstone_refuses_reads_from_before_it_even_when_nothing_was_cached() {
        let cache = Cache::new(10, Duration::from_secs(3600));
        let v5 = rec("a", 5);
        // A flight read v5, then another process revoked it (v6): the watcher lays the
        // tombstone before the flight caches.
        let before = cache.generation();
        assert!(!cache.forget_event(v5.id(), v5.created_at(), 6, true));
        cache.put(&v5, at(3600), (T0, before), Insert::Yes);
        assert!(
            cache.fresh(v5.id(), at(1)).is_none(),
            "a revoked token was cached"
        );
        // This process's own newer write is not undone by its own event.
        let v7 = rec("a", 7);
        cache.put(&v7, at(3600), (T0, cache.generation()), Insert::Yes);
        assert!(!cache.forget_event(v7.id(), v7.created_at(), 7, false));
        assert!(cache.fresh(v7.id(), at(1)).is_some());
        // Another incarnation's event drops the old one's token.
        assert!(cache.forget_event(v7.id(), at(999), 2, false));
        // Nothing cached and no flight: no tombstone to evict anything with.
        assert!(!cache.forget_event(&id("unused"), T0, 3, false));
        let entries = cache.map.read().unwrap().len();
        assert_eq!(entries, 1, "a tombstone for an installation nobody uses");
        assert!(cache.fresh(v7.id(), at(1)).is_none());
    }

    #[test]
    fn the_refresher_only_updates_and_the_least_recently_used_go_first() {
        let cache = Cache::new(20, Duration::from_secs(30));
        let r = sample_record(&id("x"), T0);
        cache.put(&r, at(3600), (T0, cache.generation()), Insert::OnlyUpdate);
        assert_eq!(cache.len(), 0, "the refresher does not fill the cache");
        cache.forget(r.id(), Some(&r));
        cache.put(&r, at(3600), (T0, cache.generation()), Insert::OnlyUpdate);
        assert_eq!(cache.len(), 0, "nor does it revive a tombstone");
        let records: Vec<_> = (0..25)
            .map(|i| sample_record(&id(&format!("i{i}")), T0))
            .collect();
        for r in &records {
            cache.put(r, at(3600), (T0, cache.generation()), Insert::Yes);
            // The first installation is used all the time.
            assert!(cache.fresh(records[0].id(), T0).is_some());
        }
        assert!(cache.len() <= 20, "{}", cache.len());
        assert!(cache.fresh(records[0].id(), T0).is_some(), "in use: kept");
        assert!(
            cache.fresh(records[1].id(), T0).is_none(),
            "oldest: evicted"
        );
        assert!(cache.fresh(records[24].id(), T0).is_some(), "newest: kept");
    }
}
