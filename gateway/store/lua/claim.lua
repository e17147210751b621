-- claim: take, renew, ask for or give up this worker's leases on some shards. One call for all
-- of them: a pipeline of a call per shard cost the worker ~3 ms of CPU in one event-loop turn
-- every second, long enough to start sends late.
-- KEYS: the prefixes of the shards. ARGV: worker_id, ttl_ms, mode, successor_ttl_ms (how long
-- an ask stands unless made again; default ttl_ms). Modes:
--   'claim'   renew the shards held and take the free ones, except a free one another worker
--             asked for (its successor); a held shard that has a successor is handed to it
--             (the successor becomes the owner, with a fresh lease) instead of renewed;
--   'want'    as 'claim', and for a shard held by another, become its successor (unless one
--             is already named): its owner hands it over at its next renewal;
--   'release' give the shards up: to their successor when there is one, else free;
--   'unwant'  no longer be the successor of these shards (the worker has what it needs);
--   'peek'    change nothing.
-- Returns, per shard in KEYS order: for 'peek' the owner's id ('' for none), else 1 when the
-- worker holds the shard after the call, else 0.
-- A handover is a change of the owner key in one step: the old owner stops taking for the
-- shard when this call returns, the new one takes for it once it sees it holds it, and no
-- moment has two owners or none.
local me, ttl, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ask_ttl = tonumber(ARGV[4] or ARGV[2])
local out = {}
for i = 1, #KEYS do
  P = KEYS[i]
  local owner_key, successor_key = key_owner(), key_successor()
  local holder = redis.call('GET', owner_key)
  local successor = redis.call('GET', successor_key)
  out[i] = 0
  if mode == 'peek' then
    out[i] = holder or ''
  elseif mode == 'unwant' then
    if successor == me then redis.call('DEL', successor_key) end
    if holder == me then out[i] = 1 end
  elseif successor and successor ~= me and (holder == me or (not holder and mode == 'release')) then
    if holder == me then
      redis.call('SET', owner_key, successor, 'PX', ttl)
      redis.call('DEL', successor_key)
    end
  elseif mode == 'release' then
    if holder == me then redis.call('DEL', owner_key) end
  elseif not holder or holder == me then
    if not successor or successor == me then
      redis.call('SET', owner_key, me, 'PX', ttl)
      if successor then redis.call('DEL', successor_key) end
      out[i] = 1
    end
  elseif mode == 'want' and (not successor or successor == me) then
    redis.call('SET', successor_key, me, 'PX', ask_ttl)
  end
end
return out
