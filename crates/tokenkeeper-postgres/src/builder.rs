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

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

mod ops;
mod schema;
mod tls;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventCursor, EventPage, EventRetention,
    InstallationId, ListFilter, ListPage, Record, StoreError, Timestamp, TokenStore,
    check_cas_arguments,
};
use tokio_postgres::config::{Host, SslMode};

pub use schema::SCHEMA_VERSION;

pub(crate) const BACKEND: &str = "postgres";

/// Why a [`PostgresStore`] could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL does not parse (the password, if any, is not echoed).
    #[error("invalid PostgreSQL URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A plaintext connection to another host was not allowed.
    #[error(
        "{url} asks for a plaintext connection (sslmode=disable) to another host: the password and every token not sealed with encryption would cross the network in cleartext; use sslmode=require, or PostgresStoreBuilder::allow_plaintext(true) on a network you trust"
    )]
    Plaintext {
        /// The URL with any password replaced by `***`.
        url: String,
    },
    /// TLS could not be set up (the platform's roots, or the given CA certificate).
    #[error("TLS for PostgreSQL could not be set up: {0}")]
    Tls(String),
    /// The server could not be reached, or refused the credentials, in time.
    #[error(
        "PostgreSQL at {url} is unreachable: {reason}; check the URL, the credentials and that the server runs"
    )]
    Unreachable {
        /// The URL with any password replaced by `***`.
        url: String,
        /// The driver's error.
        reason: String,
    },
    /// Creating or migrating the schema failed.
    #[error(
        "could not create or migrate the tokenkeeper schema: {0} (creating and upgrading it needs the schema's owner role; a runtime role only opens an up-to-date schema)"
    )]
    Schema(#[source] tokio_postgres::Error),
    /// The schema was written by a newer tokenkeeper: refused untouched.
    #[error(
        "schema {schema:?} is at tokenkeeper schema version {found}, newer than this build understands ({supported}); upgrade tokenkeeper, or point this process at another schema"
    )]
    FutureSchema {
        /// The schema.
        schema: String,
        /// The version found.
        found: i32,
        /// The newest this build understands.
        supported: i32,
    },
    /// The schema holds an `installations` table that is not tokenkeeper's.
    #[error(
        "schema {schema:?} already holds an `installations` table that tokenkeeper did not create; choose another schema with PostgresStoreBuilder::schema"
    )]
    NotTokenkeeper {
        /// The schema.
        schema: String,
    },
    /// An outbox trigger is missing or switched off: writes through this schema would store
    /// tokens without their lifecycle events (review N11).
    #[error(
        "the outbox trigger {trigger} on {schema}.installations is {how}: writes would have no lifecycle events; as the schema's owner run `ALTER TABLE {schema}.installations ENABLE TRIGGER {trigger}` (or, if it was dropped, point a process with the owner role at a fresh schema and migrate the data)"
    )]
    OutboxTrigger {
        /// The schema.
        schema: String,
        /// The trigger.
        trigger: &'static str,
        /// "missing" or "disabled".
        how: &'static str,
    },
    /// A setting is out of range.
    #[error("invalid PostgreSQL store configuration: {field}: {reason}")]
    Config {
        /// The builder method.
        field: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
}

impl ConnectError {
    fn schema(e: tokio_postgres::Error) -> Self {
        Self::Schema(e)
    }
}

/// The schema's name, validated and quoted.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// As given (`tokenkeeper`).
    pub(crate) name: String,
    /// Quoted for SQL (`"tokenkeeper"`).
    pub(crate) quoted: String,
}

impl Names {
    fn new(schema: &str) -> Result<Self, ConnectError> {
        let ok = (1..=63).contains(&schema.len())
            && !schema.starts_with("pg_")
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(ConnectError::Config {
                field: "schema",
                reason: "1 to 63 characters of a-z, 0-9 and '_', not starting with a digit or pg_",
            });
        }
        Ok(Self {
            name: schema.to_owned(),
            quoted: format!("\"{schema}\""),
        })
    }
}

/// Replaces the password of a URL with `***`: in the user info and in a `password=` query
/// parameter. Anything that is not a `postgres://` URL is not shown at all.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "<a connection string that is not a postgres:// URL>".to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // The last `@` ends the user info: a password may hold `/`, `?` or `#` unencoded.
    let shown = match rest.rfind('@') {
        Some(at) if rest[..at].contains(':') => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end + 3], &rest[at..])
        }
        _ => url.to_owned(),
    };
    match shown.split_once('?') {
        Some((base, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => shown,
    }
}

/// A driver error as text: the server's own message and SQLSTATE for a database error
/// (`tokio_postgres::Error`'s `Display` says only "db error").
fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Maps a driver error: a lost or refused connection (closed, or an I/O error), a server
/// shutting down or short of resources, a transaction it had to abort, lock contention or a
/// cancelled statement is "unavailable" (retry later); anything else, our own conversion
/// errors included, is a backend failure that retrying would not fix.
pub(crate) fn pg_error(operation: &'static str, e: tokio_postgres::Error) -> StoreError {
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let transient = e.is_closed()
        || io
        || e.code().is_some_and(|code| {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources
                || c.starts_with("57P") // shutdown, crash recovery, cannot connect now
                || c == "57014" // statement cancelled (a timeout)
                || c == "55P03" // lock not available
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock
                || c == "25006" // read-only transaction (a standby after failover)
        });
    if transient {
        StoreError::unavailable(BACKEND, operation, DriverError(e))
    } else {
        StoreError::backend(BACKEND, operation, DriverError(e))
    }
}

/// A driver error whose text carries the server's message (see [`error_text`]).
#[derive(Debug)]
struct DriverError(tokio_postgres::Error);

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&error_text(&self.0))
    }
}

impl std::error::Error for DriverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Configures and connects a [`PostgresStore`].
#[derive(Clone)]
pub struct PostgresStoreBuilder {
    url: String,
    schema: String,
    pool_size: usize,
    connect_timeout: Duration,
    operation_timeout: Duration,
    allow_plaintext: bool,
    ca_certificate: Option<Vec<u8>>,
    event_retention: Option<EventRetention>,
}

impl fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStoreBuilder")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("allow_plaintext", &self.allow_plaintext)
            .finish_non_exhaustive()
    }
}

impl PostgresStoreBuilder {
    /// How long the schema keeps lifecycle events (see [`EventRetention`]). The setting is
    /// stored in the schema and applies to every process writing it; without this call,
    /// connecting leaves the stored setting as it is (the defaults for a new schema).
    pub fn event_retention(mut self, retention: EventRetention) -> Self {
        self.event_retention = Some(retention);
        self
    }

    /// The schema that holds tokenkeeper's tables (default `tokenkeeper`), created if
    /// missing: 1 to 63 characters of `a-z 0-9 _`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Connections in the pool (default 16).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// How long opening a connection may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest any operation takes, waiting for a pooled connection included (default
    /// 5 s): while the server is down, callers get [`StoreError::Unavailable`] after at most
    /// this long.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Allows `sslmode=disable` to a host other than this machine (a private network you
    /// trust). By default it is refused.
    pub fn allow_plaintext(mut self, allow: bool) -> Self {
        self.allow_plaintext = allow;
        self
    }

    /// Trusts this CA certificate (PEM) instead of the platform's roots: for servers with a
    /// private CA.
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certificate = Some(pem.into());
        self
    }

    /// Connects, creates or migrates the schema, and checks the server answers.
    ///
    /// # Errors
    ///
    /// A [`ConnectError`] naming what is wrong: the URL, a plaintext connection to another
    /// host, TLS, an unreachable server, or a schema this build cannot use.
    pub async fn connect(self) -> Result<PostgresStore, ConnectError> {
        let shown = redact(&self.url);
        let names = Names::new(&self.schema)?;
        self.validate()?;
        let (config, tls) = self.transport(&shown)?;
        let pool = self.pool(config, tls, &shown)?;
        self.prepare(&pool, &names, &shown).await?;
        Ok(PostgresStore {
            sql: ops::Sql::new(&names),
            pool,
            names,
            operation_timeout: self.operation_timeout,
            url: shown,
        })
    }

    /// Refuses settings that cannot work, before anything connects.
    fn validate(&self) -> Result<(), ConnectError> {
        if self.pool_size == 0 {
            return Err(ConnectError::Config {
                field: "pool_size",
                reason: "must be at least 1",
            });
        }
        if self.operation_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(ConnectError::Config {
                field: "operation_timeout",
                reason: "timeouts must be greater than zero",
            });
        }
        Ok(())
    }

    /// The driver's configuration from the URL, and TLS unless the server is on this machine
    /// (or plaintext was allowed).
    fn transport(
        &self,
        shown: &str,
    ) -> Result<(tokio_postgres::Config, Option<tls::Connector>), ConnectError> {
        let mut config = parse_url(&self.url).map_err(|reason| ConnectError::InvalidUrl {
            url: shown.to_owned(),
            reason,
        })?;
        config.connect_timeout(self.connect_timeout);
        // No `options` startup parameter: poolers such as PgBouncer refuse it. Under a
        // database default stricter than `read committed`, concurrent writes meet on the
        // event log's sequence row and one fails with 40001, which is `Unavailable` (retried);
        // the README asks for `read committed` on the store's role.
        // A connection that went silent is noticed within seconds, not hours.
        config.keepalives_idle(Duration::from_secs(30));
        config.tcp_user_timeout(self.operation_timeout.saturating_mul(2));
        // This machine: every host a loopback name or a Unix socket, every `hostaddr` (which
        // is where tokio-postgres really connects when given) a loopback address, and at
        // least one of them given.
        let hosts = config.get_hosts();
        let unix_only = !hosts.is_empty()
            && hosts.iter().all(|h| matches!(h, Host::Unix(_)))
            && config.get_hostaddrs().is_empty();
        let local = (!hosts.is_empty() || !config.get_hostaddrs().is_empty())
            && hosts.iter().all(|h| match h {
                Host::Tcp(name) => is_loopback(name),
                Host::Unix(_) => true,
            })
            && config
                .get_hostaddrs()
                .iter()
                .all(|ip| ip.to_canonical().is_loopback());
        let tls = match config.get_ssl_mode() {
            SslMode::Disable if !local && !self.allow_plaintext => {
                return Err(ConnectError::Plaintext {
                    url: shown.to_owned(),
                });
            }
            SslMode::Disable => None,
            // A Unix socket never leaves the machine (and TLS there has no host name to
            // check); `prefer` on this machine is plaintext too, so a local server's
            // self-signed certificate is not an error.
            SslMode::Prefer if local => None,
            _ if unix_only => None,
            // `prefer` would fall back to plaintext if a server (or someone in between) does
            // not offer TLS: to another host, TLS is required.
            mode => {
                if mode == SslMode::Prefer && !self.allow_plaintext {
                    config.ssl_mode(SslMode::Require);
                }
                Some(tls::connector(self.ca_certificate.as_deref())?)
            }
        };
        if tls.is_none() {
            config.ssl_mode(SslMode::Disable);
        }
        Ok((config, tls))
    }

    /// The connection pool (it connects lazily).
    fn pool(
        &self,
        config: tokio_postgres::Config,
        tls: Option<tls::Connector>,
        shown: &str,
    ) -> Result<Pool, ConnectError> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Some(tls) => Manager::from_config(config, tls, manager_config),
            None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
        };
        Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.operation_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| ConnectError::Unreachable {
                url: shown.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Connects once: creates or migrates the schema (bounded in time), checks its outbox
    /// triggers, and stores the retention when one was set.
    async fn prepare(&self, pool: &Pool, names: &Names, shown: &str) -> Result<(), ConnectError> {
        let unreachable = |reason: String| ConnectError::Unreachable {
            url: shown.to_owned(),
            reason,
        };
        let mut client = tokio::time::timeout(self.connect_timeout, pool.get())
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(pool_error_text(&e)))?;
        // A migrator that died holding the lock, or a table lock held by someone else, makes
        // connecting fail in time instead of waiting forever.
        let budget = self.connect_timeout.saturating_add(self.operation_timeout);
        match tokio::time::timeout(budget, schema::migrate(&mut client, names, budget)).await {
            Ok(result) => result?,
            Err(_) => {
                // The connection may be mid-statement: never hand it to anyone else.
                let _ = deadpool_postgres::Object::take(client);
                return Err(unreachable(format!(
                    "creating or checking the schema took longer than {budget:?} (another process migrating, or a lock held on its tables)"
                )));
            }
        }
        schema::check_outbox(&client, names).await?;
        if let Some(retention) = self.event_retention {
            ops::set_retention(&client, names, retention)
                .await
                .map_err(ConnectError::schema)?;
        }
        Ok(())
    }
}

fn pool_error_text(e: &PoolError) -> String {
    match e {
        PoolError::Backend(e) => error_text(e),
        other => other.to_string(),
    }
}

/// Parses a `postgres://` or `postgresql://` URL; `verify-ca` and `verify-full` mean TLS with
/// full verification, which is what rustls does in every mode.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("the URL must start with postgres:// or postgresql://".into());
    }
    // Only the `sslmode` query parameter is rewritten, never a password that contains it.
    let mut normalized = url.to_owned();
    for sep in ['?', '&'] {
        for mode in ["verify-full", "verify-ca"] {
            normalized = normalized.replace(
                &format!("{sep}sslmode={mode}"),
                &format!("{sep}sslmode=require"),
            );
        }
    }
    normalized
        .parse::<tokio_postgres::Config>()
        .map_err(|e| e.to_string().replace(url, &redact(url)))
}

/// Whether `host` is this machine: `localhost` or a loopback address.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// A [`TokenStore`] on PostgreSQL.
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
        PostgresStoreBuilder {
            url: url.into(),
            schema: "tokenkeeper".to_owned(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(5),
            allow_plaintext: false,
            ca_certificate: None,
            event_retention: None,
        }
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

#[async_trait]
impl TokenStore for PostgresStore {
    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        self.run("get", async |c| ops::get(c, &self.sql, id).await)
            .await
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        self.run("create", async |c| ops::create(c, &self.sql, record).await)
            .await
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<CasOutcome, StoreError> {
        check_cas_arguments(BACKEND, record, expected_version)?;
        self.run("compare_and_swap", async |c| {
            ops::compare_and_swap(c, &self.sql, record, expected_version).await
        })
        .await
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected_version: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        self.run("delete", async |c| {
            ops::delete(c, &self.sql, id, expected_version).await
        })
        .await
    }

    async fn due(
        &self,
        consumer: &str,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        self.run("due", async |c| {
            ops::due(c, &self.sql, consumer, before, after, limit).await
        })
        .await
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        self.run("list", async |c| {
            ops::list(c, &self.sql, filter, after, limit).await
        })
        .await
    }

    async fn count_states(&self, _cap: u64) -> Result<tokenkeeper_core::StateCounts, StoreError> {
        self.run("count_states", async |c| {
            ops::count_states(c, &self.sql).await
        })
        .await
    }

    async fn claim_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.run("claim_flow", async |c| {
            ops::claim_flow(c, &self.sql, flow, value, ttl).await
        })
        .await
    }

    async fn settle_flow(&self, flow: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        self.run("settle_flow", async |c| {
            ops::settle_flow(c, &self.sql, flow, value, ttl).await
        })
        .await
    }

    async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.run("get_flow", async |c| {
            ops::get_flow(c, &self.sql, flow).await
        })
        .await
    }

    async fn read_events(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        self.run("read_events", async |c| {
            ops::read_events(c, &self.sql, after, limit).await
        })
        .await
    }

    async fn event_head(&self) -> Result<EventCursor, StoreError> {
        self.run("event_head", async |c| ops::event_head(c, &self.sql).await)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_schemas_validated() {
        assert_eq!(
            redact("postgres://app:s3cr/et@db:5432/x?sslmode=require"),
            "postgres://app:***@db:5432/x?sslmode=require"
        );
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
        assert_eq!(
            redact("postgres://app@db/x?sslmode=require&password=hunter2"),
            "postgres://app@db/x?sslmode=require&password=***"
        );
        assert!(!redact("host=db password=hunter2").contains("hunter2"));
        for bad in [
            "",
            "Upper",
            "1abc",
            "a-b",
            "a;drop",
            "pg_x",
            &"a".repeat(64),
        ] {
            assert!(Names::new(bad).is_err(), "{bad}");
        }
        assert_eq!(Names::new("tk_1").unwrap().quoted, "\"tk_1\"");
    }

    #[test]
    fn urls_parse_with_every_sslmode() {
        for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            let config = parse_url(&format!("postgresql://u:p@h:5433/d?sslmode={mode}")).unwrap();
            assert_eq!(config.get_dbname(), Some("d"));
        }
        assert!(parse_url("mysql://h/d").is_err());
        let e = parse_url("postgres://u:hunter2@h/d?sslmode=bogus").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
