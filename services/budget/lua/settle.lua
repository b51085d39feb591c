-- Settle: replace a call's hold by its actual cost on every bucket it was taken on (the
-- window it was reserved in, even after midnight). Idempotent: a second settle changes nothing.
-- A hold already freed (expired or released) still records the cost, flagged as late; a cost
-- above the hold is recorded and counted as an overrun. Alerts fire once per threshold per
-- bucket (HSETNX), and a bucket key carries its window, so once per window.
--
-- KEYS[1] the call's hold   KEYS[2] holds by expiry (zset)
-- ARGV[1] JSON spec: {call_id, actual, tool, model, tokens, now, keep}
local function fmt(n) return string.format('%.0f', n + 0.0) end  -- + 0.0 turns -0 into 0 ("-0" is no integer)
local spec = cjson.decode(ARGV[1])

local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'unknown'} end
if state == 'settled' then
  local h = redis.call('HMGET', KEYS[1], 'amount', 'actual', 'overrun', 'late')
  return {'dup', h[1], h[2], h[3], h[4]}
end

local h = redis.call('HMGET', KEYS[1], 'amount', 'buckets', 'token_keys')
local amount, actual = tonumber(h[1]), tonumber(spec.actual)
local late = state ~= 'held'
local overrun = 0
if not late and actual > amount then overrun = actual - amount end
local fired = {}
for _, bucket in ipairs(cjson.decode(h[2])) do
  local key = bucket.key
  if not late then redis.call('HINCRBY', key, 'held', fmt(-amount)) end
  local spent = redis.call('HINCRBY', key, 'spent', fmt(actual))
  if actual > 0 then
    redis.call('HINCRBY', key, 'tool:' .. spec.tool, fmt(actual))
    if spec.model ~= '' then redis.call('HINCRBY', key, 'model:' .. spec.model, fmt(actual)) end
  end
  if overrun > 0 then redis.call('HINCRBY', key, 'overrun', fmt(overrun)) end
  if late and actual > 0 then redis.call('HINCRBY', key, 'late', fmt(actual)) end
  if bucket.keep > 0 then redis.call('EXPIRE', key, bucket.keep) end
  for _, alert in ipairs(bucket.alerts) do
    if spent >= tonumber(alert[2]) and redis.call('HSETNX', key, 'alert:' .. alert[1], '1') == 1 then
      table.insert(fired, bucket.name)
      table.insert(fired, alert[1])
    end
  end
end
if spec.tokens > 0 then
  local now_s = fmt(math.floor(spec.now / 1000))
  for _, key in ipairs(cjson.decode(h[3])) do
    redis.call('HINCRBY', key, now_s, fmt(spec.tokens))
    redis.call('EXPIRE', key, 120)
  end
end
local late_flag = late and '1' or '0'
redis.call('HSET', KEYS[1], 'state', 'settled', 'actual', fmt(actual), 'overrun', fmt(overrun),
  'late', late_flag, 'settled_at', fmt(spec.now))
redis.call('EXPIRE', KEYS[1], spec.keep)
redis.call('ZREM', KEYS[2], spec.call_id)
return {'settled', fmt(amount), fmt(actual), fmt(overrun), late_flag, unpack(fired)}
