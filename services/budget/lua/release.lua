-- Release: free a call's hold on every bucket it was taken on. Idempotent: only a hold still
-- `held` is freed, so a repeated release, or the reaper racing an executor, frees it once.
-- The reaper passes state "expired", which frees only a hold whose expiry has come.
--
-- KEYS[1] the call's hold   KEYS[2] holds by expiry (zset)
-- ARGV[1] JSON spec: {call_id, state: "released"|"expired", now, keep}
local function fmt(n) return string.format('%.0f', n + 0.0) end  -- + 0.0 turns -0 into 0 ("-0" is no integer)
local spec = cjson.decode(ARGV[1])

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('ZREM', KEYS[2], spec.call_id)
  return {'unknown'}
end
local h = redis.call('HMGET', KEYS[1], 'amount', 'buckets', 'expires')
if state ~= 'held' then return {'dup', state, h[1]} end
if spec.state == 'expired' and tonumber(h[3]) > spec.now then return {'not_due', state, h[1]} end

local amount = tonumber(h[1])
for _, bucket in ipairs(cjson.decode(h[2])) do
  redis.call('HINCRBY', bucket.key, 'held', fmt(-amount))
end
redis.call('HSET', KEYS[1], 'state', spec.state, 'released_at', fmt(spec.now))
redis.call('EXPIRE', KEYS[1], spec.keep)
redis.call('ZREM', KEYS[2], spec.call_id)
return {'released', spec.state, fmt(amount)}
