//! # tokenkeeper-postgres
//!
//! [`PostgresStore`]: a [`TokenStore`] on PostgreSQL, where most applications that install into
//! many accounts already keep their data. Any number of processes on any number of machines
//! share it.
//!
//! - **One statement per write.** Compare-and-swap is one conditional
//!   `UPDATE ... WHERE id = $1 AND version = $2` that also checks the lease the record was
//!   written under (the `lease_holder` column), with the index columns in the same row.
//! - **Index-backed reads.** `due` reads the `(consumer, due_at, id)` index with a row-wise
//!   cursor; `list` reads the primary key or `(state, id)`. Ids use the `C` collation, so they
//!   sort byte-wise like every other store.
//! - **Versioned schema** in a schema of your choice (default `tokenkeeper`): a version table,
//!   migrations under an advisory lock, a newer schema refused untouched.
//! - **A pool that outlives the server** (deadpool-postgres): while the server is down every
//!   operation is [`StoreError::Unavailable`] within the operation timeout; once it is back,
//!   broken connections are replaced and operations succeed again.
//! - **TLS with rustls** and the platform's root certificates (or a private CA).
//!
//! URLs are `postgres://` or `postgresql://` with user, password, host, port, dbname and
//! `sslmode`:
//! - `disable`: plaintext, allowed only to this machine (loopback or a Unix socket) unless
//!   [`PostgresStoreBuilder::allow_plaintext`];
//! - `prefer` (the default) to this machine: TLS if the server offers it;
//! - `prefer` to another host, `require`, `verify-ca`, `verify-full`: TLS, with the
//!   certificate verified and the host name checked (rustls verifies fully in every mode).
//!
//! ```no_run
//! use tokenkeeper_postgres::PostgresStore;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::builder("postgres://app:secret@db.internal/app?sslmode=require")
//!     .schema("tokenkeeper")
//!     .connect()
//!     .await?;
//! # let _ = store;
//! # Ok(()) }
//! ```
//!
//! [`TokenStore`]: tokenkeeper_core::TokenStore

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

// Where things are: `builder` makes a store (settings, URL, TLS, pool, schema check);
// `store` is the `TokenStore` operations and `ops` their statements; `schema` creates and
// migrates the tables; `error` maps driver errors; `tls` is the rustls connector.
mod builder;
mod error;
mod ops;
mod schema;
mod store;
mod tls;

use std::fmt;
use std::time::Duration;

use deadpool_postgres::{Pool, PoolError};
use tokenkeeper_core::StoreError;

pub use builder::{ConnectError, PostgresStoreBuilder};
pub use schema::SCHEMA_VERSION;

use builder::Names;
use error::pg_error;

pub(crate) const BACKEND: &str = "postgres";

/// A [`TokenStore`](tokenkeeper_core::TokenStore) on PostgreSQL.
pub struct PostgresStore {
    pool: Pool,
    sql: ops::Sql,
    names: Names,
    operation_timeout: Duration,
    url: String,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url)
            .field("schema", &self.names.name)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A builder for `url` with the defaults.
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(url.into())
    }

    /// Connects to `url` with the defaults.
    ///
    /// # Errors
    ///
    /// See [`PostgresStoreBuilder::connect`].
    pub async fn connect(url: impl Into<String>) -> Result<Self, ConnectError> {
        Self::builder(url).connect().await
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.names.name
    }

    /// The plan PostgreSQL chooses for one page of `due` (`EXPLAIN`), to check it is served
    /// by the index.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`].
    pub async fn explain_due(&self, consumer: &str) -> Result<String, StoreError> {
        let sql = format!("EXPLAIN {}", self.sql.due_sql());
        self.run("explain", async |c| {
            let rows = c
                .query(&sql, &[&consumer, &i64::MAX, &i64::MIN, &"", &100_i64])
                .await
                .map_err(|e| pg_error("explain", e))?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"))
        })
        .await
    }

    /// Runs `f` on a pooled connection within the operation timeout.
    async fn run<T>(
        &self,
        operation: &'static str,
        f: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.operation_timeout;
        let timed_out = || {
            StoreError::unavailable(
                BACKEND,
                operation,
                format!(
                    "no answer within {:?} (PostgreSQL at {})",
                    self.operation_timeout, self.url
                ),
            )
        };
        let client = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(PoolError::Backend(e))) => return Err(pg_error(operation, e)),
            Ok(Err(other)) => return Err(StoreError::unavailable(BACKEND, operation, other)),
            Err(_) => return Err(timed_out()),
        };
        match tokio::time::timeout_at(deadline, f(&client)).await {
            Ok(result) => result,
            Err(_) => {
                // The statement may still be running on this connection: it leaves the pool
                // instead of queueing the next borrower's statements behind it.
                let _ = deadpool_postgres::Object::take(client);
                Err(timed_out())
            }
        }
    }
}

/// What the benchmarks need to run the raw statements the store wraps on the same pool.
/// Not a public API: compiled only with the `__bench` feature the benchmarks turn on.
#[cfg(feature = "__bench")]
#[doc(hidden)]
pub mod bench_support {
    use crate::PostgresStore;

    /// The store's pool.
    pub fn pool(store: &PostgresStore) -> &deadpool_postgres::Pool {
        &store.pool
    }

    /// The `get` statement.
    pub fn get_sql(store: &PostgresStore) -> &str {
        store.sql.get_sql()
    }

    /// The compare-and-swap statement.
    pub fn cas_sql(store: &PostgresStore) -> &str {
        store.sql.cas_sql()
    }
}
