//! The event outbox beside the raw primitives it is built on, per durable backend, in one run:
//!
//! - `events_write/<backend>`: `compare_and_swap` (record + its event, one atomic write) vs the
//!   same store with its outbox triggers dropped (SQLite, PostgreSQL): what the outbox costs a
//!   write. (Each store's CAS beside its raw statement is in `sqlite_store`, `redis_store` and
//!   `postgres_store`; on Redis the event is part of the script both run.)
//! - `events_read/<backend>`: `read_events` of a 500-event page vs the raw query (SQL) or the
//!   raw pipeline of per-shard `XRANGE` + `GET` (Redis), both as it asked before review E10
//!   (each shard for the whole page) and as it asks now (each shard for its share): the store
//!   adds decoding, the retention check and, on Redis, the merge of 16 shards. The bytes each
//!   Redis read moves are printed.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rusqlite::{Connection, params};
use tokenkeeper_benches::{bump, postgres_url, redis_bytes_of, redis_url, time_cas};
use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{CasOutcome, EventCursor, InstallationId, TokenStore};
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

async fn sqlite_store(path: &std::path::Path) -> SqliteStore {
    SqliteStore::builder(path)
        .synchronous(tokenkeeper_sqlite::Synchronous::Normal)
        .open()
        .await
        .unwrap()
}

fn sqlite(c: &mut Criterion) {
    let rt = runtime();
    let ids = ids();
    let with = tokenkeeper_testkit::dirs::fresh_db("bench-events");
    let store = rt.block_on(sqlite_store(&with));
    rt.block_on(fill(&store, &ids));
    // The same store with its outbox triggers dropped: what a write cost before the outbox.
    let without = tokenkeeper_testkit::dirs::fresh_db("bench-no-events");
    let bare = rt.block_on(sqlite_store(&without));
    Connection::open(&without)
        .unwrap()
        .execute_batch(
            "DROP TRIGGER installations_created; DROP TRIGGER installations_written;
             DROP TRIGGER installations_deleted;",
        )
        .unwrap();
    rt.block_on(fill(&bare, &ids));
    let mut g = c.benchmark_group("events_write/sqlite");
    g.bench_function("cas/tokenkeeper", |b| {
        b.iter_custom(|iters| time_cas(&rt, &store, &ids[1], iters))
    });
    g.bench_function("cas/tokenkeeper_without_outbox", |b| {
        b.iter_custom(|iters| time_cas(&rt, &bare, &ids[1], iters))
    });
    g.finish();
    let conn = Arc::new(std::sync::Mutex::new(Connection::open(&with).unwrap()));
    let mut g = c.benchmark_group("events_read/sqlite");
    g.bench_function("page_500/tokenkeeper", |b| {
        b.iter(|| read_page(&rt, &store))
    });
    g.bench_function("page_500/raw_SELECT", |b| {
        b.iter(|| {
            let conn = conn.clone();
            // The store's hop to the blocking pool, as in `sqlite_ops`.
            rt.block_on(rt.spawn_blocking(move || {
                let conn = conn.lock().unwrap();
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT seq, id, consumer, version, at, body FROM events \
                         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                    )
                    .unwrap();
                let rows: Vec<(i64, String, String, i64, i64, String)> = stmt
                    .query_map(params![0, PAGE as i64], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
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

async fn postgres_store(schema: &str) -> PostgresStore {
    PostgresStore::builder(postgres_url())
        .schema(schema)
        .connect()
        .await
        .unwrap()
}

fn postgres(c: &mut Criterion) {
    let rt = runtime();
    let ids = ids();
    let schema = tokenkeeper_testkit::postgres::unique_schema("bench_events");
    let store = rt.block_on(postgres_store(&schema));
    rt.block_on(fill(&store, &ids));
    let bare_schema = tokenkeeper_testkit::postgres::unique_schema("bench_no_events");
    let bare = rt.block_on(postgres_store(&bare_schema));
    rt.block_on(async {
        let client = pool(&bare).get().await.unwrap();
        client
            .batch_execute(&format!(
                "DROP TRIGGER installations_created_or_deleted ON {bare_schema}.installations;
                 DROP TRIGGER installations_written ON {bare_schema}.installations;"
            ))
            .await
            .unwrap();
    });
    rt.block_on(fill(&bare, &ids));
    let mut g = c.benchmark_group("events_write/postgres");
    g.bench_function("cas/tokenkeeper", |b| {
        b.iter_custom(|iters| time_cas(&rt, &store, &ids[1], iters))
    });
    g.bench_function("cas/tokenkeeper_without_outbox", |b| {
        b.iter_custom(|iters| time_cas(&rt, &bare, &ids[1], iters))
    });
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
        b.iter_custom(|iters| time_cas(&rt, &store, &ids[1], iters))
    });
    g.finish();
    let mut g = c.benchmark_group("events_read/redis");
    g.bench_function("page_500/tokenkeeper", |b| {
        b.iter(|| read_page(&rt, &store))
    });
    // The raw pipeline as the store sent it before review E10 (every shard asked for the
    // whole page) and as it sends it now (each shard its share, `PAGE / 16 + 1`).
    let pipeline = |count: usize| {
        let mut pipe = redis::pipe();
        for shard in 0..16 {
            let base = format!("{prefix}:{{s{shard:02}}}");
            pipe.cmd("XRANGE")
                .arg(format!("{base}:events"))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(count);
            pipe.cmd("GET").arg(format!("{base}:events:trimmed"));
        }
        pipe
    };
    let (whole, share) = (pipeline(PAGE), pipeline(PAGE / 16 + 1));
    let mut counted = raw.clone();
    let (bytes, _) = rt.block_on(redis_bytes_of(
        &mut counted,
        store.read_events(&EventCursor::beginning(), PAGE),
    ));
    println!("events_read/redis: a {PAGE}-event page moved {bytes} bytes");
    let (bytes, _) = rt.block_on(redis_bytes_of(
        &mut counted,
        whole.query_async::<Vec<redis::Value>>(&mut raw.clone()),
    ));
    println!("events_read/redis: the whole page from every shard moved {bytes} bytes");
    for (name, pipe) in [
        ("page_500/raw_XRANGE_whole_page_per_shard", &whole),
        ("page_500/raw_XRANGE_share_per_shard", &share),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let replies: Vec<redis::Value> = rt.block_on(pipe.query_async(&mut raw)).unwrap();
                assert_eq!(replies.len(), 32);
                replies.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, sqlite, postgres, redis);
criterion_main!(benches);
