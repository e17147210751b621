-- number_put: create, replace or change a phone number, and apply what the change means for
-- its drain (held, released, removed) in the same atomic step.
-- ARGV: pn, mode ('put' = create or replace, 'patch' = change, fails when absent,
--       'upsert' = change or create), tier_rates ('standard=80,medium=200,...', 0 = unlimited),
--       coexistence_cap, n_set, n_set x (field, value), n_del, n_del x field,
--       then for 'put' the record fields a replace clears.
-- Returns {'created'|'updated'|'not_found', previous status or ''}.
local pn = ARGV[1]
local mode = ARGV[2]
local cfg = key_cfg(pn)
local now = now_ms()
local before = redis.call('HMGET', cfg, 'status', 'quality_rating')
local existed = before[1] ~= false
if mode == 'patch' and not existed then return {'not_found', ''} end

local n_set = tonumber(ARGV[5])
local pos = 6
local sets = {}
for j = 0, n_set - 1 do
  sets[#sets + 1] = ARGV[pos + j * 2]
  sets[#sets + 1] = ARGV[pos + j * 2 + 1]
end
pos = pos + n_set * 2
local n_del = tonumber(ARGV[pos])
pos = pos + 1
local dels = {}
for j = 0, n_del - 1 do dels[#dels + 1] = ARGV[pos + j] end
pos = pos + n_del
if mode == 'put' then
  for j = pos, #ARGV do dels[#dels + 1] = ARGV[j] end
end

if #dels > 0 then redis.call('HDEL', cfg, unpack(dels)) end
if #sets > 0 then redis.call('HSET', cfg, unpack(sets)) end
-- (a new number has queued to no lane list yet: lib.lua, LIST_LETTER)
if not existed then redis.call('HSET', cfg, 'created_at', now, 'ls', '') end
redis.call('HSET', cfg, 'updated_at', now)

-- The rate before headroom (0 = unlimited): tier, capped for coexistence, capped by max_mps.
local tiers = {}
for name, rate in string.gmatch(ARGV[3], '(%w+)=(%d+)') do tiers[name] = tonumber(rate) end
local now_fields = redis.call('HMGET', cfg, 'status', 'quality_rating', 'throughput_tier',
                              'connection_type', 'max_mps')
local rate = tiers[now_fields[3]] or 0
local function cap(limit)
  if rate == 0 or limit < rate then rate = limit end
end
if now_fields[4] == 'coexistence' then cap(tonumber(ARGV[4])) end
if now_fields[5] then cap(tonumber(now_fields[5])) end
redis.call('HSET', cfg, 'rate', rate)

local status, quality = now_fields[1], now_fields[2]
if status == 'active' then
  if before[1] ~= 'active' or (before[2] == 'red' and quality ~= 'red') then
    redis.call('HDEL', cfg, 'nx')
    mark_ready(pn, now)
  end
else
  redis.call('ZREM', key_ready(), pn)
end
if existed then return {'updated', before[1]} end
return {'created', ''}
