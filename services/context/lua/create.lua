-- Create: a new, empty context session, unless one with this id exists; indexed for search.
--
-- KEYS[1] meta (hash)  KEYS[2] all sessions (zset)  KEYS[3] the agent's sessions (set)
-- KEYS[4] the user's sessions (set; only when the session has a user)
-- ARGV[1] session id  ARGV[2] now (ms)  ARGV[3] ttl (ms)  ARGV[4..] meta field, value, ...
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
for k = 3, #KEYS do redis.call('SADD', KEYS[k], ARGV[1]) end
return 1
