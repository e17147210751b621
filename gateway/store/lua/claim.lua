-- claim: take or renew this worker's leases on some shards, or give them up. One call for all of
-- them: a pipeline of a call per shard cost the worker ~3 ms of CPU in one event-loop turn every
-- second, long enough to start sends late.
-- KEYS: the prefixes of the shards. ARGV: worker_id, ttl_ms, 'claim' | 'release'.
-- Returns, per shard in KEYS order, 1 when the worker holds it after the call, else 0.
local held = {}
for i = 1, #KEYS do
  P = KEYS[i]
  local k = key_owner()
  local holder = redis.call('GET', k)
  held[i] = 0
  if ARGV[3] == 'release' then
    if holder == ARGV[1] then redis.call('DEL', k) end
  elseif not holder or holder == ARGV[1] then
    redis.call('SET', k, ARGV[1], 'PX', tonumber(ARGV[2]))
    held[i] = 1
  end
end
return held
