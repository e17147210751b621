-- callback_done: what became of leased status callback events (`gateway.callbacks`), of several
-- shards in one call (the sender batches the outcomes of many events: a call per event cost
-- more than the callback itself).
-- KEYS: the prefixes of the shards the outcomes belong to.
-- ARGV: groups: key index (into KEYS), n, then n x (kind, event id, delay_ms): kind 'ok'
-- (delivered) or 'drop' (given up): the event is done and its message's next event, if any,
-- goes on the outbox now; 'retry': one more attempt counted, due again in delay_ms; 'defer':
-- due again in delay_ms, no attempt counted (its receiver had no room).
-- An outcome for an event that is already done (a late answer after its lease ran out and
-- another worker finished it) changes nothing. Returns how many outcomes applied.
local now = now_ms()
local applied = 0

local function finish(outbox, eid)
  local ek = key_cbevent(eid)
  local id = string.match(eid, '^(.*)%.[0-9]+$')
  redis.call('DEL', ek)
  if redis.call('ZREM', outbox, eid) == 0 or not id then return false end
  local k = key_msg(id)
  local exists = redis.call('EXISTS', k) == 1
  local head = redis.call('HGET', k, 'eh')
  if exists and head ~= eid then return true end
  -- this message's next event (skipping any that outlived the status retention)
  local q = key_cbqueue(id)
  local nxt = redis.call('LPOP', q)
  while nxt and redis.call('EXISTS', key_cbevent(nxt)) == 0 do nxt = redis.call('LPOP', q) end
  if nxt then
    if exists then redis.call('HSET', k, 'eh', nxt) end
    redis.call('ZADD', outbox, now, nxt)
    redis.call('LPUSH', key_cbwake(), '1')
    redis.call('LTRIM', key_cbwake(), 0, 0)
  elseif exists then
    redis.call('HDEL', k, 'eh')
  end
  return true
end

local g = 1
while g <= #ARGV do
  -- the prelude's key functions all read P: point it at this group's shard
  P = KEYS[tonumber(ARGV[g])]
  local outbox = key_outbox()
  local n = tonumber(ARGV[g + 1])
  for i = g + 2, g + 1 + n * 3, 3 do
    local kind, eid, delay = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    if kind == 'ok' or kind == 'drop' then
      if finish(outbox, eid) then applied = applied + 1 end
    elseif redis.call('ZSCORE', outbox, eid) then
      if kind == 'retry' then redis.call('HINCRBY', key_cbevent(eid), 'n', 1) end
      redis.call('ZADD', outbox, now + delay, eid)
      applied = applied + 1
    end
  end
  g = g + 2 + n * 3
end
return applied
