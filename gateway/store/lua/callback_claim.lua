-- callback_claim: lease the due status callback events of several shards (`gateway.callbacks`).
-- KEYS: the prefixes of the shards this worker owns.
-- ARGV: budget (most events to lease in all), lease_ms.
-- An event is leased by moving its due time to now + lease_ms: if this worker dies before it
-- reports the outcome (`callback_done`), the event is due again then, for any worker.
-- Returns: server now (ms), the soonest due time left over these shards (ms, -1: none), then
-- per event 11 values: key index, event id, status, t, url, pn, to, client_reference,
-- upstream id, error JSON, attempts so far ('' for an absent field). An event whose hash is
-- gone (it outlived the status retention) comes back with status '' to be dropped.
local now = now_ms()
local budget = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local out = {now, -1}
local soonest = -1
for k = 1, #KEYS do
  -- the prelude's key functions all read P: point it at this shard
  P = KEYS[k]
  local outbox = key_outbox()
  if budget > 0 then
    local due = redis.call('ZRANGEBYSCORE', outbox, '-inf', now, 'LIMIT', 0, budget)
    for _, eid in ipairs(due) do
      local f = redis.call('HMGET', key_cbevent(eid), 's', 't', 'u', 'pn', 'to', 'r', 'w', 'e', 'n')
      redis.call('ZADD', outbox, now + lease, eid)
      out[#out + 1] = k; out[#out + 1] = eid
      for j = 1, 9 do out[#out + 1] = f[j] or '' end
      budget = budget - 1
    end
  end
  local first = redis.call('ZRANGE', outbox, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = tonumber(first[2])
    if soonest < 0 or at < soonest then soonest = at end
  end
end
out[2] = soonest
return out
