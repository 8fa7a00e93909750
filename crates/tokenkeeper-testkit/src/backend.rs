//! The one typed choice of a store for the facade's tests and the benches (feature `stores`).
//!
//! A test or bench names its store as a [`Backend`] value: an unknown backend is a compile
//! error, never a silent fallback to another store (a string-typed choice once fell back to
//! memory on any unknown name, and the SQLite benchmark rows of 2026-11-26 measured Redis).
//! Across the hop to a child process the value travels as text ([`Display`](fmt::Display)),
//! and [`FromStr`] refuses anything it does not know: the child unwraps, so a typo panics.
//!
//! Text form, fields separated by `|` (which no field may contain):
//!
//! | backend | text |
//! |---|---|
//! | memory | `memory` |
//! | SQLite | `sqlite\|Full\|/tmp/…/tokens.db` |
//! | Redis | `redis\|redis://127.0.0.1:6379\|PREFIX\|wait` (or `nowait`) |
//! | Redis Cluster | `redis_cluster\|redis://…,redis://…\|PREFIX\|nowait` |
//! | PostgreSQL | `postgres\|postgres://…\|SCHEMA` |

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokenkeeper_core::TokenStore;
pub use tokenkeeper_sqlite::Synchronous;

/// How long a token write waits for a replica's acknowledgement when
/// `wait_for_replica` is on.
const REPLICA_WAIT: Duration = Duration::from_millis(500);

/// A store and where it lives: enough to open a handle of its own to it, here or in another
/// process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A [`MemoryStore`](tokenkeeper_memory::MemoryStore). Every [`Backend::open`] makes a
    /// new, empty one: handles that must share it share one `Arc`.
    Memory,
    /// A SQLite file.
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Its `PRAGMA synchronous` (the store's default is `Full`).
        synchronous: Synchronous,
    },
    /// One Redis server (or a failover address in front of one).
    Redis {
        /// `redis://HOST:PORT`
        url: String,
        /// The key prefix of this store.
        prefix: String,
        /// Token writes wait for one replica (`WAIT 1`, 500 ms).
        wait_for_replica: bool,
    },
    /// A Redis Cluster.
    RedisCluster {
        /// `redis://HOST:PORT` of the nodes the client starts from.
        nodes: Vec<String>,
        /// The key prefix of this store.
        prefix: String,
        /// Token writes wait for one replica of the primary that took them.
        wait_for_replica: bool,
    },
    /// A PostgreSQL schema.
    Postgres {
        /// `postgres://…`
        url: String,
        /// The schema of this store.
        schema: String,
    },
}

impl Backend {
    /// A fresh SQLite file in a fresh temporary directory (synchronous `Full`).
    pub fn fresh_sqlite(tag: &str) -> Backend {
        Backend::Sqlite {
            path: crate::dirs::fresh_db(tag),
            synchronous: Synchronous::default(),
        }
    }

    /// The shared test redis-server ([`crate::redis::server_url`]) with a prefix of its own.
    pub fn fresh_redis(tag: &str) -> Backend {
        Backend::Redis {
            url: crate::redis::server_url(),
            prefix: crate::redis::unique_prefix(tag),
            wait_for_replica: false,
        }
    }

    /// The shared test Redis Cluster of three primaries ([`crate::redis::cluster_urls`]) with
    /// a prefix of its own.
    pub fn fresh_redis_cluster(tag: &str) -> Backend {
        Backend::RedisCluster {
            nodes: crate::redis::cluster_urls(),
            prefix: crate::redis::unique_prefix(tag),
            wait_for_replica: false,
        }
    }

    /// The shared test PostgreSQL server ([`crate::postgres::server_url`]) with a schema of
    /// its own.
    pub fn fresh_postgres(tag: &str) -> Backend {
        Backend::Postgres {
            url: crate::postgres::server_url(),
            schema: crate::postgres::unique_schema(tag),
        }
    }

    /// The backend's kind, for messages and benchmark labels: `memory`, `sqlite`, `redis`,
    /// `redis_cluster` or `postgres`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Sqlite { .. } => "sqlite",
            Backend::Redis { .. } => "redis",
            Backend::RedisCluster { .. } => "redis_cluster",
            Backend::Postgres { .. } => "postgres",
        }
    }

    /// A handle of its own on the store, as another process would open it (for
    /// [`Backend::Memory`], a new empty store). Panics when the store cannot be opened.
    pub async fn open(&self) -> Arc<dyn TokenStore> {
        match self {
            Backend::Memory => Arc::new(tokenkeeper_memory::MemoryStore::new()),
            Backend::Sqlite { path, synchronous } => Arc::new(
                tokenkeeper_sqlite::SqliteStore::builder(path)
                    .synchronous(*synchronous)
                    .open()
                    .await
                    .unwrap_or_else(|e| panic!("opening {self}: {e}")),
            ),
            Backend::Redis {
                url,
                prefix,
                wait_for_replica,
            } => {
                let builder = tokenkeeper_redis::RedisStore::builder(url);
                self.connect_redis(builder, prefix, *wait_for_replica).await
            }
            Backend::RedisCluster {
                nodes,
                prefix,
                wait_for_replica,
            } => {
                let builder = tokenkeeper_redis::RedisStore::cluster_builder(nodes);
                self.connect_redis(builder, prefix, *wait_for_replica).await
            }
            Backend::Postgres { url, schema } => Arc::new(
                tokenkeeper_postgres::PostgresStore::builder(url)
                    .schema(schema)
                    .connect()
                    .await
                    .unwrap_or_else(|e| panic!("connecting to {self}: {e}")),
            ),
        }
    }

    async fn connect_redis(
        &self,
        builder: tokenkeeper_redis::RedisStoreBuilder,
        prefix: &str,
        wait_for_replica: bool,
    ) -> Arc<dyn TokenStore> {
        let mut builder = builder.prefix(prefix);
        if wait_for_replica {
            builder = builder.wait_for_replicas(1, REPLICA_WAIT);
        }
        Arc::new(
            builder
                .connect()
                .await
                .unwrap_or_else(|e| panic!("connecting to {self}: {e}")),
        )
    }
}

fn wait_word(wait_for_replica: bool) -> &'static str {
    if wait_for_replica { "wait" } else { "nowait" }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match self {
            Backend::Memory => write!(f, "{name}"),
            Backend::Sqlite { path, synchronous } => {
                write!(f, "{name}|{synchronous:?}|{}", path.display())
            }
            Backend::Redis {
                url,
                prefix,
                wait_for_replica,
            } => write!(f, "{name}|{url}|{prefix}|{}", wait_word(*wait_for_replica)),
            Backend::RedisCluster {
                nodes,
                prefix,
                wait_for_replica,
            } => write!(
                f,
                "{name}|{}|{prefix}|{}",
                nodes.join(","),
                wait_word(*wait_for_replica)
            ),
            Backend::Postgres { url, schema } => write!(f, "{name}|{url}|{schema}"),
        }
    }
}

/// Text that names no [`Backend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownBackend(pub String);

impl fmt::Display for UnknownBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not a backend: {:?} (expected memory, sqlite|SYNC|PATH, redis|URL|PREFIX|WAIT, redis_cluster|URL,URL|PREFIX|WAIT or postgres|URL|SCHEMA)",
            self.0
        )
    }
}

impl std::error::Error for UnknownBackend {}

fn parse_wait(word: &str) -> Option<bool> {
    match word {
        "wait" => Some(true),
        "nowait" => Some(false),
        _ => None,
    }
}

fn parse_synchronous(word: &str) -> Option<Synchronous> {
    match word {
        "Full" => Some(Synchronous::Full),
        "Normal" => Some(Synchronous::Normal),
        _ => None,
    }
}

impl FromStr for Backend {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fields: Vec<&str> = s.split('|').collect();
        let parsed = match fields.as_slice() {
            ["memory"] => Some(Backend::Memory),
            ["sqlite", sync, path] if !path.is_empty() => {
                parse_synchronous(sync).map(|synchronous| Backend::Sqlite {
                    path: PathBuf::from(path),
                    synchronous,
                })
            }
            ["redis", url, prefix, wait] if !url.is_empty() => {
                parse_wait(wait).map(|wait_for_replica| Backend::Redis {
                    url: (*url).to_owned(),
                    prefix: (*prefix).to_owned(),
                    wait_for_replica,
                })
            }
            ["redis_cluster", nodes, prefix, wait] if !nodes.is_empty() => {
                parse_wait(wait).map(|wait_for_replica| Backend::RedisCluster {
                    nodes: nodes.split(',').map(str::to_owned).collect(),
                    prefix: (*prefix).to_owned(),
                    wait_for_replica,
                })
            }
            ["postgres", url, schema] if !url.is_empty() && !schema.is_empty() => {
                Some(Backend::Postgres {
                    url: (*url).to_owned(),
                    schema: (*schema).to_owned(),
                })
            }
            _ => None,
        };
        parsed.ok_or_else(|| UnknownBackend(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Backend> {
        vec![
            Backend::Memory,
            Backend::Sqlite {
                path: PathBuf::from("/tmp/a b/tokens.db"),
                synchronous: Synchronous::Normal,
            },
            Backend::Redis {
                url: "redis://127.0.0.1:6379".into(),
                prefix: "tk-test-x-1".into(),
                wait_for_replica: true,
            },
            Backend::RedisCluster {
                nodes: vec!["redis://127.0.0.1:1".into(), "redis://127.0.0.1:2".into()],
                prefix: "tk-test-y-2".into(),
                wait_for_replica: false,
            },
            Backend::Postgres {
                url: "postgres://tokenkeeper@127.0.0.1:5432/postgres?sslmode=disable".into(),
                schema: "tk_z_3".into(),
            },
        ]
    }

    #[test]
    fn the_text_form_round_trips() {
        for backend in every_kind() {
            let text = backend.to_string();
            assert_eq!(text.parse::<Backend>(), Ok(backend), "{text}");
        }
    }

    #[test]
    fn unknown_text_is_refused_never_a_fallback() {
        for text in [
            "",
            "postgre|postgres://x|s",
            "Memory",
            "sqlite|/tmp/x.db",
            "sqlite|full|/tmp/x.db",
            "redis|redis://x|p",
            "redis|redis://x|p|always",
            "redis|redis://x,redis://y|p|nowait|extra",
            "postgres|postgres://x|",
        ] {
            assert_eq!(
                text.parse::<Backend>(),
                Err(UnknownBackend(text.to_owned())),
                "{text:?}"
            );
        }
    }
}
