-- status: read one message, ending it `expired` first when its ttl ran out while queued (or
-- scheduled: past its send_at, on a number that is not drained).
-- ARGV: id, retention_s, lease_ms (as the workers take: when a message being sent was taken).
-- Returns {'expired' if it just expired else '', field, value, ...}, or {} when there is no
-- such message. A message out under a lease reads as its take would have written it (lib.lua,
-- attempt_of): `s` sending, `a` counting the attempt under way, `ua` when it was taken.
local id = ARGV[1]
local k = key_msg(id)
local fields = redis.call('HMGET', k, 's', 'x', 'pn', 'l', 'c', 'f')
if not fields[1] then return {} end
local event = ''
local deadline = nil
if fields[1] == 'queued' then deadline = lease_of(id, fields[6]) end
if (fields[1] == 'queued' or fields[1] == 'scheduled') and fields[2] and not deadline then
  local now = now_ms()
  if tonumber(fields[2]) <= now then
    end_queued(id, fields[3], list_of(fields[4], fields[5]), 'expired', now, tonumber(ARGV[2]), nil)
    event = 'expired'
  end
end
local out = redis.call('HGETALL', k)
if deadline then
  local taken = string.format('%d', tonumber(deadline) - tonumber(ARGV[3] or '0'))
  local seen = {}
  for i = 1, #out, 2 do
    local field = out[i]
    if field == 's' then
      out[i + 1] = 'sending'
    elseif field == 'a' then
      out[i + 1] = count_text(tonumber(out[i + 1]) + 1)
    elseif field == 'ua' then
      out[i + 1] = taken
    end
    seen[field] = true
  end
  if not seen.a then out[#out + 1] = 'a'; out[#out + 1] = '1' end
  if not seen.ua then out[#out + 1] = 'ua'; out[#out + 1] = taken end
end
table.insert(out, 1, event)
return out
