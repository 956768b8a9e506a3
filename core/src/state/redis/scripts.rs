//! The server-side Lua scripts of the Redis backend: one script per state operation, so each
//! operation is one round trip and atomic across every gateway sharing the server.
//!
//! Every script that writes also keeps the namespace's key index (a sorted set, for
//! `scan_prefix` and export), the set of namespaces, and publishes the written key on the
//! invalidation channel, so other instances drop it from their local read cache. The key
//! layout (see [`super::Keys`]):
//!
//! - `KEYS[1]` the data key `<prefix>kv|<ns>|<key>`;
//! - `KEYS[2]` the index `<prefix>ix|<ns>` (members: the keys, all score 0, so lexical order);
//! - `KEYS[3]` the namespace set `<prefix>ns`;
//!
//! and the last three `ARGV`s are the plain key, the namespace and the invalidation channel
//! (the payload is `<ns>|<key>`). Numbers cross as decimal strings: Lua numbers are doubles,
//! exact for integers up to 2^53 (micro-USD up to $9 billion; limiter times relative to the
//! caller's clock up to 104 days in nanoseconds).

use std::sync::LazyLock;

use redis::Script;

/// The common tail of every writing script: index the key, record the namespace, publish.
/// Expects `local key, ns, chan = ARGV[n-2], ARGV[n-1], ARGV[n]`.
macro_rules! tail {
    () => {
        r#"
-- Limiter and ledger keys are never read through the local cache: they skip the publish.
local function indexed()
  redis.call('ZADD', KEYS[2], 0, key)
  redis.call('SADD', KEYS[3], ns)
end
local function touched()
  indexed()
  redis.call('PUBLISH', chan, ns .. '|' .. key)
end
local function removed()
  redis.call('ZREM', KEYS[2], key)
  redis.call('PUBLISH', chan, ns .. '|' .. key)
end
"#
    };
}

macro_rules! args3 {
    () => {
        "local key, ns, chan = ARGV[#ARGV - 2], ARGV[#ARGV - 1], ARGV[#ARGV]\n"
    };
}

/// `ARGV`: value, ttl_ms (0 = none), then key, ns, channel.
pub(super) static SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        r#"
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
touched()
return 1
"#
    ))
});

/// `ARGV`: delta, ttl_ms (0 = none; applied only when the counter is created), then key, ns,
/// channel. Returns the new value, or an error `NOTINT` / `OVERFLOW`.
pub(super) static INCR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        r#"
local existed = redis.call('EXISTS', KEYS[1])
local n = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(n) == 'table' and n.err then
  if string.find(n.err, 'overflow') then
    return redis.error_reply('OVERFLOW')
  end
  return redis.error_reply('NOTINT')
end
local ttl = tonumber(ARGV[2])
if existed == 0 and ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
touched()
return n
"#
    ))
});

/// `ARGV`: expect_present ("1"/"0"), expected, new_present ("1"/"0"), new, ttl_ms, then key,
/// ns, channel. Returns 1 when it swapped.
pub(super) static CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        r#"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
if ARGV[3] == '1' then
  local ttl = tonumber(ARGV[5])
  if ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[4], 'PX', ttl)
  else
    redis.call('SET', KEYS[1], ARGV[4])
  end
  touched()
elseif cur then
  redis.call('DEL', KEYS[1])
  removed()
end
return 1
"#
    ))
});

/// `ARGV`: key, ns, channel. Returns 1 when a live value was deleted.
pub(super) static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        r#"
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], key)
if n > 0 then
  redis.call('PUBLISH', chan, ns .. '|' .. key)
end
return n
"#
    ))
});

/// A page of live entries from the index. `KEYS[1]`: the index; `ARGV`: min and max (lexical
/// range syntax), limit, data-key prefix. Returns a flat list `key, value, expires_ms`
/// (`-1` = never) of at most `limit` live entries, in key order, and drops index members
/// whose value has expired.
pub(super) static RANGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out, dead = {}, {}
local min, max = ARGV[1], ARGV[2]
local limit = tonumber(ARGV[3])
local found = 0
local batch = 256
while found < limit do
  local members = redis.call('ZRANGEBYLEX', KEYS[1], min, max, 'LIMIT', 0, batch)
  if #members == 0 then break end
  for _, m in ipairs(members) do
    local dk = ARGV[4] .. m
    local v = redis.call('GET', dk)
    if v then
      out[#out + 1] = m
      out[#out + 1] = v
      out[#out + 1] = tostring(redis.call('PEXPIRETIME', dk))
      found = found + 1
      if found >= limit then break end
    else
      dead[#dead + 1] = m
    end
    min = '(' .. m
  end
  if #members < batch then break end
end
for _, m in ipairs(dead) do
  redis.call('ZREM', KEYS[1], m)
end
return out
"#,
    )
});

/// Shared by the limiter scripts: the stored TAT relative to the caller's clock, in ns.
macro_rules! gcra {
    () => {
        r#"
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[#ARGV - 3])
local function fmt(x) return string.format('%.0f', x) end
-- The stored TAT (ns since the epoch, decimal) minus now, in ns; nil when absent.
local function stored_rel()
  local s = redis.call('GET', KEYS[1])
  if not s then return nil end
  if not string.match(s, '^%d+$') then
    return redis.error_reply('NOTINT')
  end
  local len = #s
  if len <= 6 then
    return tonumber(s) - now_ms * 1e6
  end
  return (tonumber(string.sub(s, 1, len - 6)) - now_ms) * 1e6 + tonumber(string.sub(s, len - 5))
end
local function cost(units) return math.floor(units * window / limit) end
local function remaining(busy)
  local free = window - busy
  if free < 0 then free = 0 end
  return math.floor(free * limit / window)
end
local function ceil_ms(ns) return math.ceil(ns / 1e6) end
-- Stores now + rel as the TAT; it expires a window after the limiter is full again.
local function write(rel)
  local ms = math.floor(rel / 1e6)
  local sub = rel - ms * 1e6
  if sub < 0 or sub >= 1e6 then sub = 0 end
  local value = fmt(now_ms + ms) .. string.format('%06.0f', sub)
  local ttl = math.ceil((rel + window) / 1e6)
  if ttl < 1 then ttl = 1 end
  if ttl > 1e13 then ttl = 1e13 end
  redis.call('SET', KEYS[1], value, 'PX', fmt(ttl))
  indexed()
end
"#
    };
}

/// GCRA reserve. `ARGV`: limit, window_ns, amount, give_back, lease_permille, now_ms, then
/// key, ns, channel. `give_back` units an instance leased and did not use go back first; when
/// `amount` is admitted, up to `lease_permille`/1000 of the units still free are reserved on
/// top as a lease for the caller to admit locally. Returns `allowed (0/1), remaining,
/// retry_after_ms (-1 = the window), reset_after_ms, leased`.
pub(super) static LIMIT_RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        gcra!(),
        r#"
local amount = tonumber(ARGV[3])
local give_back = tonumber(ARGV[4])
local permille = tonumber(ARGV[5])
local rel = stored_rel()
if type(rel) == 'table' then return rel end
local busy = rel or 0
if busy < 0 then busy = 0 end
local returned = false
if give_back > 0 and busy > 0 then
  busy = busy - cost(give_back)
  if busy < 0 then busy = 0 end
  returned = true
end
if amount > limit then
  if returned then write(busy) end
  return {'0', fmt(remaining(busy)), '-1', fmt(ceil_ms(busy)), '0'}
end
local new_busy = busy + cost(amount)
if new_busy > window then
  if returned then write(busy) end
  return {'0', fmt(remaining(busy)), fmt(ceil_ms(new_busy - window)), fmt(ceil_ms(busy)), '0'}
end
local leased = 0
if amount > 0 and permille > 0 then
  leased = math.floor(remaining(new_busy) * permille / 1000)
  if leased > 0 then new_busy = new_busy + cost(leased) end
end
if amount > 0 or returned then write(new_busy) end
return {'1', fmt(remaining(new_busy)), '0', fmt(ceil_ms(new_busy)), fmt(leased)}
"#
    ))
});

/// GCRA settle. `ARGV`: limit, window_ns, reserved, used, now_ms, then key, ns, channel.
pub(super) static LIMIT_SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        gcra!(),
        r#"
local reserved, used = tonumber(ARGV[3]), tonumber(ARGV[4])
local rel = stored_rel()
if type(rel) == 'table' then return rel end
local new
if used > reserved then
  local base = rel or 0
  if base < 0 then base = 0 end
  new = base + cost(used - reserved)
else
  if rel == nil or rel <= 0 then return 0 end
  new = rel - cost(reserved - used)
  if new < 0 then new = 0 end
end
if new == rel then return 0 end
write(new)
return 1
"#
    ))
});

/// Shared by the ledger scripts: the account as `spent, reserved` (nil when absent).
macro_rules! ledger {
    () => {
        r#"
local function fmt(x) return string.format('%.0f', x) end
local function read()
  local s = redis.call('GET', KEYS[1])
  if not s then return nil end
  local a, b, c, extra = string.match(s, '^%s*(-?%d+)%s+(-?%d+)%s*(%-?%d*)%s*(.-)%s*$')
  if a == nil or extra ~= '' then
    return redis.error_reply('NOTINT')
  end
  return {tonumber(a), tonumber(b)}
end
-- Stores the account; a new one gets `ttl_ms` (0 = none), an existing one keeps its TTL.
local function store(acct, existed, ttl)
  local v = fmt(acct[1]) .. ' ' .. fmt(acct[2])
  if existed then
    redis.call('SET', KEYS[1], v, 'KEEPTTL')
  elseif ttl > 0 then
    redis.call('SET', KEYS[1], v, 'PX', ttl)
  else
    redis.call('SET', KEYS[1], v)
  end
  indexed()
end
local function reply(ok, acct) return {ok, fmt(acct[1]), fmt(acct[2])} end
"#
    };
}

/// Ledger reserve. `ARGV`: limit, amount, ttl_ms, then key, ns, channel. Returns
/// `admitted (0/1), spent, reserved`.
pub(super) static LEDGER_RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        ledger!(),
        r#"
local acct = read()
if acct and acct.err then return acct end
local existed = acct ~= nil
acct = acct or {0, 0}
local limit, amount, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if amount < 0 then amount = 0 end
if acct[1] + acct[2] + amount > limit then
  return reply('0', acct)
end
acct[2] = acct[2] + amount
if amount > 0 then store(acct, existed, ttl) end
return reply('1', acct)
"#
    ))
});

/// Ledger settle. `ARGV`: reserved, cost, ttl_ms, then key, ns, channel. Returns
/// `1, spent, reserved`.
pub(super) static LEDGER_SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        ledger!(),
        r#"
local acct = read()
if acct and acct.err then return acct end
local existed = acct ~= nil
acct = acct or {0, 0}
local before1, before2 = acct[1], acct[2]
local reserved, cost, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if reserved < 0 then reserved = 0 end
if cost < 0 then cost = 0 end
acct[2] = acct[2] - reserved
if acct[2] < 0 then acct[2] = 0 end
acct[1] = acct[1] + cost
local changed = acct[1] ~= before1 or acct[2] ~= before2
if (existed and changed) or (not existed and (acct[1] ~= 0 or acct[2] ~= 0)) then
  store(acct, existed, ttl)
end
return reply('1', acct)
"#
    ))
});

/// Ledger release. `ARGV`: reserved, then key, ns, channel. Returns `1, spent, reserved`.
pub(super) static LEDGER_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        ledger!(),
        r#"
local acct = read()
if acct and acct.err then return acct end
if acct == nil then return reply('1', {0, 0}) end
local amount = tonumber(ARGV[1])
if amount < 0 then amount = 0 end
local r = acct[2] - amount
if r < 0 then r = 0 end
if r ~= acct[2] then
  acct[2] = r
  store(acct, true, 0)
end
return reply('1', acct)
"#
    ))
});

/// Ledger balance, read on the server (never from the local cache). `ARGV`: (unused tail).
pub(super) static LEDGER_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        ledger!(),
        r#"
local acct = read()
if acct and acct.err then return acct end
return reply('1', acct or {0, 0})
"#
    ))
});

/// Stores an exported entry with an absolute expiry. `ARGV`: value, expires_ms (0 = never),
/// overwrite ("1"/"0"), then key, ns, channel. Returns 1 when stored.
pub(super) static PUT_ENTRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        args3!(),
        tail!(),
        r#"
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local at = tonumber(ARGV[2])
if at > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
touched()
return 1
"#
    ))
});
