-- cancel: end a message that is still `queued` or `scheduled` as `canceled`, wherever it waits
-- (lane, retry or scheduled set).
-- ARGV: id, retention_s. Returns 'done' (canceled now), 'not_found', or the status that
-- forbids it (e.g. 'sending', 'sent', 'canceled'; 'expired' when its ttl had just run out).
local id = ARGV[1]
local k = key_msg(id)
local fields = redis.call('HMGET', k, 's', 'x', 'pn', 'l', 'c', 'f')
local status = fields[1]
if not status then return 'not_found' end
if status ~= 'queued' and status ~= 'scheduled' then return status end
-- out under a lease: being sent (lib.lua, attempt_of)
if status == 'queued' and lease_of(id, fields[6]) then return 'sending' end
local now = now_ms()
local list = list_of(fields[4], fields[5])
if fields[2] and tonumber(fields[2]) <= now then
  end_queued(id, fields[3], list, 'expired', now, tonumber(ARGV[2]), nil)
  return 'expired_now'
end
end_queued(id, fields[3], list, 'canceled', now, tonumber(ARGV[2]), nil)
return 'done'
