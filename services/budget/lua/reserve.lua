-- Reserve: check every rate limit and every spend limit of a call, then hold its amount on all
-- of them, or on none. Idempotent by call id: a second reserve returns the first one's hold.
--
-- KEYS[1] epoch   KEYS[2] the call's hold   KEYS[3] holds by expiry (zset)
-- KEYS[3+i] spend counter of spec.buckets[i]   KEYS[3+#buckets+j] counter of spec.rates[j]
-- ARGV[1] JSON spec: {epoch, call_id, amount, now, expires, tool, max_tokens, keep,
--                     buckets: [{key, name, limit, keep, alerts: [[label, micros], ...]}],
--                     rates: [{scope, kind: "req"|"tok", limit}]}
-- Amounts travel as decimal strings and are formatted with %.0f: Lua 5.1 numbers are doubles,
-- exact for integers below 2^53 micro-USD (about 9 billion dollars).
local function fmt(n) return string.format('%.0f', n + 0.0) end  -- + 0.0 turns -0 into 0 ("-0" is no integer)
local spec = cjson.decode(ARGV[1])

if redis.call('GET', KEYS[1]) ~= spec.epoch then return {'epoch'} end
local state = redis.call('HGET', KEYS[2], 'state')
if state then
  local h = redis.call('HMGET', KEYS[2], 'amount', 'tool', 'expires', 'max_tokens')
  return {'exists', state, h[1], h[2], h[3], h[4]}
end

local nb = #spec.buckets
local now_s = math.floor(spec.now / 1000)

-- Rate limits: per-second counts over the last 60 seconds (a sliding window of one minute).
-- A request needs room for itself; tokens are counted when settled, so a call is let in while
-- the minute's tokens are under the limit.
for j, rate in ipairs(spec.rates) do
  local key = KEYS[3 + nb + j]
  local flat = redis.call('HGETALL', key)
  local used, seconds = 0, {}
  for i = 1, #flat, 2 do
    local sec, count = tonumber(flat[i]), tonumber(flat[i + 1])
    if sec <= now_s - 60 then
      redis.call('HDEL', key, flat[i])
    else
      used = used + count
      table.insert(seconds, {sec, count})
    end
  end
  if used + 1 > rate.limit then
    table.sort(seconds, function(a, b) return a[1] < b[1] end)
    local freed, retry_ms = 0, 60000
    for _, entry in ipairs(seconds) do
      freed = freed + entry[2]
      if used - freed + 1 <= rate.limit then
        retry_ms = (entry[1] + 60) * 1000 - spec.now
        break
      end
    end
    return {'rate', rate.scope, rate.kind, fmt(math.max(retry_ms, 1))}
  end
end

-- Spend limits: spent + held + this amount must fit under every limit.
local amount = tonumber(spec.amount)
for i, bucket in ipairs(spec.buckets) do
  local v = redis.call('HMGET', KEYS[3 + i], 'spent', 'held')
  local used = tonumber(v[1] or '0') + tonumber(v[2] or '0')
  local limit = tonumber(bucket.limit)
  if used + amount > limit then return {'budget', bucket.name, fmt(math.max(limit - used, 0))} end
end

-- All checks passed: hold on every bucket, count the request, remember the hold.
for i, bucket in ipairs(spec.buckets) do
  redis.call('HINCRBY', KEYS[3 + i], 'held', fmt(amount))
  if bucket.keep > 0 then redis.call('EXPIRE', KEYS[3 + i], bucket.keep) end
end
local token_keys = {}
for j, rate in ipairs(spec.rates) do
  local key = KEYS[3 + nb + j]
  if rate.kind == 'req' then
    redis.call('HINCRBY', key, fmt(now_s), 1)
    redis.call('EXPIRE', key, 120)
  else
    table.insert(token_keys, key)
  end
end
redis.call('HSET', KEYS[2], 'state', 'held', 'amount', fmt(amount), 'tool', spec.tool,
  'expires', fmt(spec.expires), 'max_tokens', fmt(spec.max_tokens), 'reserved_at', fmt(spec.now),
  'buckets', cjson.encode(spec.buckets), 'token_keys', cjson.encode(token_keys))
redis.call('EXPIRE', KEYS[2], spec.keep)
redis.call('ZADD', KEYS[3], fmt(spec.expires), spec.call_id)
return {'ok'}
