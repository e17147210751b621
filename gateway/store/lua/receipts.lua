-- receipts: apply Meta's webhook content of one shard, in the order given, all or nothing.
-- ARGV: retention_s, hold_s, then ops of 5 args each:
--   S  wamid, status, at ms (Meta's time), error JSON ('' none)   a status of a sent message
--   I  pn, user, at ms, ''                                         an inbound message
-- A status whose wamid no message has yet is held on `wh:<wamid>` for hold_s (settle applies
-- it when a message gets that wamid). An inbound message keeps the user's last inbound time
-- until the 24 h window it opens closes.
-- Returns {changed to sent, failed, delivered, read, played (as RECEIPT_RANK), recorded (a time
-- or an error without a status change), unchanged, held, inbound, then the ms from sent to
-- delivered of each message that got its delivered time}.
local now = now_ms()
local retention = tonumber(ARGV[1])
local hold = tonumber(ARGV[2])
local WINDOW_MS = 86400000
local HELD_MAX = 32
local counts = {0, 0, 0, 0, 0, 0, 0, 0, 0}
local delays = {}

local function status_op(wamid, status, at, error_json)
  local id = redis.call('GET', key_wamid(wamid))
  if not id then
    local hk = key_held(wamid)
    redis.call('RPUSH', hk, cjson.encode({status, at, error_json}))
    -- a wamid's statuses are a handful; repeats past that add nothing worth keeping
    redis.call('LTRIM', hk, -HELD_MAX, -1)
    redis.call('EXPIRE', hk, hold)
    counts[8] = counts[8] + 1
    return
  end
  local code = apply_receipt(id, status, at, error_json, now, retention)
  -- the index lives as long as the message it points to (whose retention a change renews)
  if code > 0 then redis.call('EXPIRE', key_wamid(wamid), retention) end
  if code == 1 then
    counts[RECEIPT_RANK[status]] = counts[RECEIPT_RANK[status]] + 1
  elseif code == 2 then
    counts[6] = counts[6] + 1
  else
    counts[7] = counts[7] + 1
  end
  if code > 0 and status == 'delivered' then
    local t = redis.call('HMGET', key_msg(id), 'sa', 'da')
    if t[1] and t[2] then delays[#delays + 1] = math.max(tonumber(t[2]) - tonumber(t[1]), 0) end
  end
end

local function inbound_op(pn, user, at)
  local closes = at + WINDOW_MS
  counts[9] = counts[9] + 1
  if closes <= now then return end
  local k = key_inbound(pn, user)
  if at > tonumber(redis.call('GET', k) or '0') then
    redis.call('SET', k, at, 'PXAT', closes)
  end
end

for i = 3, #ARGV, 5 do
  if ARGV[i] == 'S' then
    status_op(ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4])
  else
    inbound_op(ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]))
  end
end
for _, delay in ipairs(delays) do counts[#counts + 1] = delay end
return counts
