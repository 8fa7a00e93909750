//! Reading the lifecycle event streams: one stream per shard, merged.
//!
//! Each shard's script appends to its own stream (`{prefix}:{sNN}:events`), so events are
//! ordered per shard, hence per installation (an installation never changes shard), and the
//! cursor holds one stream entry id per shard plus the log's id (`{prefix}:events:log`, drawn
//! by the first store that connects). A read asks every shard for the entries after its
//! position (`XRANGE`), its retention mark (`GET`) and its newest entry (`XREVRANGE`): on a
//! single server all in one `MULTI`, one snapshot; on a cluster one pipeline per shard in that
//! order, so a trim between the reads shows as a trim (a spurious `EventsTrimmed` at worst),
//! never as a gap. Each shard is asked for its share of the page; the shards that sent all
//! they were asked for are asked for the rest, so a page is short only when the log is read
//! to its end. It then merges the entries by id (the server's milliseconds) and keeps the
//! first `limit`: per shard a prefix of what that shard sent, so resuming from any event's
//! cursor skips nothing.

use std::sync::atomic::Ordering;

use redis::Value;
use tokenkeeper_core::{
    EventCursor, EventPage, InstallationId, LogPosition, StoreError, Timestamp, backend::EventRow,
    backend::decode_event,
};

use crate::error::unexpected_reply;
use crate::store::parse_id;
use crate::{BACKEND, RedisStore};

const OP: &str = "read_events";

/// Commands per shard in a read: XRANGE, GET (retention mark), XREVRANGE (newest).
const PER_SHARD: usize = 3;

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

/// Reads the log id (creating it if the key is missing) and keeps it in the store.
pub(crate) async fn refresh_log_id(store: &RedisStore) -> Result<u64, StoreError> {
    let id = log_id(store).await?;
    store.log_id.store(id, Ordering::Relaxed);
    Ok(id)
}

/// The log id: created once per prefix (`SET NX`), then read.
async fn log_id(store: &RedisStore) -> Result<u64, StoreError> {
    let key = format!("{}:events:log", store.prefix);
    let fresh = tokenkeeper_core::backend::new_log_id() & (i64::MAX as u64);
    let id: String = store
        .run("event_log_id", async |c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(fresh.to_string())
                .arg("NX")
                .query_async::<()>(&mut *c)
                .await?;
            redis::cmd("GET").arg(&key).query_async(c).await
        })
        .await?;
    id.parse().map_err(|_| malformed("the event log id"))
}

/// The stream id right after `p` (an exclusive `XRANGE` start that servers before 6.2, which
/// lack the `(` syntax, understand too).
fn after(p: LogPosition) -> String {
    match p.minor.checked_add(1) {
        Some(minor) => format!("{}-{minor}", p.major),
        None => format!("{}-0", p.major.saturating_add(1)),
    }
}

pub(crate) async fn read(
    store: &RedisStore,
    after_cursor: &EventCursor,
    limit: usize,
) -> Result<EventPage, StoreError> {
    let shards = store.layout.shards();
    let mut log = store.log_id.load(Ordering::Relaxed);
    if after_cursor.log().is_some_and(|l| l != log) {
        // Another process may have drawn the id after the key was lost: look again before
        // refusing the cursor.
        log = refresh_log_id(store).await?;
    }
    let mut positions = after_cursor.positions_for(BACKEND, log, shards.len())?;
    let beginning = after_cursor.is_beginning();
    let limit = limit.max(1);
    let mut fetched = first_round(store, &mut positions, beginning, limit).await?;
    more_rounds(store, &mut fetched, beginning, &positions, limit).await?;
    let mut entries = fetched.known();
    entries.truncate(limit);
    let mut events = Vec::with_capacity(entries.len());
    for entry in entries {
        positions[entry.shard] = entry.position;
        events.push(decode_event(
            EventCursor::from_positions(log, positions.clone()),
            entry.shard as u32,
            entry.position,
            EventRow {
                installation: entry.id.clone(),
                consumer: entry.consumer.clone(),
                version: entry.version,
                at: Timestamp::from_unix_nanos(entry.at_ms.saturating_mul(1_000_000)),
                body: &entry.body,
            },
        ));
    }
    let next = match events.last() {
        Some(last) => last.cursor.clone(),
        None if beginning => after_cursor.clone(),
        None => EventCursor::from_positions(log, positions),
    };
    Ok(EventPage { events, next })
}

/// What the rounds of one read fetched: every entry, in per-shard prefixes of what each
/// shard holds after the cursor, and per shard the last position fetched and whether the
/// shard sent all it was asked for (so it may hold more).
struct Fetched {
    entries: Vec<Entry>,
    last: Vec<Option<LogPosition>>,
    full: Vec<bool>,
    trimmed: Vec<bool>,
}

/// The first round: every shard asked for its share of the page (`limit / shards + 1`, not
/// the whole page: that moved 16 times what a page returns, review E10), with its retention
/// mark and newest entry, checked against the cursor.
async fn first_round(
    store: &RedisStore,
    positions: &mut [LogPosition],
    beginning: bool,
    limit: usize,
) -> Result<Fetched, StoreError> {
    let shards = store.layout.shards();
    let share = limit.div_ceil(shards.len()) + 1;
    let pipes: Vec<redis::Pipeline> = shards
        .iter()
        .zip(positions.iter())
        .map(|(keys, position)| {
            let start = if beginning {
                "-".to_owned()
            } else {
                after(*position)
            };
            let mut pipe = redis::pipe();
            pipe.cmd("XRANGE")
                .arg(&keys.events)
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(share);
            push_tail(&mut pipe, keys);
            pipe
        })
        .collect();
    let replies = per_shard(store, OP, &pipes).await?;
    if replies.len() != PER_SHARD * shards.len() {
        return Err(unexpected_reply(OP, &Value::Array(replies)));
    }
    let mut fetched = Fetched {
        entries: Vec::new(),
        last: vec![None; shards.len()],
        full: vec![false; shards.len()],
        trimmed: vec![false; shards.len()],
    };
    for (shard, reply) in replies.chunks(PER_SHARD).enumerate() {
        let (trimmed, newest) = (mark(&reply[1])?, newest(shard, &reply[2])?);
        if beginning {
            // Retained entries all lie after the mark.
            positions[shard] = trimmed;
        } else {
            check_position(shard, positions[shard], trimmed, newest)?;
        }
        let items = entries_of(shard, &reply[0])?;
        fetched.full[shard] = items.len() == share;
        fetched.last[shard] = items.last().map(|e| e.position);
        fetched.entries.extend(items);
    }
    Ok(fetched)
}

/// Until every shard's entries are known up to the page's end: the shards that sent their
/// whole share (they may hold more) are asked for more after what each sent, with their
/// retention marks (a shard trimmed past what it sent is asked nothing more; its entries
/// still bound the page, and the next read from the page's cursor reports the trim). Twice
/// for a share of what is missing, divided among them; then, if still short, each for all
/// that is missing, which makes the page whole. So at most three rounds, and mostly none.
async fn more_rounds(
    store: &RedisStore,
    fetched: &mut Fetched,
    beginning: bool,
    positions: &[LogPosition],
    limit: usize,
) -> Result<(), StoreError> {
    let shards = store.layout.shards();
    for round in 0..3 {
        let known = fetched.known().len();
        let asked: Vec<usize> = (0..shards.len()).filter(|s| fetched.full[*s]).collect();
        // A shard trimmed mid-read bounds the page where its entries stop; asking the others
        // for more cannot lengthen it (the next read reports the trim).
        let bounded_by_trim = fetched.cut().is_some_and(|(_, s)| fetched.trimmed[s]);
        if known >= limit || asked.is_empty() || bounded_by_trim {
            return Ok(());
        }
        let missing = limit - known;
        let share = if round < 2 {
            missing.div_ceil(asked.len()) + 1
        } else {
            missing
        };
        let pipes: Vec<redis::Pipeline> = asked
            .iter()
            .map(|&shard| {
                let start = match fetched.last[shard] {
                    Some(last) => after(last),
                    None if beginning => "-".to_owned(),
                    None => after(positions[shard]),
                };
                let mut pipe = redis::pipe();
                pipe.cmd("XRANGE")
                    .arg(&shards[shard].events)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(share);
                pipe.cmd("GET").arg(&shards[shard].events_trimmed);
                pipe
            })
            .collect();
        let replies = per_shard(store, OP, &pipes).await?;
        if replies.len() != 2 * asked.len() {
            return Err(unexpected_reply(OP, &Value::Array(replies)));
        }
        for (&shard, reply) in asked.iter().zip(replies.chunks(2)) {
            fetched.full[shard] = false;
            let sent_through = fetched.last[shard].unwrap_or(positions[shard]);
            if mark(&reply[1])? > sent_through {
                fetched.trimmed[shard] = true;
                continue;
            }
            let items = entries_of(shard, &reply[0])?;
            fetched.full[shard] = items.len() == share;
            if let Some(last) = items.last() {
                fetched.last[shard] = Some(last.position);
            }
            fetched.entries.extend(items);
        }
    }
    Ok(())
}

impl Fetched {
    /// Where every shard's entries are known up to: the smallest last entry fetched from a
    /// shard that may hold more (it sent all it was asked for, or was trimmed mid-read).
    /// `None` when every shard was read to its end.
    fn cut(&self) -> Option<(LogPosition, usize)> {
        (0..self.last.len())
            .filter(|&s| self.full[s] || self.trimmed[s])
            .filter_map(|s| self.last[s].map(|p| (p, s)))
            .min()
    }

    /// The entries at or below the cut, in log order: the page is the first `limit` of them,
    /// the same whatever page size read them (a page of 7 and seven pages of 1 agree).
    fn known(&self) -> Vec<&Entry> {
        let cut = self.cut();
        let mut known: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| cut.is_none_or(|c| (e.position, e.shard) <= c))
            .collect();
        known.sort_by_key(|e| (e.position, e.shard));
        known
    }
}

/// Refuses a cursor the shard's stream cannot continue: one past its end (the data was
/// restored or wiped) or one whose next entries retention removed.
fn check_position(
    shard: usize,
    position: LogPosition,
    trimmed: LogPosition,
    newest: LogPosition,
) -> Result<(), StoreError> {
    if position > newest.max(trimmed) {
        return Err(StoreError::InvalidCursor {
            backend: BACKEND,
            message: format!(
                "the cursor stands at {position} in shard {shard} but that stream ends at {}: the data was restored from an older backup or wiped, so the events the cursor saw may be gone; reconcile with `list`/`explain`, then start from the event head",
                newest.max(trimmed)
            ),
        });
    }
    if position < trimmed {
        return Err(StoreError::EventsTrimmed {
            backend: BACKEND,
            trimmed_through: trimmed,
        });
    }
    Ok(())
}

/// The entries of an `XRANGE` reply.
fn entries_of(shard: usize, reply: &Value) -> Result<Vec<Entry>, StoreError> {
    let Value::Array(items) = reply else {
        return Err(unexpected_reply(OP, reply));
    };
    items.iter().map(|item| parse_entry(shard, item)).collect()
}

/// Runs one pipeline per shard and returns every reply in order: on a single server all of
/// them in one transaction (one snapshot of every shard), on a cluster one pipeline per
/// shard (each shard's keys live in their own slot).
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
    pipe.atomic();
    for shard in pipes {
        for cmd in shard.cmd_iter() {
            pipe.add_command(cmd.clone());
        }
    }
    store
        .run(operation, async |c| pipe.query_async::<Vec<Value>>(c).await)
        .await
}

/// Asks for a shard's retention mark (`GET`) and its newest entry (`XREVRANGE … COUNT 1`),
/// read back by [`mark`] and [`newest`].
fn push_tail(pipe: &mut redis::Pipeline, keys: &crate::keys::ShardKeys) {
    pipe.cmd("GET").arg(&keys.events_trimmed);
    pipe.cmd("XREVRANGE")
        .arg(&keys.events)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
}

/// A shard's retention mark (`GET`), zero when nothing was trimmed.
fn mark(reply: &Value) -> Result<LogPosition, StoreError> {
    match reply {
        Value::Nil => Ok(LogPosition::default()),
        Value::BulkString(text) => parse_position(text),
        other => Err(unexpected_reply(OP, other)),
    }
}

/// A shard's newest entry id (`XREVRANGE … COUNT 1`), zero for an empty stream.
fn newest(shard: usize, reply: &Value) -> Result<LogPosition, StoreError> {
    match reply {
        Value::Array(items) => match items.first() {
            Some(item) => Ok(parse_entry(shard, item)?.position),
            None => Ok(LogPosition::default()),
        },
        other => Err(unexpected_reply(OP, other)),
    }
}

/// Each shard's newest entry id (or its retention mark, when retention removed every entry).
pub(crate) async fn head(store: &RedisStore) -> Result<EventCursor, StoreError> {
    const HEAD: &str = "event_head";
    let shards = store.layout.shards();
    let pipes: Vec<redis::Pipeline> = shards
        .iter()
        .map(|keys| {
            let mut pipe = redis::pipe();
            push_tail(&mut pipe, keys);
            pipe
        })
        .collect();
    let replies = per_shard(store, HEAD, &pipes).await?;
    if replies.len() != 2 * shards.len() {
        return Err(unexpected_reply(HEAD, &Value::Array(replies)));
    }
    let positions = replies
        .chunks(2)
        .enumerate()
        .map(|(shard, reply)| Ok(mark(&reply[0])?.max(newest(shard, &reply[1])?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(EventCursor::from_positions(
        store.log_id.load(Ordering::Relaxed),
        positions,
    ))
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
