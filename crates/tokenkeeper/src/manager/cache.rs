//! The in-process cache of usable access tokens: the hot path of `access_token`.
//!
//! One read lock and one hash lookup per call, no store I/O. An entry is served only while
//! `now < stale_at` (expiry minus skew); it is replaced only by a newer record version, so a
//! slow flight can never put back an older token.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use tokenkeeper_core::{AccessToken, InstallationId, Record, Timestamp};

#[derive(Clone)]
struct Entry {
    access: AccessToken,
    stale_at: Timestamp,
    version: u64,
}

/// Usable access tokens by installation.
#[derive(Default)]
pub(crate) struct Cache {
    map: RwLock<HashMap<InstallationId, Entry>>,
}

impl Cache {
    /// The cached token if it is still usable at `now`.
    pub(crate) fn fresh(&self, id: &InstallationId, now: Timestamp) -> Option<AccessToken> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(id)
            .filter(|e| now < e.stale_at)
            .map(|e| e.access.clone())
    }

    /// Caches `record`'s access token until `stale_at`, unless a newer version is cached.
    pub(crate) fn put(&self, record: &Record, stale_at: Timestamp) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        match map.get(record.id()) {
            Some(e) if e.version > record.version() => {}
            _ => {
                map.insert(
                    record.id().clone(),
                    Entry {
                        access: record.tokens().access_token.clone(),
                        stale_at,
                        version: record.version(),
                    },
                );
            }
        }
    }

    /// Forgets an installation's token (after a 401, a revocation, a terminal state).
    pub(crate) fn remove(&self, id: &InstallationId) {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// How many tokens are cached.
    pub(crate) fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
