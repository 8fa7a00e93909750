//! One connection type for a single Redis server and for a Redis Cluster (feature `cluster`).
//!
//! Both are multiplexed and cheap to clone. Commands and scripts go through
//! [`redis::aio::ConnectionLike`] either way: in a cluster, redis-rs routes each by its key's
//! slot and follows `MOVED`/`ASK` redirections and failovers. What differs: a pipeline whose
//! commands span slots is refused by a cluster (`CROSSSLOT`), so [`Conn::is_cluster`] tells
//! the store to send per-shard commands one by one. (`WAIT` travels in one pipeline with the
//! write it waits for, which routes it to the primary that took the write, on a connection
//! of the [`WritePool`] so that it blocks no read.)

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connection to one server or to a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    /// Whether commands on keys of different slots must go separately.
    pub(crate) fn is_cluster(&self) -> bool {
        !matches!(self, Self::Single(_))
    }

    /// Runs `cmd` on every node: the one server, or each node of the cluster (read from
    /// `CLUSTER NODES`, failed nodes left out), returning each node's address and reply.
    pub(crate) async fn on_every_node(&mut self, cmd: &Cmd) -> RedisResult<Vec<(String, Value)>> {
        match self {
            Self::Single(c) => Ok(vec![(String::new(), cmd.query_async(c).await?)]),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(c).await?;
                let mut replies = Vec::new();
                for line in nodes
                    .lines()
                    .filter(|l| !l.contains("fail") && !l.contains("noaddr"))
                {
                    let Some(addr) = line
                        .split_whitespace()
                        .nth(1)
                        .and_then(|a| a.split('@').next())
                    else {
                        continue;
                    };
                    let Some((host, port)) = addr.rsplit_once(':') else {
                        continue;
                    };
                    let Ok(port) = port.parse::<u16>() else {
                        continue;
                    };
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.to_owned(),
                        port,
                    });
                    replies.push((
                        addr.to_owned(),
                        c.route_command(cmd.clone(), routing).await?,
                    ));
                }
                Ok(replies)
            }
        }
    }
}

/// On one server, a read that finds its connection dead (the server restarted or failed over
/// while the connection sat idle) is sent once more on the reconnected connection: reads are
/// idempotent. A write is never resent here: its first run may have been applied with only
/// the reply lost, and the engine tells that apart itself (it reads the record back), which a
/// resend would hide (a `WAIT` resent with a no-op write would even count replicas that never
/// saw it). The cluster client follows its own redirections and retries.
impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => Box::pin(async move {
                match c.req_packed_command(cmd).await {
                    Err(e) if e.is_connection_dropped() && is_read(cmd) => {
                        c.req_packed_command(cmd).await
                    }
                    done => done,
                }
            }),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => Box::pin(async move {
                match c.req_packed_commands(pipeline, offset, count).await {
                    Err(e) if e.is_connection_dropped() && pipeline.cmd_iter().all(is_read) => {
                        c.req_packed_commands(pipeline, offset, count).await
                    }
                    done => done,
                }
            }),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether `cmd` only reads (so sending it twice is harmless): the commands the store reads
/// with, and the brackets of a read-only transaction.
fn is_read(cmd: &Cmd) -> bool {
    const READS: [&[u8]; 13] = [
        b"GET",
        b"PING",
        b"ZRANGEBYLEX",
        b"ZRANGE",
        b"ZCARD",
        b"XRANGE",
        b"XREVRANGE",
        b"XLEN",
        b"EXISTS",
        b"INFO",
        b"MULTI",
        b"EXEC",
        b"CLUSTER",
    ];
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => READS.iter().any(|r| r.eq_ignore_ascii_case(name)),
        _ => false,
    }
}

/// The connections writes that wait for replicas go on, apart from everything else (review
/// E9). `WAIT` blocks the client connection it runs on until the replicas answer or its
/// timeout ends, and a multiplexed connection answers in order: on the store's one shared
/// connection, every read of the process (flights' `get`s, `due`, the event watcher) would
/// queue behind each write's replica round trip, and behind the whole timeout while a replica
/// is down. Each write holds a connection of its own until its reply: a write is sent only
/// when a connection is free, so its deadline counts from when it was sent and a write that
/// found none free in time was never sent (a clean `Unavailable`, not one the server may still
/// apply).
pub(crate) struct WritePool {
    slots: Vec<Slot>,
    free: Mutex<Vec<usize>>,
    permits: Arc<Semaphore>,
}

/// One pool connection and when a write last finished on it.
struct Slot {
    conn: Conn,
    last_used: Mutex<Instant>,
}

impl WritePool {
    /// A pool of the given connections (at least one).
    pub(crate) fn new(conns: Vec<Conn>) -> Self {
        let n = conns.len();
        Self {
            slots: conns
                .into_iter()
                .map(|conn| Slot {
                    conn,
                    last_used: Mutex::new(Instant::now()),
                })
                .collect(),
            free: Mutex::new((0..n).collect()),
            permits: Arc::new(Semaphore::new(n)),
        }
    }

    /// How many connections the pool has.
    pub(crate) fn size(&self) -> usize {
        self.slots.len()
    }

    /// A connection no other write is using, waiting at most `wait` for one; `None` when
    /// none came free in time.
    pub(crate) async fn checkout(self: &Arc<Self>, wait: Duration) -> Option<Checkout> {
        let permit = tokio::time::timeout(wait, self.permits.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        let index = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()?;
        Some(Checkout {
            pool: Arc::clone(self),
            index,
            _permit: permit,
        })
    }
}

/// One write's hold on a pool connection; gives it back when dropped (also when the write's
/// future is cancelled).
pub(crate) struct Checkout {
    pool: Arc<WritePool>,
    index: usize,
    _permit: OwnedSemaphorePermit,
}

impl Checkout {
    /// The connection to send on (a cheap clone of the multiplexed handle).
    pub(crate) fn conn(&self) -> Conn {
        self.pool.slots[self.index].conn.clone()
    }

    /// How long the connection sat unused before this write: one idle a while may have died
    /// with a server restart or failover, which only its next command finds out.
    pub(crate) fn idle_for(&self) -> Duration {
        self.pool.slots[self.index]
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let slot = &self.pool.slots[self.index];
        *slot
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        // Back in the free list before the permit (a field, dropped after this) lets the next
        // write in.
        self.pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only reads are sent twice after a dropped connection: a write's first run may have
    /// been applied (review of the resend: a resent lease write came back as a conflict with
    /// itself, and a resent `WAIT` counted replicas that never saw the write).
    #[test]
    fn only_reads_are_resent() {
        for read in [
            "GET",
            "get",
            "PING",
            "ZRANGEBYLEX",
            "ZCARD",
            "XRANGE",
            "XREVRANGE",
        ] {
            assert!(is_read(&redis::cmd(read)), "{read}");
        }
        for write in [
            "EVALSHA", "EVAL", "WAIT", "SET", "DEL", "ZADD", "XADD", "SCRIPT",
        ] {
            assert!(!is_read(&redis::cmd(write)), "{write}");
        }
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA").arg("x").arg(0);
        pipe.cmd("WAIT").arg(1).arg(100);
        assert!(!pipe.cmd_iter().all(is_read));
    }
}
