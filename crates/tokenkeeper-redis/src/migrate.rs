//! The one-time move of the due index written by stores before the per-consumer layout:
//! members of the shared `{prefix}:{sNN}:due` sets go to their records' consumers' sets.
//! `connect` runs it (see the builder's `finish`); it is resumable and idempotent, one
//! member per script. It is a file of its own because it is upgrade code, not part of any
//! store operation, and can be deleted whole once no deployment holds the old layout.

use tokenkeeper_core::{InstallationId, StoreError, TokenStore};

use crate::{RedisStore, scripts};

impl RedisStore {
    /// Moves the members of the shared due sets that stores before the per-consumer index
    /// kept (`{prefix}:{sNN}:due`) into their records' consumers' sets, dropping members
    /// whose record is gone or no longer indexes them. Idempotent and resumable: each member
    /// moves in one script; run by `connect`. Stop processes of older versions first (they
    /// would go on writing the shared sets).
    pub(crate) async fn migrate_legacy_due(&self) -> Result<u64, StoreError> {
        let mut moved = 0;
        for shard in self.layout.shards() {
            loop {
                let members: Vec<Vec<u8>> = self
                    .run("migrate", async |c| {
                        redis::cmd("ZRANGE")
                            .arg(&shard.legacy_due)
                            .arg(0)
                            .arg(99)
                            .query_async(c)
                            .await
                    })
                    .await?;
                if members.is_empty() {
                    break;
                }
                for member in members {
                    let id = member
                        .get(16..)
                        .and_then(|b| InstallationId::from_bytes(b).ok());
                    let consumer = match &id {
                        Some(id) => match self.get(id).await {
                            Ok(Some(record)) => Some(record.consumer().to_owned()),
                            Ok(None) => None,
                            Err(StoreError::Corrupt { .. }) => None,
                            Err(e) => return Err(e),
                        },
                        None => None,
                    };
                    let (due, record) = match (&id, &consumer) {
                        (Some(id), Some(consumer)) => (shard.due(consumer), self.record_key(id)),
                        // Gone or unreadable: the member is only dropped.
                        _ => (shard.due(""), format!("{}:rec:", shard.legacy_due)),
                    };
                    let keys = [shard.legacy_due.clone(), due, record];
                    let n: i64 = self
                        .run("migrate", async |c| {
                            scripts::MIGRATE_DUE
                                .key(&keys)
                                .arg(&member)
                                .invoke_async(c)
                                .await
                        })
                        .await?;
                    moved += u64::try_from(n).unwrap_or(0);
                }
            }
        }
        Ok(moved)
    }
}
