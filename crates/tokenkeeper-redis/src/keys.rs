//! The key layout: which Redis keys hold an installation's record and index entries.
//!
//! ```text
//! {prefix}:{sNN}:rec:{id}             string: header line + the record (tokens live only here)
//! {prefix}:{sNN}:due:{consumer}       sorted set, all scores 0, members `HEX16(due_at) ++ id`
//! {prefix}:{sNN}:state:{state}        sorted set per state, all scores 0, members `id`
//! {prefix}:{sNN}:events              stream: the shard's lifecycle events (no token)
//! {prefix}:{sNN}:events:trimmed      string: the newest entry id retention removed
//! {prefix}:flow:{flow}                string with a TTL: an authorization flow's claim
//! ```
//!
//! The due index is per consumer (a record's `profile/client_id`), so consumers sharing one
//! Redis and prefix never walk each other's entries. Stores written before that kept one
//! `{prefix}:{sNN}:due` per shard; `connect` moves its members to their consumer's set.
//!
//! `{sNN}` is a Redis Cluster hash tag derived from the installation id (its shard, a hash of
//! the id modulo the shard count). Every key one installation touches shares that tag, so the
//! Lua scripts that update a record together with its index entries run in one cluster slot,
//! while installations still spread over as many slots as there are shards. (A hash tag of the
//! raw id would give every record its own slot and make an atomic record+index update
//! impossible in a cluster.) Because the tag comes first, ids containing `{` or `}` cannot
//! change which slot a key hashes to.
//!
//! Index members sort lexicographically (`ZRANGEBYLEX`), which orders `due` entries exactly by
//! `(due_at, id)`: the due time is fixed-width hex of the nanosecond timestamp with its sign
//! bit flipped, so no precision is lost to floating-point scores.

use tokenkeeper_core::{InstallationId, StateKind, Timestamp};

/// Keys of one shard.
#[derive(Debug, Clone)]
pub(crate) struct ShardKeys {
    base: String,
    /// The due set of every consumer, as stores before the per-consumer index kept it.
    pub(crate) legacy_due: String,
    /// One per [`StateKind::ALL`], in that order.
    pub(crate) states: Vec<String>,
    pub(crate) record_prefix: String,
    /// The shard's event stream and its retention mark.
    pub(crate) events: String,
    pub(crate) events_trimmed: String,
}

/// The layout for a prefix and shard count.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    shards: Vec<ShardKeys>,
    flow_prefix: String,
}

impl Layout {
    pub(crate) fn new(prefix: &str, shards: u16) -> Self {
        let shards = (0..shards.max(1))
            .map(|n| {
                let base = format!("{prefix}:{{s{n:02}}}");
                ShardKeys {
                    legacy_due: format!("{base}:due"),
                    states: StateKind::ALL
                        .iter()
                        .map(|k| format!("{base}:state:{}", k.as_str()))
                        .collect(),
                    record_prefix: format!("{base}:rec:"),
                    events: format!("{base}:events"),
                    events_trimmed: format!("{base}:events:trimmed"),
                    base,
                }
            })
            .collect();
        Self {
            shards,
            flow_prefix: format!("{prefix}:flow:"),
        }
    }

    /// The key of an authorization flow's claim (one key, its own slot).
    pub(crate) fn flow_key(&self, flow: &str) -> String {
        format!("{}{flow}", self.flow_prefix)
    }

    pub(crate) fn shards(&self) -> &[ShardKeys] {
        &self.shards
    }

    /// The shard of an id: FNV-1a of its bytes, stable across processes and versions.
    pub(crate) fn shard(&self, id: &InstallationId) -> &ShardKeys {
        let mut h: u32 = 0x811c_9dc5;
        for b in id.as_str().bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        &self.shards[(h as usize) % self.shards.len()]
    }

    pub(crate) fn record_key(&self, id: &InstallationId) -> String {
        format!("{}{}", self.shard(id).record_prefix, id.as_str())
    }

    /// All keys a script touching `id` of `consumer` needs: record, due, one per state, then
    /// the shard's event stream and its retention mark.
    pub(crate) fn script_keys(&self, id: &InstallationId, consumer: &str) -> Vec<String> {
        let shard = self.shard(id);
        let mut keys = Vec::with_capacity(4 + shard.states.len());
        keys.push(self.record_key(id));
        keys.push(shard.due(consumer));
        keys.extend(shard.states.iter().cloned());
        keys.push(shard.events.clone());
        keys.push(shard.events_trimmed.clone());
        keys
    }
}

impl ShardKeys {
    /// The due set of `consumer` in this shard.
    pub(crate) fn due(&self, consumer: &str) -> String {
        format!("{}:due:{consumer}", self.base)
    }
}

/// Fixed-width, order-preserving text of a timestamp.
pub(crate) fn due_hex(t: Timestamp) -> String {
    format!("{:016x}", (t.unix_nanos() as u64) ^ (1 << 63))
}

pub(crate) fn parse_due_hex(hex: &str) -> Option<Timestamp> {
    let raw = u64::from_str_radix(hex, 16).ok()?;
    Some(Timestamp::from_unix_nanos((raw ^ (1 << 63)) as i64))
}

/// The due-index member of a record, or `-` for none.
pub(crate) fn due_member(id: &InstallationId, due_at: Option<Timestamp>) -> String {
    match due_at {
        Some(t) => format!("{}{}", due_hex(t), id.as_str()),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_hex_orders_like_timestamps() {
        let times = [i64::MIN, -5, -1, 0, 1, 1_767_225_600_000_000_000, i64::MAX];
        let hexes: Vec<String> = times
            .iter()
            .map(|t| due_hex(Timestamp::from_unix_nanos(*t)))
            .collect();
        assert!(hexes.windows(2).all(|w| w[0] < w[1]));
        for (t, h) in times.iter().zip(&hexes) {
            assert_eq!(parse_due_hex(h), Some(Timestamp::from_unix_nanos(*t)));
        }
    }
}
