//! How a [`PostgresStore`] comes to be: [`PostgresStoreBuilder`] and its settings, the URL
//! (parsed by `parse_url`, shown with its password replaced by `***` by `redact`), the
//! transport (TLS unless the server is on this machine, no plaintext to another host), the
//! pool, and `prepare`, which creates or migrates the schema and checks its outbox
//! triggers. [`ConnectError`] says why connecting failed, and `Names` is the validated,
//! quoted schema name the statements are built with. Everything here runs once per store,
//! before the first operation; the operations are in `store` and `ops`.

use std::fmt;
use std::time::Duration;
use tokenkeeper_core::backend::url::is_loopback;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokenkeeper_core::EventRetention;
use tokio_postgres::config::{Host, SslMode};

use crate::error::pool_error_text;
use crate::{PostgresStore, ops, schema, tls};

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
    /// A failed schema statement (`map_err(ConnectError::schema)`).
    pub(crate) fn schema(e: tokio_postgres::Error) -> Self {
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
    pub(crate) fn new(schema: &str) -> Result<Self, ConnectError> {
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
    tokenkeeper_core::backend::url::redact(url, &["password"])
        .unwrap_or_else(|| "<a connection string that is not a postgres:// URL>".to_owned())
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
    /// A builder for `url` with the defaults.
    pub(crate) fn new(url: String) -> Self {
        Self {
            url,
            schema: "tokenkeeper".to_owned(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(5),
            allow_plaintext: false,
            ca_certificate: None,
            event_retention: None,
        }
    }

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
    /// 5 s): while the server is down, callers get
    /// [`StoreError::Unavailable`](tokenkeeper_core::StoreError::Unavailable) after at most
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
