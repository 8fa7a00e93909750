//! How the PostgreSQL store says what went wrong: `pg_error` maps a driver error to a
//! [`StoreError`] (`Unavailable` for a lost connection, a server shutting down or short of
//! resources, lock contention or a cancelled statement, which a retry can fix; `Backend`
//! otherwise), and `error_text` / `pool_error_text` show the server's own message and
//! SQLSTATE where the driver's `Display` says only "db error". It is a file of its own so
//! that the rule callers' retries depend on is in one place for the store, the statements
//! in `ops` and the builder.

use std::fmt;

use deadpool_postgres::PoolError;
use tokenkeeper_core::StoreError;

use crate::BACKEND;

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

/// A pool error as text, with the server's own message when the driver failed.
pub(crate) fn pool_error_text(e: &PoolError) -> String {
    match e {
        PoolError::Backend(e) => error_text(e),
        other => other.to_string(),
    }
}
