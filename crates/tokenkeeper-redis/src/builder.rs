//! How a [`RedisStore`] comes to be: [`RedisStoreBuilder`] and its settings, the checks made
//! before anything connects (the key prefix, the shard count, no plaintext to another host),
//! the connection to one server or to a cluster (`connect_single`, `connect_cluster`), the
//! durability check (`read_durability`) and `finish`, which builds the store and moves a
//! legacy due index. [`ConnectError`] says why a connection failed, with the URL's password
//! replaced by `***` (`redact`). Everything here runs once per store, before the first
//! operation; the operations themselves are in `store` and `exec`.

use std::time::Duration;
use tokenkeeper_core::backend::url::is_loopback;

use redis::RedisError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokenkeeper_core::{EventRetention, StoreError};

use crate::conn::{self, Conn};
use crate::durability::{self, DurabilityCheck, DurabilityGap, ReplicaWait};
use crate::exec::ReplicaWrites;
use crate::keys::Layout;
use crate::{RedisStore, events};

/// How many index shards a store has unless [`RedisStoreBuilder::index_shards`] says
/// otherwise.
pub(crate) const DEFAULT_INDEX_SHARDS: u16 = 16;

/// Why a store could not be connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not a Redis URL this build can use.
    #[error("invalid Redis URL {url}: {source}")]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
        /// Why.
        #[source]
        source: RedisError,
    },
    /// The server could not be reached or refused the credentials.
    #[error(
        "cannot connect to Redis at {url}: {source}; check the server is running and the credentials"
    )]
    Unreachable {
        /// The URL with any password replaced by `***`.
        url: String,
        /// Why.
        #[source]
        source: RedisError,
    },
    /// The server could lose or evict acknowledged tokens and the builder requires
    /// durability (`DurabilityCheck::Require`).
    #[error(
        "the Redis server at {url} could lose rotated tokens: {}; fix its configuration or connect with DurabilityCheck::Warn",
        gaps.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    NotDurable {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What is missing.
        gaps: Vec<DurabilityGap>,
    },
    /// The due index written by an older version could not be moved to the per-consumer
    /// layout; nothing was lost (the move is per member and resumes on the next connect).
    #[error(
        "could not move the due index at {url} to the per-consumer layout: {source}; connect again once Redis answers"
    )]
    Migration {
        /// The URL with any password replaced by `***`.
        url: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// A plaintext connection to another host was not allowed.
    #[error(
        "{url} is a plaintext connection to another host: the password and unsealed tokens would cross the network in cleartext; use rediss:// (feature `tls`), or RedisStoreBuilder::allow_plaintext(true) on a network you trust"
    )]
    Plaintext {
        /// The URL with any password replaced by `***`.
        url: String,
    },
    /// A setting is out of range.
    #[error("invalid Redis store configuration: {field}: {reason}")]
    Config {
        /// The builder method that sets it.
        field: &'static str,
        /// What the value must be.
        reason: &'static str,
    },
}

/// Replaces the password of a URL (between `:` and `@` of the authority) with `***`.
/// The userinfo ends at the *last* `@` (a password may hold `/`, `?`, `#` or `@` unencoded;
/// Redis URLs carry none in their path), and a `pass`/`password` query parameter
/// (`redis+unix://...?pass=...`) is blanked too.
fn redact(url: &str) -> String {
    tokenkeeper_core::backend::url::redact(url, &["pass", "password"])
        .unwrap_or_else(|| "<a Redis URL that is not a redis:// URL>".to_owned())
}

/// Configures and connects a [`RedisStore`]. `Debug` shows the URL with its password
/// replaced by `***`.
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    shards: u16,
    response_timeout: Duration,
    connection_timeout: Duration,
    operation_timeout: Duration,
    reconnect_retries: usize,
    durability_check: DurabilityCheck,
    replica_wait: Option<ReplicaWait>,
    write_connections: usize,
    event_retention: EventRetention,
    allow_plaintext: bool,
    /// The seed nodes of a cluster (`url` is the first); empty for a single server.
    cluster_nodes: Vec<String>,
    #[cfg(feature = "tls")]
    tls_root: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &redact(&self.url))
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|n| redact(n))
                    .collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field("shards", &self.shards)
            .field("operation_timeout", &self.operation_timeout)
            .field("durability_check", &self.durability_check)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// A builder with the defaults for the server at `url`, or for the cluster whose seed
    /// nodes are `cluster_nodes` (`url` being the first of them).
    pub(crate) fn new(url: String, cluster_nodes: Vec<String>) -> Self {
        Self {
            url,
            prefix: "tokenkeeper".to_owned(),
            shards: DEFAULT_INDEX_SHARDS,
            event_retention: EventRetention::default(),
            response_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(5),
            reconnect_retries: 1,
            durability_check: DurabilityCheck::default(),
            replica_wait: None,
            write_connections: 4,
            allow_plaintext: false,
            cluster_nodes,
            #[cfg(feature = "tls")]
            tls_root: None,
        }
    }

    /// What to do when the server could lose or evict an acknowledged token (default
    /// [`DurabilityCheck::Warn`]): `appendonly` off, `appendfsync` other than `always`, or an
    /// `allkeys-*` eviction policy. See [`RedisStore::durability_gaps`].
    pub fn durability_check(mut self, check: DurabilityCheck) -> Self {
        self.durability_check = check;
        self
    }

    /// After every write (new tokens, and also refresh leases: a lease lost in a failover
    /// would let a peer refresh while its holder's request is in flight), wait until
    /// `replicas` replicas acknowledged it (`WAIT`), at most `timeout`; fewer
    /// acknowledgements make the write `StoreError::Unavailable`, so a failover cannot lose a
    /// token the application has already used nor a lease its holder acts under. Off by
    /// default.
    ///
    /// These writes travel on connections of their own
    /// ([`RedisStoreBuilder::replica_wait_connections`]): `WAIT` blocks the connection it
    /// runs on, and reads must not queue behind it. A write may take up to
    /// `operation_timeout + timeout` before it is reported.
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_wait = (replicas > 0).then_some(ReplicaWait { replicas, timeout });
        self
    }

    /// How many connections the writes that wait for replicas share (default 4, 1 to 64):
    /// up to this many of them wait for their replicas at once, each on a connection of its
    /// own; more wait for a free one, at most the operation timeout, then fail as
    /// `Unavailable` without having been sent. Unused without
    /// [`RedisStoreBuilder::wait_for_replicas`].
    pub fn replica_wait_connections(mut self, connections: usize) -> Self {
        self.write_connections = connections;
        self
    }

    /// Trusts this CA certificate (PEM) for `rediss://` instead of the platform's roots
    /// (feature `tls`): for servers with a private CA.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root = Some(pem.into());
        self
    }

    /// How long each shard's event stream keeps lifecycle events (see [`EventRetention`];
    /// the event bound is per shard). Every write trims by the retention of the process
    /// writing, so give every process of one prefix the same setting.
    pub fn event_retention(mut self, retention: EventRetention) -> Self {
        self.event_retention = retention;
        self
    }

    /// The key prefix (default `tokenkeeper`); several applications can share one Redis with
    /// different prefixes. Must be non-empty and contain no `{`, `}` or whitespace.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How many index shards (distinct cluster hash tags) installations spread over
    /// (default 16, 1 to 256). Fixed for the lifetime of the data: changing it re-homes keys.
    pub fn index_shards(mut self, shards: u16) -> Self {
        self.shards = shards;
        self
    }

    /// How long one Redis command may take (default 2 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long one connection attempt may take (default 2 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The bound on a whole store operation, reconnection attempts included (default 5 s):
    /// during an outage callers get [`StoreError::Unavailable`] after at most this long.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Allows a plaintext `redis://` connection to a host other than this machine (a private
    /// network you trust). By default it is refused: the AUTH password, and every token not
    /// sealed with encryption, would cross the network in cleartext. Prefer `rediss://`
    /// (feature `tls`). Loopback hosts and Unix sockets are always allowed.
    pub fn allow_plaintext(mut self, allow: bool) -> Self {
        self.allow_plaintext = allow;
        self
    }

    /// Connects (and checks the server answers).
    ///
    /// # Errors
    ///
    /// [`ConnectError::Config`] for a setting out of range (named), before anything connects;
    /// [`ConnectError::Plaintext`] for a plaintext URL to another host; an invalid URL, a
    /// server that does not answer, a durability check the server fails, or a migration of
    /// the due index that fails, each as its own [`ConnectError`] variant naming the URL
    /// without its password.
    pub async fn connect(self) -> Result<RedisStore, ConnectError> {
        self.validate()?;
        let url = redact(&self.url);
        let conn = self.open(&url, self.response_timeout).await?;
        // A connection is not a usable server: a PING fails on missing or wrong credentials.
        let mut ping = conn.clone();
        let pong: Result<String, RedisError> = redis::cmd("PING").query_async(&mut ping).await;
        pong.map_err(|source| ConnectError::Unreachable {
            url: url.clone(),
            source,
        })?;
        let writers = match self.replica_wait {
            Some(wait) => {
                // A write's reply comes after its `WAIT`: allow for the wait on top.
                let timeout = self.response_timeout + wait.timeout;
                let mut conns = Vec::with_capacity(self.write_connections);
                for _ in 0..self.write_connections {
                    conns.push(self.open(&url, timeout).await?);
                }
                Some(ReplicaWrites {
                    wait,
                    pool: std::sync::Arc::new(conn::WritePool::new(conns)),
                })
            }
            None => None,
        };
        self.finish(conn, writers, url).await
    }

    /// Refuses settings that cannot work, before anything connects.
    fn validate(&self) -> Result<(), ConnectError> {
        let nodes: Vec<&str> = if self.cluster_nodes.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.cluster_nodes.iter().map(String::as_str).collect()
        };
        for node in &nodes {
            if !self.allow_plaintext
                && let Ok(info) = redis::IntoConnectionInfo::into_connection_info(*node)
                && let redis::ConnectionAddr::Tcp(host, _) = info.addr()
                && !is_loopback(host)
            {
                return Err(ConnectError::Plaintext { url: redact(node) });
            }
        }
        if self.prefix.is_empty()
            || self
                .prefix
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(ConnectError::Config {
                field: "prefix",
                reason: "the key prefix must be non-empty, without braces, whitespace or control characters",
            });
        }
        if self.shards == 0 || self.shards > 256 {
            return Err(ConnectError::Config {
                field: "index_shards",
                reason: "must be 1 to 256",
            });
        }
        if !(1..=64).contains(&self.write_connections) {
            return Err(ConnectError::Config {
                field: "replica_wait_connections",
                reason: "must be 1 to 64",
            });
        }
        Ok(())
    }

    /// One connection (to the server, or to the cluster) whose commands may take
    /// `response_timeout`.
    async fn open(&self, url: &str, response_timeout: Duration) -> Result<Conn, ConnectError> {
        if self.cluster_nodes.is_empty() {
            self.connect_single(url, response_timeout).await
        } else {
            self.connect_cluster(url, response_timeout).await
        }
    }

    /// A single server's multiplexed connection, reconnecting by itself.
    async fn connect_single(
        &self,
        url: &str,
        response_timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        #[cfg(feature = "tls")]
        let client = match self.tls_root.clone() {
            Some(root) => redis::Client::build_with_tls(
                self.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                },
            ),
            None => redis::Client::open(self.url.as_str()),
        };
        #[cfg(not(feature = "tls"))]
        let client = redis::Client::open(self.url.as_str());
        let client = client.map_err(|source| ConnectError::InvalidUrl {
            url: url.to_owned(),
            source,
        })?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(self.connection_timeout))
            .set_number_of_retries(self.reconnect_retries)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            self.operation_timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| ConnectError::Unreachable {
            url: url.to_owned(),
            source: RedisError::from((redis::ErrorKind::Io, "connection timed out")),
        })?
        .map_err(|source| ConnectError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
        Ok(Conn::Single(conn))
    }

    /// A cluster connection from the seed nodes (it learns the slot map and follows it).
    #[cfg(feature = "cluster")]
    async fn connect_cluster(
        &self,
        url: &str,
        response_timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        let unreachable = |source| ConnectError::Unreachable {
            url: url.to_owned(),
            source,
        };
        let builder = redis::cluster::ClusterClient::builder(self.cluster_nodes.clone());
        // A private CA for `rediss://` nodes, as for one server.
        #[cfg(feature = "tls")]
        let builder = match self.tls_root.clone() {
            Some(root) => builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            }),
            None => builder,
        };
        let client = builder
            .connection_timeout(self.connection_timeout)
            .response_timeout(response_timeout)
            // A failover takes the cluster's node timeout and an election: follow redirections
            // and refresh the slot map that long before reporting `Unavailable`.
            .retries(
                u32::try_from(self.reconnect_retries)
                    .unwrap_or(u32::MAX)
                    .max(8),
            )
            .build()
            .map_err(|source| ConnectError::InvalidUrl {
                url: url.to_owned(),
                source,
            })?;
        let conn = tokio::time::timeout(self.operation_timeout, client.get_async_connection())
            .await
            .map_err(|_| {
                unreachable(RedisError::from((
                    redis::ErrorKind::Io,
                    "connection timed out",
                )))
            })?
            .map_err(unreachable)?;
        Ok(Conn::Cluster(conn))
    }

    /// Without the `cluster` feature there is no cluster builder, so no seed nodes.
    #[cfg(not(feature = "cluster"))]
    async fn connect_cluster(
        &self,
        _url: &str,
        _response_timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        Err(ConnectError::Config {
            field: "cluster_builder",
            reason: "Redis Cluster needs the `cluster` feature",
        })
    }

    /// Checks durability, moves a legacy due index, and builds the store.
    async fn finish(
        self,
        conn: Conn,
        writers: Option<ReplicaWrites>,
        url: String,
    ) -> Result<RedisStore, ConnectError> {
        let durability_gaps = match self.durability_check {
            DurabilityCheck::Skip => Vec::new(),
            _ => read_durability(&conn).await,
        };
        if !durability_gaps.is_empty() {
            if self.durability_check == DurabilityCheck::Require {
                return Err(ConnectError::NotDurable {
                    url,
                    gaps: durability_gaps,
                });
            }
            for gap in &durability_gaps {
                tracing::warn!(url = %url, "Redis could lose rotated tokens: {gap}");
            }
        }
        let store = RedisStore {
            conn,
            replica_writes: writers,
            layout: Layout::new(&self.prefix, self.shards),
            prefix: self.prefix,
            url,
            operation_timeout: self.operation_timeout,
            event_retention: self.event_retention,
            log_id: std::sync::Arc::default(),
            durability_gaps,
        };
        events::refresh_log_id(&store)
            .await
            .map_err(|source| ConnectError::Migration {
                url: store.url.clone(),
                source,
            })?;
        let moved = store
            .migrate_legacy_due()
            .await
            .map_err(|source| ConnectError::Migration {
                url: store.url.clone(),
                source,
            })?;
        if moved > 0 {
            tracing::info!(
                moved,
                "moved due-index entries to their consumers' due sets"
            );
        }
        Ok(store)
    }
}

/// Reads the persistence and eviction settings; an unreadable answer is itself a gap.
async fn read_durability(conn: &Conn) -> Vec<durability::DurabilityGap> {
    let mut conn = conn.clone();
    // Per node (every node of a cluster: any one of them can own a slot or be promoted),
    // one `CONFIG GET` per setting (several in one needs Redis 7).
    let mut by_node: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for name in ["appendonly", "appendfsync", "maxmemory-policy"] {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        let replies = match conn.on_every_node(&cmd).await {
            Ok(replies) => replies,
            Err(e) => return vec![DurabilityGap::Unknown(e.to_string())],
        };
        for (node, reply) in replies {
            let pairs: Vec<String> = match redis::FromRedisValue::from_redis_value(reply) {
                Ok(pairs) => pairs,
                Err(e) => return vec![DurabilityGap::Unknown(format!("{node}: {e}"))],
            };
            let settings = pairs
                .chunks_exact(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()));
            match by_node.iter_mut().find(|(n, _)| *n == node) {
                Some((_, all)) => all.extend(settings),
                None => by_node.push((node, settings.collect())),
            }
        }
    }
    let mut gaps: Vec<DurabilityGap> = Vec::new();
    for (_, settings) in &by_node {
        for gap in durability::gaps(settings) {
            if !gaps.contains(&gap) {
                gaps.push(gap);
            }
        }
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(redact("rediss://app:pw@host/1"), "rediss://app:***@host/1");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        // Unencoded `/`, `?`, `#` and `@` in a password, and a socket URL's `pass` parameter.
        for (url, secret) in [
            ("redis://:pa/ss@h:6379/0", "pa/ss"),
            ("redis://u:p?w#x@h/0", "p?w#x"),
            ("redis://u:a@b@h/0", "a@b"),
            ("redis+unix:///tmp/redis.sock?db=1&pass=sekrit", "sekrit"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{shown}");
        }
        let builder = crate::RedisStore::builder("redis://app:hunter2@127.0.0.1:6379/0");
        let shown = format!("{builder:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("app:***@"),
            "{shown}"
        );
    }
}
