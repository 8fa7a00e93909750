//! The Lua scripts that make each write atomic with its index entries.
//!
//! A stored value starts with a header line `version \t state \t due-member \n` that the
//! scripts read to compare versions and to find the index entries to remove; the record
//! (JSON, with the tokens) follows and is never parsed by Redis. `redis::Script` sends
//! `EVALSHA` and reloads the script on `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
//!
//! KEYS for every script: record, due, then the five state sets in `StateKind::ALL` order.

use std::sync::LazyLock;

use redis::Script;

const PRELUDE: &str = r#"
local STATES = {active = 3, refreshing = 4, backoff = 5, reauthorization_required = 6, revoked = 7}
local function header(value)
  return string.match(value, '^(%d+)\t([%w_]+)\t([^\n]*)\n')
end
"#;

/// ARGV: value, state, due member, id. Returns 1 when created, 0 when the id exists.
pub(crate) static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{PRELUDE}
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] ~= '-' then redis.call('ZADD', KEYS[2], 0, ARGV[3]) end
redis.call('ZADD', KEYS[STATES[ARGV[2]]], 0, ARGV[4])
return 1
"#
    ))
});

/// ARGV: expected version, value, state, due member, id, and the lease holder the value was
/// written under (empty for none). Returns 1 when swapped, 0 when missing, or the current
/// value on a conflict: another version, an unreadable header, or this version under another
/// lease (versions can repeat after a store lost an acknowledged write; lease holders cannot).
pub(crate) static CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{PRELUDE}
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local v, s, d = header(cur)
if v ~= ARGV[1] then return cur end
if ARGV[6] ~= '' then
  local nl = string.find(cur, '\n', 1, true)
  local ok, rec = pcall(cjson.decode, string.sub(cur, nl + 1))
  local st = ok and type(rec) == 'table' and type(rec.record) == 'table' and rec.record.state
  local holder = type(st) == 'table' and type(st.Refreshing) == 'table'
    and type(st.Refreshing.lease) == 'table' and st.Refreshing.lease.holder
  if holder ~= ARGV[6] then return cur end
end
redis.call('SET', KEYS[1], ARGV[2])
if d ~= ARGV[4] then
  if d ~= '-' then redis.call('ZREM', KEYS[2], d) end
  if ARGV[4] ~= '-' then redis.call('ZADD', KEYS[2], 0, ARGV[4]) end
end
if s ~= ARGV[3] then
  if STATES[s] then redis.call('ZREM', KEYS[STATES[s]], ARGV[5]) end
  redis.call('ZADD', KEYS[STATES[ARGV[3]]], 0, ARGV[5])
end
return 1
"#
    ))
});

/// KEYS: the legacy due set, the consumer's due set, the record. ARGV: a legacy member.
/// Moves the member to the consumer's set if the record still indexes it (a record written
/// since indexes itself in its consumer's set); drops it either way. Returns 1 when moved.
pub(crate) static MIGRATE_DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{PRELUDE}
redis.call('ZREM', KEYS[1], ARGV[1])
local cur = redis.call('GET', KEYS[3])
if not cur then return 0 end
local v, s, d = header(cur)
if d ~= ARGV[1] then return 0 end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"#
    ))
});

/// ARGV: expected version, id. Returns 1 when deleted, 0 when missing, or the current value on
/// a version conflict.
pub(crate) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{PRELUDE}
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local v, s, d = header(cur)
if v ~= ARGV[1] then return cur end
redis.call('DEL', KEYS[1])
if d and d ~= '-' then redis.call('ZREM', KEYS[2], d) end
if s and STATES[s] then redis.call('ZREM', KEYS[STATES[s]], ARGV[2]) end
return 1
"#
    ))
});

/// KEYS: the flow's key. ARGV: value, time to live in milliseconds. Returns nil when this call
/// claimed the flow, or the live claim's value (keys do not expire while a script runs).
pub(crate) static CLAIM_FLOW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
"#,
    )
});
