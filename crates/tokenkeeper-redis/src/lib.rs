//! # tokenkeeper-redis
//!
//! [`RedisStore`]: a [`TokenStore`] on Redis, for fleets of processes on many machines sharing
//! one token store: the backend to move to when one machine is no longer enough.
//!
//! - Every write is one Lua script (`EVALSHA`, reloaded on `NOSCRIPT`) that checks the version
//!   and updates the record and its index entries atomically.
//! - One server, or a Redis Cluster (feature `cluster`, `RedisStore::cluster_builder`) with
//!   the same key layout (see the `keys` module docs): each installation's keys share one hash tag derived from its id, so every script
//!   runs on one slot; `due` and `list` ask each shard on its own; a configurable key prefix
//!   lets several applications share one Redis. Keys hold no installation data but the id;
//!   tokens live only inside values.
//! - A connection manager reconnects after a server restart; during an outage every
//!   operation fails within a bounded time with [`StoreError::Unavailable`].
//! - `redis://` and, with the `tls` feature, `rediss://` URLs, with `user:password@` for AUTH
//!   (ACL users too). The password never appears in `Debug` or errors.
//!
//! ```no_run
//! use tokenkeeper_redis::RedisStore;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::builder("redis://:secret@127.0.0.1:6379/0")
//!     .prefix("my-app")
//!     .connect()
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`TokenStore`]: tokenkeeper_core::TokenStore
//! [`StoreError::Unavailable`]: tokenkeeper_core::StoreError::Unavailable

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

// Where things are: `builder` makes a store (settings, connection, durability check);
// `store` is what each `TokenStore` operation does; `exec` how commands reach the server
// (timeouts, the replica wait, NOSCRIPT); `error` what a failure maps to; `events` reads
// the event streams; `keys`, `scripts` and `value` are the key layout, the Lua scripts and
// the stored bytes; `conn` and `durability` the connection and the server's settings;
// `migrate` moves a due index from the old layout.
mod builder;
mod conn;
mod durability;
mod error;
mod events;
mod exec;
mod keys;
mod migrate;
mod scripts;
mod store;
mod value;

pub use builder::{ConnectError, RedisStoreBuilder};
pub use durability::{DurabilityCheck, DurabilityGap};

use std::time::Duration;

use conn::Conn;
use tokenkeeper_core::{EventRetention, InstallationId};

use exec::ReplicaWrites;
use keys::Layout;

pub(crate) const BACKEND: &str = "redis";

/// A [`TokenStore`](tokenkeeper_core::TokenStore) on Redis. Clone-cheap: clones share one
/// multiplexed connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    /// With `wait_for_replicas`: what each write waits for, and the connections such writes
    /// go on, so that their `WAIT` blocks no read.
    replica_writes: Option<ReplicaWrites>,
    layout: Layout,
    prefix: String,
    url: String,
    operation_timeout: Duration,
    event_retention: EventRetention,
    /// The event log's id (`{prefix}:events:log`, created by the first store to connect;
    /// read again when a cursor names another, in case the key was lost and drawn anew).
    log_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
    durability_gaps: Vec<DurabilityGap>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("index_shards", &self.layout.shards().len())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A builder for the server at `url` (`redis://[user][:password@]host[:port][/db]`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(url.into(), Vec::new())
    }

    /// A builder for a Redis Cluster (feature `cluster`), given some of its nodes (`redis://`
    /// URLs; the client learns the rest). The key layout is the same as on one server: each
    /// installation's keys share a hash tag, so every script touches one slot, and `due` and
    /// `list` ask each shard on its own. `MOVED`, `ASK` and failovers are followed by the
    /// client; with [`RedisStoreBuilder::wait_for_replicas`], each token write waits for the
    /// replicas of the primary that took it.
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub fn cluster_builder<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        RedisStoreBuilder::new(nodes.first().cloned().unwrap_or_default(), nodes)
    }

    /// Connects to `url` with the defaults.
    pub async fn connect(url: impl Into<String>) -> Result<Self, ConnectError> {
        Self::builder(url).connect().await
    }

    /// How the server could lose or evict acknowledged tokens, as read at connect time
    /// (empty: `appendonly yes`, `appendfsync always`, no `allkeys-*` eviction; also empty
    /// with `DurabilityCheck::Skip`).
    pub fn durability_gaps(&self) -> &[DurabilityGap] {
        &self.durability_gaps
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key holding `id`'s record (for operators and tests).
    pub fn record_key(&self, id: &InstallationId) -> String {
        self.layout.record_key(id)
    }

    /// Every index key of `consumer` (its due sets and the state sets of every shard).
    pub fn index_keys(&self, consumer: &str) -> Vec<String> {
        self.layout
            .shards()
            .iter()
            .flat_map(|s| std::iter::once(s.due(consumer)).chain(s.states.iter().cloned()))
            .collect()
    }
}

/// Not a public API: the stored-value decoder, for the fuzz targets (feature `__fuzz`).
#[cfg(feature = "__fuzz")]
#[doc(hidden)]
pub fn __fuzz_decode(
    id: &tokenkeeper_core::InstallationId,
    bytes: &[u8],
) -> Result<tokenkeeper_core::Record, tokenkeeper_core::StoreError> {
    value::decode(id, bytes)
}

/// Not a public API: the stored-value encoder, for the fuzz targets (feature `__fuzz`).
#[cfg(feature = "__fuzz")]
#[doc(hidden)]
pub fn __fuzz_encode(record: &tokenkeeper_core::Record) -> Vec<u8> {
    value::encode(record)
}

/// What the benchmarks need to run the raw commands the store wraps side by side with it.
/// Not a public API: compiled only with the `__bench` feature the benchmarks turn on.
#[cfg(feature = "__bench")]
#[doc(hidden)]
pub mod bench_support {
    use tokenkeeper_core::{EventRetention, InstallationId, Record};

    use crate::RedisStore;
    use crate::builder::DEFAULT_INDEX_SHARDS;
    use crate::store::{EventBounds, cas_argv};

    /// The compare-and-swap script.
    pub fn cas_script() -> &'static redis::Script {
        &crate::scripts::CAS
    }

    /// The KEYS of a script touching `id` of `consumer`.
    pub fn script_keys(store: &RedisStore, id: &InstallationId, consumer: &str) -> Vec<String> {
        store.layout.script_keys(id, consumer)
    }

    /// The ARGV of a compare-and-swap of `record` from `expected`, as a store with the
    /// default index shards and event retention sends it (the benchmarks connect such a
    /// store): the store's own `cas_argv`, so the raw `EVALSHA` runs the script on the
    /// arguments the store would send.
    pub fn cas_args(record: &Record, expected: u64) -> Vec<Vec<u8>> {
        let events = EventBounds::new(
            usize::from(DEFAULT_INDEX_SHARDS),
            &EventRetention::default(),
        );
        cas_argv(record, expected, events)
    }
}
