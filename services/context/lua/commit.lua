-- Commit: one change to a context session, all or nothing. Deletes blocks, adds new ones (an id the
-- session ever held is skipped, never added twice: `seen`), replaces held ones; keeps the counters
-- (version, tokens, blocks, blocks per type) in the session's meta hash; refreshes the TTL.
--
-- KEYS[1] meta (hash)  KEYS[2] blocks (hash id -> msgpack)  KEYS[3] order (zset id -> position)
-- KEYS[4] seen (set of every id ever added)  KEYS[5] all sessions (zset id -> updated ms)
-- ARGV[1] JSON spec: {session_id, expected ("" = any), now, ttl_ms, cap (0 = none), max_blocks, max_bytes,
--                     delete: [id], put: [{mode: "add"|"set", id, tokens, type}], types: [type]}
-- Returns {status, ...}: ok -> version, tokens, blocks, added ids, skipped ids, capacity, blocks
-- per type (in `types` order); conflict -> current version; too_large -> version, tokens;
-- too_many -> version, blocks; too_big -> version, bytes (stored blocks); missing.
-- ARGV[2..] the msgpack of each `put`, in order
local function fmt(n) return string.format('%.0f', n + 0.0) end
local spec = cjson.decode(ARGV[1])

if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local m = redis.call('HMGET', KEYS[1], 'version', 'tokens', 'blocks', 'next_pos', 'max_tokens', 'bytes')
local version, tokens, count, pos = tonumber(m[1]), tonumber(m[2]), tonumber(m[3]), tonumber(m[4])
local bytes = tonumber(m[6]) or 0
if spec.expected ~= '' and tonumber(spec.expected) ~= version then return {'conflict', fmt(version)} end

local per_type, deletes, adds, sets, skipped, added = {}, {}, {}, {}, {}, {}
local function shift(kind, by) per_type[kind] = (per_type[kind] or 0) + by end

for _, id in ipairs(spec.delete) do
  local raw = redis.call('HGET', KEYS[2], id)
  if raw then
    local old = cmsgpack.unpack(raw)
    tokens, count, bytes = tokens - old.token_count, count - 1, bytes - #raw
    shift(old.type, -1)
    table.insert(deletes, id)
  end
end
for n, put in ipairs(spec.put) do
  if put.mode == 'add' then
    if redis.call('SISMEMBER', KEYS[4], put.id) == 1 then
      table.insert(skipped, put.id)
    else
      tokens, count, bytes = tokens + put.tokens, count + 1, bytes + #ARGV[n + 1]
      shift(put.type, 1)
      table.insert(adds, {put.id, ARGV[n + 1]})
    end
  else
    local raw = redis.call('HGET', KEYS[2], put.id)
    if raw then
      local old = cmsgpack.unpack(raw)
      tokens, bytes = tokens - old.token_count + put.tokens, bytes - #raw + #ARGV[n + 1]
      shift(old.type, -1)
      shift(put.type, 1)
      table.insert(sets, {put.id, ARGV[n + 1]})
    end
  end
end

if #adds > 0 then
  if spec.cap > 0 and tokens > tonumber(m[5]) then return {'too_large', fmt(version), fmt(tokens)} end
  if count > spec.max_blocks then return {'too_many', fmt(version), fmt(count)} end
end
if #adds + #sets > 0 and bytes > spec.max_bytes then return {'too_big', fmt(version), fmt(bytes)} end
if #deletes + #adds + #sets > 0 then
  for _, id in ipairs(deletes) do
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
  end
  for _, block in ipairs(adds) do
    redis.call('HSET', KEYS[2], block[1], block[2])
    redis.call('ZADD', KEYS[3], fmt(pos), block[1])
    redis.call('SADD', KEYS[4], block[1])
    pos = pos + 1
    table.insert(added, block[1])
  end
  for _, block in ipairs(sets) do redis.call('HSET', KEYS[2], block[1], block[2]) end
  version = version + 1
  redis.call('HSET', KEYS[1], 'version', fmt(version), 'tokens', fmt(tokens), 'blocks', fmt(count),
             'next_pos', fmt(pos), 'updated_ms', fmt(spec.now), 'bytes', fmt(bytes))
  for kind, by in pairs(per_type) do redis.call('HINCRBY', KEYS[1], 'n:' .. kind, by) end
  redis.call('ZADD', KEYS[5], fmt(spec.now), spec.session_id)
end
for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], spec.ttl_ms) end
local per_kind = {}
for _, kind in ipairs(spec.types) do table.insert(per_kind, redis.call('HGET', KEYS[1], 'n:' .. kind) or '0') end
return {'ok', fmt(version), fmt(tokens), fmt(count), added, skipped, m[5], per_kind}
