//! The [`TokenStore`] operations on Redis: `impl TokenStore for RedisStore`, the write
//! scripts' arguments (the record, its index entries and its event), and the merge that
//! turns one page per shard into one page. It is the file to open for what an operation
//! does on Redis; how its commands reach the server is in `exec`, the key names in `keys`,
//! the scripts in `scripts` and the stored value in `value`.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokenkeeper_core::{
    CasOutcome, DeleteOutcome, DueEntry, DuePage, EventCursor, EventPage, EventRetention,
    InstallationId, ListEntry, ListFilter, ListPage, Record, StateKind, StoreError, Timestamp,
    TokenStore, backend::check_cas_arguments, backend::write_event_payload,
};

use crate::error::{RedisFault, unexpected_reply};
use crate::exec::Write;
use crate::keys::{due_hex, due_member, parse_due_hex};
use crate::{BACKEND, RedisStore, events, scripts, value};

impl RedisStore {
    /// The compare-and-swap script with its KEYS and ARGV for writing `record` over version
    /// `expected`: what [`TokenStore::compare_and_swap`] sends. The ARGV comes from
    /// [`cas_argv`], which the benchmarks' raw `EVALSHA` uses too.
    pub(crate) fn cas_invocation(
        &self,
        record: &Record,
        expected: u64,
    ) -> redis::ScriptInvocation<'static> {
        // A record's consumer never changes, so its due set is the one the stored version
        // indexes itself in.
        let keys = self.layout.script_keys(record.id(), record.consumer());
        let mut invocation = scripts::CAS.key(&keys);
        for arg in cas_argv(record, expected, self.event_bounds()) {
            invocation.arg(arg);
        }
        invocation
    }

    /// The event arguments of a write of `record`: consumer, version, body, retention.
    fn event_args(&self, invocation: &mut redis::ScriptInvocation<'_>, record: &Record) {
        for arg in event_argv(record, self.event_bounds()) {
            invocation.arg(arg);
        }
    }

    /// This store's event bounds: its retention over its index shards.
    fn event_bounds(&self) -> EventBounds {
        EventBounds::new(self.layout.shards().len(), &self.event_retention)
    }
}

/// What every write script is told about the event streams: how many events each shard's
/// stream keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventBounds {
    /// The retention's event bound split among the shards (rounded up, at least 1).
    per_shard: u64,
    /// The retention's age limit, in milliseconds.
    age_millis: u64,
}

impl EventBounds {
    /// `retention` over `shards` index shards.
    pub(crate) fn new(shards: usize, retention: &EventRetention) -> Self {
        let shards = shards.max(1) as u64;
        Self {
            per_shard: retention.event_limit().div_ceil(shards).max(1),
            age_millis: retention.age_limit_millis(),
        }
    }
}

/// The compare-and-swap script's ARGV for writing `record` over version `expected`: the
/// expected version, the value, the state and due index entries, the id, the lease it was
/// written under (empty for none), then the event arguments. The store sends it
/// ([`RedisStore::cas_invocation`]) and so do the benchmarks beside it, so both run the
/// script on the same arguments.
pub(crate) fn cas_argv(record: &Record, expected: u64, events: EventBounds) -> Vec<Vec<u8>> {
    let written_under = value::holder_hex(record.written_under().map(|h| h.as_str()));
    let mut argv = vec![
        expected.to_string().into_bytes(),
        value::encode(record),
        record.state().kind().as_str().as_bytes().to_vec(),
        due_member(record.id(), record.due_at()).into_bytes(),
        record.id().as_str().as_bytes().to_vec(),
        written_under.into_bytes(),
    ];
    argv.extend(event_argv(record, events));
    argv
}

/// The arguments every write script of `record` ends with: consumer, version, event body,
/// then the event bounds.
fn event_argv(record: &Record, events: EventBounds) -> [Vec<u8>; 5] {
    [
        record.consumer().as_bytes().to_vec(),
        record.version().to_string().into_bytes(),
        write_event_payload(record),
        events.per_shard.to_string().into_bytes(),
        events.age_millis.to_string().into_bytes(),
    ]
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

pub(crate) fn parse_id(operation: &'static str, text: &[u8]) -> Result<InstallationId, StoreError> {
    InstallationId::from_bytes(text)
        .map_err(|e| StoreError::backend(BACKEND, operation, RedisFault::InvalidIndexId(e)))
}

#[async_trait]
impl TokenStore for RedisStore {
    async fn get(&self, id: &InstallationId) -> Result<Option<Record>, StoreError> {
        let key = self.layout.record_key(id);
        let bytes: Option<Vec<u8>> = self
            .run("get", async |c| {
                redis::cmd("GET").arg(&key).query_async(c).await
            })
            .await?;
        bytes.map(|b| value::decode(id, &b)).transpose()
    }

    async fn create(&self, record: &Record) -> Result<(), StoreError> {
        let keys = self.layout.script_keys(record.id(), record.consumer());
        let value = value::encode(record);
        let mut invocation = scripts::CREATE.key(&keys);
        invocation
            .arg(&value)
            .arg(record.state().kind().as_str())
            .arg(due_member(record.id(), record.due_at()))
            .arg(record.id().as_str());
        self.event_args(&mut invocation, record);
        match self.write("create", Write::Script(&invocation)).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => {
                // A write resent after a lost reply (the cluster client does that) finds the
                // record its first run created: ours, so created.
                if self.get(record.id()).await?.as_ref() == Some(record) {
                    return Ok(());
                }
                Err(StoreError::AlreadyExists {
                    id: record.id().clone(),
                    backend: BACKEND,
                })
            }
            other => Err(unexpected_reply("create", &other)),
        }
    }

    async fn compare_and_swap(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<CasOutcome, StoreError> {
        check_cas_arguments(BACKEND, record, expected_version)?;
        let invocation = self.cas_invocation(record, expected_version);
        match self
            .write("compare_and_swap", Write::Script(&invocation))
            .await?
        {
            Value::Int(1) => Ok(CasOutcome::Swapped),
            Value::Int(0) => Ok(CasOutcome::Missing),
            // A swap resent after a lost reply finds its own first run as the conflict: the
            // engine recognises its own write there, as for any store (design, refresh
            // protocol), so the store reports what it saw.
            Value::BulkString(current) => Ok(CasOutcome::Conflict(Box::new(value::decode(
                record.id(),
                &current,
            )?))),
            other => Err(unexpected_reply("compare_and_swap", &other)),
        }
    }

    async fn delete(
        &self,
        id: &InstallationId,
        expected_version: u64,
    ) -> Result<DeleteOutcome, StoreError> {
        // The due set to clean is the record's consumer's: read it first (the script checks
        // the version, so a record changed in between is a conflict, not a wrong key).
        let consumer = match self.get(id).await {
            Ok(Some(stored)) => stored.consumer().to_owned(),
            Ok(None) => return Ok(DeleteOutcome::Missing),
            // An unreadable record can still be deleted; its due member, if any, stays behind
            // as a ghost the refresher passes over.
            Err(StoreError::Corrupt { .. }) => String::new(),
            Err(e) => return Err(e),
        };
        let keys = self.layout.script_keys(id, &consumer);
        let events = self.event_bounds();
        let mut invocation = scripts::DELETE.key(&keys);
        invocation
            .arg(expected_version.to_string())
            .arg(id.as_str())
            .arg(consumer.as_str())
            .arg(expected_version.saturating_add(1))
            .arg(events.per_shard)
            .arg(events.age_millis);
        match self.write("delete", Write::Script(&invocation)).await? {
            Value::Int(1) => Ok(DeleteOutcome::Deleted),
            Value::Int(0) => Ok(DeleteOutcome::Missing),
            Value::BulkString(current) => Ok(DeleteOutcome::Conflict(Box::new(value::decode(
                id, &current,
            )?))),
            other => Err(unexpected_reply("delete", &other)),
        }
    }

    async fn claim_flow(
        &self,
        flow: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.layout.flow_key(flow);
        let mut invocation = scripts::CLAIM_FLOW.key(&key);
        invocation.arg(value).arg(ttl_millis(ttl));
        match self.write("claim_flow", Write::Script(&invocation)).await? {
            Value::Nil => Ok(None),
            // A claim resent after a lost reply reads its own first run (claim values are
            // unique per claimant): claimed.
            Value::BulkString(existing) if existing == value => Ok(None),
            Value::BulkString(existing) => Ok(Some(existing)),
            other => Err(unexpected_reply("claim_flow", &other)),
        }
    }

    async fn settle_flow(&self, flow: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let key = self.layout.flow_key(flow);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(value).arg("PX").arg(ttl_millis(ttl));
        self.write("settle_flow", Write::Command(&set)).await?;
        Ok(())
    }

    async fn get_flow(&self, flow: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.layout.flow_key(flow);
        self.run("get_flow", async |c| {
            redis::cmd("GET").arg(&key).query_async(c).await
        })
        .await
    }

    async fn read_events(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> Result<EventPage, StoreError> {
        events::read(self, after, limit).await
    }

    async fn event_head(&self) -> Result<EventCursor, StoreError> {
        events::head(self).await
    }

    /// One page merged from every shard's due set of `consumer`. Each shard is asked for
    /// `limit / shards + 1` members (not `limit`: that moved 16 times what a page returns);
    /// the page then ends at the smallest last member of the shards that filled their share,
    /// below which every shard's entries are known, so paging never skips one.
    async fn due(
        &self,
        consumer: &str,
        before: Timestamp,
        after: Option<&DueEntry>,
        limit: usize,
    ) -> Result<DuePage, StoreError> {
        if limit == 0 {
            return Ok(DuePage::default());
        }
        let min = match after {
            Some(c) => format!("({}", due_member(&c.id, Some(c.due_at))),
            None => "-".to_owned(),
        };
        let max = format!("({}", due_hex(before));
        let shards = self.layout.shards();
        let share = limit.div_ceil(shards.len()) + 1;
        let cmds: Vec<redis::Cmd> = shards
            .iter()
            .map(|shard| {
                let mut cmd = redis::cmd("ZRANGEBYLEX");
                cmd.arg(shard.due(consumer))
                    .arg(&min)
                    .arg(&max)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(share);
                cmd
            })
            .collect();
        let pages: Vec<Vec<Vec<u8>>> = self.fan_out("due", cmds).await?;
        let (members, more) = merge_shares(pages, share, limit);
        let mut entries = Vec::with_capacity(members.len());
        for m in members {
            let due_at = m
                .get(..16)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(parse_due_hex)
                .ok_or_else(|| {
                    StoreError::backend(BACKEND, "due", RedisFault::MalformedDueMember)
                })?;
            entries.push(DueEntry {
                due_at,
                id: parse_id("due", &m[16..])?,
            });
        }
        let next = if more { entries.last().cloned() } else { None };
        Ok(DuePage { entries, next })
    }

    async fn list(
        &self,
        filter: ListFilter,
        after: Option<&InstallationId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        if limit == 0 {
            return Ok(ListPage::default());
        }
        let min = match after {
            Some(id) => format!("({}", id.as_str()),
            None => "-".to_owned(),
        };
        let kinds: Vec<(usize, StateKind)> = StateKind::ALL
            .into_iter()
            .enumerate()
            .filter(|(_, k)| filter.matches(*k))
            .collect();
        // Each (shard, state) index is asked for its share of the page, not the whole page
        // (that moved 16 times what a page returns: review E10); the merge ends the page
        // where every index's members are known.
        let share = limit.div_ceil(self.layout.shards().len()) + 1;
        let mut cmds = Vec::new();
        let mut tags = Vec::new();
        for shard in self.layout.shards() {
            for (n, kind) in &kinds {
                let mut cmd = redis::cmd("ZRANGEBYLEX");
                cmd.arg(&shard.states[*n])
                    .arg(&min)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(share);
                cmds.push(cmd);
                tags.push(*kind);
            }
        }
        let pages: Vec<Vec<Vec<u8>>> = self.fan_out("list", cmds).await?;
        let pages = pages
            .into_iter()
            .zip(tags)
            .map(|(ids, kind)| ids.into_iter().map(|id| (id, kind)).collect())
            .collect();
        let (rows, more) = merge_shares(pages, share, limit);
        let entries = rows
            .into_iter()
            .map(|(id, state)| {
                Ok(ListEntry {
                    id: parse_id("list", &id)?,
                    state,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next = if more {
            entries.last().map(|e| e.id.clone())
        } else {
            None
        };
        Ok(ListPage { entries, next })
    }

    /// One `ZCARD` per (shard, state) index: the gauge moves numbers, not ids (review E10).
    async fn count_states(&self, _cap: u64) -> Result<tokenkeeper_core::StateCounts, StoreError> {
        let mut cmds = Vec::new();
        let mut tags = Vec::new();
        for shard in self.layout.shards() {
            for (n, kind) in StateKind::ALL.into_iter().enumerate() {
                let mut cmd = redis::cmd("ZCARD");
                cmd.arg(&shard.states[n]);
                cmds.push(cmd);
                tags.push(kind);
            }
        }
        let sizes: Vec<u64> = self.fan_out("count_states", cmds).await?;
        let mut counts = tokenkeeper_core::StateCounts::default();
        for (kind, n) in tags.into_iter().zip(sizes) {
            counts.add(kind, n);
        }
        Ok(counts)
    }
}

/// Merges pages read from several sorted indexes, each asked for `share` members after the
/// same cursor. Below the smallest last member of a page that came back full, every index's
/// members are known, so the merge ends there (and at `limit`): paging on from its last
/// member skips nothing. Returns the members in order and whether more may follow.
fn merge_shares<T: Ord + Clone>(pages: Vec<Vec<T>>, share: usize, limit: usize) -> (Vec<T>, bool) {
    let cut = pages
        .iter()
        .filter(|p| p.len() == share)
        .filter_map(|p| p.last())
        .min()
        .cloned();
    let mut members: Vec<T> = pages.into_iter().flatten().collect();
    members.sort_unstable();
    if let Some(cut) = &cut {
        members.retain(|m| m <= cut);
    }
    let more = cut.is_some() || members.len() > limit;
    members.truncate(limit);
    (members, more)
}

#[cfg(test)]
mod tests {
    use tokenkeeper_core::conformance::{T0, sample_record};
    use tokenkeeper_core::{EventRetention, InstallationId, Record, backend::write_event_payload};

    use super::{EventBounds, cas_argv};
    use crate::keys::due_member;
    use crate::{scripts, value};

    /// The script command as sent, byte for byte.
    fn packed(invocation: &redis::ScriptInvocation<'_>) -> Vec<u8> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(invocation);
        pipe.get_packed_pipeline()
    }

    /// The compare-and-swap as `compare_and_swap` built it before `cas_argv` existed: one
    /// `arg` per value, in the script's order.
    fn chained(record: &Record, expected: u64, per_shard: u64, age: u64) -> Vec<u8> {
        let written_under = value::holder_hex(record.written_under().map(|h| h.as_str()));
        let mut invocation = scripts::CAS.key(&["k1", "k2"]);
        invocation
            .arg(expected.to_string())
            .arg(value::encode(record))
            .arg(record.state().kind().as_str())
            .arg(due_member(record.id(), record.due_at()))
            .arg(record.id().as_str())
            .arg(written_under.as_str())
            .arg(record.consumer())
            .arg(record.version())
            .arg(write_event_payload(record))
            .arg(per_shard)
            .arg(age);
        packed(&invocation)
    }

    #[test]
    fn cas_argv_sends_what_the_chained_arguments_sent() {
        let record = sample_record(&InstallationId::new("inst-argv").unwrap(), T0);
        let retention = EventRetention::default();
        let events = EventBounds::new(16, &retention);
        // The event bound is split among the shards, as every write script is told.
        let per_shard = retention.event_limit().div_ceil(16).max(1);
        assert_eq!(events.per_shard, per_shard);
        let mut invocation = scripts::CAS.key(&["k1", "k2"]);
        for arg in cas_argv(&record, 3, events) {
            invocation.arg(arg);
        }
        assert_eq!(
            packed(&invocation),
            chained(&record, 3, per_shard, retention.age_limit_millis())
        );
    }
}
