//! The Lua scripts that make each write atomic with its index entries.
//!
//! A stored value starts with a header line `version \t state \t due-member \t holder-hex \n`
//! that the scripts read to compare versions and lease holders and to find the index entries
//! to remove; the record (JSON, with the tokens) follows. Redis parses it only for a value
//! written before the header named the holder (three fields), to find the holder there. `redis::Script` sends
//! `EVALSHA` and reloads the script on `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
//!
//! KEYS for every script: record, due, the five state sets in `StateKind::ALL` order, then the
//! shard's event stream and its retention mark. Every successful write appends its lifecycle
//! event to the stream in the same script (the outbox: no write without its event), *before*
//! it writes anything else: Redis does not roll a script back, so an `XADD` that fails (the key
//! holding another type) must fail the script while nothing is written yet. The last two ARGV
//! of every write are the retention bounds (events per stream, age in milliseconds).

use std::sync::LazyLock;

use redis::Script;

const PRELUDE: &str = r#"
local STATES = {active = 3, refreshing = 4, backoff = 5, reauthorization_required = 6, revoked = 7}
-- version, state, due member, then the tab before the holder ('' in a value written before
-- the header named it) and the holder in hex.
local function header(value)
  return string.match(value, '^(%d+)\t([%w_]+)\t([^\t\n]*)(\t?)(%x*)\n')
end
-- The lease holder of a value whose header does not name it: decoded from the record.
local function holder_in_record(value)
  local nl = string.find(value, '\n', 1, true)
  local ok, rec = pcall(cjson.decode, string.sub(value, nl + 1))
  local st = ok and type(rec) == 'table' and type(rec.record) == 'table' and rec.record.state
  local holder = type(st) == 'table' and type(st.Refreshing) == 'table'
    and type(st.Refreshing.lease) == 'table' and st.Refreshing.lease.holder
  if type(holder) ~= 'string' then return nil end
  return (string.gsub(holder, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
-- Appends an event to KEYS[8] and trims at most two of the oldest entries retention no longer
-- keeps (never the new one), recording the newest trimmed id in KEYS[9].
local function append_event(id, consumer, version, body, max_events, max_age_ms)
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local new = redis.call('XADD', KEYS[8], '*', 'id', id, 'consumer', consumer,
    'version', version, 'at', now_ms, 'body', body)
  local len = redis.call('XLEN', KEYS[8])
  local oldest = redis.call('XRANGE', KEYS[8], '-', '+', 'COUNT', 2)
  for i, entry in ipairs(oldest) do
    if entry[1] == new then break end
    local ms = tonumber(string.match(entry[1], '^(%d+)'))
    if len - (i - 1) > tonumber(max_events) or ms < now_ms - tonumber(max_age_ms) then
      redis.call('XDEL', KEYS[8], entry[1])
      redis.call('SET', KEYS[9], entry[1])
    else
      break
    end
  end
end
"#;

/// ARGV: value, state, due member, id, consumer, version, event body, retention (2). Returns
/// 1 when created, 0 when the id exists.
pub(crate) static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{PRELUDE}
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
append_event(ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] ~= '-' then redis.call('ZADD', KEYS[2], 0, ARGV[3]) end
redis.call('ZADD', KEYS[STATES[ARGV[2]]], 0, ARGV[4])
return 1
"#
    ))
});

/// ARGV: expected version, value, state, due member, id, the lease holder the value was
/// written under (hex, empty for none), consumer, version, event body, retention (2). Returns 1 when swapped, 0 when missing, or the current
/// value on a conflict: another version, an unreadable header, or this version under another
/// lease (versions can repeat after a store lost an acknowledged write; lease holders cannot).
pub(crate) static CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{PRELUDE}
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local v, s, d, tab, h = header(cur)
if v ~= ARGV[1] then return cur end
if ARGV[6] ~= '' then
  if tab == '' then h = holder_in_record(cur) end
  if h ~= ARGV[6] then return cur end
end
append_event(ARGV[5], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11])
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

/// ARGV: expected version, id, consumer, the event's version (expected + 1), retention (2).
/// Returns 1 when deleted, 0 when missing, or the current value on a version conflict. The
/// event's body names the deleted state and the record's creation time, copied as digits
/// (`tokenkeeper_core::backend::delete_event_payload`'s JSON; Lua numbers would round nanoseconds).
pub(crate) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{PRELUDE}
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local v, s, d = header(cur)
if v ~= ARGV[1] then return cur end
local created = string.match(cur, '"created_at":(%-?%d+)')
local body = '{{"deleted":"' .. s .. '"'
if created then body = body .. ',"created":' .. created end
append_event(ARGV[2], ARGV[3], ARGV[4], body .. '}}', ARGV[5], ARGV[6])
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
