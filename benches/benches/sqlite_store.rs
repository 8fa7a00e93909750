//! SqliteStore beside the raw rusqlite statements it wraps, in one run:
//!
//! - `sqlite_ops`: `get` and `compare_and_swap` vs the same SQL run directly (a) synchronously
//!   on the bench thread and (b) on tokio's blocking pool, the same off-runtime hop the store
//!   makes. The store adds decoding/validation of the record and encoding of the new one.
//! - `sqlite_scale`: `get` and one `due` page at 10,000 and at 1,000,000 records (the large
//!   database is built once with raw inserts and cached under `target/bench-data`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rusqlite::{Connection, params};
use tokenkeeper_benches::{bump, time_cas};
use tokenkeeper_benches::{data_dir, quick_mode};
use tokenkeeper_core::conformance::{CONSUMER, T0, sample_record};
use tokenkeeper_core::{InstallationId, Record, Timestamp, TokenStore};
use tokenkeeper_sqlite::SqliteStore;

const GET_SQL: &str = "SELECT version, state, due_at, record FROM installations WHERE id = ?1";
const CAS_SQL: &str = "UPDATE installations SET version = ?1, state = ?2, due_at = ?3, record = ?4 WHERE id = ?5 AND version = ?6";

fn id(n: usize) -> InstallationId {
    InstallationId::new(format!("inst-{n:08}")).unwrap()
}

fn due_at(n: usize) -> Timestamp {
    T0.saturating_add(Duration::from_secs((n as u64 * 7919) % 100_000))
}

/// A database with `n` records: created through the store's schema, filled with raw inserts
/// in one transaction (the store's own encoding), cached across runs.
fn database(rt: &tokio::runtime::Runtime, n: usize) -> PathBuf {
    let path = data_dir().join(format!("sqlite-{n}.db"));
    if let Ok(conn) = Connection::open(&path) {
        let count: Result<i64, _> =
            conn.query_row("SELECT count(*) FROM installations", [], |r| r.get(0));
        // Reuse the cached database only if this build still reads its records.
        let readable = || {
            let store = rt.block_on(SqliteStore::open(&path)).ok()?;
            rt.block_on(store.get(&id(n - 1))).ok().flatten()
        };
        if count.ok() == Some(n as i64) && readable().is_some() {
            return path;
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    drop(rt.block_on(SqliteStore::open(&path)).unwrap());
    let mut conn = Connection::open(&path).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare("INSERT INTO installations (id, version, state, due_at, record, consumer) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .unwrap();
        for i in 0..n {
            let r = sample_record(&id(i), due_at(i));
            insert
                .execute(params![
                    r.id().as_str(),
                    r.version() as i64,
                    r.state().kind().as_str(),
                    r.due_at().map(Timestamp::unix_nanos),
                    r.encode(),
                    r.consumer()
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    conn.execute_batch("ANALYZE; PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    path
}

fn raw_get(conn: &Connection, key: &str) -> Vec<u8> {
    let mut stmt = conn.prepare_cached(GET_SQL).unwrap();
    stmt.query_row([key], |r| r.get::<_, Vec<u8>>(3)).unwrap()
}

fn raw_cas(conn: &Connection, r: &Record, bytes: &[u8], expected: u64) -> usize {
    let mut stmt = conn.prepare_cached(CAS_SQL).unwrap();
    stmt.execute(params![
        r.version() as i64,
        r.state().kind().as_str(),
        r.due_at().map(Timestamp::unix_nanos),
        bytes,
        r.id().as_str(),
        expected as i64
    ])
    .unwrap()
}

fn open_raw(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn
}

fn sqlite_ops(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let n = 10_000;
    let path = database(&rt, n);
    let store = rt.block_on(SqliteStore::open(&path)).unwrap();
    let raw = open_raw(&path);
    let shared = Arc::new(Mutex::new(open_raw(&path)));
    let mut g = c.benchmark_group("sqlite_ops");

    let mut k = 0usize;
    g.bench_function("get/tokenkeeper", |b| {
        b.iter(|| {
            k = (k + 7919) % n;
            rt.block_on(store.get(&id(k))).unwrap().unwrap()
        })
    });
    g.bench_function("get/raw_rusqlite_sync", |b| {
        b.iter(|| {
            k = (k + 7919) % n;
            raw_get(&raw, id(k).as_str())
        })
    });
    g.bench_function("get/raw_rusqlite_blocking_pool", |b| {
        b.iter(|| {
            k = (k + 7919) % n;
            let (conn, key) = (shared.clone(), id(k));
            rt.block_on(async move {
                tokio::task::spawn_blocking(move || raw_get(&conn.lock().unwrap(), key.as_str()))
                    .await
            })
            .unwrap()
        })
    });

    // CAS: the next record is built outside the timed section; only the write is timed.
    let cas_id = id(1);
    g.bench_function("cas/tokenkeeper", |b| {
        b.iter_custom(|iters| time_cas(&rt, &store, &cas_id, iters))
    });
    g.bench_function("cas/raw_rusqlite_sync", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let current = rt.block_on(store.get(&cas_id)).unwrap().unwrap();
                let next = bump(&current);
                let bytes = next.encode();
                let started = Instant::now();
                let changed = raw_cas(&raw, &next, &bytes, current.version());
                total += started.elapsed();
                assert_eq!(changed, 1);
            }
            total
        })
    });
    g.bench_function("cas/raw_rusqlite_blocking_pool", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let current = rt.block_on(store.get(&cas_id)).unwrap().unwrap();
                let next = bump(&current);
                let bytes = next.encode();
                let conn = shared.clone();
                let expected = current.version();
                let started = Instant::now();
                let changed = rt
                    .block_on(async move {
                        tokio::task::spawn_blocking(move || {
                            raw_cas(&conn.lock().unwrap(), &next, &bytes, expected)
                        })
                        .await
                    })
                    .unwrap();
                total += started.elapsed();
                assert_eq!(changed, 1);
            }
            total
        })
    });
    g.finish();
}

fn sqlite_scale(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let large = if quick_mode() { 20_000 } else { 1_000_000 };
    let mut g = c.benchmark_group("sqlite_scale");
    for n in [10_000, large] {
        let path = database(&rt, n);
        let store = rt.block_on(SqliteStore::open(&path)).unwrap();
        let mut k = 0usize;
        g.bench_with_input(BenchmarkId::new("get", n), &n, |b, &n| {
            b.iter(|| {
                k = (k + 104_729) % n;
                rt.block_on(store.get(&id(k))).unwrap().unwrap()
            })
        });
        let mut start = 0u64;
        g.bench_with_input(BenchmarkId::new("due_page_100", n), &n, |b, _| {
            b.iter(|| {
                start = (start + 7) % 50_000;
                let after = tokenkeeper_core::DueEntry {
                    due_at: T0.saturating_add(Duration::from_secs(start)),
                    id: id(0),
                };
                let page = rt
                    .block_on(store.due(CONSUMER, Timestamp::MAX, Some(&after), 100))
                    .unwrap();
                assert_eq!(page.entries.len(), 100);
                page
            })
        });
    }
    g.finish();
}

criterion_group!(benches, sqlite_ops, sqlite_scale);
criterion_main!(benches);
