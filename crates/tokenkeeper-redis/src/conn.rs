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
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// On one server, a connection found dead (the server restarted or failed over while the
/// connection sat idle) reconnects, and the command or pipeline is sent once more on it.
/// Reads are idempotent, and every write recognises its own first run should that one have
/// been applied after all (a script's conflict with its own value, a claim's own bytes), so
/// the resend is safe; without it the first use of each idle connection after a restart
/// fails the flight that made it. The cluster client resends by itself.
impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => Box::pin(async move {
                match c.req_packed_command(cmd).await {
                    Err(e) if e.is_connection_dropped() => c.req_packed_command(cmd).await,
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
                    Err(e) if e.is_connection_dropped() => {
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

/// The connections writes that wait for replicas go on, apart from everything else (review
/// E9). `WAIT` blocks the client connection it runs on until the replicas answer or its
/// timeout ends, and a multiplexed connection answers in order: on the store's one shared
/// connection, every read of the process (flights' `get`s, `due`, the event watcher) would
/// queue behind each write's replica round trip, and behind the whole timeout while a replica
/// is down. Each write takes the least busy connection of the pool, so up to its size of
/// writes wait for replicas at once and no read ever does.
pub(crate) struct WritePool {
    conns: Vec<(Conn, AtomicUsize)>,
}

impl WritePool {
    /// A pool of the given connections (at least one).
    pub(crate) fn new(conns: Vec<Conn>) -> Self {
        Self {
            conns: conns
                .into_iter()
                .map(|c| (c, AtomicUsize::new(0)))
                .collect(),
        }
    }

    /// The least busy connection, counted busy until the returned guard is dropped.
    pub(crate) fn checkout(self: &Arc<Self>) -> Checkout {
        let index = self
            .conns
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, busy))| busy.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i);
        if let Some((_, busy)) = self.conns.get(index) {
            busy.fetch_add(1, Ordering::Relaxed);
        }
        Checkout {
            pool: Arc::clone(self),
            index,
        }
    }
}

/// One write's hold on a pool connection; releases it when dropped (also when the write's
/// future is cancelled).
pub(crate) struct Checkout {
    pool: Arc<WritePool>,
    index: usize,
}

impl Checkout {
    /// The connection to send on (a cheap clone of the multiplexed handle).
    pub(crate) fn conn(&self) -> Conn {
        self.pool.conns[self.index].0.clone()
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some((_, busy)) = self.pool.conns.get(self.index) {
            busy.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
