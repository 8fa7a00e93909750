//! The `TokenStore` contract: a versioned compare-and-swap store of [`Record`]s.
//!
//! One primitive carries all concurrency (see the design document, "The store contract"): every write names the version it read,
//! and the store applies it only if that is still the stored version. Leases are fields of the
//! record taken by the same compare-and-swap, so every backend gets fenced locking without
//! implementing locks. Backends stay thin: no HTTP, no policy, just atomic versioned writes and
//! two indexes (due time, state). The conformance suite (`conformance` feature) proves each one.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::event::{EventCursor, EventPage};
use crate::id::InstallationId;
use crate::record::Record;
use crate::state::StateKind;
use crate::time::Timestamp;

/// A boxed error from a backend's driver.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What can go wrong talking to a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `create` found a record with this id already.
    #[error(
        "installation {id} already exists in the {backend} store; read it, or choose another id"
    )]
    AlreadyExists {
        /// The id.
        id: InstallationId,
        /// The backend.
        backend: &'static str,
    },
    /// The stored data of one installation cannot be decoded. Other installations are unaffected.
    #[error(
        "the {backend} store holds corrupt data for installation {id}: {source}; restore it from a backup or delete it and authorize the installation again"
    )]
    Corrupt {
        /// The installation whose data is corrupt.
        id: InstallationId,
        /// The backend.
        backend: &'static str,
        /// What is wrong with it.
        #[source]
        source: BoxError,
    },
    /// The store could not be reached in time. For a write, the outcome is unknown: read the
    /// record again before retrying.
    #[error(
        "the {backend} store is unavailable ({operation}): {source}; the operation may not have been applied, retry once the store is back"
    )]
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// The caller passed something the contract forbids.
    #[error("invalid {operation} on the {backend} store for installation {id}: {message}")]
    InvalidArgument {
        /// The backend.
        backend: &'static str,
        /// The operation.
        operation: &'static str,
        /// The installation.
        id: InstallationId,
        /// What is wrong.
        message: String,
    },
    /// Events after the reader's cursor were removed by the store's retention before it read
    /// them: resuming would skip them silently, so the read is refused.
    #[error(
        "the {backend} store no longer holds the events after this cursor (retention removed events up to {trimmed_through}); reconcile every installation with `list`/`explain`, then read from EventCursor::beginning(), and raise the store's event retention or read more often"
    )]
    EventsTrimmed {
        /// The backend.
        backend: &'static str,
        /// The newest removed position, in the log that lost events.
        trimmed_through: crate::event::LogPosition,
    },
    /// The cursor passed to `read_events` does not belong to this store.
    #[error("invalid event cursor for the {backend} store: {message}")]
    InvalidCursor {
        /// The backend.
        backend: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The backend failed in another way.
    #[error("the {backend} store failed ({operation}): {source}")]
    Backend {
        /// The backend.
        backend: &'static str,
        /// What was being done.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
}

/// The source of a [`StoreError::Unavailable`] write that the store applied but could not
/// make as durable as it was configured to (a Redis `WAIT` for replicas that fell short): it
/// may vanish in a failover. A caller must neither act on it (a lease) nor count on it (a
/// result), nor assume it absent. See [`StoreError::not_durable`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotDurable(pub BoxError);

impl StoreError {
    /// A write the store applied without the durability it was configured for (see
    /// [`NotDurable`]), reported as [`StoreError::Unavailable`].
    pub fn not_durable(
        backend: &'static str,
        operation: &'static str,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::unavailable(backend, operation, NotDurable(source.into()))
    }

    /// Whether this is a write applied without its configured durability ([`NotDurable`]).
    pub fn is_not_durable(&self) -> bool {
        matches!(self, Self::Unavailable { source, .. } if source.is::<NotDurable>())
    }

    /// The store could not be reached in time (connection lost or refused, timeout, failover
    /// reply, lock contention that outlasted its wait): the caller may retry.
    pub fn unavailable(
        backend: &'static str,
        operation: &'static str,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Unavailable {
            backend,
            operation,
            source: source.into(),
        }
    }

    /// The backend failed in a way a retry will not fix by itself.
    pub fn backend(
        backend: &'static str,
        operation: &'static str,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Backend {
            backend,
            operation,
            source: source.into(),
        }
    }

    /// The stored data of installation `id` cannot be decoded.
    pub fn corrupt(backend: &'static str, id: InstallationId, source: impl Into<BoxError>) -> Self {
        Self::Corrupt {
            id,
            backend,
            source: source.into(),
        }
    }
}

/// The outcome of [`TokenStore::compare_and_swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The record was written.
    Swapped,
    /// Someone else wrote first; here is what is stored now.
    Conflict(Box<Record>),
    /// No record with this id exists.
    Missing,
}

/// The outcome of [`TokenStore::delete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The record was deleted.
    Deleted,
    /// The stored version differs; here is what is stored now.
    Conflict(Box<Record>),
    /// No record with this id exists.
    Missing,
}

/// One installation whose next action is due.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DueEntry {
    /// When it falls due.
    pub due_at: Timestamp,
    /// The installation.
    pub id: InstallationId,
}

/// An entry of a paged read, and the cursor that resumes after it.
pub trait PageEntry {
    /// What `after` takes to resume after this entry.
    type Cursor: Clone + fmt::Debug + PartialEq + Eq;

    /// The cursor that resumes after this entry.
    fn cursor(&self) -> Self::Cursor;
}

impl PageEntry for DueEntry {
    type Cursor = DueEntry;

    fn cursor(&self) -> DueEntry {
        self.clone()
    }
}

impl PageEntry for ListEntry {
    type Cursor = InstallationId;

    fn cursor(&self) -> InstallationId {
        self.id.clone()
    }
}

/// A page of a paged read ([`TokenStore::due`], [`TokenStore::list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T: PageEntry> {
    /// The entries, in the read's order.
    pub entries: Vec<T>,
    /// Pass this as `after` to read the next page; `None` when this page was the last.
    pub next: Option<T::Cursor>,
}

impl<T: PageEntry> Default for Page<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            next: None,
        }
    }
}

impl<T: PageEntry> Page<T> {
    /// A page of up to `limit` entries read in order: when it is full, its last entry is the
    /// cursor of the next page (which may turn out empty).
    pub fn from_entries(entries: Vec<T>, limit: usize) -> Self {
        let next = if limit > 0 && entries.len() == limit {
            entries.last().map(PageEntry::cursor)
        } else {
            None
        };
        Self { entries, next }
    }
}

/// How many installations are in each state ([`TokenStore::count_states`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    counts: [u64; StateKind::ALL.len()],
}

impl StateCounts {
    fn slot(kind: StateKind) -> usize {
        StateKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default()
    }

    /// The count of `kind`.
    pub fn get(&self, kind: StateKind) -> u64 {
        self.counts[Self::slot(kind)]
    }

    /// Adds `n` to the count of `kind`.
    pub fn add(&mut self, kind: StateKind, n: u64) {
        let slot = &mut self.counts[Self::slot(kind)];
        *slot = slot.saturating_add(n);
    }

    /// Every state with its count, in lifecycle order.
    pub fn iter(&self) -> impl Iterator<Item = (StateKind, u64)> + '_ {
        StateKind::ALL.into_iter().map(|k| (k, self.get(k)))
    }
}

/// A page of [`TokenStore::due`]: entries in `(due_at, id)` order.
pub type DuePage = Page<DueEntry>;

/// A page of [`TokenStore::list`]: entries in id order (byte-wise).
pub type ListPage = Page<ListEntry>;

/// Which records [`TokenStore::list`] returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only records in this state, or all.
    pub state: Option<StateKind>,
}

impl ListFilter {
    /// Every record.
    pub fn all() -> Self {
        Self { state: None }
    }

    /// Records in `state`.
    pub fn in_state(state: StateKind) -> Self {
        Self { state: Some(state) }
    }

    /// Whether `kind` passes.
    pub fn matches(&self, kind: StateKind) -> bool {
        self.state.is_none_or(|s| s == kind)
    }
}

/// One row of [`TokenStore::list`]: served from the indexes, so a corrupt payload does not hide
/// the rest of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// The installation.
    pub id: InstallationId,
    /// Its state's kind.
    pub state: StateKind,
}

/// A versioned compare-and-swap store of installation records.
///
/// The methods come in three groups: records (`get`, `create`, `compare_and_swap`,
/// `delete`, and the `due` and `list` indexes with `count_states`), authorization flows
/// (`claim_flow`, `settle_flow`, `get_flow`) and the event log (`read_events`,
/// `event_head`). A new store instantiates the conformance suite
/// ([`conformance_tests!`](crate::conformance_tests), feature `conformance`).
///
/// Contract (checked by the conformance suite):
/// - `create` writes only if the id is absent, else [`StoreError::AlreadyExists`].
/// - `compare_and_swap(record, expected)` writes `record` only if the stored version equals
///   `expected`, atomically with its index entries; `record.version()` must be greater than
///   `expected` ([`StoreError::InvalidArgument`] otherwise). Of any number of concurrent swaps
///   from the same version, exactly one succeeds. A record written under a lease
///   ([`Record::written_under`]) is written only over a stored record holding that lease
///   ([`Record::lease_matches`]); otherwise the outcome is `Conflict`.
/// - `due(consumer, before, after, limit)` returns up to `limit` entries of `consumer` with
///   `due_at < before`, in
///   `(due_at, id)` order, strictly after the cursor `after`; terminal records never appear.
/// - `list(filter, after, limit)` returns up to `limit` entries in id order after `after`.
/// - A record that cannot be decoded is [`StoreError::Corrupt`] naming the id; never a panic.
/// - `claim_flow(flow, value, ttl)` stores `value` under `flow` only if no unexpired value is
///   there, and otherwise returns the stored one; of any number of concurrent claims of one
///   flow, exactly one gets `None`. `settle_flow` replaces the value (the claimant's result);
///   `get_flow` reads it. A flow's value disappears `ttl` after it was last written, judged by
///   the backend's own clock.
/// - Every `create`, `compare_and_swap` and `delete` that is applied appends exactly one
///   [`LifecycleEvent`](crate::LifecycleEvent) in the same atomic write (see
///   the event log's contract in `docs/design.md`): both or neither, also when the caller got an error
///   after the store applied it ([`StoreError::Unavailable`]). One that is refused
///   (`AlreadyExists`, `Conflict`, `Missing`) appends none.
///   `read_events(after, limit)` returns up to `limit` events after the cursor, each
///   installation's in version order; a cursor whose next events retention removed is
///   [`StoreError::EventsTrimmed`].
#[async_trait]
pub trait TokenStore: Send + Sync + fmt::Debug + 'static {
    // Records: read, create, compare-and-swap, delete, and the two indexes (due, by state).

    /// The record of `id`, if any. A read sees every write acknowledged before it started,
    /// by any handle of the store.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`]; data that cannot be decoded is
    /// [`StoreError::Corrupt`] naming the installation.
    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError>;

    /// Stores a new record, with its due entry and a `Created` event in the event log, in one
    /// atomic write.
    ///
    /// # Errors
    ///
    /// [`StoreError::AlreadyExists`] if the id is taken; [`StoreError::InvalidArgument`] for
    /// a record the contract forbids; [`StoreError::Unavailable`] (the outcome unknown: read
    /// again before retrying) or [`StoreError::Backend`].
    async fn create(&self, record: &Record) -> Result<(), StoreError>;

    /// Replaces the stored record if its version is still `expected_version` (and, for a
    /// record written under a lease, the stored record holds that lease), with its due entry
    /// and the event of its newest history entry, in one atomic write. The one way records
    /// change: every writer's fencing rests on it. A conflict returns the stored record.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidArgument`] when `record.version()` is not greater than
    /// `expected_version` or the ids differ; [`StoreError::Unavailable`] (the outcome unknown:
    /// the write may have been applied; read again, and recognise your own write) or
    /// [`StoreError::Backend`].
    async fn compare_and_swap(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<CasOutcome, StoreError>;

    /// Deletes the record, with its due entry, if its version is still `expected_version`, and
    /// writes a `Deleted` event.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] (the outcome unknown) or [`StoreError::Backend`].
    async fn delete(
        &self,
        id: &InstallationId,
        expected_version: u64,
    ) -> Result<DeleteOutcome, StoreError>;

    /// Installations of `consumer` (a record's [`Record::consumer`]) whose next action is due
    /// before `before`, oldest first, paged: up to `limit` entries strictly after the cursor
    /// `after`. Terminal records never appear. The index is kept per consumer, so consumers
    /// sharing a store never walk each other's entries.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`]; a corrupt index entry is
    /// [`StoreError::Corrupt`] naming the installation when it can be named.
    async fn due(
        &self,
        consumer: &str,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError>;

    /// Installations by state, in id order, paged: up to `limit` entries strictly after
    /// the id `after`. Served from the indexes, so a corrupt record does not hide the rest.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`].
    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError>;

    /// How many installations are in each state, for the state gauge. The default pages
    /// [`TokenStore::list`] and stops counting a state at `cap`; the stores of this workspace
    /// count in the backend instead (an SQL `GROUP BY`, a Redis `ZCARD` per index), so the
    /// gauge over a million installations moves a few numbers, not a million ids (review
    /// E10), and their counts are exact whatever `cap`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`].
    async fn count_states(&self, cap: u64) -> Result<StateCounts, StoreError> {
        count_by_listing(self, cap, 1000).await
    }

    /// Claims an authorization flow: stores `value` under `flow` for `ttl` unless an unexpired
    /// value is already there, and returns `None` when this call claimed it, or the value that
    /// was there. This is what makes a callback's code exchange happen once across processes:
    /// the flow is claimed in the store before the exchange, and a duplicate callback reads
    /// the claimant's result instead of spending the code again. `flow` is at most 512 bytes
    /// and `value` a few hundred; neither holds a secret.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`]: the claim may or may not be
    /// stored, so the caller must not exchange the code.
    async fn claim_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Replaces the value of a claimed flow (the claimant writes its result) and keeps it for
    /// `ttl` from now.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`].
    async fn settle_flow(&self, flow: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError>;

    /// The value of a flow, unless it expired or was never claimed.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`].
    async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` lifecycle events written after `after`, in log order (each installation's
    /// in version order), and the cursor to resume from.
    ///
    /// # Errors
    ///
    /// [`StoreError::EventsTrimmed`] when retention removed events after `after`;
    /// [`StoreError::InvalidCursor`] for a cursor of another store; [`StoreError::Corrupt`]
    /// for an undecodable event (naming its installation); [`StoreError::Unavailable`] or
    /// [`StoreError::Backend`].
    async fn read_events(&self, after: &EventCursor, limit: usize)
    -> Result<EventPage, StoreError>;

    /// The cursor after the newest event: reading from it returns only events written later.
    /// What a reader that wants no history starts from.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`].
    async fn event_head(&self) -> Result<EventCursor, StoreError>;

    /// Where a process can keep the tokens this store would not take (default
    /// [`UnsavedHome::Unknown`]). Wrappers forward their inner store's answer.
    fn unsaved_tokens_home(&self) -> UnsavedHome {
        UnsavedHome::Unknown
    }
}

/// Where the tokens a store would not take can be kept by the process using it (see
/// [`TokenStore::unsaved_tokens_home`]): the engine's last resort for rotated refresh tokens,
/// which exist nowhere else, must be at least as durable as the store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnsavedHome {
    /// The store keeps nothing past the process (the memory store): holding such tokens in
    /// memory loses nothing the store would have kept.
    Ephemeral,
    /// A directory beside the store's own data, as durable as it (SQLite: `<database>.unsaved`
    /// next to the database file).
    Dir(std::path::PathBuf),
    /// The store cannot tell (a store shared over the network): the application chooses.
    Unknown,
}

/// Checks the argument rule of `compare_and_swap`; backends call it first.
pub fn check_cas_arguments(
    backend: &'static str,
    record: &Record,
    expected_version: u64,
) -> Result<(), StoreError> {
    if record.version() <= expected_version {
        return Err(StoreError::InvalidArgument {
            backend,
            operation: "compare_and_swap",
            id: record.id().clone(),
            message: format!(
                "the new record's version ({}) must be greater than the expected version ({expected_version}); build it with `transition`",
                record.version()
            ),
        });
    }
    Ok(())
}

/// The default [`TokenStore::count_states`]: pages of `page` entries of [`TokenStore::list`]
/// per state, stopping a state at the page that reaches `cap`. The conformance suite runs it
/// against every store (whose own counts it must match), so the default is checked even
/// though no store of this workspace uses it.
pub(crate) async fn count_by_listing<S: TokenStore + ?Sized>(
    store: &S,
    cap: u64,
    page: usize,
) -> Result<StateCounts, StoreError> {
    let mut counts = StateCounts::default();
    for state in StateKind::ALL {
        let mut after: Option<InstallationId> = None;
        loop {
            let listed = store
                .list(ListFilter::in_state(state), after.as_ref(), page)
                .await?;
            counts.add(state, listed.entries.len() as u64);
            match listed.next {
                Some(next) if counts.get(state) < cap => after = Some(next),
                _ => break,
            }
        }
    }
    Ok(counts)
}

macro_rules! forward_store {
    ($($wrapper:tt)*) => {
        #[async_trait]
        impl<S: TokenStore + ?Sized> TokenStore for $($wrapper)*<S> {
            fn unsaved_tokens_home(&self) -> UnsavedHome {
                (**self).unsaved_tokens_home()
            }
            async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
                (**self).get(id).await
            }
            async fn create(&self, record: &Record) -> Result<(), StoreError> {
                (**self).create(record).await
            }
            async fn compare_and_swap(
                &self,
                record: &Record,
                expected_version: u64,
            ) -> Result<CasOutcome, StoreError> {
                (**self).compare_and_swap(record, expected_version).await
            }
            async fn delete(
                &self,
                id: &InstallationId,
                expected_version: u64,
            ) -> Result<DeleteOutcome, StoreError> {
                (**self).delete(id, expected_version).await
            }
            async fn due(
                &self,
                consumer: &str,
                before: Timestamp,
                after: Option<&DueEntry>,
                limit: usize,
            ) -> Result<DuePage, StoreError> {
                (**self).due(consumer, before, after, limit).await
            }
            async fn list(
                &self,
                filter: ListFilter,
                after: Option<&InstallationId>,
                limit: usize,
            ) -> Result<ListPage, StoreError> {
                (**self).list(filter, after, limit).await
            }
            async fn count_states(&self, cap: u64) -> Result<StateCounts, StoreError> {
                (**self).count_states(cap).await
            }
            async fn claim_flow(
                &self,
                flow: &str,
                value: &[u8],
                ttl: Duration,
            ) -> Result<Option<Vec<u8>>, StoreError> {
                (**self).claim_flow(flow, value, ttl).await
            }
            async fn settle_flow(
                &self,
                flow: &str,
                value: &[u8],
                ttl: Duration,
            ) -> Result<(), StoreError> {
                (**self).settle_flow(flow, value, ttl).await
            }
            async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
                (**self).get_flow(flow).await
            }
            async fn read_events(
                &self,
                after: &EventCursor,
                limit: usize,
            ) -> Result<EventPage, StoreError> {
                (**self).read_events(after, limit).await
            }
            async fn event_head(&self) -> Result<EventCursor, StoreError> {
                (**self).event_head().await
            }
        }
    };
}

forward_store!(Arc);
forward_store!(Box);
