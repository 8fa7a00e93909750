//! The tables and their versioned migrations, in a schema of the application's choosing.
//!
//! `tokenkeeper_schema` holds one row: the schema version this store wrote. Opening an
//! up-to-date schema only reads it (no DDL: a role with read and write grants is enough).
//! Otherwise opening takes a transaction-scoped advisory lock (so two processes starting at
//! once do not both migrate; bounded by a lock timeout), refuses a schema written by a newer
//! tokenkeeper untouched, refuses a schema whose `installations` table is not tokenkeeper's,
//! and applies the missing migrations in the same transaction.
//!
//! Ids use the `C` collation so that they sort byte-wise, as every store lists them, whatever
//! the database's default collation. Times are unix nanoseconds in `BIGINT` (the same
//! `Timestamp` every backend orders by).

use crate::ConnectError;
use crate::builder::Names;

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Migration `n` takes the schema from version `n` to `n + 1`; `{s}` is the quoted schema.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE {s}.installations (
        id           TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        consumer     TEXT NOT NULL,
        version      BIGINT NOT NULL,
        state        TEXT NOT NULL,
        due_at       BIGINT,
        lease_holder TEXT,
        record       BYTEA NOT NULL
    );
    CREATE INDEX installations_by_consumer_due ON {s}.installations (consumer, due_at, id)
        WHERE due_at IS NOT NULL;
    CREATE INDEX installations_by_state ON {s}.installations (state, id);
    CREATE TABLE {s}.flows (
        key        TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        value      BYTEA NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX flows_by_expiry ON {s}.flows (expires_at);
"#,
    // 2: the lifecycle event outbox (`TokenStore::read_events`). A trigger appends an event in
    // the statement that writes the record, so no write exists without its event. Sequence
    // numbers come from `event_log.last_seq`, whose row lock the writing transaction holds
    // until it commits: events become visible in sequence order, so a reader that has seen
    // sequence n never later finds a smaller one committed behind it (a plain `SEQUENCE`
    // hands out numbers in start order and commits them in any order). The body is the
    // record's last history entry, state and creation time (`tokenkeeper_core::
    // write_event_payload`'s JSON; `JSON`, not `JSONB`, which would refuse a `\u0000` in a
    // token). Retention trims at most two of the oldest events per append. `log_id` names
    // this log in every cursor, so a cursor of another schema or database is refused.
    r#"
    CREATE TABLE {s}.events (
        seq      BIGINT NOT NULL PRIMARY KEY,
        id       TEXT COLLATE "C" NOT NULL,
        consumer TEXT NOT NULL,
        version  BIGINT NOT NULL,
        at       BIGINT NOT NULL,
        body     TEXT NOT NULL
    );
    CREATE TABLE {s}.event_log (
        only_row        BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
        log_id          BIGINT NOT NULL,
        last_seq        BIGINT NOT NULL,
        max_events      BIGINT NOT NULL,
        max_age         BIGINT NOT NULL,
        trimmed_through BIGINT NOT NULL
    );
    INSERT INTO {s}.event_log VALUES
        (TRUE, floor(random() * 9007199254740991)::BIGINT, 0, 100000, 604800000000000, 0);
    CREATE FUNCTION {s}.append_event() RETURNS trigger LANGUAGE plpgsql AS $fn$
    DECLARE
        log {s}.event_log%ROWTYPE;
        now_ns BIGINT := (extract(epoch FROM clock_timestamp()) * 1000000000)::BIGINT;
        rec JSON;
        cut BIGINT;
    BEGIN
        UPDATE {s}.event_log SET last_seq = last_seq + 1 RETURNING * INTO log;
        IF TG_OP = 'DELETE' THEN
            rec := convert_from(OLD.record, 'UTF8')::JSON -> 'record';
            INSERT INTO {s}.events VALUES (log.last_seq, OLD.id, OLD.consumer, OLD.version + 1,
                now_ns, json_build_object('deleted', OLD.state,
                                          'created', rec -> 'created_at')::TEXT);
        ELSE
            rec := convert_from(NEW.record, 'UTF8')::JSON -> 'record';
            INSERT INTO {s}.events VALUES (log.last_seq, NEW.id, NEW.consumer, NEW.version,
                now_ns, json_build_object('entry', rec -> 'history' -> -1,
                                          'state', rec -> 'state',
                                          'created', rec -> 'created_at')::TEXT);
        END IF;
        SELECT max(oldest.seq) INTO cut FROM (
            SELECT seq, at FROM {s}.events WHERE seq < log.last_seq ORDER BY seq LIMIT 2
        ) AS oldest
        WHERE oldest.seq <= log.last_seq - log.max_events OR oldest.at < now_ns - log.max_age;
        IF cut IS NOT NULL THEN
            DELETE FROM {s}.events WHERE seq <= cut;
            UPDATE {s}.event_log SET trimmed_through = greatest(trimmed_through, cut);
        END IF;
        RETURN NULL;
    END
    $fn$;
    CREATE TRIGGER installations_created_or_deleted AFTER INSERT OR DELETE ON {s}.installations
        FOR EACH ROW EXECUTE FUNCTION {s}.append_event();
    CREATE TRIGGER installations_written AFTER UPDATE ON {s}.installations
        FOR EACH ROW WHEN (NEW.version IS DISTINCT FROM OLD.version)
        EXECUTE FUNCTION {s}.append_event();
"#,
    // 3: the outbox runs as the schema's owner with a fixed search path (review N11). The
    // runtime role then needs no write privilege on `events` or `event_log`, so SQL run as
    // the application (an injection elsewhere included) cannot forge or erase events, and no
    // object it can create shadows a function the trigger calls.
    r#"
    ALTER FUNCTION {s}.append_event() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
    REVOKE ALL ON FUNCTION {s}.append_event() FROM PUBLIC;
"#,
    // 4: every update of an installation raises its version (second review of N11). The
    // outbox fires on a version change, so an `UPDATE` by hand that kept the version would
    // change tokens, state or account with no event, unseen by every process's cache.
    r#"
    CREATE FUNCTION {s}.refuse_silent_update() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    BEGIN
        IF NEW.version <= OLD.version THEN
            RAISE EXCEPTION 'installation % was updated without raising its version (% to %): such a write has no lifecycle event; write through tokenkeeper',
                OLD.id, OLD.version, NEW.version USING ERRCODE = '42501';
        END IF;
        RETURN NEW;
    END
    $fn$;
    REVOKE ALL ON FUNCTION {s}.refuse_silent_update() FROM PUBLIC;
    CREATE TRIGGER installations_versioned BEFORE UPDATE ON {s}.installations
        FOR EACH ROW EXECUTE FUNCTION {s}.refuse_silent_update();
"#,
];

/// The triggers that append every write's event, and the operations they cover.
const OUTBOX_TRIGGERS: [&str; 3] = [
    "installations_created_or_deleted",
    "installations_written",
    "installations_versioned",
];

/// Refuses a schema whose outbox triggers are missing or switched off (`tgenabled` `D`, or
/// `R`: firing only on replicas): its writes would have no events. Read from the catalog, so
/// any role can check.
pub(crate) async fn check_outbox(
    client: &tokio_postgres::Client,
    names: &Names,
) -> Result<(), ConnectError> {
    let rows = client
        .query(
            "SELECT t.tgname::TEXT, t.tgenabled::TEXT FROM pg_catalog.pg_trigger t
               JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = 'installations' AND NOT t.tgisinternal",
            &[&names.name],
        )
        .await
        .map_err(ConnectError::schema)?;
    for trigger in OUTBOX_TRIGGERS {
        let enabled = rows.iter().find_map(|r| {
            let name: &str = r.try_get(0).ok()?;
            (name == trigger).then(|| r.try_get::<_, &str>(1).ok())?
        });
        let how = match enabled {
            None => "missing",
            Some("O" | "A") => continue,
            Some(_) => "disabled",
        };
        return Err(ConnectError::OutboxTrigger {
            schema: names.name.clone(),
            trigger,
            how,
        });
    }
    Ok(())
}

/// The first key of the advisory lock migrations take ("TkKp"); the second is the schema's.
const LOCK_CLASS: i32 = 0x546b_4b70;

/// The version a schema is at, read without any DDL (so a role without `CREATE` rights opens
/// an up-to-date schema): `None` when there is no tokenkeeper schema there yet.
async fn current_version(
    client: &tokio_postgres::Client,
    names: &Names,
) -> Result<Option<i32>, ConnectError> {
    let s = &names.quoted;
    match client
        .query_opt(&format!("SELECT version FROM {s}.tokenkeeper_schema"), &[])
        .await
    {
        Ok(row) => row
            .map(|r| r.try_get::<_, i32>(0))
            .transpose()
            .map_err(ConnectError::schema),
        // No such schema or table: nothing there yet.
        Err(e)
            if e.code()
                .is_some_and(|c| matches!(c.code(), "3F000" | "42P01")) =>
        {
            Ok(None)
        }
        Err(e) => Err(ConnectError::schema(e)),
    }
}

/// The version recorded in the schema (inside the migration's transaction): 0 for a schema
/// with nothing in it yet; a schema that holds an `installations` table tokenkeeper did not
/// create is refused.
async fn found_version(
    tx: &tokio_postgres::Transaction<'_>,
    names: &Names,
) -> Result<i32, ConnectError> {
    let s = &names.quoted;
    let found: Option<i32> = tx
        .query_opt(&format!("SELECT version FROM {s}.tokenkeeper_schema"), &[])
        .await
        .map_err(ConnectError::schema)?
        .map(|row| row.try_get(0))
        .transpose()
        .map_err(ConnectError::schema)?;
    if let Some(v) = found {
        return Ok(v);
    }
    let foreign: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables
              WHERE table_schema = $1 AND table_name = 'installations')",
            &[&names.name],
        )
        .await
        .map_err(ConnectError::schema)?
        .try_get(0)
        .map_err(ConnectError::schema)?;
    if foreign {
        return Err(ConnectError::NotTokenkeeper {
            schema: names.name.clone(),
        });
    }
    Ok(0)
}

/// Brings the schema up to [`SCHEMA_VERSION`], or refuses it. An up-to-date schema is only
/// read; otherwise one transaction takes the schema's advisory lock (waiting at most
/// `lock_wait` for it and for table locks), creates or migrates, and records the version.
pub(crate) async fn migrate(
    client: &mut tokio_postgres::Client,
    names: &Names,
    lock_wait: std::time::Duration,
) -> Result<(), ConnectError> {
    let future = |found| ConnectError::FutureSchema {
        schema: names.name.clone(),
        found,
        supported: SCHEMA_VERSION,
    };
    match current_version(client, names).await? {
        Some(v) if v == SCHEMA_VERSION => return Ok(()),
        Some(v) if v > SCHEMA_VERSION => return Err(future(v)),
        _ => {}
    }
    let s = &names.quoted;
    let tx = client.transaction().await.map_err(ConnectError::schema)?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        lock_wait.as_millis().max(1)
    ))
    .await
    .map_err(ConnectError::schema)?;
    // One migrator at a time per schema (creating it included: `CREATE SCHEMA IF NOT EXISTS`
    // races), released with the transaction.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&LOCK_CLASS, &names.name],
    )
    .await
    .map_err(ConnectError::schema)?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
        .await
        .map_err(ConnectError::schema)?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {s}.tokenkeeper_schema (
            only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
            version  INTEGER NOT NULL
        )"
    ))
    .await
    .map_err(ConnectError::schema)?;
    let version = found_version(&tx, names).await?;
    if version > SCHEMA_VERSION {
        return Err(future(version));
    }
    for sql in MIGRATIONS
        .iter()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.batch_execute(&sql.replace("{s}", s))
            .await
            .map_err(ConnectError::schema)?;
    }
    tx.execute(
        &format!(
            "INSERT INTO {s}.tokenkeeper_schema (version) VALUES ($1)
             ON CONFLICT (only_row) DO UPDATE SET version = excluded.version"
        ),
        &[&SCHEMA_VERSION],
    )
    .await
    .map_err(ConnectError::schema)?;
    tx.commit().await.map_err(ConnectError::schema)
}
