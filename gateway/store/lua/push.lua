-- push: accept messages in one atomic step.
-- KEYS: the prefixes of the shards the messages go to (see gateway.accept.service for why one
--       call may cover several shards).
-- ARGV: max_backlog, idem_scope, idem_ttl_s,
--       then groups: key index (into KEYS), pn, count,
--                    count x (id, list, category, payload, recipient, n_extra (0 or 6),
--                             n_extra x (reference, ttl_s, idem_key, digest, callback_url, send_at
--                                        ms, each '' when none))
--       (a message with none of the extras, as most are, passes none: each value passed cost
--       the script about as much as a write of the message's)
-- A message with an idem_key is one of an idempotent send: its record `idem:<scope>:<key>`
-- ('<digest> <id>') is read and written here, in the same step as the push, so a retry finds
-- the first attempt's message whenever that attempt landed, even after its answer was lost.
-- Returns per group, flattened: code ('ok', 'unknown' or 'deleted'), accepted (how many new
-- messages were queued: the first ones in order, fewer than asked when the backlog is full),
-- tier, n_seen, then n_seen x (position in the group from 0, 'replay' | 'conflict', first id
-- or ''): messages whose key was already used, which take no room and are not counted.
-- A message with a send_at still ahead is `scheduled`: kept on the number's `sched` ZSET by that
-- time (its ttl counting from it), not on a lane, and the number is put on the ready set for
-- that time so that `take` moves it to its lane then, however idle the number. Scheduled
-- messages take room in the backlog (they will all be queued), but are not queue depth.
local now = now_ms()
local now_text = string.format('%d', now) -- (lib.lua, count_text)
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
                            'nx', 'ls', 'inflight', unpack(DEPTH_FIELDS))
  local status = number[1]
  local code, room = 'ok', 0
  -- the lists the number uses (lib.lua, LIST_LETTER): as cfg `ls` has them, else (a number
  -- last queued to by a version before) as found now when that can be known; nil: not known,
  -- every list is read
  local ls = number[5] or nil
  if not status then
    code = 'unknown'
  elseif status == 'deleted' then
    code = 'deleted'
  else
    local counts = {}
    for f = 1, #DEPTH_FIELDS do counts[f] = number[6 + f] end
    local depth, found = depth_of(pn, counts, ls)
    local scheduled_count = 0
    if not ls or uses_list(ls, 'S') then scheduled_count = redis.call('ZCARD', key_sched(pn)) end
    room = max_backlog - depth - scheduled_count
    if not ls and scheduled_count == 0 and tonumber(number[6] or '0') <= 0
        and redis.call('EXISTS', key_retry(pn)) == 0 then
      -- nothing of the number is out of its lane lists (no lease, retry, scheduled or parked
      -- message), so nothing will be put back on a list that is empty now
      local parked = 0
      for f = 7, 12 do
        if counts[f] then parked = parked + tonumber(counts[f]) end
      end
      if parked <= 0 then ls = found end
    end
  end
  local ls_before = number[5]
  local accepted = 0
  local seen = {}
  local by_list = {}
  local sendable = false
  local scheduled, first_due, seq = {}, nil, nil
  for j = 0, count - 1 do
    local id, list, category, payload, recipient = ARGV[i], ARGV[i + 1], ARGV[i + 2],
                                                   ARGV[i + 3], ARGV[i + 4]
    local reference, ttl, idem_key, digest, callback, send_at = '', '', '', '', '', ''
    -- (`n_extra` is '0' or '6': compared as text, as a `tonumber` parses with strtod)
    if ARGV[i + 5] == '0' then
      i = i + 6
    else
      reference, ttl, idem_key, digest, callback, send_at = unpack(ARGV, i + 6, i + 11)
      i = i + 12
    end
    local idem, prev = nil, nil
    if idem_key ~= '' then
      idem = key_idem(scope, idem_key)
      prev = redis.call('GET', idem)
    end
    if prev then
      local sep = string.find(prev, ' ', 1, true)
      seen[#seen + 1] = j
      if string.sub(prev, 1, sep - 1) == digest then
        seen[#seen + 1] = 'replay'; seen[#seen + 1] = string.sub(prev, sep + 1)
      else
        seen[#seen + 1] = 'conflict'; seen[#seen + 1] = ''
      end
    elseif code == 'ok' and accepted < room then
      accepted = accepted + 1
      local fields = {'s', 'queued', 't', recipient, 'ca', now_text,
                      'pn', pn, 'c', category, 'l', string.sub(list, 1, 1), 'p', payload}
      if reference ~= '' then fields[#fields + 1] = 'r'; fields[#fields + 1] = reference end
      if callback ~= '' then fields[#fields + 1] = 'cb'; fields[#fields + 1] = callback end
      -- ttl_seconds counts from send_at
      local start = now
      local due = tonumber(send_at)
      if due then
        fields[#fields + 1] = 'sd'; fields[#fields + 1] = due
        if due > start then start = due end
      end
      if ttl ~= '' then
        fields[#fields + 1] = 'x'; fields[#fields + 1] = start + tonumber(ttl) * 1000
      end
      if due and due > now then
        if not seq then seq = redis.call('HINCRBY', key_cfg(pn), 'sq', count) - count end
        local member = string.format('%015.0f', seq + j) .. ':' .. id
        fields[2] = 'scheduled' -- after 's'
        if ls then ls = with_list(ls, 'S'); ls = with_list(ls, LIST_LETTER[list]) end
        fields[#fields + 1] = 'sk'; fields[#fields + 1] = member
        scheduled[#scheduled + 1] = due
        scheduled[#scheduled + 1] = member
        if not first_due or due < first_due then first_due = due end
        redis.call('HSET', key_msg(id), unpack(fields))
      else
        redis.call('HSET', key_msg(id), unpack(fields))
        local ids = by_list[list]
        if not ids then ids = {}; by_list[list] = ids end
        ids[#ids + 1] = id
        if string.len(list) == 1 or number[3] ~= 'red' then sendable = true end
      end
      if idem then redis.call('SET', idem, digest .. ' ' .. id, 'EX', idem_ttl) end
    end
  end
  for list, ids in pairs(by_list) do
    redis.call('RPUSH', key_lane(pn, list), unpack(ids))
    if ls then ls = with_list(ls, LIST_LETTER[list]) end
  end
  if ls and ls ~= ls_before then redis.call('HSET', key_cfg(pn), 'ls', ls) end
  if #scheduled > 0 then redis.call('ZADD', key_sched(pn), unpack(scheduled)) end
  if status == 'active' then
    local nx = tonumber(number[4] or '0')
    if sendable then
      schedule(pn, math.max(now, nx))
    elseif first_due then
      schedule(pn, math.max(first_due, nx))
    end
  end
  out[#out + 1] = code; out[#out + 1] = accepted; out[#out + 1] = number[2] or ''
  out[#out + 1] = #seen / 3
  for _, value in ipairs(seen) do out[#out + 1] = value end
end
return out
