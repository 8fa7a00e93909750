//! Connections: a deadpool pool of rusqlite connections, each call run on tokio's blocking
//! pool (`spawn_blocking`) so SQLite never blocks an async worker thread.
//!
//! Two things are ours rather than deadpool-sqlite's, each for a measured reason:
//! - recycling is free: deadpool-sqlite's manager runs a `SELECT` round trip on the blocking
//!   pool each time a connection is checked out, doubling the cost of every store operation;
//! - the connection wrapper drops its connection inline: deadpool-sync's wrapper hands the
//!   drop to `spawn_blocking`, which panics when a store is dropped outside a tokio runtime
//!   (found by the benchmarks, which drop stores after their runtime's `block_on`).
//!
//! A connection is reusable unless a panic poisoned its mutex.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::{Arc, Mutex, PoisonError};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use rusqlite::{Connection, OpenFlags};

/// One pooled connection.
#[derive(Debug, Clone)]
pub(crate) struct Conn(Arc<Mutex<Connection>>);

impl Conn {
    /// Runs `f` with the connection on the blocking pool. Fails only if `f` panicked.
    pub(crate) async fn interact<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> R + Send + 'static,
    ) -> Result<R, tokio::task::JoinError> {
        let conn = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut guard)
        })
        .await
    }
}

/// How durable each commit is (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// Every commit is on disk before it returns, also across power loss (`FULL`). The
    /// default: a rotated refresh token lost to a power cut is a lost installation.
    #[default]
    Full,
    /// Commits survive a crash of the process but may roll back on power loss (`NORMAL`).
    Normal,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// Where the database lives.
#[derive(Debug, Clone)]
pub(crate) enum Location {
    File(PathBuf),
    Memory,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// SQLite refused.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The opening task panicked.
    #[error("the task opening a SQLite connection failed: {0}")]
    Panicked(#[source] tokio::task::JoinError),
    /// The database file changed hands since the store opened (review N10): not opened.
    #[error("the token database file {} is not private: {reason}; it was not opened", path.display())]
    NotPrivate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Creates configured connections.
#[derive(Debug)]
pub(crate) struct Manager {
    pub(crate) location: Location,
    pub(crate) busy_timeout: Duration,
    pub(crate) synchronous: Synchronous,
    /// The user the database files must belong to (checked at open), on Unix.
    pub(crate) owner: Option<u32>,
}

/// Opens one connection with the settings every connection of the store shares.
pub(crate) fn connect(
    location: &Location,
    busy_timeout: Duration,
    synchronous: Synchronous,
) -> rusqlite::Result<Connection> {
    // The store created the file when it opened; a connection never creates it (a database
    // renamed away since must not come back as whatever file is at the path then).
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match location {
        Location::File(path) => Connection::open_with_flags(path, flags)?,
        Location::Memory => Connection::open_in_memory()?,
    };
    conn.busy_timeout(busy_timeout)?;
    if matches!(location, Location::File(_)) {
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %mode, "SQLite refused WAL mode; concurrency will be lower");
        }
    }
    conn.pragma_update(None, "synchronous", synchronous.pragma())?;
    // Overwrite freed pages: a rotated-away token must not linger in the file.
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

impl Manager {
    /// Opens a connection, after checking the files again: SQLite opens by path, so a file
    /// swapped for a link or another user's file since the store opened would be followed.
    pub(crate) async fn open_connection(&self) -> Result<Connection, ConnectError> {
        let (location, timeout, sync, owner) = (
            self.location.clone(),
            self.busy_timeout,
            self.synchronous,
            self.owner,
        );
        let open = move || {
            if let (Location::File(path), Some(me)) = (&location, owner) {
                still_private(path, me)?;
            }
            connect(&location, timeout, sync).map_err(ConnectError::from)
        };
        match tokio::task::spawn_blocking(open).await {
            Ok(conn) => conn,
            Err(e) => Err(ConnectError::Panicked(e)),
        }
    }
}

impl managed::Manager for Manager {
    type Type = Conn;
    type Error = ConnectError;

    /// A checked connection ([`Manager::open_connection`]) for the pool.
    async fn create(&self) -> Result<Self::Type, Self::Error> {
        Ok(Conn(Arc::new(Mutex::new(self.open_connection().await?))))
    }

    async fn recycle(&self, conn: &mut Self::Type, _: &Metrics) -> RecycleResult<Self::Error> {
        if conn.0.is_poisoned() {
            return Err(RecycleError::message("a panic poisoned this connection"));
        }
        Ok(())
    }
}

/// Refuses the database, `-wal` or `-shm` file if it is now a link, another user's, or open
/// to others (the store made them private when it opened).
fn still_private(path: &std::path::Path, me: u32) -> Result<(), ConnectError> {
    #[cfg(unix)]
    for file in crate::database_files(path) {
        let reason = tokenkeeper_core::backend::private_files::not_private(&file, me, true)
            .unwrap_or_else(|e| Some(format!("its metadata cannot be read ({e})")));
        if let Some(reason) = reason {
            return Err(ConnectError::NotPrivate { path: file, reason });
        }
    }
    #[cfg(not(unix))]
    let _ = (path, me);
    Ok(())
}

/// The pool type.
pub(crate) type Pool = managed::Pool<Manager>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_overwrites_freed_pages() {
        let conn = connect(&Location::Memory, Duration::from_secs(1), Synchronous::Full).unwrap();
        let on: i64 = conn
            .query_row("PRAGMA secure_delete", [], |r| r.get(0))
            .unwrap();
        assert_eq!(on, 1);
    }
}
