//! One connection type for a single Redis server and for a Redis Cluster (feature `cluster`).
//!
//! Both are multiplexed and cheap to clone. Commands and scripts go through
//! [`redis::aio::ConnectionLike`] either way: in a cluster, redis-rs routes each by its key's
//! slot and follows `MOVED`/`ASK` redirections and failovers. What differs: a pipeline whose
//! commands span slots is refused by a cluster (`CROSSSLOT`), so [`Conn::is_cluster`] tells
//! the store to send per-shard commands one by one. (`WAIT` travels in one pipeline with the
//! write it waits for, which routes it to the primary that took the write.)

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};

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
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
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
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
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

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag (the text between the first `{`
/// and the next `}`, when not empty) or of the whole key, modulo 16384. (The store leaves
/// routing to the client; the tests check key placement with it.)
#[cfg(test)]
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // The examples of the Redis Cluster specification.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty first tag: the whole key is hashed, not `bar`.
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }
}
