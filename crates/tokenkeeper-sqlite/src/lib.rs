//! # tokenkeeper-sqlite
//!
//! [`SqliteStore`]: a [`TokenStore`] on SQLite (rusqlite with bundled SQLite), for applications
//! that run on one machine, in one or several processes sharing a database file.
//!
//! - **Durable**: WAL journal, `synchronous = FULL` by default ([`Synchronous`]), files created
//!   with mode 0600 (tokens are credentials); an existing file, `-wal` or `-shm` that others
//!   may read is tightened to 0600 (or refused: `LoosePermissions::Refuse`), a symbolic link is
//!   refused, and freed pages are overwritten (`secure_delete`).
//! - **Safe across processes**: every write is one conditional statement
//!   (`UPDATE ... WHERE id = ? AND version = ?`), and lock contention waits out a busy timeout
//!   instead of failing.
//! - **Group commit**: every write of a file store goes to one writer connection on its own
//!   thread, which commits the writes waiting for it in one transaction (one fsync) and answers
//!   each caller with its own outcome only after the commit; reads run on tokio's blocking
//!   pool through a deadpool pool of connections, off the async workers.
//! - **Versioned schema**: migrations keyed by `PRAGMA user_version`; a database from a newer
//!   tokenkeeper is refused untouched ([`OpenError::FutureSchema`]).
//! - **Indexed**: `due` and `list` are range scans of indexes (tested with
//!   `EXPLAIN QUERY PLAN`).
//!
//! ```
//! use tokenkeeper_core::{InstallationId, TokenStore};
//! use tokenkeeper_sqlite::SqliteStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("tk-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let store = SqliteStore::open(dir.join("tokens.db")).await?;
//! assert!(store.get(&InstallationId::new("nobody")?).await?.is_none());
//! # drop(store); std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

mod ops;
mod pool;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use deadpool::managed::PoolError;
use tokenkeeper_core::backend::private_files;
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventCursor, EventPage, EventRetention,
    InstallationId, ListFilter, ListPage, Record, StoreError, Timestamp, TokenStore,
    backend::check_cas_arguments,
};

pub use pool::Synchronous;
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};

use ops::BACKEND;
use pool::{ConnectError, Location, Manager, Pool};

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file could not be created or opened.
    #[error(
        "cannot create the SQLite database file {path}: {source}; check the directory exists and is writable"
    )]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused.
    #[error("SQLite could not open the token database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Written by a newer tokenkeeper.
    #[error(
        "the token database has schema version {found}, newer than this build's {supported}; it was not touched: upgrade tokenkeeper"
    )]
    FutureSchema {
        /// The schema version found.
        found: i32,
        /// The newest this build understands.
        supported: i32,
    },
    /// Not a tokenkeeper database.
    #[error(
        "the file is not a tokenkeeper database ({detail}); it was not touched: use a new path"
    )]
    NotTokenkeeper {
        /// What gave it away.
        detail: String,
    },
    /// The database file (or its `-wal`/`-shm` file) is a symbolic link, or others may read
    /// it and the builder refuses loose permissions ([`LoosePermissions::Refuse`]).
    #[error("the token database file {path} is not private: {reason}; it was not opened")]
    NotPrivate {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The connection pool could not be built, or its first connection's task failed.
    #[error("cannot set up the SQLite connection pool: {0}")]
    Pool(#[source] tokenkeeper_core::backend::BoxError),
}

/// What to do with an existing database file (or its `-wal`/`-shm` file) that its group or
/// others may read or write: it holds every installation's tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LoosePermissions {
    /// Remove the group and other permissions (to 0600), with a warning (the default).
    #[default]
    Tighten,
    /// Refuse to open it ([`OpenError::NotPrivate`]).
    Refuse,
}

/// Configures and opens a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteStoreBuilder {
    location: Location,
    loose_permissions: LoosePermissions,
    busy_timeout: Duration,
    synchronous: Synchronous,
    max_connections: usize,
    acquire_timeout: Duration,
    event_retention: Option<EventRetention>,
}

impl SqliteStoreBuilder {
    /// How long the database keeps lifecycle events (see [`EventRetention`]). The setting is
    /// stored in the database and applies to every process writing it; without this call,
    /// opening leaves the stored setting as it is (the defaults for a new database).
    pub fn event_retention(mut self, retention: EventRetention) -> Self {
        self.event_retention = Some(retention);
        self
    }

    /// How long a statement waits for another process's lock before failing with
    /// [`StoreError::Unavailable`] (default 10 s).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Commit durability (default [`Synchronous::Full`]).
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Most connections open at once (default 8; always 1 in memory, where every connection
    /// would be a separate database).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long an operation waits for a free connection before [`StoreError::Unavailable`]
    /// (default 30 s).
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// What to do with an existing database file that others may read (default
    /// [`LoosePermissions::Tighten`]). Symbolic links are always refused.
    pub fn loose_permissions(mut self, policy: LoosePermissions) -> Self {
        self.loose_permissions = policy;
        self
    }

    /// Opens (creating with mode 0600 if needed) and migrates the database. The file and its
    /// `-wal` and `-shm` files must not be symbolic links; existing ones that others may read
    /// are tightened to 0600 or refused ([`loose_permissions`](Self::loose_permissions)).
    ///
    /// # Errors
    ///
    /// [`OpenError::NotPrivate`] for a link, another user's file or a directory others may
    /// write; [`OpenError::FutureSchema`] for a database of a newer version;
    /// [`OpenError::NotTokenkeeper`] for a database that is not tokenkeeper's;
    /// [`OpenError::Io`] or [`OpenError::Sqlite`] when the file cannot be opened or migrated.
    pub async fn open(self) -> Result<SqliteStore, OpenError> {
        let (location, busy) = (self.location.clone(), self.busy_timeout);
        let loose = self.loose_permissions;
        let setup = tokio_blocking(move || -> Result<Option<u32>, OpenError> {
            let Location::File(path) = &location else {
                return Ok(None);
            };
            let owner = prepare_file(path, loose)?;
            // Check before anything writes (WAL mode does): refuse foreign/newer files.
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
            )?;
            conn.busy_timeout(busy)?;
            schema::check(&conn)?;
            Ok(owner)
        });
        let owner = setup.await?;
        let max = match self.location {
            Location::Memory => 1,
            Location::File(_) => self.max_connections,
        };
        let manager = Manager {
            location: self.location.clone(),
            busy_timeout: self.busy_timeout,
            synchronous: self.synchronous,
            owner,
        };
        // The group-commit writer's connection, checked as every pooled one (an in-memory
        // database has one connection: its writes go through the pool).
        let writer_conn = match self.location {
            Location::Memory => None,
            Location::File(_) => Some(manager.open_connection().await.map_err(open_error)?),
        };
        let pool = Pool::builder(manager)
            .max_size(max)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(self.acquire_timeout))
            .create_timeout(Some(self.busy_timeout + Duration::from_secs(5)))
            .build()
            .map_err(|e| OpenError::Pool(e.into()))?;
        let conn = pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => open_error(e),
            other => OpenError::Pool(other.into()),
        })?;
        conn.interact(schema::migrate)
            .await
            .map_err(|e| OpenError::Pool(e.into()))??;
        if let Some(retention) = self.event_retention {
            conn.interact(move |c| ops::set_retention(c, retention))
                .await
                .map_err(|e| OpenError::Pool(e.into()))??;
        }
        drop(conn);
        let writer = writer_conn
            .map(writer::Writer::start)
            .transpose()
            .map_err(|e| OpenError::Pool(e.into()))?;
        Ok(SqliteStore {
            pool,
            location: self.location,
            writer,
        })
    }
}

/// What a connection that could not be opened means for `open`.
fn open_error(e: ConnectError) -> OpenError {
    match e {
        ConnectError::Sqlite(e) => OpenError::Sqlite(e),
        ConnectError::NotPrivate { path, reason } => OpenError::NotPrivate { path, reason },
        other => OpenError::Pool(other.into()),
    }
}

async fn tokio_blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, OpenError> + Send + 'static,
) -> Result<R, OpenError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpenError::Pool(e.into()))?
}

/// Creates the database file readable and writable by its owner only. SQLite creates the
/// `-wal` and `-shm` files with the same permissions.
fn create_private(path: &Path) -> Result<(), OpenError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(OpenError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks where the database goes, creates it (0600) if needed and makes its files private;
/// returns the user the process creates files as (`None` off Unix), which every later
/// connection checks the files against again.
fn prepare_file(path: &Path, loose: LoosePermissions) -> Result<Option<u32>, OpenError> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::Io { path, source }
        };
        let me = private_files::creator_uid(&dir).map_err(io(&dir))?;
        if let Some(reason) = private_files::replaceable_by_others(&dir, me).map_err(io(&dir))? {
            return Err(OpenError::NotPrivate { path: dir, reason });
        }
        create_private(path)?;
        make_private(path, loose, me)?;
        Ok(Some(me))
    }
    #[cfg(not(unix))]
    {
        let _ = loose;
        create_private(path)?;
        Ok(None)
    }
}

/// The database file and its `-wal` and `-shm` files.
pub(crate) fn database_files(path: &Path) -> [PathBuf; 3] {
    let with = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [path.to_owned(), with("-wal"), with("-shm")]
}

/// Refuses a database file, `-wal` or `-shm` that is a symbolic link (it could point anywhere,
/// and a swapped link would redirect the tokens) or that belongs to another user than `me`
/// (review N10), and tightens or refuses one that its group or others may access.
#[cfg(unix)]
fn make_private(path: &Path, loose: LoosePermissions, me: u32) -> Result<(), OpenError> {
    use std::os::unix::fs::PermissionsExt;
    for file in database_files(path) {
        let io = |source| OpenError::Io {
            path: file.clone(),
            source,
        };
        if let Some(reason) = private_files::not_private(&file, me, false).map_err(io)? {
            return Err(OpenError::NotPrivate { path: file, reason });
        }
        let Some(reason) = private_files::not_private(&file, me, true).map_err(io)? else {
            continue;
        };
        if loose == LoosePermissions::Refuse {
            return Err(OpenError::NotPrivate { path: file, reason });
        }
        tracing::warn!(path = %file.display(), "the token database was readable by others; its mode is now 600");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

/// A [`TokenStore`] on SQLite. Cheap to share behind an `Arc`; several processes may open the
/// same file.
#[derive(Debug)]
pub struct SqliteStore {
    pool: Pool,
    location: Location,
    /// The group-commit writer of a file store (every write goes through it); an in-memory
    /// database has one connection, so its writes go through the pool.
    writer: Option<writer::Writer>,
}

impl SqliteStore {
    /// A builder for the database at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            location: Location::File(path.into()),
            loose_permissions: LoosePermissions::default(),
            busy_timeout: Duration::from_secs(10),
            synchronous: Synchronous::default(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(30),
            event_retention: None,
        }
    }

    /// Opens the database at `path` with the defaults.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, OpenError> {
        Self::builder(path).open().await
    }

    /// A private in-memory database (nothing survives the store).
    pub async fn in_memory() -> Result<Self, OpenError> {
        SqliteStoreBuilder {
            location: Location::Memory,
            ..Self::builder("")
        }
        .open()
        .await
    }

    /// The database file, if on disk.
    pub fn path(&self) -> Option<&Path> {
        match &self.location {
            Location::File(p) => Some(p),
            Location::Memory => None,
        }
    }

    /// Runs the write `f` in the writer's next batch (group commit), or on a pooled
    /// connection for an in-memory database.
    async fn write<R: Send + 'static>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&rusqlite::Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        match &self.writer {
            Some(writer) => writer.write(operation, f).await,
            None => self.run(operation, f).await,
        }
    }

    /// Runs `f` on a pooled connection on the blocking pool.
    async fn run<R: Send + 'static>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&rusqlite::Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let conn = self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(ConnectError::Sqlite(e)) => ops::sqlite_error(operation, e),
            PoolError::Backend(e @ ConnectError::NotPrivate { .. }) => {
                StoreError::backend(BACKEND, operation, e)
            }
            other => StoreError::unavailable(BACKEND, operation, other),
        })?;
        conn.interact(move |c| f(c))
            .await
            .map_err(|e| StoreError::backend(BACKEND, operation, e))?
    }
}

#[async_trait]
impl TokenStore for SqliteStore {
    /// `<database>.unsaved`, next to the database file (as durable as the database); an
    /// in-memory database is ephemeral.
    fn unsaved_tokens_home(&self) -> tokenkeeper_core::UnsavedHome {
        match &self.location {
            Location::File(path) => {
                let mut dir = path.as_os_str().to_owned();
                dir.push(".unsaved");
                tokenkeeper_core::UnsavedHome::Dir(dir.into())
            }
            Location::Memory => tokenkeeper_core::UnsavedHome::Ephemeral,
        }
    }

    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        let id = id.clone();
        self.run("get", move |c| ops::get(c, &id)).await
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        let bytes = record.encode();
        let record = record.clone();
        self.write("create", move |c| ops::create(c, &record, &bytes))
            .await
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<CasOutcome, StoreError> {
        check_cas_arguments(BACKEND, record, expected_version)?;
        let bytes = record.encode();
        let record = record.clone();
        self.write("compare_and_swap", move |c| {
            ops::compare_and_swap(c, &record, &bytes, expected_version)
        })
        .await
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected_version: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        let id = id.clone();
        self.write("delete", move |c| ops::delete(c, &id, expected_version))
            .await
    }

    async fn due(
        &self,
        consumer: &str,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        let (consumer, after) = (consumer.to_owned(), after.cloned());
        self.run("due", move |c| {
            ops::due(c, &consumer, before, after.as_ref(), limit)
        })
        .await
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let after = after.cloned();
        self.run("list", move |c| ops::list(c, filter, after.as_ref(), limit))
            .await
    }

    async fn count_states(&self, _cap: u64) -> Result<tokenkeeper_core::StateCounts, StoreError> {
        self.run("count_states", ops::count_states).await
    }

    async fn claim_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: std::time::Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (flow, value) = (flow.to_owned(), value.to_vec());
        self.write("claim_flow", move |c| {
            ops::claim_flow(c, &flow, &value, ttl)
        })
        .await
    }

    async fn settle_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        let (flow, value) = (flow.to_owned(), value.to_vec());
        self.write("settle_flow", move |c| {
            ops::settle_flow(c, &flow, &value, ttl)
        })
        .await
    }

    async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let flow = flow.to_owned();
        self.run("get_flow", move |c| ops::get_flow(c, &flow)).await
    }

    async fn read_events(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        let after = after.clone();
        self.run("read_events", move |c| ops::read_events(c, &after, limit))
            .await
    }

    async fn event_head(&self) -> Result<EventCursor, StoreError> {
        self.run("event_head", ops::event_head).await
    }
}
