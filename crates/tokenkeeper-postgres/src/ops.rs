//! The SQL of each store operation, on a pooled connection.
//!
//! Every write is one statement: `compare_and_swap` is a single conditional
//! `UPDATE ... WHERE id = $ AND version = $ AND (lease holder check)`, so there is no
//! read-then-write race for PostgreSQL's locking to get wrong; the index columns (`version`,
//! `state`, `due_at`, `consumer`, `lease_holder`) are written by the same statement as the
//! record they index. Statements are prepared once per connection (`prepare_cached`).

use deadpool_postgres::Client;
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventCursor, EventPage, InstallationId,
    ListEntry, ListFilter, ListPage, LogPosition, Record, StateCounts, StateKind, StoreError,
    Timestamp, backend::EventRow, backend::check_sequence_cursor, backend::sequence_event,
};
use tokio_postgres::Row;

use crate::BACKEND;
use crate::builder::Names;
use crate::error::pg_error;

/// The statements, with the schema's name in them.
#[derive(Debug)]
pub(crate) struct Sql {
    get: String,
    create: String,
    cas: String,
    delete: String,
    due: String,
    list_all: String,
    list_state: String,
    count_states: String,
    claim: String,
    purge: String,
    settle: String,
    get_flow: String,
    events: String,
    head: String,
}

impl Sql {
    pub(crate) fn new(names: &Names) -> Self {
        let s = &names.quoted;
        Self {
            get: format!("SELECT version, state, record FROM {s}.installations WHERE id = $1"),
            create: format!(
                "INSERT INTO {s}.installations (id, consumer, version, state, due_at, lease_holder, record)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING"
            ),
            cas: format!(
                "UPDATE {s}.installations
                    SET consumer = $2, version = $3, state = $4, due_at = $5, lease_holder = $6, record = $7
                  WHERE id = $1 AND version = $8 AND ($9::TEXT IS NULL OR lease_holder = $9)"
            ),
            delete: format!("DELETE FROM {s}.installations WHERE id = $1 AND version = $2"),
            due: format!(
                "SELECT id, due_at FROM {s}.installations
                  WHERE consumer = $1 AND due_at IS NOT NULL AND due_at < $2
                    AND (due_at, id) > ($3, $4)
                  ORDER BY due_at, id LIMIT $5"
            ),
            list_all: format!(
                "SELECT id, state FROM {s}.installations WHERE id > $1 ORDER BY id LIMIT $2"
            ),
            list_state: format!(
                "SELECT id, state FROM {s}.installations WHERE state = $1 AND id > $2
                  ORDER BY id LIMIT $3"
            ),
            count_states: format!(
                "SELECT state, COUNT(*) FROM {s}.installations GROUP BY state"
            ),
            claim: format!(
                "INSERT INTO {s}.flows (key, value, expires_at)
                 VALUES ($1, $2, now() + $3::BIGINT * INTERVAL '1 millisecond')
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
                  WHERE flows.expires_at <= now()"
            ),
            purge: format!("DELETE FROM {s}.flows WHERE expires_at <= now()"),
            settle: format!(
                "INSERT INTO {s}.flows (key, value, expires_at)
                 VALUES ($1, $2, now() + $3::BIGINT * INTERVAL '1 millisecond')
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
            ),
            get_flow: format!("SELECT value FROM {s}.flows WHERE key = $1 AND expires_at > now()"),
            // One statement, one snapshot: the retention mark and the events agree.
            events: format!(
                "SELECT l.log_id, l.trimmed_through, l.last_seq,
                        e.seq, e.id, e.consumer, e.version, e.at, e.body
                   FROM {s}.event_log l LEFT JOIN LATERAL (
                        SELECT * FROM {s}.events WHERE seq > $1 ORDER BY seq LIMIT $2
                   ) e ON TRUE"
            ),
            head: format!("SELECT log_id, last_seq FROM {s}.event_log"),
        }
    }

    /// The statement `due` runs (for `EXPLAIN` in the tests).
    pub(crate) fn due_sql(&self) -> &str {
        &self.due
    }

    /// The statement `get` runs (for the benchmarks).
    #[cfg(feature = "__bench")]
    pub(crate) fn get_sql(&self) -> &str {
        &self.get
    }

    /// The statement `compare_and_swap` runs (for the benchmarks).
    #[cfg(feature = "__bench")]
    pub(crate) fn cas_sql(&self) -> &str {
        &self.cas
    }
}

fn version_param(id: &InstallationId, version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::InvalidArgument {
        backend: BACKEND,
        operation: "write",
        id: id.clone(),
        message: format!("version {version} does not fit PostgreSQL's BIGINT"),
    })
}

/// The index columns of a record: consumer, version, state, due time, lease holder.
pub(crate) struct Columns<'a> {
    consumer: &'a str,
    version: i64,
    state: &'static str,
    due_at: Option<i64>,
    lease_holder: Option<&'a str>,
}

impl<'a> Columns<'a> {
    pub(crate) fn of(record: &'a Record) -> Result<Self, StoreError> {
        Ok(Self {
            consumer: record.consumer(),
            version: version_param(record.id(), record.version())?,
            state: record.state().kind().as_str(),
            due_at: record.due_at().map(Timestamp::unix_nanos),
            lease_holder: record.state().lease().map(|l| l.holder.as_str()),
        })
    }
}

/// What can be wrong with a row, beyond what the driver reports.
#[derive(Debug, thiserror::Error)]
enum RowFault {
    #[error(
        "the row's version or state column disagrees with the record it indexes (was the table edited outside tokenkeeper?)"
    )]
    IndexMismatch,
    #[error("the row's id {0:?} is not a valid installation id; delete that row")]
    InvalidId(String),
    #[error("unknown state {0:?} in the state column")]
    UnknownState(String),
}

/// A column of a row, or `Corrupt` for that installation when its type is not the one
/// tokenkeeper wrote (an altered table).
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    id: &InstallationId,
    row: &'a Row,
    n: usize,
) -> Result<T, StoreError> {
    row.try_get(n)
        .map_err(|e| StoreError::corrupt(BACKEND, id.clone(), e))
}

/// A column of an index row, or a backend error (the table was altered).
fn index_column<'a, T: tokio_postgres::types::FromSql<'a>>(
    operation: &'static str,
    row: &'a Row,
    n: usize,
) -> Result<T, StoreError> {
    row.try_get(n)
        .map_err(|e| StoreError::backend(BACKEND, operation, e))
}

fn decode(id: &InstallationId, row: &Row) -> Result<Record, StoreError> {
    let version: i64 = column(id, row, 0)?;
    let state: &str = column(id, row, 1)?;
    let bytes: &[u8] = column(id, row, 2)?;
    let record =
        Record::decode(id, bytes).map_err(|e| StoreError::corrupt(BACKEND, id.clone(), e))?;
    if i64::try_from(record.version()).ok() != Some(version)
        || record.state().kind().as_str() != state
    {
        return Err(StoreError::corrupt(
            BACKEND,
            id.clone(),
            RowFault::IndexMismatch,
        ));
    }
    Ok(record)
}

pub(crate) async fn get(
    client: &Client,
    sql: &Sql,
    id: &InstallationId,
) -> Result<Option<Record>, StoreError> {
    let stmt = client
        .prepare_cached(&sql.get)
        .await
        .map_err(|e| pg_error("get", e))?;
    let row = client
        .query_opt(&stmt, &[&id.as_str()])
        .await
        .map_err(|e| pg_error("get", e))?;
    row.map(|r| decode(id, &r)).transpose()
}

pub(crate) async fn create(client: &Client, sql: &Sql, record: &Record) -> Result<(), StoreError> {
    let c = Columns::of(record)?;
    let bytes = record.encode();
    let stmt = client
        .prepare_cached(&sql.create)
        .await
        .map_err(|e| pg_error("create", e))?;
    let inserted = client
        .execute(
            &stmt,
            &[
                &record.id().as_str(),
                &c.consumer,
                &c.version,
                &c.state,
                &c.due_at,
                &c.lease_holder,
                &bytes,
            ],
        )
        .await
        .map_err(|e| pg_error("create", e))?;
    if inserted == 1 {
        Ok(())
    } else {
        Err(StoreError::AlreadyExists {
            id: record.id().clone(),
            backend: BACKEND,
        })
    }
}

pub(crate) async fn compare_and_swap(
    client: &Client,
    sql: &Sql,
    record: &Record,
    expected: u64,
) -> Result<CasOutcome, StoreError> {
    let c = Columns::of(record)?;
    let expected = version_param(record.id(), expected)?;
    let bytes = record.encode();
    let written_under = record.written_under().map(|h| h.as_str());
    let stmt = client
        .prepare_cached(&sql.cas)
        .await
        .map_err(|e| pg_error("compare_and_swap", e))?;
    let changed = client
        .execute(
            &stmt,
            &[
                &record.id().as_str(),
                &c.consumer,
                &c.version,
                &c.state,
                &c.due_at,
                &c.lease_holder,
                &bytes,
                &expected,
                &written_under,
            ],
        )
        .await
        .map_err(|e| pg_error("compare_and_swap", e))?;
    if changed == 1 {
        return Ok(CasOutcome::Swapped);
    }
    // Versions only grow, so whatever is stored now is the conflicting state.
    Ok(match get(client, sql, record.id()).await? {
        Some(current) => CasOutcome::Conflict(Box::new(current)),
        None => CasOutcome::Missing,
    })
}

pub(crate) async fn delete(
    client: &Client,
    sql: &Sql,
    id: &InstallationId,
    expected: u64,
) -> Result<DeleteOutcome, StoreError> {
    let expected = version_param(id, expected)?;
    let stmt = client
        .prepare_cached(&sql.delete)
        .await
        .map_err(|e| pg_error("delete", e))?;
    let deleted = client
        .execute(&stmt, &[&id.as_str(), &expected])
        .await
        .map_err(|e| pg_error("delete", e))?;
    if deleted == 1 {
        return Ok(DeleteOutcome::Deleted);
    }
    Ok(match get(client, sql, id).await {
        Ok(Some(current)) => DeleteOutcome::Conflict(Box::new(current)),
        Ok(None) => DeleteOutcome::Missing,
        Err(e) => return Err(e),
    })
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn row_id(operation: &'static str, text: &str) -> Result<InstallationId, StoreError> {
    InstallationId::new(text)
        .or_else(|_| InstallationId::from_bytes(text.as_bytes()))
        .map_err(|_| StoreError::backend(BACKEND, operation, RowFault::InvalidId(text.to_owned())))
}

pub(crate) async fn due(
    client: &Client,
    sql: &Sql,
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
    let stmt = client
        .prepare_cached(&sql.due)
        .await
        .map_err(|e| pg_error("due", e))?;
    let rows = client
        .query(
            &stmt,
            &[
                &consumer,
                &before.unix_nanos(),
                &after_due,
                &after_id,
                &limit_param(limit),
            ],
        )
        .await
        .map_err(|e| pg_error("due", e))?;
    let entries = rows
        .iter()
        .map(|r| {
            Ok(DueEntry {
                id: row_id("due", index_column("due", r, 0)?)?,
                due_at: Timestamp::from_unix_nanos(index_column("due", r, 1)?),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(DuePage::from_entries(entries, limit))
}

pub(crate) async fn list(
    client: &Client,
    sql: &Sql,
    filter: ListFilter,
    after: Option<&InstallationId>,
    limit: usize,
) -> Result<ListPage, StoreError> {
    if limit == 0 {
        return Ok(ListPage::default());
    }
    let after = after.map_or("", InstallationId::as_str);
    let limit_p = limit_param(limit);
    let rows = match filter.state {
        None => {
            let stmt = client
                .prepare_cached(&sql.list_all)
                .await
                .map_err(|e| pg_error("list", e))?;
            client.query(&stmt, &[&after, &limit_p]).await
        }
        Some(state) => {
            let stmt = client
                .prepare_cached(&sql.list_state)
                .await
                .map_err(|e| pg_error("list", e))?;
            client
                .query(&stmt, &[&state.as_str(), &after, &limit_p])
                .await
        }
    }
    .map_err(|e| pg_error("list", e))?;
    let entries = rows
        .iter()
        .map(|r| {
            let text: &str = index_column("list", r, 1)?;
            let state = text.parse::<StateKind>().map_err(|_| {
                StoreError::backend(BACKEND, "list", RowFault::UnknownState(text.to_owned()))
            })?;
            Ok(ListEntry {
                id: row_id("list", index_column("list", r, 0)?)?,
                state,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(ListPage::from_entries(entries, limit))
}

/// Counts installations by state in one statement: the gauge moves five numbers, not every
/// id (review E10).
pub(crate) async fn count_states(client: &Client, sql: &Sql) -> Result<StateCounts, StoreError> {
    const OP: &str = "count_states";
    let stmt = client
        .prepare_cached(&sql.count_states)
        .await
        .map_err(|e| pg_error(OP, e))?;
    let rows = client
        .query(&stmt, &[])
        .await
        .map_err(|e| pg_error(OP, e))?;
    let mut counts = StateCounts::default();
    for row in &rows {
        let text: &str = index_column(OP, row, 0)?;
        let n: i64 = index_column(OP, row, 1)?;
        let state = text.parse::<StateKind>().map_err(|_| {
            StoreError::backend(BACKEND, OP, RowFault::UnknownState(text.to_owned()))
        })?;
        counts.add(state, u64::try_from(n).unwrap_or_default());
    }
    Ok(counts)
}

/// A time to live in milliseconds, at most about a century (PostgreSQL's timestamps end at
/// year 294276, but nothing needs a claim that long).
fn millis(ttl: std::time::Duration) -> i64 {
    const CENTURY_MS: i64 = 100 * 366 * 24 * 3600 * 1000;
    i64::try_from(ttl.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, CENTURY_MS)
}

pub(crate) async fn claim_flow(
    client: &Client,
    sql: &Sql,
    flow: &str,
    value: &[u8],
    ttl: std::time::Duration,
) -> Result<Option<Vec<u8>>, StoreError> {
    let err = |e| pg_error("claim_flow", e);
    let purge = client.prepare_cached(&sql.purge).await.map_err(err)?;
    client.execute(&purge, &[]).await.map_err(err)?;
    let claim = client.prepare_cached(&sql.claim).await.map_err(err)?;
    // A concurrent purge can remove an expired claim between the insert and the read: try
    // again (each round either claims or reads a live claim).
    for _ in 0..3 {
        let claimed = client
            .execute(&claim, &[&flow, &value, &millis(ttl)])
            .await
            .map_err(err)?;
        if claimed == 1 {
            return Ok(None);
        }
        if let Some(existing) = get_flow(client, sql, flow).await? {
            return Ok(Some(existing));
        }
    }
    Err(StoreError::unavailable(
        BACKEND,
        "claim_flow",
        "the flow's claim kept changing under concurrent writers",
    ))
}

pub(crate) async fn settle_flow(
    client: &Client,
    sql: &Sql,
    flow: &str,
    value: &[u8],
    ttl: std::time::Duration,
) -> Result<(), StoreError> {
    let err = |e| pg_error("settle_flow", e);
    let stmt = client.prepare_cached(&sql.settle).await.map_err(err)?;
    client
        .execute(&stmt, &[&flow, &value, &millis(ttl)])
        .await
        .map_err(err)?;
    Ok(())
}

pub(crate) async fn get_flow(
    client: &Client,
    sql: &Sql,
    flow: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let err = |e| pg_error("get_flow", e);
    let stmt = client.prepare_cached(&sql.get_flow).await.map_err(err)?;
    let row = client.query_opt(&stmt, &[&flow]).await.map_err(err)?;
    row.map(|r| index_column("get_flow", &r, 0)).transpose()
}

pub(crate) async fn read_events(
    client: &Client,
    sql: &Sql,
    after: &EventCursor,
    limit: usize,
) -> Result<EventPage, StoreError> {
    const OP: &str = "read_events";
    let err = |e| pg_error(OP, e);
    // The cursor is checked against the log's state read by the same statement (one
    // snapshot): a position past the log refuses the page that statement read.
    let from = i64::try_from(after.positions().first().map_or(0, |p| p.major)).unwrap_or(i64::MAX);
    let stmt = client.prepare_cached(&sql.events).await.map_err(err)?;
    let rows = client
        .query(&stmt, &[&from, &limit_param(limit)])
        .await
        .map_err(err)?;
    let Some(first) = rows.first() else {
        return Err(StoreError::backend(
            BACKEND,
            OP,
            "the event_log row is missing",
        ));
    };
    let number = |n: i64| n.max(0) as u64;
    let log = index_column::<i64>(OP, first, 0)? as u64;
    let trimmed = number(index_column(OP, first, 1)?);
    let last = number(index_column(OP, first, 2)?);
    check_sequence_cursor(BACKEND, after, log, trimmed, last)?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(seq) = index_column::<Option<i64>>(OP, row, 3)? else {
            continue;
        };
        let id = row_id(OP, index_column(OP, row, 4)?)?;
        let version: i64 = column(&id, row, 6)?;
        let at: i64 = column(&id, row, 7)?;
        let body: &str = column(&id, row, 8)?;
        events.push(sequence_event(
            log,
            number(seq),
            EventRow {
                consumer: column(&id, row, 5)?,
                installation: id,
                version: number(version),
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

/// Stores the retention every writer of this schema trims by.
pub(crate) async fn set_retention(
    client: &Client,
    names: &Names,
    retention: tokenkeeper_core::EventRetention,
) -> Result<(), tokio_postgres::Error> {
    let age = i64::try_from(retention.age_limit().as_nanos()).unwrap_or(i64::MAX);
    let events = i64::try_from(retention.event_limit()).unwrap_or(i64::MAX);
    client
        .execute(
            &format!(
                "UPDATE {}.event_log SET max_events = $1, max_age = $2",
                names.quoted
            ),
            &[&events, &age],
        )
        .await?;
    Ok(())
}

pub(crate) async fn event_head(client: &Client, sql: &Sql) -> Result<EventCursor, StoreError> {
    const OP: &str = "event_head";
    let err = |e| pg_error(OP, e);
    let stmt = client.prepare_cached(&sql.head).await.map_err(err)?;
    let row = client.query_one(&stmt, &[]).await.map_err(err)?;
    let log: i64 = index_column(OP, &row, 0)?;
    let seq: i64 = index_column(OP, &row, 1)?;
    Ok(EventCursor::from_positions(
        log as u64,
        vec![LogPosition::seq(seq.max(0) as u64)],
    ))
}
