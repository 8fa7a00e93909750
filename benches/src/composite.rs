//! The raw composite floor of a refresh on each durable store: what the guarantees need per
//! refresh (one read, one conditional lease write, one provider exchange, one conditional
//! result write), written directly against rusqlite, redis-rs and tokio-postgres with no
//! tokenkeeper code, at the same concurrency as the refresh benches.
//!
//! Each row is `(id, version, value)` with a value of the size a tokenkeeper record has after a
//! few refreshes, so the stores move the same bytes. The conditional writes are the naive
//! ones a user would write: `UPDATE … WHERE id = ? AND version = ?` (SQLite on one connection
//! behind a mutex on tokio's blocking pool, with the synchronous mode the row compares with;
//! PostgreSQL over a few pipelining clients) and a Lua compare-and-set on Redis. No outbox,
//! no lease holder, no history: the floor, not a competitor.

use std::sync::{Arc, Mutex};

use crate::{fan_out, raw_refresh};

/// Bytes per stored value: a record with a few history entries and its tokens.
pub const VALUE_BYTES: usize = 1_200;

/// One store's raw read and conditional write.
#[derive(Debug, Clone)]
pub enum Composite {
    /// One connection (WAL, the given `synchronous`) behind a mutex on the blocking pool.
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    /// One multiplexed connection; the write is a Lua compare-and-set on a version prefix.
    Redis(redis::aio::MultiplexedConnection, String),
    /// A few clients, picked round-robin (each pipelines what it is given), with their
    /// prepared read and write.
    Postgres(Arc<Vec<PgClient>>),
}

/// A PostgreSQL client with its prepared statements.
#[derive(Debug)]
pub struct PgClient {
    client: tokio_postgres::Client,
    read: tokio_postgres::Statement,
    write: tokio_postgres::Statement,
}

const REDIS_CAS: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur or string.sub(cur, 1, string.find(cur, '\t', 1, true) - 1) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
";

fn value(version: u64) -> Vec<u8> {
    let mut v = format!("{version}\t").into_bytes();
    v.resize(VALUE_BYTES, b'x');
    v
}

impl Composite {
    /// A fresh SQLite file at `path` with `n` rows.
    pub fn sqlite(path: &std::path::Path, synchronous: &str, n: usize) -> Self {
        let conn = rusqlite::Connection::open(path).expect("open composite db");
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
             CREATE TABLE rows (id TEXT PRIMARY KEY, version INTEGER NOT NULL, value BLOB NOT NULL);"
        ))
        .expect("composite schema");
        {
            let mut insert = conn
                .prepare("INSERT INTO rows VALUES (?1, 1, ?2)")
                .expect("prepare");
            for i in 0..n {
                insert
                    .execute(rusqlite::params![key(i), value(1)])
                    .expect("insert");
            }
        }
        Self::Sqlite(Arc::new(Mutex::new(conn)))
    }

    /// `n` rows under `prefix` on the Redis server at `url`.
    pub async fn redis(url: &str, prefix: &str, n: usize) -> Self {
        let mut conn = redis::Client::open(url)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection");
        for i in 0..n {
            let _: () = redis::cmd("SET")
                .arg(format!("{prefix}:{}", key(i)))
                .arg(value(1))
                .query_async(&mut conn)
                .await
                .expect("SET");
        }
        Self::Redis(conn, prefix.to_owned())
    }

    /// `n` rows in a fresh table `schema.rows` over `clients` connections to `url`.
    pub async fn postgres(url: &str, schema: &str, n: usize, clients: usize) -> Self {
        let mut all = Vec::new();
        for _ in 0..clients.max(1) {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("postgres connection");
            tokio::spawn(conn);
            all.push(client);
        }
        let first = &all[0];
        first
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; CREATE TABLE {schema}.rows \
                 (id TEXT PRIMARY KEY, version BIGINT NOT NULL, value BYTEA NOT NULL)"
            ))
            .await
            .expect("composite schema");
        let insert = first
            .prepare(&format!("INSERT INTO {schema}.rows VALUES ($1, 1, $2)"))
            .await
            .expect("prepare");
        for i in 0..n {
            first
                .execute(&insert, &[&key(i), &value(1)])
                .await
                .expect("insert");
        }
        let mut prepared = Vec::new();
        for client in all {
            let read = client
                .prepare(&format!(
                    "SELECT version, value FROM {schema}.rows WHERE id = $1"
                ))
                .await
                .expect("prepare");
            let write = client
                .prepare(&format!(
                    "UPDATE {schema}.rows SET version = $1, value = $2 WHERE id = $3 AND version = $4"
                ))
                .await
                .expect("prepare");
            prepared.push(PgClient {
                client,
                read,
                write,
            });
        }
        Self::Postgres(Arc::new(prepared))
    }

    /// The stored version of row `i`.
    async fn read(&self, i: usize) -> u64 {
        match self {
            Self::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().expect("composite connection");
                    let mut stmt = conn
                        .prepare_cached("SELECT version, value FROM rows WHERE id = ?1")
                        .expect("prepare");
                    stmt.query_row([key(i)], |r| {
                        let _: Vec<u8> = r.get(1)?;
                        r.get::<_, i64>(0)
                    })
                    .expect("read") as u64
                })
                .await
                .expect("blocking read")
            }
            Self::Redis(conn, prefix) => {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg(format!("{prefix}:{}", key(i)))
                    .query_async(&mut conn.clone())
                    .await
                    .expect("GET");
                let tab = v.iter().position(|b| *b == b'\t').expect("version prefix");
                std::str::from_utf8(&v[..tab])
                    .expect("digits")
                    .parse()
                    .expect("version")
            }
            Self::Postgres(clients) => {
                let pg = &clients[i % clients.len()];
                let row = pg
                    .client
                    .query_one(&pg.read, &[&key(i)])
                    .await
                    .expect("read");
                row.get::<_, i64>(0) as u64
            }
        }
    }

    /// Writes version `expected + 1` of row `i` if it is at `expected`; panics if not.
    async fn write(&self, i: usize, expected: u64) {
        let next = value(expected + 1);
        let changed = match self {
            Self::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = conn.lock().expect("composite connection");
                    let mut stmt = conn
                        .prepare_cached(
                            "UPDATE rows SET version = ?1, value = ?2 WHERE id = ?3 AND version = ?4",
                        )
                        .expect("prepare");
                    stmt.execute(rusqlite::params![
                        (expected + 1) as i64,
                        next,
                        key(i),
                        expected as i64
                    ])
                    .expect("write") as u64
                })
                .await
                .expect("blocking write")
            }
            Self::Redis(conn, prefix) => redis::Script::new(REDIS_CAS)
                .key(format!("{prefix}:{}", key(i)))
                .arg(expected)
                .arg(next)
                .invoke_async::<u64>(&mut conn.clone())
                .await
                .expect("EVALSHA"),
            Self::Postgres(clients) => {
                let pg = &clients[i % clients.len()];
                pg.client
                    .execute(
                        &pg.write,
                        &[&((expected + 1) as i64), &next, &key(i), &(expected as i64)],
                    )
                    .await
                    .expect("write")
            }
        };
        assert_eq!(changed, 1, "the composite's conditional write missed");
    }

    /// One composite refresh of row `i`: read, lease write, POST, result write. Returns the
    /// refresh token the provider rotated to.
    pub async fn refresh(
        &self,
        http: &reqwest::Client,
        token_url: &str,
        i: usize,
        refresh_token: &str,
    ) -> String {
        let version = self.read(i).await;
        self.write(i, version).await;
        let next = raw_refresh(http, token_url, refresh_token).await;
        self.write(i, version + 1).await;
        next
    }

    /// Refreshes rows `0..tokens.len()` with `in_flight` at once; returns the new tokens.
    pub async fn refresh_all(
        &self,
        http: &reqwest::Client,
        token_url: &str,
        tokens: Arc<Vec<String>>,
        in_flight: usize,
    ) -> Vec<String> {
        let (this, http, url) = (self.clone(), http.clone(), token_url.to_owned());
        fan_out(tokens.len(), in_flight, move |i| {
            let (this, http, url, tokens) =
                (this.clone(), http.clone(), url.clone(), tokens.clone());
            async move { this.refresh(&http, &url, i, &tokens[i]).await }
        })
        .await
    }
}

fn key(i: usize) -> String {
    format!("row-{i:06}")
}
