//! The SQL of each store operation, as plain functions on a connection.
//!
//! Every write is one statement: `compare_and_swap` is a single conditional
//! `UPDATE ... WHERE id = ? AND version = ?`, so there is no read-then-write race for SQLite's
//! locking to get wrong. The index columns (`version`, `state`, `due_at`) are written by the
//! same statement as the record they index.

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventCursor, EventPage, EventRetention,
    InstallationId, ListEntry, ListFilter, ListPage, LogPosition, Record, StateCounts, StateKind,
    StoreError, Timestamp, backend::EventRow, backend::check_sequence_cursor,
    backend::sequence_event,
};

pub(crate) const BACKEND: &str = "sqlite";

/// Maps a driver error: lock contention that outlasted the busy timeout is "unavailable"
/// (retry later); anything else is a backend failure.
pub(crate) fn sqlite_error(operation: &'static str, e: rusqlite::Error) -> StoreError {
    let busy = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    if busy {
        StoreError::unavailable(BACKEND, operation, e)
    } else {
        StoreError::backend(BACKEND, operation, e)
    }
}

/// What can be wrong with a row, beyond what the driver reports.
#[derive(Debug, thiserror::Error)]
enum SqliteFault {
    #[error(
        "the row's version, state or due_at column disagrees with the record it indexes (was the table edited outside tokenkeeper?)"
    )]
    IndexMismatch,
    #[error("a column of the row holds a value of the wrong type: {0}")]
    ColumnType(#[source] rusqlite::Error),
    #[error("unknown state in the state column: {0}")]
    UnknownState(#[source] tokenkeeper_core::UnknownStateKind),
    #[error(
        "the table holds a row whose id {id:?} is not a valid installation id ({source}); delete that row"
    )]
    InvalidRowId {
        id: String,
        #[source]
        source: tokenkeeper_core::InvalidInstallationId,
    },
}

fn due_column(record: &Record) -> Option<i64> {
    record.due_at().map(Timestamp::unix_nanos)
}

fn version_column(id: &InstallationId, version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::InvalidArgument {
        backend: BACKEND,
        operation: "write",
        id: id.clone(),
        message: format!("version {version} does not fit SQLite's 64-bit signed integer"),
    })
}

/// Decodes a stored row, checking the index columns agree with the record.
fn decode(
    id: &InstallationId,
    version: i64,
    state: &str,
    due_at: Option<i64>,
    bytes: &[u8],
) -> Result<Record, StoreError> {
    let record =
        Record::decode(id, bytes).map_err(|e| StoreError::corrupt(BACKEND, id.clone(), e))?;
    if i64::try_from(record.version()).ok() != Some(version)
        || record.state().kind().as_str() != state
        || due_column(&record) != due_at
    {
        return Err(StoreError::corrupt(
            BACKEND,
            id.clone(),
            SqliteFault::IndexMismatch,
        ));
    }
    Ok(record)
}

fn state_kind(id: &InstallationId, text: &str) -> Result<StateKind, StoreError> {
    text.parse()
        .map_err(|e| StoreError::corrupt(BACKEND, id.clone(), SqliteFault::UnknownState(e)))
}

/// Reads an id column. Only tampering can store an id the core refuses; it is reported
/// (rather than skipped, which would break paging) with what to do about it.
fn row_id(operation: &'static str, text: String) -> Result<InstallationId, StoreError> {
    InstallationId::new(text.clone()).map_err(|source| {
        StoreError::backend(
            BACKEND,
            operation,
            SqliteFault::InvalidRowId { id: text, source },
        )
    })
}

pub(crate) fn get(conn: &Connection, id: &InstallationId) -> Result<Option<Record>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT version, state, due_at, record FROM installations WHERE id = ?1")
        .map_err(|e| sqlite_error("get", e))?;
    let row = stmt
        .query_row([id.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })
        .optional()
        .map_err(|e| match e {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..) => {
                StoreError::corrupt(BACKEND, id.clone(), SqliteFault::ColumnType(e))
            }
            e => sqlite_error("get", e),
        })?;
    row.map(|(version, state, due_at, bytes)| decode(id, version, &state, due_at, &bytes))
        .transpose()
}

pub(crate) fn create(conn: &Connection, record: &Record, bytes: &[u8]) -> Result<(), StoreError> {
    let version = version_column(record.id(), record.version())?;
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO installations (id, version, state, due_at, record, consumer) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(|e| sqlite_error("create", e))?;
    match stmt.execute(params![
        record.id().as_str(),
        version,
        record.state().kind().as_str(),
        due_column(record),
        bytes,
        record.consumer()
    ]) {
        Ok(_) => Ok(()),
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
            Err(StoreError::AlreadyExists {
                id: record.id().clone(),
                backend: BACKEND,
            })
        }
        Err(e) => Err(sqlite_error("create", e)),
    }
}

pub(crate) fn compare_and_swap(
    conn: &Connection,
    record: &Record,
    bytes: &[u8],
    expected: u64,
) -> Result<CasOutcome, StoreError> {
    let version = version_column(record.id(), record.version())?;
    let expected_col = version_column(record.id(), expected)?;
    let mut stmt = conn
        .prepare_cached(
            "UPDATE installations SET version = ?1, state = ?2, due_at = ?3, record = ?4, \
             consumer = ?8 WHERE id = ?5 AND version = ?6 AND (?7 IS NULL OR \
             json_extract(CAST(record AS TEXT), '$.record.state.Refreshing.lease.holder') = ?7)",
        )
        .map_err(|e| sqlite_error("compare_and_swap", e))?;
    let changed = stmt
        .execute(params![
            version,
            record.state().kind().as_str(),
            due_column(record),
            bytes,
            record.id().as_str(),
            expected_col,
            record.written_under().map(|h| h.to_string()),
            record.consumer()
        ])
        .map_err(|e| sqlite_error("compare_and_swap", e))?;
    if changed == 1 {
        return Ok(CasOutcome::Swapped);
    }
    // Versions only grow, so whatever is stored now is the conflicting state (a newer version,
    // or this version under another lease than the one the record was written under).
    Ok(match get(conn, record.id())? {
        Some(current) => CasOutcome::Conflict(Box::new(current)),
        None => CasOutcome::Missing,
    })
}

pub(crate) fn delete(
    conn: &Connection,
    id: &InstallationId,
    expected: u64,
) -> Result<DeleteOutcome, StoreError> {
    let expected_col = version_column(id, expected)?;
    let mut stmt = conn
        .prepare_cached("DELETE FROM installations WHERE id = ?1 AND version = ?2")
        .map_err(|e| sqlite_error("delete", e))?;
    let changed = stmt
        .execute(params![id.as_str(), expected_col])
        .map_err(|e| sqlite_error("delete", e))?;
    if changed == 1 {
        return Ok(DeleteOutcome::Deleted);
    }
    Ok(match get(conn, id)? {
        Some(current) => DeleteOutcome::Conflict(Box::new(current)),
        None => DeleteOutcome::Missing,
    })
}

/// The `due` query: a range scan of one consumer's part of `installations_by_consumer_due`
/// (checked by a test with `EXPLAIN QUERY PLAN`).
const DUE_SQL: &str = "SELECT id, due_at FROM installations \
     WHERE consumer = ?5 AND due_at IS NOT NULL AND due_at < ?1 AND (due_at, id) > (?2, ?3) \
     ORDER BY due_at, id LIMIT ?4";

/// The `list` query for one state: a range scan of `installations_by_state`.
const LIST_STATE_SQL: &str = "SELECT id, state FROM installations \
     WHERE state = ?1 AND id > ?2 ORDER BY id LIMIT ?3";

/// The `list` query for every state: a range scan of the primary key.
const LIST_ALL_SQL: &str = "SELECT id, state FROM installations WHERE id > ?1 ORDER BY id LIMIT ?2";

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(crate) fn due(
    conn: &Connection,
    consumer: &str,
    before: Timestamp,
    after: Option<&DueEntry>,
    limit: usize,
) -> Result<DuePage, StoreError> {
    if limit == 0 {
        return Ok(DuePage::default());
    }
    let (after_due, after_id) = match after {
        Some(c) => (c.due_at.unix_nanos(), c.id.as_str()),
        None => (i64::MIN, ""),
    };
    let mut stmt = conn
        .prepare_cached(DUE_SQL)
        .map_err(|e| sqlite_error("due", e))?;
    let rows = stmt
        .query_map(
            params![
                before.unix_nanos(),
                after_due,
                after_id,
                limit_param(limit),
                consumer
            ],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )
        .map_err(|e| sqlite_error("due", e))?;
    let mut entries = Vec::with_capacity(limit.min(1024));
    for row in rows {
        let (id, due_at) = row.map_err(|e| sqlite_error("due", e))?;
        entries.push(DueEntry {
            due_at: Timestamp::from_unix_nanos(due_at),
            id: row_id("due", id)?,
        });
    }
    Ok(DuePage::from_entries(entries, limit))
}

pub(crate) fn list(
    conn: &Connection,
    filter: ListFilter,
    after: Option<&InstallationId>,
    limit: usize,
) -> Result<ListPage, StoreError> {
    if limit == 0 {
        return Ok(ListPage::default());
    }
    let after = after.map_or("", InstallationId::as_str);
    let map_row = |r: &rusqlite::Row<'_>| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?));
    let rows: Vec<(String, String)> = match filter.state {
        Some(state) => {
            let mut stmt = conn
                .prepare_cached(LIST_STATE_SQL)
                .map_err(|e| sqlite_error("list", e))?;
            stmt.query_map(params![state.as_str(), after, limit_param(limit)], map_row)
                .and_then(Iterator::collect)
                .map_err(|e| sqlite_error("list", e))?
        }
        None => {
            let mut stmt = conn
                .prepare_cached(LIST_ALL_SQL)
                .map_err(|e| sqlite_error("list", e))?;
            stmt.query_map(params![after, limit_param(limit)], map_row)
                .and_then(Iterator::collect)
                .map_err(|e| sqlite_error("list", e))?
        }
    };
    let mut entries = Vec::with_capacity(rows.len());
    for (id, state) in rows {
        let id = row_id("list", id)?;
        let state = state_kind(&id, &state)?;
        entries.push(ListEntry { id, state });
    }
    Ok(ListPage::from_entries(entries, limit))
}

/// Counts installations by state in one statement (a scan of `installations_by_state`):
/// the gauge moves five numbers, not every id (review E10).
pub(crate) fn count_states(conn: &Connection) -> Result<StateCounts, StoreError> {
    let err = |e| sqlite_error("count_states", e);
    let mut stmt = conn
        .prepare_cached("SELECT state, COUNT(*) FROM installations GROUP BY state")
        .map_err(err)?;
    let rows: Vec<(String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(Iterator::collect)
        .map_err(err)?;
    let mut counts = StateCounts::default();
    for (state, n) in rows {
        let kind = state.parse::<StateKind>().map_err(|e| {
            StoreError::backend(BACKEND, "count_states", SqliteFault::UnknownState(e))
        })?;
        counts.add(kind, u64::try_from(n).unwrap_or_default());
    }
    Ok(counts)
}

fn unix_millis_after(ttl: std::time::Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.saturating_add(ttl).as_millis()).unwrap_or(i64::MAX)
}

/// Claims a flow: one statement inserts the claim, or takes over an expired one; when neither
/// happened, the live claim is read. Expired claims are purged on the way.
pub(crate) fn claim_flow(
    conn: &Connection,
    flow: &str,
    value: &[u8],
    ttl: std::time::Duration,
) -> Result<Option<Vec<u8>>, StoreError> {
    let err = |e| sqlite_error("claim_flow", e);
    let now = unix_millis_after(std::time::Duration::ZERO);
    conn.prepare_cached("DELETE FROM flows WHERE expires_at <= ?1")
        .and_then(|mut s| s.execute(params![now]))
        .map_err(err)?;
    // A concurrent purge can remove an expired claim between the insert and the read: try
    // again (each round either claims or reads a live claim).
    for _ in 0..3 {
        let claimed = conn
            .prepare_cached(
                "INSERT INTO flows (key, value, expires_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                 expires_at = excluded.expires_at WHERE flows.expires_at <= ?4",
            )
            .and_then(|mut s| s.execute(params![flow, value, unix_millis_after(ttl), now]))
            .map_err(err)?;
        if claimed == 1 {
            return Ok(None);
        }
        if let Some(existing) = get_flow(conn, flow)? {
            return Ok(Some(existing));
        }
    }
    Err(StoreError::unavailable(
        BACKEND,
        "claim_flow",
        "the flow's claim kept changing under concurrent writers",
    ))
}

/// Replaces a flow's value and its expiry.
pub(crate) fn settle_flow(
    conn: &Connection,
    flow: &str,
    value: &[u8],
    ttl: std::time::Duration,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO flows (key, value, expires_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
    )
    .and_then(|mut s| s.execute(params![flow, value, unix_millis_after(ttl)]))
    .map_err(|e| sqlite_error("settle_flow", e))?;
    Ok(())
}

/// A flow's value, unless it expired.
pub(crate) fn get_flow(conn: &Connection, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
    conn.prepare_cached("SELECT value FROM flows WHERE key = ?1 AND expires_at > ?2")
        .and_then(|mut s| {
            s.query_row(
                params![flow, unix_millis_after(std::time::Duration::ZERO)],
                |r| r.get(0),
            )
            .optional()
        })
        .map_err(|e| sqlite_error("get_flow", e))
}

/// The log's id, its retention mark and the newest sequence number handed out (kept by
/// `AUTOINCREMENT` even when retention removed that event).
fn log_state(conn: &Connection, operation: &'static str) -> Result<(u64, u64, u64), StoreError> {
    conn.query_row(
        "SELECT log_id, trimmed_through, \
                coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0) \
           FROM event_log",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)?.max(0) as u64,
                r.get::<_, i64>(2)?.max(0) as u64,
            ))
        },
    )
    .map_err(|e| sqlite_error(operation, e))
}

/// Reads events after `after` and the log's state in one read transaction (one snapshot),
/// so a trim between the two cannot hide a gap.
pub(crate) fn read_events(
    conn: &Connection,
    after: &EventCursor,
    limit: usize,
) -> Result<EventPage, StoreError> {
    const OP: &str = "read_events";
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| sqlite_error(OP, e))?;
    let (log, trimmed, last) = log_state(&tx, OP)?;
    let after_seq = check_sequence_cursor(BACKEND, after, log, trimmed, last)?;
    let rows = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT seq, id, consumer, version, at, body FROM events \
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| sqlite_error(OP, e))?;
        stmt.query_map(
            params![
                i64::try_from(after_seq).unwrap_or(i64::MAX),
                limit_param(limit)
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                ))
            },
        )
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| sqlite_error(OP, e))?
    };
    tx.finish().map_err(|e| sqlite_error(OP, e))?;
    let mut events = Vec::with_capacity(rows.len());
    for (seq, id, consumer, version, at, body) in rows {
        events.push(sequence_event(
            log,
            seq.max(0) as u64,
            EventRow {
                installation: row_id(OP, id)?,
                consumer,
                version: version.max(0) as u64,
                at: Timestamp::from_unix_nanos(at),
                body: body.as_bytes(),
            },
        ));
    }
    let next = events
        .last()
        .map_or_else(|| after.clone(), |e| e.cursor.clone());
    Ok(EventPage { events, next })
}

/// Stores the retention every writer of this database trims by.
pub(crate) fn set_retention(conn: &Connection, retention: EventRetention) -> rusqlite::Result<()> {
    let age = i64::try_from(retention.age_limit().as_nanos()).unwrap_or(i64::MAX);
    let events = i64::try_from(retention.event_limit()).unwrap_or(i64::MAX);
    conn.execute(
        "UPDATE event_log SET max_events = ?1, max_age = ?2",
        params![events, age],
    )?;
    Ok(())
}

/// The cursor after the newest event.
pub(crate) fn event_head(conn: &Connection) -> Result<EventCursor, StoreError> {
    let (log, _, last) = log_state(conn, "event_head")?;
    Ok(EventCursor::from_positions(
        log,
        vec![LogPosition::seq(last)],
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::Connection;
    use tokenkeeper_core::conformance::{T0, sample_record};
    use tokenkeeper_core::{InstallationId, TokenStore};

    use super::{DUE_SQL, LIST_ALL_SQL, LIST_STATE_SQL};
    use crate::SqliteStore;

    fn plan(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows.join(" | ")
    }

    #[tokio::test]
    async fn due_and_list_are_served_by_indexes() {
        let path = tokenkeeper_testkit::dirs::fresh_db("plan");
        let store = SqliteStore::open(&path).await.unwrap();
        for n in 0..500u64 {
            let id = InstallationId::new(format!("i-{n:04}")).unwrap();
            let due = T0.saturating_add(Duration::from_secs(n % 37));
            store.create(&sample_record(&id, due)).await.unwrap();
        }
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch("ANALYZE").unwrap();
        let due = plan(
            &raw,
            DUE_SQL,
            rusqlite::params![i64::MAX, i64::MIN, "", 100, "conformance"],
        );
        assert!(
            due.contains("USING") && due.contains("installations_by_consumer_due"),
            "{due}"
        );
        assert!(!due.contains("TEMP B-TREE"), "due must not sort: {due}");
        let by_state = plan(&raw, LIST_STATE_SQL, rusqlite::params!["active", "", 100]);
        assert!(by_state.contains("installations_by_state"), "{by_state}");
        assert!(!by_state.contains("TEMP B-TREE"), "{by_state}");
        let all = plan(&raw, LIST_ALL_SQL, rusqlite::params!["", 100]);
        assert!(
            all.contains("USING") && !all.contains("TEMP B-TREE"),
            "{all}"
        );
    }
}
