//! Fleet-wide lifecycle events: the store's outbox read from any process.
//!
//! Every store appends a [`LifecycleEvent`] in the same atomic write as each record change
//! (see `tokenkeeper_core::event`), so a transition made by any process of the fleet is here,
//! in order per installation, however many processes died meanwhile. Two readers use it:
//!
//! - the application, through [`TokenManager::events`]: a resumable stream from a cursor it
//!   persists, at-least-once (an event is delivered again after a crash before the cursor was
//!   saved; its cursor, installation and version identify it);
//! - this process's token cache: a watcher started with the first refresh drops cached tokens
//!   another process ended (revoked, condemned, deleted, replaced by a new grant) within about
//!   [`RefreshPolicy::event_poll`](crate::policy::RefreshPolicy::event_poll), instead of serving them
//!   until `cache_revalidate`.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokenkeeper_core::{EventCursor, LifecycleEvent, LogPosition, StoreError, TokenStore};

use crate::manager::{Engine, TokenManager};

/// How many events one read of the log asks for.
const PAGE: usize = 500;

/// Why an event stream could not go on.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EventsError {
    /// The store's retention removed events after the cursor before they were read: going
    /// on would skip them. The stream ends.
    #[error(
        "the event log no longer holds the events after cursor {cursor} (retention removed them up to {trimmed_through}); reconcile the installations you track with `explain`/`list`, resume from `event_head()`, and raise the store's event retention or read more often"
    )]
    FellBehind {
        /// The cursor the stream stood at.
        cursor: EventCursor,
        /// The newest position retention removed.
        trimmed_through: LogPosition,
    },
    /// The cursor belongs to another store (or another shard layout). The stream ends.
    #[error("event cursor {cursor} cannot be read from this store: {message}")]
    InvalidCursor {
        /// The cursor.
        cursor: EventCursor,
        /// What is wrong with it.
        message: String,
    },
    /// Reading the log failed; the stream goes on (next item after one poll interval) from
    /// the same cursor, so nothing is skipped.
    #[error(
        "reading the lifecycle event log failed: {source}; the stream retries from cursor {cursor}"
    )]
    Store {
        /// The cursor it retries from.
        cursor: EventCursor,
        /// The store's error.
        #[source]
        source: Arc<StoreError>,
    },
}

impl EventsError {
    fn from_store(cursor: &EventCursor, e: StoreError) -> Self {
        match e {
            StoreError::EventsTrimmed {
                trimmed_through, ..
            } => Self::FellBehind {
                cursor: cursor.clone(),
                trimmed_through,
            },
            StoreError::InvalidCursor { message, .. } => Self::InvalidCursor {
                cursor: cursor.clone(),
                message,
            },
            other => Self::Store {
                cursor: cursor.clone(),
                source: Arc::new(other),
            },
        }
    }

    /// True when the stream ended with this error.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::Store { .. })
    }
}

/// A live stream of one consumer's lifecycle events, from [`TokenManager::events`]: waits for
/// new events (polling the store every `event_poll`) and never ends on its own, except after
/// a fatal [`EventsError`].
pub struct EventStream {
    store: Arc<dyn TokenStore>,
    /// Only this consumer's events (and deletions of unreadable records), or every event.
    consumer: Option<String>,
    /// After everything read from the log.
    cursor: EventCursor,
    /// After the last event returned.
    delivered: EventCursor,
    buffer: VecDeque<LifecycleEvent>,
    poll: Duration,
    ended: bool,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("consumer", &self.consumer)
            .field("cursor", &self.cursor.to_string())
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

impl EventStream {
    /// A stream of every consumer's events in `store` after `from`, polling every `poll` when
    /// idle: for a relay or an audit log that serves the whole store (an application reads
    /// its own consumer's with [`TokenManager::events`]).
    pub fn from_store(store: Arc<dyn TokenStore>, from: EventCursor, poll: Duration) -> Self {
        Self {
            store,
            consumer: None,
            delivered: from.clone(),
            cursor: from,
            buffer: VecDeque::new(),
            // Zero (the cache watcher turned off) would make the stream spin.
            poll: if poll.is_zero() {
                Duration::from_millis(500)
            } else {
                poll
            },
            ended: false,
        }
    }

    /// The next event, waiting for one; `None` only after a fatal error was returned.
    pub async fn next(&mut self) -> Option<Result<LifecycleEvent, EventsError>> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.delivered = event.cursor.clone();
                return Some(Ok(event));
            }
            if self.ended {
                return None;
            }
            match self.store.read_events(&self.cursor, PAGE).await {
                Ok(page) => {
                    let idle = page.events.is_empty();
                    self.cursor = page.next;
                    let consumer = self.consumer.as_deref();
                    self.buffer.extend(page.events.into_iter().filter(|e| {
                        consumer.is_none_or(|c| e.consumer == c || e.consumer.is_empty())
                    }));
                    if idle {
                        tokio::time::sleep(self.poll).await;
                    }
                }
                Err(e) => {
                    let error = EventsError::from_store(&self.cursor, e);
                    if error.is_fatal() {
                        self.ended = true;
                    } else {
                        tokio::time::sleep(self.poll).await;
                    }
                    return Some(Err(error));
                }
            }
        }
    }

    /// Where the stream stands: after every event it returned, and after the other consumers'
    /// events it passed over. Persist it (or the last event's `cursor`) to resume.
    pub fn cursor(&self) -> EventCursor {
        if self.buffer.is_empty() {
            self.cursor.clone()
        } else {
            // Events read but not returned yet: resume after the last one returned.
            self.delivered.clone()
        }
    }
}

impl TokenManager {
    /// This consumer's lifecycle events from every process of the fleet, after `from` (a
    /// cursor the application persisted, [`EventCursor::beginning`] for everything retained,
    /// or [`event_head`](Self::event_head) for only what comes next). Delivery is
    /// at-least-once and in order per installation; persist each handled event's `cursor`.
    ///
    /// ```no_run
    /// # async fn demo(manager: tokenkeeper::TokenManager, saved: Option<String>)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// use tokenkeeper::core::EventCursor;
    /// let from = saved.map_or(Ok(EventCursor::beginning()), |s| s.parse())?;
    /// let mut events = manager.events(from);
    /// while let Some(event) = events.next().await {
    ///     let event = event?; // a fatal error ends the stream; a store outage is retried
    ///     if event.to.is_some_and(|s| s.is_terminal()) {
    ///         println!("email the owner of {}: {:?}", event.installation, event.kind);
    ///     }
    ///     // Persist events.cursor().to_string() here (it also moves past other consumers'
    ///     // events, so a quiet consumer does not fall behind retention).
    /// }
    /// # Ok(()) }
    /// ```
    pub fn events(&self, from: EventCursor) -> EventStream {
        EventStream {
            consumer: Some(self.engine.consumer.clone()),
            ..EventStream::from_store(
                self.engine.store.clone(),
                from,
                self.engine.policy.event_poll,
            )
        }
    }

    /// The cursor after the newest event in the store: start [`events`](Self::events) here to
    /// see only what happens from now on.
    ///
    /// # Errors
    ///
    /// [`EventsError::Store`] when the store cannot be read.
    pub async fn event_head(&self) -> Result<EventCursor, EventsError> {
        self.engine
            .store
            .event_head()
            .await
            .map_err(|e| EventsError::from_store(&EventCursor::beginning(), e))
    }
}

/// Starts this process's cache watcher, or starts it again if it ended (its runtime shut
/// down): reads the log's head first (before the caller reads any record, so no event after
/// that read is missed), then follows the log in a task that ends when the last manager of
/// the engine is dropped. A restarted watcher forgets every cached token: what happened
/// while none watched is unknown.
pub(crate) async fn ensure_watch(engine: &Arc<Engine>) {
    let poll = engine.policy.event_poll;
    if poll.is_zero() {
        return;
    }
    let mut slot = engine.watch.lock().await;
    if slot.as_ref().is_some_and(|task| !task.is_finished()) {
        return;
    }
    let restarted = slot.is_some();
    // Bounded: concurrent first flights wait on this. A head read that takes longer is left
    // to the watcher, which then forgets what was cached meanwhile.
    let head = tokio::time::timeout(Duration::from_secs(1), engine.store.event_head())
        .await
        .ok()
        .and_then(Result::ok);
    if restarted && head.is_some() {
        engine.cache.forget_all();
    }
    *slot = Some(tokio::spawn(watch(Arc::downgrade(engine), head, poll)));
}

/// Follows the log from `cursor`; without one (the head could not be read), reads the head
/// and then forgets every cached token, since anything cached meanwhile went unwatched.
async fn watch(engine: Weak<Engine>, mut cursor: Option<EventCursor>, poll: Duration) {
    loop {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let mut full = false;
        match &cursor {
            None => {
                if let Ok(head) = engine.store.event_head().await {
                    engine.cache.forget_all();
                    cursor = Some(head);
                }
            }
            Some(at) => match engine.store.read_events(at, PAGE).await {
                Ok(page) => {
                    full = page.events.len() == PAGE;
                    for e in &page.events {
                        let ours = e.consumer == engine.consumer || e.consumer.is_empty();
                        if ours
                            && e.ends_tokens()
                            && engine.cache.forget_event(
                                &e.installation,
                                e.incarnation,
                                e.version,
                                engine.flights.in_progress(&e.installation),
                            )
                        {
                            crate::manager::metrics::cache_invalidation(&engine.consumer_label);
                            tracing::debug!(
                                installation = %e.installation,
                                event = %e.kind,
                                "dropped a cached access token another process ended"
                            );
                        }
                    }
                    cursor = Some(page.next);
                }
                Err(StoreError::EventsTrimmed { .. } | StoreError::InvalidCursor { .. }) => {
                    tracing::warn!(
                        "the token cache's event watcher lost its place in the event log (retention, a restore or a reset); every cached token will be read again from the store"
                    );
                    // The head first, then forget: nothing cached after the head is missed.
                    cursor = engine.store.event_head().await.ok();
                    if cursor.is_some() {
                        engine.cache.forget_all();
                    }
                    full = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the token cache's event watcher could not read the event log; cached tokens stay bounded by cache_revalidate meanwhile");
                }
            },
        }
        drop(engine);
        if !full {
            tokio::time::sleep(poll).await;
        }
    }
}
