-- purge: fail up to `chunk` queued (or scheduled) messages of a deleted number with
-- phone_number_deleted.
-- Called repeatedly until it returns 0, so Redis never blocks on a long queue.
-- ARGV: pn, chunk, retention_s, error_json. Returns {messages still queued, messages failed}.
local pn = ARGV[1]
local budget = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local now = now_ms()
local cfg = key_cfg(pn)
if redis.call('HGET', cfg, 'status') ~= 'deleted' then return {0, 0} end
local failed = 0

local function fail(id)
  local k = key_msg(id)
  local m = redis.call('HMGET', k, 's', 't')
  if m[1] == 'queued' or m[1] == 'scheduled' then
    redis.call('HSET', k, 's', 'failed', 'ua', now, 'e', ARGV[4])
    redis.call('EXPIRE', k, retention)
    emit_event(id, 'failed', now, retention)
    failed = failed + 1
    -- the messages parked behind it fail with it (release_pair, on a deleted number)
    release_pair(id, pn, m[2], now, retention)
  end
end

local retry = key_retry(pn)
local waiting = redis.call('ZRANGE', retry, 0, budget - 1)
for _, id in ipairs(waiting) do
  fail(id)
  redis.call('ZREM', retry, id)
end
budget = budget - #waiting
local sched = key_sched(pn)
if budget > 0 then
  local members = redis.call('ZRANGE', sched, 0, budget - 1)
  for _, member in ipairs(members) do fail(string.sub(member, SCHED_ID_AT)) end
  if #members > 0 then redis.call('ZREM', sched, unpack(members)) end
  budget = budget - #members
end
for _, list in ipairs(ALL_LISTS) do
  if budget <= 0 then break end
  local ids = redis.call('LPOP', key_lane(pn, list), budget)
  if ids then
    for _, id in ipairs(ids) do fail(id) end
    budget = budget - #ids
  end
end

local remaining = redis.call('ZCARD', retry) + redis.call('ZCARD', sched)
for _, list in ipairs(ALL_LISTS) do
  remaining = remaining + redis.call('LLEN', key_lane(pn, list))
end
if remaining == 0 then
  redis.call('HDEL', cfg, unpack(DEPTH_FIELDS))
end
return {remaining, failed}
