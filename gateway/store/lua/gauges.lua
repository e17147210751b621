-- gauges: add up the state of a page of numbers for the Redis gauges (queue depth, numbers,
-- capacity, backlog ETA, in-flight sends), so the process publishing them handles a few sums per
-- page rather than a record and six list lengths per number.
-- KEYS: the prefixes of the shards of the page's numbers (one call per page, like push).
-- ARGV: headroom, per_number ('1' = also return each number's depth and rate), tiers
--       (comma-separated, in the order the sums use), then groups: key index (into KEYS), n,
--       n x phone_number_id.
-- Returns {numbers by status and tier (statuses pending, active, disconnected, deleted; tiers
--          in order), depth by tier and lane (lanes high, normal, low), capacity by tier,
--          longest ETA by tier (seconds, as text), in-flight sends,
--          then with per_number: pn, depth, rate in force (0 = unlimited) per number}.
local headroom = tonumber(ARGV[1])
local per_number = ARGV[2] == '1'
local tiers, tier_index = {}, {}
for name in string.gmatch(ARGV[3], '[^,]+') do
  tiers[#tiers + 1] = name
  tier_index[name] = #tiers
end
local statuses = {pending = 1, active = 2, disconnected = 3, deleted = 4}
local n_tiers = #tiers

local counts, depth, capacity, eta = {}, {}, {}, {}
for i = 1, 4 * n_tiers do counts[i] = 0 end
for i = 1, 3 * n_tiers do depth[i] = 0 end
for i = 1, n_tiers do capacity[i] = 0; eta[i] = 0 end
local inflight = 0
local rows = {}
-- a number's depth per list (ALL_LISTS order), written in full for each number
local counted = {}

local g = 4
while g <= #ARGV do
  -- the prelude's key functions all read P: point it at this group's shard
  P = KEYS[tonumber(ARGV[g])]
  local n = tonumber(ARGV[g + 1])
  for i = g + 2, g + 1 + n do
    local pn = ARGV[i]
    local c = redis.call('HMGET', key_cfg(pn), 'status', 'throughput_tier', 'inflight', 'rate',
                         'ls', unpack(DEPTH_FIELDS))
    local status = statuses[c[1] or 'active'] or 2
    local tier = tier_index[c[2] or 'standard'] or 1
    counts[(status - 1) * n_tiers + tier] = counts[(status - 1) * n_tiers + tier] + 1
    if c[3] then inflight = inflight + math.max(tonumber(c[3]), 0) end
    -- (a lane's depth: its plain and marketing lists, read only when the number has queued to
    -- them, lib.lua LIST_LETTER; absent fields are not parsed, a `tonumber` being a strtod)
    for j, list in ipairs(ALL_LISTS) do
      local queued = 0
      if not c[5] or uses_list(c[5], LIST_LETTER[list]) then
        queued = redis.call('LLEN', key_lane(pn, list))
      end
      -- plus parked messages (DEPTH_FIELDS p_*), minus dead entries (d_*)
      local dead, parked = c[5 + j], c[11 + j]
      if dead then queued = queued - tonumber(dead) end
      if parked then queued = queued + tonumber(parked) end
      counted[j] = queued
    end
    local waiting = 0
    for lane_i = 1, 3 do
      -- (ALL_LISTS has each lane's plain list, then its marketing one)
      local queued = counted[lane_i * 2 - 1] + counted[lane_i * 2]
      if queued < 0 then queued = 0 end
      local slot = (tier - 1) * 3 + lane_i
      depth[slot] = depth[slot] + queued
      waiting = waiting + queued
    end
    local rate = tonumber(c[4] or '0')
    local limit = 0
    if rate > 0 then limit = math.max(1, math.floor(rate * (1 - headroom) + 1e-9)) end
    if status == 2 and limit > 0 then
      capacity[tier] = capacity[tier] + limit
      if waiting / limit > eta[tier] then eta[tier] = waiting / limit end
    end
    if per_number then
      rows[#rows + 1] = pn
      rows[#rows + 1] = waiting
      rows[#rows + 1] = limit
    end
  end
  g = g + 2 + n
end

local out = {}
for _, v in ipairs(counts) do out[#out + 1] = v end
for _, v in ipairs(depth) do out[#out + 1] = v end
for _, v in ipairs(capacity) do out[#out + 1] = v end
for _, v in ipairs(eta) do out[#out + 1] = string.format('%.3f', v) end
out[#out + 1] = inflight
for _, v in ipairs(rows) do out[#out + 1] = v end
return out
