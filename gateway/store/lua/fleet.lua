-- fleet: the upstream cap (GATEWAY_UPSTREAM_MAX_MPS), one sliding window for the whole fleet.
-- KEYS[1]: the fleet prefix (`keys.fleet_prefix()`), never a shard's.
-- ARGV[1] = 'reserve': cap, window_ms, start_us, spacing_us, want, least, bound_ms,
--           max_lead_ms, burst_ms, member prefix, first serial
--   Reserves up to `want` send slots for one take, on the grid start + i * spacing, and none
--   unless at least `least` (or `want`, if fewer) can be had at once. The start is the one
--   asked for, or the first later one with room for `least` (never earlier than this server's
--   now, never more than max_lead_ms ahead of it).
--   Returns {granted, start_us, free_at_ms, now_ms}: free_at_ms is, when nothing was granted,
--   the first start with room (if nobody reserves meanwhile), more than max_lead_ms ahead;
--   -1 when granted.
-- ARGV[1] = 'settle': cap, member prefix, first serial, granted, then the stamps (ms) of the
--   sends the take made of the reservation, one each.
--   The first members now stand for those sends at their stamps; the others are given back.
--   Returns how many were given back.
--
-- The log (`up`) holds one member per slot reserved, scored by the latest stamp the send it
-- stands for can have: until the take's reply is settled, the slot plus `bound_ms` (take.lua
-- stamps no grant later than that after its slot), after it the stamp itself. A reserve counts
-- every member scored after start - window_ms, future ones included, and grants what keeps
-- that count within the cap. That is exact, not just close, because (gateway.drain.fleet has
-- the argument in full) every send's stamp is at or after its reserve's start, every send has
-- a member scored at or after its stamp until the window has passed it, and a send arrives
-- upstream within the rate slack after its stamp: so a sliding second at the upstream holds
-- the sends of one reserve and of earlier ones all counted by it, at most the cap.
--
-- The log alone would let the fleet send its whole cap at the start of a second and nothing
-- for the rest of it. So reserves are also paced (`pace`, a GCRA at the cap's rate): one slot
-- every 1000 / cap ms with a burst of `burst_ms`, so a backlog flows evenly. Only the log is
-- the limit; the pace is its smoothing, and slots given back give their pace back too.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = now_us / 1000
local sends, pace = key_upstream_sends(), key_upstream_pace()
-- Members scored this long before the window are removed: a margin over the window for the
-- clocks of the nodes that stamp the sends, which on a cluster are not this node's.
local TRIM_MARGIN_MS = 1000

local function ms(x) return string.format('%.3f', x) end

if ARGV[1] == 'settle' then
  local interval = 1000 / tonumber(ARGV[2])
  local prefix, serial, granted = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local used = #ARGV - 5
  -- Which member stands for which send does not matter, only that each send has one of its
  -- own scored at or after its stamp: a member's new score may be above its old one (the
  -- sends of a take split over cluster nodes leave gaps in the grid), never below the stamp.
  local scored = {}
  for i = 1, used do
    scored[#scored + 1] = ARGV[5 + i]
    scored[#scored + 1] = prefix .. (serial + i - 1)
  end
  for i = 1, #scored, 1000 do
    redis.call('ZADD', sends, unpack(scored, i, math.min(i + 999, #scored)))
  end
  local unused = {}
  for i = used, granted - 1 do unused[#unused + 1] = prefix .. (serial + i) end
  for i = 1, #unused, 1000 do
    redis.call('ZREM', sends, unpack(unused, i, math.min(i + 999, #unused)))
  end
  if #unused > 0 then
    local tat = tonumber(redis.call('GET', pace) or '0')
    if tat > now then redis.call('SET', pace, ms(tat - #unused * interval), 'KEEPTTL') end
  end
  return #unused
end

local cap = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local spacing_us = tonumber(ARGV[5])
local want = tonumber(ARGV[6])
local least = math.min(want, tonumber(ARGV[7]))
local bound = tonumber(ARGV[8])
local max_lead_us = tonumber(ARGV[9]) * 1000
local burst = tonumber(ARGV[10])
local prefix, serial = ARGV[11], tonumber(ARGV[12])
local interval = 1000 / cap

local start_us = math.max(tonumber(ARGV[4]), now_us)
if start_us > now_us + max_lead_us then start_us = now_us + max_lead_us end
if want <= 0 then return {0, string.format('%d', start_us), -1, ms(now)} end

-- No reserve from now on starts before now, so a member scored before now - window is never
-- counted again.
redis.call('ZREMRANGEBYSCORE', sends, '-inf', '(' .. ms(now - window - TRIM_MARGIN_MS))
local tat = tonumber(redis.call('GET', pace) or '0')

-- The members a reserve starting at `at` counts, and the slots the pace allows it.
local function room(at)
  local since = '(' .. ms(at - window)
  local count = redis.call('ZCOUNT', sends, since, '+inf')
  local paced = math.floor((at + burst - math.max(tat, at)) / interval) + 1
  return count, since, paced
end

-- Where the asked start has no room for `least`, the first start that has, within the lead:
-- first come, first served. (Granting only at the start asked for gave everything to the
-- worker whose takes looked furthest ahead: its start always saw the room first.)
local start = start_us / 1000
local count, since, paced = room(start)
if cap - count < least or paced < least then
  local at = start
  if cap - count < least then
    -- the k-th oldest member counted must be a window old
    local k = count - (cap - least)
    local oldest = redis.call('ZRANGEBYSCORE', sends, since, '+inf', 'WITHSCORES', 'LIMIT',
                              k - 1, 1)
    at = math.max(at, tonumber(oldest[2]) + window)
  end
  if paced < least then at = math.max(at, tat - burst + (least - 1) * interval) end
  local at_us = math.ceil(at * 1000)
  if at_us > now_us + max_lead_us then
    return {0, string.format('%d', start_us), ms(at_us / 1000), ms(now)}
  end
  start_us = at_us
  start = start_us / 1000
  count, since, paced = room(start)
end
local free = cap - count
if free < least or paced < least then
  -- (only a rounding at the very edge: asked again a microsecond later, it has room)
  return {0, string.format('%d', start_us), ms(start + 0.001), ms(now)}
end
local start_text = string.format('%d', start_us)

local granted = math.min(want, free, paced)
local added = {}
for i = 0, granted - 1 do
  added[#added + 1] = ms((start_us + i * spacing_us) / 1000 + bound)
  added[#added + 1] = prefix .. (serial + i)
end
for i = 1, #added, 1000 do
  redis.call('ZADD', sends, unpack(added, i, math.min(i + 999, #added)))
end
-- an idle fleet leaves nothing behind
local keep = math.ceil(window + TRIM_MARGIN_MS + bound + max_lead_us / 1000)
redis.call('PEXPIRE', sends, keep)
redis.call('SET', pace, ms(math.max(tat, start) + granted * interval), 'PX', keep)
return {granted, start_text, -1, ms(now)}
