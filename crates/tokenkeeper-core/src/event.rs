//! The lifecycle event outbox: what every store appends in the same atomic write as a record,
//! and how an application reads it back from any process.
//!
//! Every write of a record (create, compare-and-swap, delete) appends one [`LifecycleEvent`] to
//! the store's event log *in the same atomic write* (memory: under the same lock; SQLite and
//! PostgreSQL: a trigger of the same statement; Redis: `XADD` in the same Lua script), so no
//! transition exists without its event and no event without its transition, whatever process
//! dies when. An event carries the installation, its consumer, the states before and after, the
//! provider's words for failures, the time and the record version it wrote: never a token.
//!
//! Events are read with [`crate::TokenStore::read_events`] from an [`EventCursor`] the
//! application persists (its text form is stable). A store keeps one ordered log (memory,
//! SQLite, PostgreSQL) or one per shard (Redis); the cursor holds a position per log, and order
//! is guaranteed per installation, which is all a consumer of lifecycle events needs. Delivery
//! is at-least-once: an application that crashes after handling an event and before persisting
//! its cursor sees it again, with the same cursor, installation and version to de-duplicate.
//! Retention is bounded ([`EventRetention`]); a cursor whose next events were removed is
//! refused with [`crate::StoreError::EventsTrimmed`] instead of silently skipping them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::id::InstallationId;
use crate::record::{ErrorDetail, EventKind, HistoryEntry, Record};
use crate::state::{ReauthReason, State, StateKind};
use crate::store::StoreError;
use crate::time::Timestamp;

/// A position in one event log: a sequence number (`major`, with `minor` 0) for the SQL and
/// memory stores, a stream entry id (`major`-`minor`) for Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition {
    /// Sequence number, or the stream entry's milliseconds.
    pub major: u64,
    /// 0, or the stream entry's sequence within its millisecond.
    pub minor: u64,
}

impl LogPosition {
    /// A sequence-number position.
    pub const fn seq(seq: u64) -> Self {
        Self {
            major: seq,
            minor: 0,
        }
    }
}

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.major, self.minor)
    }
}

impl FromStr for LogPosition {
    type Err = InvalidCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (major, minor) = s.split_once('-').unwrap_or((s, "0"));
        let parse = |t: &str| {
            t.parse::<u64>()
                .map_err(|_| InvalidCursor(format!("{s:?} is not a log position")))
        };
        Ok(Self {
            major: parse(major)?,
            minor: parse(minor)?,
        })
    }
}

impl Serialize for LogPosition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LogPosition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where a reader of the event log stands: the id of the store's event log and the position of
/// the last event it handled in each of the log's parts (one for memory and the SQL stores,
/// one per shard for Redis). Persist its text form ([`Display`](fmt::Display), parsed back by
/// [`FromStr`]); [`EventCursor::beginning`] starts at the oldest retained event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EventCursor {
    /// The event log it belongs to (random per store, set when the log was created); `None`
    /// only for the beginning.
    log: Option<u64>,
    positions: Vec<LogPosition>,
}

/// The text prefix of a cursor's stable form.
const CURSOR_PREFIX: &str = "tkc1:";

impl EventCursor {
    /// Before every retained event: reading from here never reports
    /// [`StoreError::EventsTrimmed`].
    pub fn beginning() -> Self {
        Self::default()
    }

    /// True for [`EventCursor::beginning`] (and only for it: a cursor a store returned, even
    /// one at position zero, is checked against retention).
    pub fn is_beginning(&self) -> bool {
        self.positions.is_empty()
    }

    /// A cursor of the event log `log` at these positions, one per part (for stores).
    pub fn from_positions(log: u64, positions: Vec<LogPosition>) -> Self {
        Self {
            log: Some(log),
            positions,
        }
    }

    /// The event log it belongs to; `None` for the beginning.
    pub fn log(&self) -> Option<u64> {
        self.log
    }

    /// The position in each part of the log; empty for the beginning (for stores).
    pub fn positions(&self) -> &[LogPosition] {
        &self.positions
    }

    /// The positions for the event log `log` with `parts` parts (for stores): zeros for the
    /// beginning; [`StoreError::InvalidCursor`] for a cursor of another log or layout.
    pub fn positions_for(
        &self,
        backend: &'static str,
        log: u64,
        parts: usize,
    ) -> Result<Vec<LogPosition>, StoreError> {
        if self.positions.is_empty() {
            return Ok(vec![LogPosition::default(); parts]);
        }
        let refuse = |what: String| StoreError::InvalidCursor {
            backend,
            message: format!(
                "{what}; reconcile the installations you track with `list`/`explain`, then start from EventCursor::beginning() or the event head"
            ),
        };
        if self.log.is_some_and(|l| l != log) {
            return Err(refuse(format!(
                "the cursor belongs to event log {:016x}, this store's is {log:016x} (another store, or this one created anew)",
                self.log.unwrap_or_default()
            )));
        }
        if self.positions.len() != parts {
            return Err(refuse(format!(
                "the cursor holds {} log positions but this store keeps {parts} (another store, or another shard count)",
                self.positions.len()
            )));
        }
        Ok(self.positions.clone())
    }
}

/// Checks a cursor of a store whose event log is one sequence (memory, SQLite, PostgreSQL)
/// against that log: its id `log`, the newest sequence number retention removed (`trimmed`)
/// and the newest handed out (`last`). Returns the sequence number to read after.
///
/// # Errors
///
/// [`StoreError::InvalidCursor`] for another log, or a position past `last` (the store was
/// restored from a backup taken before the reader's last event, which is then gone);
/// [`StoreError::EventsTrimmed`] when events after the cursor were removed.
pub fn check_sequence_cursor(
    backend: &'static str,
    after: &EventCursor,
    log: u64,
    trimmed: u64,
    last: u64,
) -> Result<u64, StoreError> {
    let at = after.positions_for(backend, log, 1)?[0].major;
    if after.is_beginning() {
        return Ok(0);
    }
    if at > last {
        return Err(StoreError::InvalidCursor {
            backend,
            message: format!(
                "the cursor stands at event {at} but the log ends at {last}: the store was restored from an older backup or its log was reset, so the events the cursor saw may be gone; reconcile with `list`/`explain`, then start from the event head"
            ),
        });
    }
    if at < trimmed {
        return Err(StoreError::EventsTrimmed {
            backend,
            trimmed_through: LogPosition::seq(trimmed),
        });
    }
    Ok(at)
}

/// The event of a row of a sequence-numbered log `log` (for stores).
pub fn sequence_event(log: u64, seq: u64, row: EventRow<'_>) -> LifecycleEvent {
    decode_event(
        EventCursor::from_positions(log, vec![LogPosition::seq(seq)]),
        0,
        LogPosition::seq(seq),
        row,
    )
}

/// A log id for a new event log, from the process's random hasher keys (for stores that
/// create their log in memory; the SQL stores draw theirs in the migration).
pub fn new_log_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

impl fmt::Display for EventCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(CURSOR_PREFIX)?;
        if let Some(log) = self.log {
            write!(f, "{log:016x}/")?;
        }
        for (n, p) in self.positions.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Text that is not an [`EventCursor`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event cursor: {0}; persist the text of `EventCursor`'s Display and parse it back")]
pub struct InvalidCursor(String);

impl FromStr for EventCursor {
    type Err = InvalidCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s
            .strip_prefix(CURSOR_PREFIX)
            .ok_or_else(|| InvalidCursor(format!("{s:?} does not start with {CURSOR_PREFIX:?}")))?;
        let (log, body) = match body.split_once('/') {
            Some((log, rest)) => (
                Some(
                    u64::from_str_radix(log, 16)
                        .map_err(|_| InvalidCursor(format!("{s:?} does not name an event log")))?,
                ),
                rest,
            ),
            None => (None, body),
        };
        if body.is_empty() {
            return Ok(Self::beginning());
        }
        let positions = body
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { log, positions })
    }
}

impl Serialize for EventCursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventCursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One write of one installation, as the event log tells it. Never holds a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LifecycleEvent {
    /// Resume after this event by passing it to `read_events`.
    pub cursor: EventCursor,
    /// Which part of the log holds it (0, or the Redis shard).
    pub part: u32,
    /// Its position in that part: with `part` and the cursor's log, what identifies this
    /// event on every delivery ([`LifecycleEvent::delivery_id`]).
    pub position: LogPosition,
    /// The installation written.
    pub installation: InstallationId,
    /// Which incarnation of the installation: its record's creation time. A record deleted
    /// and created again starts its versions at 1 under a new incarnation.
    pub incarnation: Timestamp,
    /// Its consumer ([`Record::consumer`]); empty for the deletion of a record that could not
    /// be read.
    pub consumer: String,
    /// What happened: the history event of the write, [`EventKind::Deleted`], or
    /// [`EventKind::Unknown`] for an event this build cannot read (written by a newer
    /// version, or damaged): its installation and version are still known.
    pub kind: EventKind,
    /// The state before; `None` for a creation.
    pub from: Option<StateKind>,
    /// The state after; `None` for a deletion.
    pub to: Option<StateKind>,
    /// The state after, with its data (why re-authorization is required, until when a backoff
    /// lasts, the lease); `None` for a deletion.
    pub state: Option<State>,
    /// The provider's words for a failed exchange (or an anomaly of a kept reply).
    pub error: Option<ErrorDetail>,
    /// When it happened: the writer's clock for writes, the store's for deletions.
    pub at: Timestamp,
    /// The record version this write produced; a deletion counts as the version after the
    /// last one. Versions of one installation rise by one per event until it is deleted (a
    /// record created again starts at 1).
    pub version: u64,
}

impl LifecycleEvent {
    /// A text that identifies this event, the same on every delivery of it: the event log,
    /// the part and the position. What a receiver de-duplicates on.
    pub fn delivery_id(&self) -> String {
        format!(
            "{:016x}/{}/{}",
            self.cursor.log().unwrap_or_default(),
            self.part,
            self.position
        )
    }

    /// Why the installation needs re-authorization, when this event put it there.
    pub fn reauthorization_reason(&self) -> Option<ReauthReason> {
        match &self.state {
            Some(State::ReauthorizationRequired { reason, .. }) => Some(*reason),
            _ => None,
        }
    }

    /// True when the tokens this installation had before may no longer be served: it was
    /// revoked, condemned (re-authorization required), deleted or given a new grant (or the
    /// event cannot be read, so it might be any of those).
    pub fn ends_tokens(&self) -> bool {
        matches!(
            self.kind,
            EventKind::Revoked
                | EventKind::RefreshRejected
                | EventKind::Authorized
                | EventKind::Deleted
                | EventKind::Unknown
        ) || self.to.is_some_and(StateKind::is_terminal)
    }
}

/// A page of [`crate::TokenStore::read_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPage {
    /// The events, in log order (per installation, in version order).
    pub events: Vec<LifecycleEvent>,
    /// Where the next read resumes: the last event's cursor; with no events, the cursor read
    /// from (on Redis, from the beginning, moved to each shard's retention mark).
    pub next: EventCursor,
}

/// How long a store keeps events: both bounds apply, whichever removes an event first. The
/// oldest events go as new ones are written (a few per write, so trimming never stalls a
/// write). Defaults: 100,000 events (per store: Redis divides it among its shards) and 7 days,
/// a few tens of megabytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRetention {
    max_events: u64,
    max_age: Duration,
}

impl Default for EventRetention {
    fn default() -> Self {
        Self {
            max_events: 100_000,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl EventRetention {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keep at most `n` events (at least 1; Redis keeps `n / shards`, at least 1, per shard).
    pub fn max_events(mut self, n: u64) -> Self {
        self.max_events = n.max(1);
        self
    }

    /// Remove events older than `age` (by the store's clock; at least 1 ms).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age.max(Duration::from_millis(1));
        self
    }

    /// The event bound.
    pub fn event_limit(&self) -> u64 {
        self.max_events
    }

    /// The age bound.
    pub fn age_limit(&self) -> Duration {
        self.max_age
    }

    /// The age bound in whole milliseconds, saturating.
    pub fn age_limit_millis(&self) -> u64 {
        u64::try_from(self.max_age.as_millis()).unwrap_or(u64::MAX)
    }
}

/// The stored form of an event's body. SQL stores build the same JSON in their triggers from
/// the record's last history entry and state, so it must stay in step with them.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Payload {
    Write {
        entry: HistoryEntry,
        state: State,
        /// The record's creation time (its incarnation).
        #[serde(default)]
        created: Option<Timestamp>,
    },
    /// The deleted record's state, by [`StateKind::as_str`] (what the SQL stores index).
    Deleted {
        deleted: String,
        #[serde(default)]
        created: Option<Timestamp>,
    },
}

/// The stored body of the event a write of `record` appends: its last history entry and its
/// state (JSON, no token).
pub fn write_event_payload(record: &Record) -> Vec<u8> {
    #[derive(Serialize)]
    struct Borrowed<'a> {
        entry: Option<&'a HistoryEntry>,
        state: &'a State,
        created: Timestamp,
    }
    serde_json::to_vec(&Borrowed {
        entry: record.history().last(),
        state: record.state(),
        created: record.created_at(),
    })
    .unwrap_or_default()
}

/// The stored body of the event a deletion of `record` appends.
pub fn delete_event_payload(record: &Record) -> Vec<u8> {
    serde_json::to_vec(&Payload::Deleted {
        deleted: record.state().kind().as_str().to_owned(),
        created: Some(record.created_at()),
    })
    .unwrap_or_default()
}

/// Why a stored event could not be read.
#[derive(Debug, thiserror::Error)]
enum EventFault {
    #[error("undecodable event body: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("{0}")]
    UnknownState(#[source] crate::state::UnknownStateKind),
    #[error("the event's version column ({column}) disagrees with its body ({body})")]
    VersionMismatch { column: u64, body: u64 },
}

/// One stored event as a store read it back (for stores): `version` and `at` from its own
/// columns (for a deletion: the deleted version + 1 and the store's clock), the body from
/// [`write_event_payload`] or [`delete_event_payload`] (or a trigger building the same JSON).
#[derive(Debug)]
pub struct EventRow<'a> {
    /// The installation.
    pub installation: InstallationId,
    /// Its consumer.
    pub consumer: String,
    /// The version column.
    pub version: u64,
    /// The store's time of the append.
    pub at: Timestamp,
    /// The stored body.
    pub body: &'a [u8],
}

/// The event of a stored row. Never fails: a body this build cannot read becomes an
/// [`EventKind::Unknown`] event of its installation and version (so one damaged or newer
/// event never stalls a reader), with what is wrong in `error`.
pub fn decode_event(
    cursor: EventCursor,
    part: u32,
    position: LogPosition,
    row: EventRow<'_>,
) -> LifecycleEvent {
    let EventRow {
        installation,
        consumer,
        version,
        at,
        body,
    } = row;
    let mut event = LifecycleEvent {
        cursor,
        part,
        position,
        installation,
        incarnation: Timestamp::EPOCH,
        consumer,
        kind: EventKind::Unknown,
        from: None,
        to: None,
        state: None,
        error: None,
        at,
        version,
    };
    let fault = match serde_json::from_slice::<Payload>(body) {
        Ok(Payload::Write {
            entry,
            state,
            created,
        }) if entry.version == version => {
            event.kind = entry.event;
            event.from = (entry.event != EventKind::Created).then_some(entry.from);
            event.to = Some(entry.to);
            event.state = Some(state);
            event.error = entry.error;
            event.at = entry.at;
            event.incarnation = created.unwrap_or(Timestamp::EPOCH);
            return event;
        }
        Ok(Payload::Write { entry, .. }) => EventFault::VersionMismatch {
            column: version,
            body: entry.version,
        },
        Ok(Payload::Deleted { deleted, created }) => match deleted.parse::<StateKind>() {
            Ok(from) => {
                event.kind = EventKind::Deleted;
                event.from = Some(from);
                event.incarnation = created.unwrap_or(Timestamp::EPOCH);
                return event;
            }
            Err(e) => EventFault::UnknownState(e),
        },
        Err(e) => EventFault::Malformed(e),
    };
    event.error = Some(ErrorDetail {
        description: Some(format!(
            "this event cannot be read ({fault}); a newer tokenkeeper may have written it: read the installation with `explain`"
        )),
        ..ErrorDetail::new(crate::record::FailureClass::Configuration)
    });
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_through_text() {
        for cursor in [
            EventCursor::beginning(),
            EventCursor::from_positions(7, vec![LogPosition::seq(42)]),
            EventCursor::from_positions(
                u64::MAX,
                vec![
                    LogPosition {
                        major: 1_767_225_600_000,
                        minor: 3,
                    },
                    LogPosition::default(),
                ],
            ),
        ] {
            let text = cursor.to_string();
            assert_eq!(text.parse::<EventCursor>(), Ok(cursor.clone()), "{text}");
            let json = serde_json::to_string(&cursor).unwrap();
            assert_eq!(serde_json::from_str::<EventCursor>(&json).unwrap(), cursor);
        }
        for bad in [
            "",
            "42",
            "tkc1:x",
            "tkc1:1-2-3",
            "tkc1:1,",
            "tkc2:1",
            "tkc1:zz/1",
        ] {
            assert!(bad.parse::<EventCursor>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_cursor_of_another_log_or_layout_is_refused() {
        let cursor = EventCursor::from_positions(9, vec![LogPosition::seq(1); 3]);
        assert!(cursor.positions_for("memory", 9, 1).is_err());
        assert!(cursor.positions_for("redis", 8, 3).is_err(), "another log");
        assert_eq!(cursor.positions_for("redis", 9, 3).unwrap().len(), 3);
        assert_eq!(
            EventCursor::beginning()
                .positions_for("redis", 1, 16)
                .unwrap()
                .len(),
            16
        );
    }

    #[test]
    fn sequence_cursors_are_checked_against_the_log() {
        let at = |seq| EventCursor::from_positions(5, vec![LogPosition::seq(seq)]);
        assert_eq!(check_sequence_cursor("t", &at(10), 5, 3, 20).unwrap(), 10);
        assert_eq!(check_sequence_cursor("t", &at(3), 5, 3, 20).unwrap(), 3);
        assert!(matches!(
            check_sequence_cursor("t", &at(2), 5, 3, 20),
            Err(StoreError::EventsTrimmed { .. })
        ));
        // A position at zero (the head of an empty log) is checked like any other.
        assert!(matches!(
            check_sequence_cursor("t", &at(0), 5, 3, 20),
            Err(StoreError::EventsTrimmed { .. })
        ));
        assert!(matches!(
            check_sequence_cursor("t", &at(21), 5, 3, 20),
            Err(StoreError::InvalidCursor { .. })
        ));
        assert_eq!(
            check_sequence_cursor("t", &EventCursor::beginning(), 5, 3, 20).unwrap(),
            0
        );
    }

    #[test]
    fn an_unreadable_body_is_an_unknown_event_not_an_error() {
        let row = |body: &'static [u8]| EventRow {
            installation: InstallationId::new("i").unwrap(),
            consumer: "c".into(),
            version: 4,
            at: Timestamp::EPOCH,
            body,
        };
        for body in [&b"{}"[..], b"not json", br#"{"deleted":"exploded"}"#] {
            let e = sequence_event(1, 1, row(body));
            assert_eq!((e.kind, e.version), (EventKind::Unknown, 4));
            assert!(e.ends_tokens());
            assert!(e.error.is_some());
        }
    }
}
