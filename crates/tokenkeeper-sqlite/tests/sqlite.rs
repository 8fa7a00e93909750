//! SQLite-specific guarantees: private file modes, schema versioning that refuses newer or
//! foreign files untouched, corrupt rows surfacing as typed errors for that installation only,
//! and durability across reopen. (That `due` and `list` are index range scans is checked by
//! the `EXPLAIN QUERY PLAN` unit test in `src/ops.rs`, next to the SQL.)

mod common;

use std::time::Duration;

use rusqlite::Connection;
use tokenkeeper_core::conformance::{T0, lease, sample_record};
use tokenkeeper_core::{CasOutcome, InstallationId, ListFilter, StoreError, TokenStore};
use tokenkeeper_sqlite::{APPLICATION_ID, OpenError, SCHEMA_VERSION, SqliteStore};

fn id(s: &str) -> InstallationId {
    InstallationId::new(s).unwrap()
}

fn at(secs: u64) -> tokenkeeper_core::Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

#[cfg(unix)]
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let path = common::fresh_db("mode");
    let store = SqliteStore::open(&path).await.unwrap();
    store.create(&sample_record(&id("a"), at(1))).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600, "database file");
    let wal = path.with_extension("db-wal");
    assert!(wal.exists(), "WAL journal in use");
    assert_eq!(mode(&wal), 0o600, "WAL file");
}

#[tokio::test]
async fn schema_is_versioned_and_marked() {
    let path = common::fresh_db("schema");
    drop(SqliteStore::open(&path).await.unwrap());
    let raw = Connection::open(&path).unwrap();
    let version: i32 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let app: i32 = raw
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .unwrap();
    let journal: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        (version, app, journal.as_str()),
        (SCHEMA_VERSION, APPLICATION_ID, "wal")
    );
    drop(raw);
    // Reopening an up-to-date database migrates nothing and keeps working.
    let store = SqliteStore::open(&path).await.unwrap();
    store
        .create(&sample_record(&id("again"), at(1)))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_newer_schema_is_refused_untouched() {
    let path = common::fresh_db("future");
    let store = SqliteStore::open(&path).await.unwrap();
    store
        .create(&sample_record(&id("kept"), at(1)))
        .await
        .unwrap();
    drop(store);
    {
        let raw = Connection::open(&path).unwrap();
        raw.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        raw.pragma_update(None, "journal_mode", "DELETE").unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    match SqliteStore::open(&path).await {
        Err(OpenError::FutureSchema { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected FutureSchema, got {other:?}"),
    }
    let err = SqliteStore::open(&path).await.unwrap_err().to_string();
    assert!(err.contains("upgrade tokenkeeper"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was modified"
    );
}

#[tokio::test]
async fn a_foreign_database_is_refused() {
    let path = common::fresh_db("foreign");
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE users (name TEXT)")
        .unwrap();
    assert!(matches!(
        SqliteStore::open(&path).await,
        Err(OpenError::NotTokenkeeper { .. })
    ));
    let other_app = common::fresh_db("foreign-app");
    Connection::open(&other_app)
        .unwrap()
        .pragma_update(None, "application_id", 42)
        .unwrap();
    assert!(matches!(
        SqliteStore::open(&other_app).await,
        Err(OpenError::NotTokenkeeper { .. })
    ));
    let missing_dir = common::fresh_dir("nodir").join("no/such/dir/tokens.db");
    assert!(matches!(
        SqliteStore::open(&missing_dir).await,
        Err(OpenError::Io { .. })
    ));
}

async fn store_with(names: &[&str]) -> (SqliteStore, std::path::PathBuf) {
    let path = common::fresh_db("corrupt");
    let store = SqliteStore::open(&path).await.unwrap();
    for (n, name) in names.iter().enumerate() {
        store
            .create(&sample_record(&id(name), at(n as u64)))
            .await
            .unwrap();
    }
    (store, path)
}

fn expect_corrupt(result: Result<impl std::fmt::Debug, StoreError>, who: &str) -> String {
    match result {
        Err(e @ StoreError::Corrupt { .. }) => {
            let StoreError::Corrupt { id, .. } = &e else {
                unreachable!()
            };
            assert_eq!(id.as_str(), who);
            e.to_string()
        }
        other => panic!("expected Corrupt for {who}, got {other:?}"),
    }
}

#[tokio::test]
async fn corrupt_rows_are_typed_errors_for_that_installation_only() {
    let (store, path) = store_with(&["garbage", "swapped", "version", "state", "healthy"]).await;
    let raw = Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE installations SET record = x'00ff13' WHERE id = 'garbage'",
        [],
    )
    .unwrap();
    raw.execute(
        "UPDATE installations SET record = (SELECT record FROM installations WHERE id = 'healthy') WHERE id = 'swapped'",
        [],
    )
    .unwrap();
    raw.execute(
        "UPDATE installations SET version = 7 WHERE id = 'version'",
        [],
    )
    .unwrap();
    raw.execute(
        "UPDATE installations SET state = 'zombie' WHERE id = 'state'",
        [],
    )
    .unwrap();

    let msg = expect_corrupt(store.get(&id("garbage")).await, "garbage");
    assert!(msg.contains("garbage") && msg.contains("restore"), "{msg}");
    let msg = expect_corrupt(store.get(&id("swapped")).await, "swapped");
    assert!(msg.contains("belongs to installation"), "{msg}");
    expect_corrupt(store.get(&id("version")).await, "version");
    expect_corrupt(store.get(&id("state")).await, "state");
    // A conflicting swap reports the corruption it finds instead of a made-up record.
    let r = sample_record(&id("version"), at(1));
    let leased = lease(&r, "h", at(9), at(0));
    expect_corrupt(store.compare_and_swap(&leased, 1).await, "version");

    // Everyone else is unaffected.
    let healthy = store.get(&id("healthy")).await.unwrap().unwrap();
    assert_eq!(healthy.id().as_str(), "healthy");
    let leased = lease(&healthy, "h", at(9), at(0));
    assert_eq!(
        store.compare_and_swap(&leased, 1).await.unwrap(),
        CasOutcome::Swapped
    );
    assert_eq!(
        store
            .due("conformance", at(1000), None, 10)
            .await
            .unwrap()
            .entries
            .len(),
        5
    );
    // Listing by another state still works; the unknown state is named.
    assert_eq!(
        store
            .list(
                ListFilter::in_state(tokenkeeper_core::StateKind::Refreshing),
                None,
                10
            )
            .await
            .unwrap()
            .entries
            .len(),
        1
    );
    expect_corrupt(store.list(ListFilter::all(), None, 10).await, "state");
}

#[tokio::test]
async fn records_survive_reopen_and_a_second_store_on_the_same_file() {
    let path = common::fresh_db("reopen");
    let r = sample_record(&id("durable"), at(5));
    {
        let store = SqliteStore::open(&path).await.unwrap();
        store.create(&r).await.unwrap();
    }
    let a = SqliteStore::open(&path).await.unwrap();
    let b = SqliteStore::open(&path).await.unwrap();
    assert_eq!(a.get(&id("durable")).await.unwrap().unwrap(), r);
    let leased = lease(&r, "a", at(9), at(0));
    assert_eq!(
        a.compare_and_swap(&leased, 1).await.unwrap(),
        CasOutcome::Swapped
    );
    assert!(matches!(
        b.compare_and_swap(&leased, 1).await.unwrap(),
        CasOutcome::Conflict(_)
    ));
    assert_eq!(b.get(&id("durable")).await.unwrap().unwrap(), leased);
}

/// A database of schema 1 (one due index for every consumer) opens as schema 2: each row
/// takes its consumer from the record it holds, and `due` finds it under that consumer only.
#[tokio::test]
async fn a_schema_1_database_moves_to_the_per_consumer_due_index() {
    let path = common::fresh_db("schema1");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE installations (
                 id      TEXT    NOT NULL PRIMARY KEY,
                 version INTEGER NOT NULL,
                 state   TEXT    NOT NULL,
                 due_at  INTEGER,
                 record  BLOB    NOT NULL
             );
             CREATE INDEX installations_by_due ON installations (due_at, id) WHERE due_at IS NOT NULL;
             CREATE INDEX installations_by_state ON installations (state, id);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        for name in ["old-1", "old-2"] {
            let r = sample_record(&id(name), at(5));
            conn.execute(
                "INSERT INTO installations (id, version, state, due_at, record) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![
                    name,
                    r.version() as i64,
                    r.state().kind().as_str(),
                    r.due_at().map(tokenkeeper_core::Timestamp::unix_nanos),
                    r.encode()
                ],
            )
            .unwrap();
        }
        // A corrupt row must not stop the migration (it stays a typed error of its own).
        conn.execute(
            "INSERT INTO installations (id, version, state, due_at, record) VALUES ('bad', 1, 'active', 1, x'00ff')",
            [],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).await.unwrap();
    assert!(matches!(
        store.get(&id("bad")).await,
        Err(StoreError::Corrupt { .. })
    ));
    let version: i32 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let due = store.due("conformance", at(10), None, 10).await.unwrap();
    let names: Vec<_> = due.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(names, ["old-1", "old-2"]);
    assert!(
        store
            .due("another/consumer", at(10), None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    // Writes after the move keep the index right.
    let r = store.get(&id("old-1")).await.unwrap().unwrap();
    let leased = lease(&r, "h", at(50), at(6));
    store.compare_and_swap(&leased, 1).await.unwrap();
    let due = store.due("conformance", at(10), None, 10).await.unwrap();
    assert_eq!(due.entries.len(), 1);
    // A process of the older version still running creates a row without a consumer: the
    // next open adopts it.
    let late = sample_record(&id("late"), at(5));
    Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO installations (id, version, state, due_at, record) VALUES ('late', 1, 'active', ?1, ?2)",
            rusqlite::params![late.due_at().map(tokenkeeper_core::Timestamp::unix_nanos), late.encode()],
        )
        .unwrap();
    drop(store);
    let store = SqliteStore::open(&path).await.unwrap();
    let due = store.due("conformance", at(10), None, 10).await.unwrap();
    let names: Vec<_> = due.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(names, ["late", "old-2"]);
}

/// Security review M4: an existing database (and its `-wal`/`-shm`) that others may read is
/// tightened to 0600 on open (or refused when asked), and a symbolic link is refused. (That
/// every connection overwrites freed pages, `secure_delete`, is a unit test in `src/pool.rs`.)
#[cfg(unix)]
#[tokio::test]
async fn existing_files_are_made_private_and_links_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let loosen = |p: &std::path::Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap()
    };
    let path = common::fresh_db("loose");
    let store = SqliteStore::open(&path).await.unwrap();
    store.create(&sample_record(&id("a"), at(1))).await.unwrap();
    drop(store);
    let wal = path.with_extension("db-wal");
    loosen(&path);
    if wal.exists() {
        loosen(&wal);
    }
    let refused = SqliteStore::builder(&path)
        .loose_permissions(tokenkeeper_sqlite::LoosePermissions::Refuse)
        .open()
        .await
        .unwrap_err();
    assert!(
        matches!(refused, OpenError::NotPrivate { .. }) && refused.to_string().contains("644"),
        "{refused}"
    );
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(mode(&path), 0o600);
    if wal.exists() {
        assert_eq!(mode(&wal), 0o600);
    }
    drop(store);

    let link = path.with_file_name("linked.db");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = SqliteStore::open(&link).await.unwrap_err();
    assert!(
        matches!(err, OpenError::NotPrivate { .. }) && err.to_string().contains("symbolic link"),
        "{err}"
    );
}

/// An event this build cannot read (a newer version's, or damaged) is delivered as `Unknown`
/// with its installation and version, and the events after it still flow: one bad row never
/// stalls every reader.
#[tokio::test]
async fn an_unreadable_event_is_delivered_as_unknown_and_does_not_stall_readers() {
    use tokenkeeper_core::{EventCursor, EventKind};
    let (store, path) = store_with(&["a", "b"]).await;
    let raw = Connection::open(&path).unwrap();
    let changed = raw
        .execute(
            "UPDATE events SET body = '{\"entry\":{\"event\":\"FromTheFuture\"}}' WHERE id = 'a'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    let page = store
        .read_events(&EventCursor::beginning(), 10)
        .await
        .unwrap();
    let seen: Vec<_> = page
        .events
        .iter()
        .map(|e| (e.installation.as_str(), e.kind, e.version))
        .collect();
    assert_eq!(
        seen,
        vec![("a", EventKind::Unknown, 1), ("b", EventKind::Created, 1)]
    );
    assert!(page.events[0].ends_tokens());
}

/// A store restored from a backup taken before the reader's last event refuses the reader's
/// cursor (its events may be gone) instead of silently skipping what the restored store
/// writes next; a cursor of another database is refused too.
#[tokio::test]
async fn a_cursor_from_before_a_restore_or_of_another_database_is_refused() {
    use tokenkeeper_core::EventCursor;
    let (store, path) = store_with(&["a"]).await;
    let backup = path.with_extension("backup");
    raw_backup(&path, &backup);
    store.create(&sample_record(&id("b"), at(1))).await.unwrap();
    let read = store
        .read_events(&EventCursor::beginning(), 10)
        .await
        .unwrap();
    assert_eq!(read.events.len(), 2);
    drop(store);
    raw_backup(&backup, &path);
    let restored = SqliteStore::open(&path).await.unwrap();
    match restored.read_events(&read.next, 10).await {
        Err(StoreError::InvalidCursor { message, .. }) => {
            assert!(message.contains("restored"), "{message}")
        }
        other => panic!("a cursor ahead of the restored log read {other:?}"),
    }
    let (other, _) = store_with(&["a", "b", "c"]).await;
    assert!(matches!(
        other.read_events(&read.next, 10).await,
        Err(StoreError::InvalidCursor { .. })
    ));
}

/// Copies a database consistently (SQLite's online backup through `VACUUM INTO`).
fn raw_backup(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_file(to);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", to.display()));
    }
    Connection::open(from)
        .unwrap()
        .execute("VACUUM INTO ?1", [to.to_str().unwrap()])
        .unwrap();
}

/// Review N10: a database file that belongs to another user is refused, never written (a
/// user who pre-creates `tokens.db` in a directory a root service writes would otherwise own
/// a file holding every token). Needs root to hand a file to another user; skipped otherwise.
#[cfg(unix)]
#[tokio::test]
async fn a_database_file_of_another_user_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let path = common::fresh_db("foreign-owner");
    let store = SqliteStore::open(&path).await.unwrap();
    drop(store);
    let me = std::fs::metadata(&path).unwrap().uid();
    if me != 0 {
        eprintln!("skipped: handing a file to another user needs root");
        return;
    }
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    let refused = SqliteStore::open(&path).await.unwrap_err();
    assert!(
        matches!(refused, OpenError::NotPrivate { .. }) && refused.to_string().contains("65534"),
        "{refused}"
    );
}

/// Review N10: a database in a directory that other users may write (and that is not sticky)
/// is refused: anyone there can rename the file away and put another, or a link, in its
/// place. A sticky directory (like `/tmp`) keeps others from renaming or removing our files.
#[cfg(unix)]
#[tokio::test]
async fn a_database_in_a_directory_others_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let path = common::fresh_db("open-dir");
    let dir = path.parent().unwrap().to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = SqliteStore::open(&path).await.unwrap_err();
    assert!(
        matches!(&refused, OpenError::NotPrivate { path: p, .. } if *p == dir)
            && refused.to_string().contains("777"),
        "{refused}"
    );
    assert!(!path.exists(), "nothing was created in it");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    SqliteStore::open(&path)
        .await
        .expect("a sticky directory is accepted");
}

/// A store of up to 8 connections at `path` holding one installation, "before".
#[cfg(unix)]
async fn pooled_store(path: &std::path::Path) -> std::sync::Arc<SqliteStore> {
    let store = SqliteStore::builder(path)
        .max_connections(8)
        .open()
        .await
        .unwrap();
    store
        .create(&sample_record(&id("before"), at(1)))
        .await
        .unwrap();
    std::sync::Arc::new(store)
}

/// 32 creates at once, then 32 reads at once (so the pool opens new connections), with
/// their outcomes. Writes go to the store's one writer connection, opened with the store.
#[cfg(unix)]
async fn many_writes(store: &std::sync::Arc<SqliteStore>) -> Vec<Result<(), StoreError>> {
    let writes: Vec<_> = (0..32)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create(&sample_record(&id(&format!("after-{n}")), at(2)))
                    .await
            })
        })
        .collect();
    let reads: Vec<_> = (0..32)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.get(&id(&format!("after-{n}"))).await.map(drop) })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in writes.into_iter().chain(reads) {
        outcomes.push(call.await.unwrap());
    }
    outcomes
}

/// Review N10: the path is checked again for every connection the pool opens later, so a
/// database swapped for a link after start-up is not followed: no write lands in the file
/// the link points to (writes go to the writer connection opened with the store, on the
/// real file), and the reads that needed a new connection are refused.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_swapped_for_a_link_after_start_is_not_followed() {
    let path = common::fresh_db("swapped");
    let store = pooled_store(&path).await;
    // The attacker's copy, and the real path now a link to it.
    let theirs = path.with_file_name("theirs.db");
    let moved = path.with_file_name("moved.db");
    raw_backup(&path, &theirs);
    std::fs::rename(&path, &moved).unwrap();
    std::os::unix::fs::symlink(&theirs, &path).unwrap();
    let mut refused = 0;
    for outcome in many_writes(&store).await {
        if let Err(e) = outcome {
            assert!(e.to_string().contains("symbolic link"), "{e}");
            refused += 1;
        }
    }
    let conn = rusqlite::Connection::open(&theirs).unwrap();
    let landed: i64 = conn
        .query_row(
            "SELECT count(*) FROM installations WHERE id LIKE 'after-%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        landed, 0,
        "writes followed the link into the attacker's file"
    );
    assert!(refused > 0, "no call needed a new connection");
}

/// Review N10 (second review): a connection the pool opens later never creates the database:
/// one renamed away since the store opened is not re-created at the path (where another user
/// could then slip in a file of their own between the check and the open).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_renamed_away_is_not_created_again() {
    let path = common::fresh_db("renamed");
    let store = pooled_store(&path).await;
    std::fs::rename(&path, path.with_file_name("moved.db")).unwrap();
    many_writes(&store).await;
    assert!(
        !path.exists(),
        "a new connection created the database again"
    );
}
