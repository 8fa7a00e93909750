//! The database schema and its versioned migrations (`PRAGMA user_version`).
//!
//! Opening checks, before writing anything, that the file is either new or a tokenkeeper
//! database (`PRAGMA application_id`) of a schema this build understands; a database written
//! by a newer tokenkeeper is refused untouched, so an old binary can never corrupt it.

use rusqlite::{Connection, TransactionBehavior};

use crate::OpenError;

/// `PRAGMA application_id` of tokenkeeper databases ("TkKp").
pub const APPLICATION_ID: i32 = 0x546b_4b70;

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Migration `n` takes the schema from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE installations (
        id      TEXT    NOT NULL PRIMARY KEY,
        version INTEGER NOT NULL,
        state   TEXT    NOT NULL,
        due_at  INTEGER,
        record  BLOB    NOT NULL
    );
    CREATE INDEX installations_by_due ON installations (due_at, id) WHERE due_at IS NOT NULL;
    CREATE INDEX installations_by_state ON installations (state, id);
",
    // 2: the due index per consumer, so consumers sharing a database never walk each other's
    // entries; existing rows take their consumer from the record they hold (`ADOPT`).
    "
    ALTER TABLE installations ADD COLUMN consumer TEXT NOT NULL DEFAULT '';
    DROP INDEX installations_by_due;
    CREATE INDEX installations_by_consumer_due ON installations (consumer, due_at, id)
        WHERE due_at IS NOT NULL;
",
    // 3: single-use claims of authorization flows (`TokenStore::claim_flow`): a callback's code
    // is exchanged once across processes. Expiry in unix milliseconds by the writer's clock.
    "
    CREATE TABLE flows (
        key        TEXT    NOT NULL PRIMARY KEY,
        value      BLOB    NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX flows_by_expiry ON flows (expires_at);
",
    // 4: the lifecycle event outbox (`TokenStore::read_events`). Triggers append an event in
    // the statement that writes the record, so no write (by any tokenkeeper version or by hand)
    // exists without its event; the body is the record's last history entry and its state,
    // the JSON `tokenkeeper_core::backend::write_event_payload` writes. An `UPDATE` that keeps the
    // version (the consumer adoption below) is not a write of the record and appends nothing.
    // Retention trims at most two of the oldest events per append; `trimmed_through` is the
    // newest trimmed sequence number, what tells a reader it fell behind. `log_id` names this
    // log in every cursor, so a cursor of another database is refused.
    "
    CREATE TABLE events (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        id       TEXT    NOT NULL,
        consumer TEXT    NOT NULL,
        version  INTEGER NOT NULL,
        at       INTEGER NOT NULL,
        body     TEXT    NOT NULL
    );
    CREATE TABLE event_log (
        one             INTEGER NOT NULL PRIMARY KEY CHECK (one = 1),
        log_id          INTEGER NOT NULL,
        max_events      INTEGER NOT NULL,
        max_age         INTEGER NOT NULL,
        trimmed_through INTEGER NOT NULL
    );
    INSERT INTO event_log VALUES (1, random() & 9223372036854775807, 100000, 604800000000000, 0);
    CREATE TRIGGER installations_created AFTER INSERT ON installations BEGIN
        INSERT INTO events (id, consumer, version, at, body) VALUES (
            NEW.id, NEW.consumer, NEW.version, CAST(unixepoch('subsec') * 1e9 AS INTEGER),
            json_object('entry', CAST(NEW.record AS TEXT) -> '$.record.history[#-1]',
                        'state', CAST(NEW.record AS TEXT) -> '$.record.state',
                        'created', CAST(NEW.record AS TEXT) -> '$.record.created_at'));
    END;
    CREATE TRIGGER installations_written AFTER UPDATE ON installations
        WHEN NEW.version IS NOT OLD.version BEGIN
        INSERT INTO events (id, consumer, version, at, body) VALUES (
            NEW.id, NEW.consumer, NEW.version, CAST(unixepoch('subsec') * 1e9 AS INTEGER),
            json_object('entry', CAST(NEW.record AS TEXT) -> '$.record.history[#-1]',
                        'state', CAST(NEW.record AS TEXT) -> '$.record.state',
                        'created', CAST(NEW.record AS TEXT) -> '$.record.created_at'));
    END;
    CREATE TRIGGER installations_deleted AFTER DELETE ON installations BEGIN
        INSERT INTO events (id, consumer, version, at, body) VALUES (
            OLD.id, OLD.consumer, OLD.version + 1, CAST(unixepoch('subsec') * 1e9 AS INTEGER),
            json_object('deleted', OLD.state,
                        'created', CAST(OLD.record AS TEXT) -> '$.record.created_at'));
    END;
    CREATE TRIGGER events_trimmed AFTER INSERT ON events BEGIN
        UPDATE event_log SET trimmed_through = coalesce((
            SELECT max(oldest.seq) FROM (
                SELECT seq, at FROM events WHERE seq < NEW.seq ORDER BY seq LIMIT 2
            ) AS oldest
            WHERE oldest.seq <= NEW.seq - event_log.max_events
               OR oldest.at < NEW.at - event_log.max_age
        ), trimmed_through);
        DELETE FROM events WHERE seq <= (SELECT trimmed_through FROM event_log);
    END;
",
];

/// Fills the consumer column of due rows that lack it from the record they hold: rows of a
/// schema-1 database, and rows a process of an older version created after the migration
/// (run at every open; a range scan of the consumer index). A row whose record is not JSON
/// keeps an empty consumer, so no refresher sees it; reading it reports it corrupt.
const ADOPT: &str = "
    UPDATE installations
       SET consumer = CASE WHEN json_valid(CAST(record AS TEXT))
           THEN coalesce(json_extract(CAST(record AS TEXT), '$.record.consumer'), '')
           ELSE '' END
     WHERE consumer = '' AND due_at IS NOT NULL;
";

fn identity(conn: &Connection) -> rusqlite::Result<(i32, i32, i64)> {
    let app: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let objects: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
        [],
        |r| r.get(0),
    )?;
    Ok((app, version, objects))
}

/// Refuses foreign or newer databases; reads only.
pub(crate) fn check(conn: &Connection) -> Result<(), OpenError> {
    let (app, version, objects) = identity(conn)?;
    if app != 0 && app != APPLICATION_ID {
        return Err(OpenError::NotTokenkeeper {
            detail: format!("its application_id is {app:#x}"),
        });
    }
    if app == 0 && objects > 0 {
        return Err(OpenError::NotTokenkeeper {
            detail: format!("it already holds {objects} tables or indexes of another application"),
        });
    }
    if version > SCHEMA_VERSION {
        return Err(OpenError::FutureSchema {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Brings the schema up to [`SCHEMA_VERSION`] in one immediate transaction (so two processes
/// opening a new file at once do not both migrate it).
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), OpenError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    check(&tx)?;
    let (_, version, _) = identity(&tx)?;
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", n as i32 + 1)?;
    }
    tx.execute_batch(ADOPT)?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.commit()?;
    Ok(())
}
