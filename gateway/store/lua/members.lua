-- members: the heartbeat of drain workers (kept in shard 0's slot, using the server's clock).
-- ARGV: worker_id, ttl_ms, 'beat' | 'leave'. Returns the ids of the workers alive (after a
-- 'leave', without the caller).
local members = key_members()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == 'leave' then
  redis.call('ZREM', members, ARGV[1])
else
  redis.call('ZADD', members, now + tonumber(ARGV[2]), ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', members, '-inf', now)
return redis.call('ZRANGE', members, 0, -1)
