-- push: accept messages in one atomic step.
-- KEYS: the prefixes of the shards the messages go to (see gateway.accept.service for why one
--       call may cover several shards).
-- ARGV: max_backlog, idem_scope, idem_key, body_hash, idem_ttl_s,
--       then groups: key index (into KEYS), pn, count,
--                    count x (id, list, category, payload, reference, ttl_s)
-- An empty idem_key means no idempotency. Returns, for an idempotent repeat,
-- {'replay', id} or {'conflict'}; otherwise per group {code, accepted, tier} flattened, where
-- code is 'ok', 'unknown' or 'deleted' and accepted may fall short of count when the backlog
-- limit was reached.
local now = now_ms()
local max_backlog = tonumber(ARGV[1])
local idem_key = ARGV[3]
local idem
if idem_key ~= '' then
  idem = key_idem(ARGV[2], idem_key)
  local prev = redis.call('GET', idem)
  if prev then
    local sep = string.find(prev, ' ', 1, true)
    if string.sub(prev, 1, sep - 1) == ARGV[4] then
      return {'replay', string.sub(prev, sep + 1)}
    end
    return {'conflict'}
  end
end

local out = {}
local i = 6
while i <= #ARGV do
  -- the prelude's key functions all read P: point it at this group's shard
  P = KEYS[tonumber(ARGV[i])]
  local pn = ARGV[i + 1]
  local count = tonumber(ARGV[i + 2])
  i = i + 3
  local number = redis.call('HMGET', key_cfg(pn), 'status', 'throughput_tier', 'quality_rating',
                            'nx', 'd_h', 'd_hm', 'd_n', 'd_nm', 'd_l', 'd_lm')
  local status = number[1]
  if not status then
    out[#out + 1] = 'unknown'; out[#out + 1] = 0; out[#out + 1] = ''
  elseif status == 'deleted' then
    out[#out + 1] = 'deleted'; out[#out + 1] = 0; out[#out + 1] = number[2]
  else
    local room = max_backlog - depth_of(pn, {number[5], number[6], number[7], number[8],
                                             number[9], number[10]})
    local accepted = count
    if room < accepted then accepted = math.max(room, 0) end
    local by_list = {}
    local sendable = false
    for j = 0, accepted - 1 do
      local b = i + j * 6
      local id, list = ARGV[b], ARGV[b + 1]
      local fields = {'pn', pn, 's', 'queued', 'c', ARGV[b + 2], 'l', string.sub(list, 1, 1),
                      'p', ARGV[b + 3], 'ca', now}
      if ARGV[b + 4] ~= '' then fields[#fields + 1] = 'r'; fields[#fields + 1] = ARGV[b + 4] end
      if ARGV[b + 5] ~= '' then
        fields[#fields + 1] = 'x'; fields[#fields + 1] = now + tonumber(ARGV[b + 5]) * 1000
      end
      redis.call('HSET', key_msg(id), unpack(fields))
      local ids = by_list[list]
      if not ids then ids = {}; by_list[list] = ids end
      ids[#ids + 1] = id
      if string.len(list) == 1 or number[3] ~= 'red' then sendable = true end
    end
    for list, ids in pairs(by_list) do
      redis.call('RPUSH', key_lane(pn, list), unpack(ids))
    end
    if sendable and status == 'active' then
      schedule(pn, math.max(now, tonumber(number[4] or '0')))
    end
    out[#out + 1] = 'ok'; out[#out + 1] = accepted; out[#out + 1] = number[2]
    if idem and accepted == 1 then
      redis.call('SET', idem, ARGV[4] .. ' ' .. ARGV[i], 'EX', tonumber(ARGV[5]))
    end
  end
  i = i + count * 6
end
return out
