-- push: accept messages in one atomic step.
-- KEYS: the prefixes of the shards the messages go to (see gateway.accept.service for why one
--       call may cover several shards).
-- ARGV: max_backlog, idem_scope, idem_ttl_s,
--       then groups: key index (into KEYS), pn, count,
--                    count x (id, list, category, payload, reference, ttl_s, idem_key, digest,
--                             callback_url or '')
-- A message with an idem_key is one of an idempotent send: its record `idem:<scope>:<key>`
-- ('<digest> <id>') is read and written here, in the same step as the push, so a retry finds
-- the first attempt's message whenever that attempt landed, even after its answer was lost.
-- Returns per group, flattened: code ('ok', 'unknown' or 'deleted'), accepted (how many new
-- messages were queued: the first ones in order, fewer than asked when the backlog is full),
-- tier, n_seen, then n_seen x (position in the group from 0, 'replay' | 'conflict', first id
-- or ''): messages whose key was already used, which take no room and are not counted.
local now = now_ms()
local max_backlog = tonumber(ARGV[1])
local scope = ARGV[2]
local idem_ttl = tonumber(ARGV[3])

local out = {}
local i = 4
while i <= #ARGV do
  -- the prelude's key functions all read P: point it at this group's shard
  P = KEYS[tonumber(ARGV[i])]
  local pn = ARGV[i + 1]
  local count = tonumber(ARGV[i + 2])
  i = i + 3
  local number = redis.call('HMGET', key_cfg(pn), 'status', 'throughput_tier', 'quality_rating',
                            'nx', 'd_h', 'd_hm', 'd_n', 'd_nm', 'd_l', 'd_lm')
  local status = number[1]
  local code, room = 'ok', 0
  if not status then
    code = 'unknown'
  elseif status == 'deleted' then
    code = 'deleted'
  else
    room = max_backlog - depth_of(pn, {number[5], number[6], number[7], number[8],
                                       number[9], number[10]})
  end
  local accepted = 0
  local seen = {}
  local by_list = {}
  local sendable = false
  for j = 0, count - 1 do
    local b = i + j * 9
    local idem, prev = nil, nil
    if ARGV[b + 6] ~= '' then
      idem = key_idem(scope, ARGV[b + 6])
      prev = redis.call('GET', idem)
    end
    if prev then
      local sep = string.find(prev, ' ', 1, true)
      seen[#seen + 1] = j
      if string.sub(prev, 1, sep - 1) == ARGV[b + 7] then
        seen[#seen + 1] = 'replay'; seen[#seen + 1] = string.sub(prev, sep + 1)
      else
        seen[#seen + 1] = 'conflict'; seen[#seen + 1] = ''
      end
    elseif code == 'ok' and accepted < room then
      accepted = accepted + 1
      local id, list = ARGV[b], ARGV[b + 1]
      local fields = {'pn', pn, 's', 'queued', 'c', ARGV[b + 2], 'l', string.sub(list, 1, 1),
                      'p', ARGV[b + 3], 'ca', now}
      if ARGV[b + 4] ~= '' then fields[#fields + 1] = 'r'; fields[#fields + 1] = ARGV[b + 4] end
      if ARGV[b + 8] ~= '' then fields[#fields + 1] = 'cb'; fields[#fields + 1] = ARGV[b + 8] end
      if ARGV[b + 5] ~= '' then
        fields[#fields + 1] = 'x'; fields[#fields + 1] = now + tonumber(ARGV[b + 5]) * 1000
      end
      redis.call('HSET', key_msg(id), unpack(fields))
      local ids = by_list[list]
      if not ids then ids = {}; by_list[list] = ids end
      ids[#ids + 1] = id
      if string.len(list) == 1 or number[3] ~= 'red' then sendable = true end
      if idem then redis.call('SET', idem, ARGV[b + 7] .. ' ' .. id, 'EX', idem_ttl) end
    end
  end
  for list, ids in pairs(by_list) do
    redis.call('RPUSH', key_lane(pn, list), unpack(ids))
  end
  if sendable and status == 'active' then
    schedule(pn, math.max(now, tonumber(number[4] or '0')))
  end
  out[#out + 1] = code; out[#out + 1] = accepted; out[#out + 1] = number[2] or ''
  out[#out + 1] = #seen / 3
  for _, value in ipairs(seen) do out[#out + 1] = value end
  i = i + count * 9
end
return out
