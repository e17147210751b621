-- settle: record what became of messages a worker took; many messages, of several shards, per
-- call (one call per batch: a call per shard cost a round trip each, which made the drain's
-- cost grow with the count of numbers sharing it).
-- KEYS: the prefixes of the shards the ops belong to.
-- ARGV: retention_s, then groups: key index (into KEYS), n_ops, then 5 per op: kind, id, fence,
--       a, b
--   S sent      a = upstream message id, b = the item's context from its take ('' none)
--   R retry     a = delay ms, b = last error JSON
--   Q requeue   a = pause: '' none, 'throttle' (1 s, doubling while it repeats, cap 60 s) or ms;
--               b = grant stamp to give back to the rate window ('' none)
--   F fail      a = error JSON
--   H hold      a = the number's new status (e.g. 'disconnected')
-- Q and H put the message back at the head of its lane with its attempt not spent.
-- An op whose fence is not the message's current one is stale (the lease ran out and another
-- attempt owns the message) and changes nothing.
-- An `S` op with its take's context is recorded without reading the message (`sent_quick`):
-- its lease "<id>#<fence>" still in the lease set is the proof that its attempt is the current
-- one and still sending (take.lua); the group's are looked up in one call. Any other op reads
-- the message and checks its status and fence (lib.lua, attempt_of). An op that ends the
-- attempt without ending the message (R, Q, H) writes the attempt's fence and attempts: the
-- take wrote neither.
-- An op that would put a message back (R, Q, H) while its number is deleted fails it with
-- phone_number_deleted instead: nothing drains a deleted number's queue.
-- A message that ends (sent, failed, expired) lets go of its (number, recipient) pair
-- (lib.lua, release_pair); one waiting for a retry or put back keeps holding it, so the
-- recipient's later messages stay behind it.
-- Returns one code per op: 0 stale, 1 done, 2 ended `expired` instead of waiting for a retry,
-- 3 failed because the number was deleted.
--
-- What the ops do to a number's `inflight` and `sent:<pn>` and to the shard's lease set is
-- summed and written at the end of the group (once per number, once for the leases): nothing in
-- this script reads them in between, and `now` is one time for the whole call, so the result is
-- what a write per message gave, at a few calls per number instead of five per message.
local now = now_ms()
local retention = tonumber(ARGV[1])
-- (as text for the writes of every message: lib.lua, count_text)
local now_text, retention_text = string.format('%d', now), ARGV[1]
-- (tables appended to with counts of their own: `#t` is a search of the table, per value)
local results, n_results = {}, 0

-- This group's numbers (pn -> what is known of its cfg and what is owed to it), the message
-- ids whose lease ended, and the wamids the group's sent messages got (wamid, id, ...); flushed
-- by `flush_group`.
local numbers, lease_ended, n_lease_ended, wamids, n_wamids
-- and the pairs a sent message may hold that its take did not write (id, pn, user, ...): let go
-- of at the end of the group, after one EXISTS finds whether any of them is there at all
local unknown_pairs, n_unknown_pairs

-- The number's state in this call: its cfg `status` and `tb` as read once (and kept in step
-- with this script's own writes to them), ops done (inflight to give back), messages sent.
local function number_of(pn)
  local n = numbers[pn]
  if not n then
    local c = redis.call('HMGET', key_cfg(pn), 'status', 'tb')
    n = {status = c[1], tb = c[2], done = 0, sent = 0}
    numbers[pn] = n
  end
  return n
end

-- `sent:<pn>` counts the number's sends per second. Its expiry is set and its old seconds
-- dropped when a second gets its first count: the hash grows only then, and an expiry 120 s from
-- the first send of the last second with sends keeps every second `sent_last_minute` reads.
local function count_sent(pn, count)
  local sent = key_sent(pn)
  local second = math.floor(now / 1000)
  if redis.call('HINCRBY', sent, second, count) > count then return end
  redis.call('EXPIRE', sent, 120)
  if redis.call('HLEN', sent) > 90 then
    for _, field in ipairs(redis.call('HKEYS', sent)) do
      if tonumber(field) < second - 60 then redis.call('HDEL', sent, field) end
    end
  end
end

-- Lets go of the pairs in `unknown_pairs`. They are mostly not there: a number drained without
-- the recipient rules holds none, and its messages' contexts say `f` only because the rules may
-- have been on when an earlier message of the recipient was taken. One EXISTS over their keys
-- spares a read per message then (2.6% of the server's instructions per message without the
-- rules, `bench redis-instructions --no-recipient-rules`).
local function release_unknown_pairs()
  for i = 1, n_unknown_pairs, 300 do
    local last = math.min(i + 299, n_unknown_pairs)
    local pks, n_pks = {}, 0
    for j = i, last, 3 do
      n_pks = n_pks + 1
      pks[n_pks] = key_pair(unknown_pairs[j + 1], unknown_pairs[j + 2])
    end
    if redis.call('EXISTS', unpack(pks)) > 0 then
      for j = i, last, 3 do
        release_pair(unknown_pairs[j], unknown_pairs[j + 1], unknown_pairs[j + 2], now,
                     retention)
      end
    end
  end
end

local function flush_group()
  release_unknown_pairs()
  for pn, n in pairs(numbers) do
    if n.done > 0 then
      local cfg = key_cfg(pn)
      if redis.call('HINCRBY', cfg, 'inflight', -n.done) < 0 then
        redis.call('HSET', cfg, 'inflight', 0)
      end
    end
    if n.sent > 0 then count_sent(pn, n.sent) end
  end
  local lease = key_lease()
  for i = 1, n_lease_ended, 500 do
    redis.call('ZREM', lease, unpack(lease_ended, i, math.min(i + 499, n_lease_ended)))
  end
  -- Statuses Meta sent before the send's answer came are rare: one EXISTS over the group's
  -- wamids finds whether there are any (a read per message cost a call per message).
  for i = 1, n_wamids, 500 do
    local held, n_held = {}, 0
    for j = i, math.min(i + 499, n_wamids), 2 do
      n_held = n_held + 1
      held[n_held] = key_held(wamids[j])
    end
    if redis.call('EXISTS', unpack(held)) > 0 then
      for j = i, math.min(i + 499, n_wamids), 2 do
        apply_held(wamids[j + 1], wamids[j], now, retention)
      end
    end
  end
end

local function pause(pn, how, number)
  local cfg = key_cfg(pn)
  local ms = 0
  if how == 'throttle' then
    local nx = tonumber(redis.call('HGET', cfg, 'nx') or '0')
    if nx <= now then
      -- not paused yet: this answer starts (or doubles) the pause; its siblings in flight don't
      local backoff = tonumber(number.tb or '0')
      if backoff == 0 then backoff = 1000 else backoff = math.min(backoff * 2, 60000) end
      redis.call('HSET', cfg, 'tb', backoff)
      number.tb = tostring(backoff)
      ms = backoff
    end
  elseif how ~= '' then
    ms = tonumber(how)
  end
  if ms > 0 then
    redis.call('HSET', cfg, 'nx', now + ms)
    redis.call('ZADD', key_ready(), now + ms, pn)
    -- the owner may be asleep with nothing due in this shard: wake it to learn the new time
    redis.call('LPUSH', key_wake(), '1')
    redis.call('LTRIM', key_wake(), 0, 0)
  else
    mark_ready(pn, now)
  end
end

-- Records a message sent (its lease already counted as ended) after `spent` attempts (text: the
-- take wrote none, lib.lua `attempt_of`). `had_error`: it has an earlier
-- attempt's error to clear; `callback`: it has a callback URL (only such a message has events:
-- emit_event's own reads are spared for every other one); `user`, `written`, `t`: its pair's
-- release, as `release_pair` takes them (user nil: it holds none).
local function record_sent(id, k, pn, number, wamid, spent, had_error, callback, user, written,
                           t)
  redis.call('HSET', k, 's', 'sent', 'sa', now_text, 'ua', now_text, 'w', wamid, 'a', spent)
  if had_error then redis.call('HDEL', k, 'e') end
  redis.call('EXPIRE', k, retention_text)
  if number.tb then
    redis.call('HDEL', key_cfg(pn), 'tb')
    number.tb = false
  end
  number.sent = number.sent + 1
  if callback then emit_event(id, 'sent', now, retention) end
  if wamid ~= '' then
    -- Meta's statuses find the message by its wamid; any that came before it are applied
    -- at the end of the group (`flush_group`)
    redis.call('SET', key_wamid(wamid), id, 'EX', retention_text)
    wamids[n_wamids + 1] = wamid
    wamids[n_wamids + 2] = id
    n_wamids = n_wamids + 2
  end
  if user then release_pair(id, pn, user, now, retention, written, t) end
end

-- An `S` op whose lease stands, from its take's context (take.lua): no read of the message.
local function sent_quick(id, lease, wamid, context)
  -- "<pn> <release><callback> <user> <tat>", split with plain finds (a pattern cost twice as much)
  local find, sub = string.find, string.sub
  local at = find(context, ' ', 1, true)
  local pn, release = sub(context, 1, at - 1), sub(context, at + 1, at + 1)
  local callback = sub(context, at + 2, at + 2) == 'c'
  local number = number_of(pn)
  n_lease_ended = n_lease_ended + 1
  lease_ended[n_lease_ended] = lease
  number.done = number.done + 1
  -- its pair: released here when its take wrote it (`q`), else at the end of the group
  local user, written, t = nil, nil, nil
  if release ~= 'n' then
    local last = find(context, ' ', at + 4, true)
    local recipient = sub(context, at + 4, last - 1)
    if release == 'q' then
      user, t = recipient, sub(context, last + 1)
      written = id .. ' ' .. t .. ' 0'
    else
      unknown_pairs[n_unknown_pairs + 1] = id
      unknown_pairs[n_unknown_pairs + 2] = pn
      unknown_pairs[n_unknown_pairs + 3] = recipient
      n_unknown_pairs = n_unknown_pairs + 3
    end
  end
  -- (a context is given for a first attempt only)
  record_sent(id, key_msg(id), pn, number, wamid, '1', false, callback, user, written, t)
  n_results = n_results + 1
  results[n_results] = 1
end

local function settle_one(kind, id, fence, a, b)
  local k = key_msg(id)
  local m = redis.call('HMGET', k, 's', 'f', 'pn', 'l', 'c', 'x', 'a', 'cb', 't', 'e')
  -- m[8], the callback URL (see record_sent); m[10], an earlier attempt's error
  local spent = attempt_of(m[1], m[2], m[7], fence)
  if not spent then
    n_results = n_results + 1
    results[n_results] = 0
  else
    local pn = m[3]
    local cfg = key_cfg(pn)
    local number = number_of(pn)
    -- its lease, as the take of either version wrote it
    lease_ended[n_lease_ended + 1] = id .. '#' .. fence
    lease_ended[n_lease_ended + 2] = id
    n_lease_ended = n_lease_ended + 2
    number.done = number.done + 1
    local code = 1
    if kind ~= 'S' and kind ~= 'F' and number.status == 'deleted' then
      redis.call('HSET', k, 's', 'failed', 'ua', now, 'a', spent, 'e', DELETED_ERROR)
      redis.call('EXPIRE', k, retention)
      if m[8] then emit_event(id, 'failed', now, retention) end
      release_pair(id, pn, m[9], now, retention)
      code = 3
    elseif kind == 'S' then
      record_sent(id, k, pn, number, a, spent, m[10], m[8], m[9])
    elseif kind == 'F' then
      redis.call('HSET', k, 's', 'failed', 'ua', now, 'a', spent, 'e', a)
      redis.call('EXPIRE', k, retention)
      if m[8] then emit_event(id, 'failed', now, retention) end
      release_pair(id, pn, m[9], now, retention)
    elseif kind == 'R' then
      local due = now + tonumber(a)
      if m[6] and tonumber(m[6]) <= due then
        redis.call('HSET', k, 's', 'expired', 'ua', now, 'a', spent, 'e', b)
        redis.call('EXPIRE', k, retention)
        if m[8] then emit_event(id, 'expired', now, retention) end
        release_pair(id, pn, m[9], now, retention)
        code = 2
      else
        -- (its attempt ended: the next is under the next fence, lib.lua attempt_of)
        redis.call('HSET', k, 's', 'queued', 'ua', now, 'a', spent, 'f', fence, 'e', b)
        redis.call('ZADD', key_retry(pn), due, id)
        mark_ready(pn, due)
      end
    else
      -- its attempt not spent
      redis.call('HSET', k, 's', 'queued', 'ua', now, 'a', math.max(spent - 1, 0), 'f', fence)
      redis.call('LPUSH', key_lane(pn, list_of(m[4], m[5])), id)
      if kind == 'Q' then
        if b ~= '' then
          -- a grant given back: its slot in the window is free again, and the number's pacing
          -- gives back its step (else every put-back would cost a step of rate for good; making
          -- the number due at once instead turned put-backs into storms)
          redis.call('LREM', key_window(pn), 1, b)
          local c = redis.call('HMGET', cfg, 'nx', 'rate')
          if c[1] and tonumber(c[2] or '0') > 0 then
            redis.call('HSET', cfg, 'nx', tonumber(c[1]) - 1000 / tonumber(c[2]))
          end
        end
        pause(pn, a, number)
      else
        redis.call('HSET', cfg, 'status', a, 'updated_at', now)
        number.status = a
        redis.call('ZREM', key_ready(), pn)
      end
    end
    n_results = n_results + 1
    results[n_results] = code
  end
end

-- Of the group's `S` ops with a context (its n ops from ARGV[first]), those whose lease is still
-- in the lease set, in one read: the op's first ARGV index -> its lease.
local function leases_standing(first, n)
  local asked, at, n_asked = {}, {}, 0
  for i = first, first + (n - 1) * 5, 5 do
    if ARGV[i] == 'S' and ARGV[i + 4] ~= '' then
      n_asked = n_asked + 1
      asked[n_asked] = ARGV[i + 1] .. '#' .. ARGV[i + 2]
      at[n_asked] = i
    end
  end
  local standing = {}
  for i = 1, n_asked, 500 do
    local scores = redis.call('ZMSCORE', key_lease(), unpack(asked, i, math.min(i + 499, n_asked)))
    for j, score in ipairs(scores) do
      if score then standing[at[i + j - 1]] = asked[i + j - 1] end
    end
  end
  return standing
end

local g = 2
while g <= #ARGV do
  -- the prelude's key functions all read P: point it at this group's shard
  P = KEYS[tonumber(ARGV[g])]
  numbers, lease_ended, n_lease_ended, wamids, n_wamids = {}, {}, 0, {}, 0
  unknown_pairs, n_unknown_pairs = {}, 0
  local n = tonumber(ARGV[g + 1])
  local standing = leases_standing(g + 2, n)
  local ended = {} -- (the same attempt twice in a group: the second is stale, as it was)
  for i = g + 2, g + 1 + n * 5, 5 do
    local lease = standing[i]
    if lease and not ended[lease] then
      ended[lease] = true
      sent_quick(ARGV[i + 1], lease, ARGV[i + 3], ARGV[i + 4])
    else
      settle_one(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
    end
  end
  flush_group()
  g = g + 2 + n * 5
end
return results
