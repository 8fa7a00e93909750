//! The event outbox beside the raw primitives it is built on, per durable backend, in one run:
//!
//! - `events_write/<backend>`: `compare_and_swap` (record + its event, one atomic write) vs the
//!   same raw `UPDATE` on the outbox's table (its trigger appends the event) vs the same raw
//!   `UPDATE` on a copy of the table *without* the trigger: the last pair is what the outbox
//!   costs a write.
//! - `events_read/<backend>`: `read_events` of a 500-event page vs the raw query (SQL) or the
//!   raw pipeline of per-shard `XRANGE` + `GET` (Redis) that it runs: the store adds decoding,
//!   the retention check and, on Redis, the merge of 16 shards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rusqlite::{Connection, params};
use tokenkeeper_benches::{bump, postgres_url, redis_url};
use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{CasOutcome, EventCursor, InstallationId, Record, Timestamp, TokenStore};
use tokenkeeper_postgres::PostgresStore;
use tokenkeeper_postgres::bench_support::pool;
use tokenkeeper_redis::RedisStore;
use tokenkeeper_sqlite::SqliteStore;

const RECORDS: usize = 200;
const PAGE: usize = 500;

fn ids() -> Vec<InstallationId> {
    (0..RECORDS)
        .map(|i| InstallationId::new(format!("inst-{i:05}")).unwrap())
        .collect()
}

/// Creates the records and writes until the log holds at least `2 * PAGE` events.
async fn fill(store: &dyn TokenStore, ids: &[InstallationId]) {
    for i in ids {
        store.create(&sample_record(i, T0)).await.unwrap();
    }
    for _ in 0..(2 * PAGE / RECORDS) {
        for i in ids {
            let current = store.get(i).await.unwrap().unwrap();
            let next = bump(&current);
            assert_eq!(
                store
                    .compare_and_swap(&next, current.version())
                    .await
                    .unwrap(),
                CasOutcome::Swapped
            );
        }
    }
}

/// Times `store.compare_and_swap` alone (the read and the next record outside the clock).
fn cas_tokenkeeper(
    rt: &tokio::runtime::Runtime,
    store: &dyn TokenStore,
    id: &InstallationId,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let current = rt.block_on(store.get(id)).unwrap().unwrap();
        let next = bump(&current);
        let started = Instant::now();
        let out = rt
            .block_on(store.compare_and_swap(&next, current.version()))
            .unwrap();
        total += started.elapsed();
        assert_eq!(out, CasOutcome::Swapped);
    }
    total
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn read_page(rt: &tokio::runtime::Runtime, store: &dyn TokenStore) -> usize {
    let page = rt
        .block_on(store.read_events(&EventCursor::beginning(), PAGE))
        .unwrap();
    assert_eq!(page.events.len(), PAGE);
    page.events.len()
}

const SQLITE_UPDATE: &str = "UPDATE {t} SET version = ?1, state = ?2, due_at = ?3, record = ?4 WHERE id = ?5 AND version = ?6";

fn sqlite_update(conn: &Connection, table: &str, next: &Record, expected: u64) -> usize {
    conn.prepare_cached(&SQLITE_UPDATE.replace("{t}", table))
        .unwrap()
        .execute(params![
            next.version() as i64,
            next.state().kind().as_str(),
            next.due_at().map(Timestamp::unix_nanos),
            next.encode(),
            next.id().as_str(),
            expected as i64
        ])
        .unwrap()
}

fn sqlite(c: &mut Criterion) {
    let rt = runtime();
    let dir = tokenkeeper_testkit::dirs::fresh_db("bench-events");
    let store = rt
        .block_on(
            SqliteStore::builder(&dir)
                .synchronous(tokenkeeper_sqlite::Synchronous::Normal)
                .open(),
        )
        .unwrap();
    let ids = ids();
    rt.block_on(fill(&store, &ids));
    let conn = Arc::new(std::sync::Mutex::new(Connection::open(&dir).unwrap()));
    {
        let conn = conn.lock().unwrap();
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL;
             CREATE TABLE plain AS SELECT * FROM installations;
             CREATE UNIQUE INDEX plain_id ON plain (id);",
        )
        .unwrap();
    }
    let mut g = c.benchmark_group("events_write/sqlite");
    g.bench_function("cas/tokenkeeper", |b| {
        b.iter_custom(|iters| cas_tokenkeeper(&rt, &store, &ids[1], iters))
    });
    for (name, table, id) in [
        ("cas/raw_UPDATE_with_trigger", "installations", &ids[2]),
        ("cas/raw_UPDATE_without_outbox", "plain", &ids[2]),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let conn = conn.clone();
                    let current = rt.block_on(store.get(id)).unwrap().unwrap();
                    // The copy's own version, read before the clock starts.
                    let plain = conn
                        .lock()
                        .unwrap()
                        .query_row(
                            "SELECT version FROM plain WHERE id = ?1",
                            [id.as_str()],
                            |r| r.get::<_, i64>(0),
                        )
                        .unwrap() as u64;
                    let (next, expected) = if table == "plain" {
                        (bump_to(&bump(&current), plain + 1), plain)
                    } else {
                        (bump(&current), current.version())
                    };
                    let started = Instant::now();
                    // The store's hop to the blocking pool, as in `sqlite_ops`.
                    let changed = rt
                        .block_on(rt.spawn_blocking(move || {
                            sqlite_update(&conn.lock().unwrap(), table, &next, expected)
                        }))
                        .unwrap();
                    total += started.elapsed();
                    assert_eq!(changed, 1);
                }
                total
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("events_read/sqlite");
    g.bench_function("page_500/tokenkeeper", |b| {
        b.iter(|| read_page(&rt, &store))
    });
    g.bench_function("page_500/raw_SELECT", |b| {
        b.iter(|| {
            let conn = conn.clone();
            rt.block_on(rt.spawn_blocking(move || {
                let conn = conn.lock().unwrap();
                let mut stmt = conn
                    .prepare_cached("SELECT seq, id, consumer, version, at, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                    .unwrap();
                let rows: Vec<(i64, String, String, i64, i64, String)> = stmt
                    .query_map(params![0, PAGE as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                    })
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert_eq!(rows.len(), PAGE);
                rows.len()
            }))
            .unwrap()
        })
    });
    g.finish();
}

/// `record` as if written at version `version` (the copy table's own count).
fn bump_to(record: &Record, version: u64) -> Record {
    let mut next = record.clone();
    while next.version() < version {
        next = bump(&next);
    }
    next
}

fn postgres(c: &mut Criterion) {
    let rt = runtime();
    let schema = tokenkeeper_testkit::postgres::unique_schema("bench_events");
    let store = rt
        .block_on(
            PostgresStore::builder(postgres_url())
                .schema(&schema)
                .connect(),
        )
        .unwrap();
    let ids = ids();
    rt.block_on(fill(&store, &ids));
    rt.block_on(async {
        let client = pool(&store).get().await.unwrap();
        client
            .batch_execute(&format!(
                "CREATE TABLE {schema}.plain (LIKE {schema}.installations INCLUDING ALL);
                 INSERT INTO {schema}.plain SELECT * FROM {schema}.installations;"
            ))
            .await
            .unwrap();
    });
    let update = |table: &str| {
        format!(
            "UPDATE {schema}.{table} SET consumer = $2, version = $3, state = $4, due_at = $5, lease_holder = $6, record = $7
              WHERE id = $1 AND version = $8 AND ($9::TEXT IS NULL OR lease_holder = $9)"
        )
    };
    let mut g = c.benchmark_group("events_write/postgres");
    g.bench_function("cas/tokenkeeper", |b| {
        b.iter_custom(|iters| cas_tokenkeeper(&rt, &store, &ids[1], iters))
    });
    for (name, table) in [
        ("cas/raw_UPDATE_with_trigger", "installations"),
        ("cas/raw_UPDATE_without_outbox", "plain"),
    ] {
        let sql = update(table);
        let id = &ids[2];
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let current = rt.block_on(store.get(id)).unwrap().unwrap();
                    let expected: i64 = rt.block_on(async {
                        let client = pool(&store).get().await.unwrap();
                        client
                            .query_one(
                                &format!("SELECT version FROM {schema}.{table} WHERE id = $1"),
                                &[&id.as_str()],
                            )
                            .await
                            .unwrap()
                            .get(0)
                    });
                    let next = bump_to(&bump(&current), expected as u64 + 1);
                    let bytes = next.encode();
                    let version = next.version() as i64;
                    let due = next.due_at().map(Timestamp::unix_nanos);
                    let holder = next.state().lease().map(|l| l.holder.as_str().to_owned());
                    let under: Option<String> = None;
                    let started = Instant::now();
                    let changed = rt.block_on(async {
                        let client = pool(&store).get().await.unwrap();
                        let stmt = client.prepare_cached(&sql).await.unwrap();
                        client
                            .execute(
                                &stmt,
                                &[
                                    &id.as_str(),
                                    &next.consumer(),
                                    &version,
                                    &next.state().kind().as_str(),
                                    &due,
                                    &holder,
                                    &bytes,
                                    &expected,
                                    &under,
                                ],
                            )
                            .await
                            .unwrap()
                    });
                    total += started.elapsed();
                    assert_eq!(changed, 1);
                }
                total
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("events_read/postgres");
    g.bench_function("page_500/tokenkeeper", |b| {
        b.iter(|| read_page(&rt, &store))
    });
    let select = format!(
        "SELECT l.trimmed_through, e.seq, e.id, e.consumer, e.version, e.at, e.body
           FROM {schema}.event_log l LEFT JOIN LATERAL (
                SELECT * FROM {schema}.events WHERE seq > $1 ORDER BY seq LIMIT $2
           ) e ON TRUE"
    );
    g.bench_function("page_500/raw_SELECT", |b| {
        b.iter(|| {
            rt.block_on(async {
                let client = pool(&store).get().await.unwrap();
                let stmt = client.prepare_cached(&select).await.unwrap();
                let rows = client.query(&stmt, &[&0i64, &(PAGE as i64)]).await.unwrap();
                assert_eq!(rows.len(), PAGE);
                rows.iter()
                    .map(|r| r.get::<_, &str>(6).len())
                    .sum::<usize>()
            })
        })
    });
    g.finish();
}

fn redis(c: &mut Criterion) {
    let rt = runtime();
    let url = redis_url();
    let prefix = format!("bench-events-{}", std::process::id());
    let store = rt
        .block_on(RedisStore::builder(&url).prefix(&prefix).connect())
        .unwrap();
    let ids = ids();
    rt.block_on(fill(&store, &ids));
    let mut raw = rt
        .block_on(
            redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection(),
        )
        .unwrap();
    let mut g = c.benchmark_group("events_write/redis");
    g.bench_function("cas/tokenkeeper", |b| {
        b.iter_custom(|iters| cas_tokenkeeper(&rt, &store, &ids[1], iters))
    });
    g.finish();
    let mut g = c.benchmark_group("events_read/redis");
    g.bench_function("page_500/tokenkeeper", |b| {
        b.iter(|| read_page(&rt, &store))
    });
    g.bench_function("page_500/raw_XRANGE_pipeline", |b| {
        b.iter(|| {
            let mut pipe = redis::pipe();
            for shard in 0..16 {
                let base = format!("{prefix}:{{s{shard:02}}}");
                pipe.cmd("XRANGE")
                    .arg(format!("{base}:events"))
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE);
                pipe.cmd("GET").arg(format!("{base}:events:trimmed"));
            }
            let replies: Vec<redis::Value> = rt.block_on(pipe.query_async(&mut raw)).unwrap();
            assert_eq!(replies.len(), 32);
            replies.len()
        })
    });
    g.finish();
}

criterion_group!(benches, sqlite, postgres, redis);
criterion_main!(benches);
