//! How durable "written" is on this Redis server, checked at connect time, and the optional
//! wait for replicas after every write that stores new tokens.
//!
//! A `Swapped` from Redis means the primary applied the write in memory. Whether a rotated
//! refresh token survives a restart depends on the server's persistence (`appendonly yes` with
//! `appendfsync always` loses nothing acknowledged; `everysec` up to a second; RDB snapshots
//! minutes), whether it survives a failover depends on replication (`WAIT`), and whether it
//! survives memory pressure depends on `maxmemory-policy` (any `allkeys-*` policy may evict a
//! record or an index). The store reads these settings once at connect time and warns, or
//! refuses, as configured.

use std::fmt;
use std::time::Duration;

/// What [`RedisStoreBuilder::durability_check`](crate::RedisStoreBuilder::durability_check)
/// does when the server could lose or evict a rotated token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DurabilityCheck {
    /// Log a warning naming each gap and connect anyway (default).
    #[default]
    Warn,
    /// Refuse to connect ([`ConnectError::NotDurable`](crate::ConnectError::NotDurable)).
    Require,
    /// Do not look (a server that forbids `CONFIG GET`, or a throwaway test server).
    Skip,
}

/// One way the server could lose an acknowledged token.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DurabilityGap {
    /// `appendonly no`: a restart loses every write since the last RDB snapshot.
    AppendOnlyOff,
    /// `appendfsync` is not `always`: a crash loses up to this much of acknowledged writes.
    LazyFsync(String),
    /// An eviction policy that may drop records or index entries under memory pressure.
    Evicts(String),
    /// The settings could not be read (`CONFIG` disabled or renamed).
    Unknown(String),
}

impl fmt::Display for DurabilityGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AppendOnlyOff => f.write_str(
                "appendonly is off: a restart loses every token rotated since the last snapshot (set `appendonly yes`)",
            ),
            Self::LazyFsync(mode) => write!(
                f,
                "appendfsync is {mode}: a crash can lose tokens acknowledged in the last second (set `appendfsync always`)"
            ),
            Self::Evicts(policy) => write!(
                f,
                "maxmemory-policy is {policy}: records or index entries can be evicted (use `noeviction`)"
            ),
            Self::Unknown(why) => write!(f, "the persistence settings could not be read ({why})"),
        }
    }
}

/// The gaps found in a server's `CONFIG GET` answers (`name`, `value` pairs).
pub(crate) fn gaps(settings: &[(String, String)]) -> Vec<DurabilityGap> {
    let get = |name: &str| {
        settings
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let mut found = Vec::new();
    match get("appendonly").as_deref() {
        Some("yes") => match get("appendfsync") {
            Some(mode) if mode == "always" => {}
            Some(mode) => found.push(DurabilityGap::LazyFsync(mode)),
            None => found.push(DurabilityGap::Unknown("no appendfsync setting".into())),
        },
        Some(_) => found.push(DurabilityGap::AppendOnlyOff),
        None => found.push(DurabilityGap::Unknown("no appendonly setting".into())),
    }
    if let Some(policy) = get("maxmemory-policy")
        && policy.starts_with("allkeys")
    {
        found.push(DurabilityGap::Evicts(policy));
    }
    found
}

/// After a write that stores new tokens, wait until this many replicas acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplicaWait {
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn only_fsync_always_without_eviction_has_no_gap() {
        let ok = settings(&[
            ("appendonly", "yes"),
            ("appendfsync", "always"),
            ("maxmemory-policy", "noeviction"),
        ]);
        assert!(gaps(&ok).is_empty());
        let lazy = settings(&[
            ("appendonly", "yes"),
            ("appendfsync", "everysec"),
            ("maxmemory-policy", "allkeys-lru"),
        ]);
        assert_eq!(
            gaps(&lazy),
            [
                DurabilityGap::LazyFsync("everysec".into()),
                DurabilityGap::Evicts("allkeys-lru".into())
            ]
        );
        assert_eq!(
            gaps(&settings(&[("appendonly", "no")])),
            [DurabilityGap::AppendOnlyOff]
        );
        assert!(matches!(gaps(&[])[..], [DurabilityGap::Unknown(_)]));
    }
}
