//! Reading the lifecycle event streams: one stream per shard, merged.
//!
//! Each shard's script appends to its own stream (`{prefix}:{sNN}:events`), so events are
//! ordered per shard, hence per installation (an installation never changes shard), and the
//! cursor holds one stream entry id per shard. A read asks every shard for the entries after
//! its position (`XRANGE`) and then for its retention mark (`GET`, after the `XRANGE`, so a
//! trim between the two is seen as a trim, never as a gap), then merges them by entry id (the
//! server's milliseconds) and keeps the first `limit`: per shard that is a prefix of what it
//! sent, so resuming from any event's cursor skips nothing.

use redis::Value;
use tokenkeeper_core::{
    EventCursor, EventPage, InstallationId, LogPosition, StoreError, Timestamp, decode_event,
};

use crate::{BACKEND, RedisStore, parse_id, unexpected_reply};

const OP: &str = "read_events";

/// One stream entry as read back.
struct Entry {
    shard: usize,
    position: LogPosition,
    id: InstallationId,
    consumer: String,
    version: u64,
    at_ms: i64,
    body: Vec<u8>,
}

pub(crate) async fn read(
    store: &RedisStore,
    after: &EventCursor,
    limit: usize,
) -> Result<EventPage, StoreError> {
    let shards = store.layout.shards();
    let mut positions = after.positions_for(BACKEND, shards.len())?;
    let count = limit.max(1);
    let pipes: Vec<redis::Pipeline> = shards
        .iter()
        .zip(&positions)
        .map(|(keys, position)| {
            let start = if *position == LogPosition::default() {
                "-".to_owned()
            } else {
                format!("({position}")
            };
            let mut pipe = redis::pipe();
            pipe.cmd("XRANGE")
                .arg(&keys.events)
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(count);
            pipe.cmd("GET").arg(&keys.events_trimmed);
            pipe
        })
        .collect();
    let replies = per_shard(store, OP, &pipes).await?;
    if replies.len() != 2 * shards.len() {
        return Err(unexpected_reply(OP, &Value::Array(replies)));
    }
    let mut entries = Vec::new();
    for (shard, pair) in replies.chunks(2).enumerate() {
        let trimmed = match &pair[1] {
            Value::Nil => LogPosition::default(),
            Value::BulkString(text) => parse_position(text)?,
            other => return Err(unexpected_reply(OP, other)),
        };
        // A shard never read from starts at its retention mark: its retained entries all lie
        // after it. One read from elsewhere must have lost events to be refused.
        if positions[shard] == LogPosition::default() {
            positions[shard] = trimmed;
        } else if positions[shard] < trimmed {
            return Err(StoreError::EventsTrimmed {
                backend: BACKEND,
                trimmed_through: trimmed,
            });
        }
        let Value::Array(items) = &pair[0] else {
            return Err(unexpected_reply(OP, &pair[0]));
        };
        for item in items {
            entries.push(parse_entry(shard, item)?);
        }
    }
    entries.sort_by_key(|e| (e.position, e.shard));
    entries.truncate(limit);
    let mut events = Vec::with_capacity(entries.len());
    for entry in entries {
        positions[entry.shard] = entry.position;
        events.push(decode_event(
            BACKEND,
            EventCursor::from_positions(positions.clone()),
            entry.id,
            entry.consumer,
            entry.version,
            Timestamp::from_unix_nanos(entry.at_ms.saturating_mul(1_000_000)),
            &entry.body,
        )?);
    }
    let next = match events.last() {
        Some(last) => last.cursor.clone(),
        None if after.is_beginning() => after.clone(),
        None => EventCursor::from_positions(positions),
    };
    Ok(EventPage { events, next })
}

fn malformed(what: &str) -> StoreError {
    StoreError::backend(
        BACKEND,
        OP,
        format!(
            "an event stream entry is malformed ({what}); was the stream written outside tokenkeeper?"
        ),
    )
}

fn parse_position(text: &[u8]) -> Result<LogPosition, StoreError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| malformed("entry id"))
}

fn parse_entry(shard: usize, item: &Value) -> Result<Entry, StoreError> {
    let Value::Array(parts) = item else {
        return Err(malformed("not an entry"));
    };
    let [Value::BulkString(entry_id), Value::Array(fields)] = parts.as_slice() else {
        return Err(malformed("not an id and fields"));
    };
    let position = parse_position(entry_id)?;
    let (mut id, mut consumer, mut version, mut at, mut body) = (None, None, None, None, None);
    for pair in fields.chunks(2) {
        let [Value::BulkString(name), Value::BulkString(value)] = pair else {
            return Err(malformed("field"));
        };
        match name.as_slice() {
            b"id" => id = Some(value.clone()),
            b"consumer" => consumer = Some(value.clone()),
            b"version" => version = Some(value.clone()),
            b"at" => at = Some(value.clone()),
            b"body" => body = Some(value.clone()),
            _ => {}
        }
    }
    let number = |v: Option<Vec<u8>>, what: &str| {
        v.and_then(|v| String::from_utf8(v).ok()?.parse::<i64>().ok())
            .ok_or_else(|| malformed(what))
    };
    let id = parse_id(OP, &id.ok_or_else(|| malformed("id"))?)?;
    Ok(Entry {
        shard,
        position,
        consumer: String::from_utf8(consumer.ok_or_else(|| malformed("consumer"))?)
            .map_err(|_| malformed("consumer"))?,
        version: u64::try_from(number(version, "version")?).map_err(|_| malformed("version"))?,
        at_ms: number(at, "at")?,
        body: body.ok_or_else(|| malformed("body"))?,
        id,
    })
}

/// Runs one pipeline per shard and returns every reply in order: one pipeline in all on a
/// single server, one per shard on a cluster (each shard's keys live in their own slot).
async fn per_shard(
    store: &RedisStore,
    operation: &'static str,
    pipes: &[redis::Pipeline],
) -> Result<Vec<Value>, StoreError> {
    if store.conn.is_cluster() {
        return store
            .run(operation, async |c| {
                let mut all = Vec::new();
                for pipe in pipes {
                    all.extend(pipe.query_async::<Vec<Value>>(c).await?);
                }
                Ok(all)
            })
            .await;
    }
    let mut pipe = redis::pipe();
    for shard in pipes {
        for cmd in shard.cmd_iter() {
            pipe.add_command(cmd.clone());
        }
    }
    store
        .run(operation, async |c| pipe.query_async::<Vec<Value>>(c).await)
        .await
}

/// Each shard's newest entry id (or its retention mark, when retention removed every entry).
pub(crate) async fn head(store: &RedisStore) -> Result<EventCursor, StoreError> {
    const HEAD: &str = "event_head";
    let shards = store.layout.shards();
    let pipes: Vec<redis::Pipeline> = shards
        .iter()
        .map(|keys| {
            let mut pipe = redis::pipe();
            pipe.cmd("XREVRANGE")
                .arg(&keys.events)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1);
            pipe.cmd("GET").arg(&keys.events_trimmed);
            pipe
        })
        .collect();
    let replies = per_shard(store, HEAD, &pipes).await?;
    if replies.len() != 2 * shards.len() {
        return Err(unexpected_reply(HEAD, &Value::Array(replies)));
    }
    let mut positions = Vec::with_capacity(shards.len());
    for (shard, pair) in replies.chunks(2).enumerate() {
        let trimmed = match &pair[1] {
            Value::BulkString(text) => parse_position(text)?,
            _ => LogPosition::default(),
        };
        let newest = match &pair[0] {
            Value::Array(items) => match items.first() {
                Some(item) => parse_entry(shard, item)?.position,
                None => LogPosition::default(),
            },
            other => return Err(unexpected_reply(HEAD, other)),
        };
        positions.push(newest.max(trimmed));
    }
    Ok(EventCursor::from_positions(positions))
}
