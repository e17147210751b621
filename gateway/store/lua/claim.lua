-- claim: take or renew this worker's lease on a shard, or give it up.
-- ARGV: worker_id, ttl_ms, 'claim' | 'release'. Returns 1 when the worker holds the shard.
local k = key_owner()
local holder = redis.call('GET', k)
if ARGV[3] == 'release' then
  if holder == ARGV[1] then redis.call('DEL', k) end
  return 0
end
if not holder or holder == ARGV[1] then
  redis.call('SET', k, ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
