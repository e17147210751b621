-- status: read one message, ending it `expired` first when its ttl ran out while queued (or
-- scheduled: past its send_at, on a number that is not drained).
-- ARGV: id, retention_s. Returns {'expired' if it just expired else '', field, value, ...},
-- or {} when there is no such message.
local id = ARGV[1]
local k = key_msg(id)
local fields = redis.call('HMGET', k, 's', 'x', 'pn', 'l', 'c')
if not fields[1] then return {} end
local event = ''
if (fields[1] == 'queued' or fields[1] == 'scheduled') and fields[2] then
  local now = now_ms()
  if tonumber(fields[2]) <= now then
    end_queued(id, fields[3], list_of(fields[4], fields[5]), 'expired', now, tonumber(ARGV[2]), nil)
    event = 'expired'
  end
end
local out = redis.call('HGETALL', k)
table.insert(out, 1, event)
return out
