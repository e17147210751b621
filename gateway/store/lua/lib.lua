-- Shared helpers, loaded after the key-name prelude and before every script.
-- Message hash fields: pn number, s status, c category, l lane (h|n|l), p upstream payload,
-- ca created ms, ua updated ms, r client_reference, x expiry ms, a attempts, f fence
-- (of the last attempt: every attempt has the next, so a late worker cannot settle a newer
-- one; see `attempt_of` for a message being sent), sa sent ms,
-- w upstream message id, e error JSON; delivery receipts: da delivered ms, ra read ms, pa played
-- ms, fa failed ms; status callbacks: cb callback URL (set at accept: the message's own or
-- GATEWAY_CALLBACK_URL; none: no callbacks), ev events emitted so far, eh the event now on the
-- outbox (absent: none pending); scheduled sends: sd send_at ms, sk its member of `sched:<pn>`;
-- recipients: t the recipient, nb not before (waiting for its pair allowance). (pv and pt, the
-- pair as a take wrote it, were fields of the version before: a take's item context carries
-- them now, take.lua.)

-- Where the message id starts in a member of `sched:<pn>` (after "<15-digit sequence>:").
local SCHED_ID_AT = 17

-- The error of a message whose number was deleted before it could be sent.
local DELETED_ERROR = '{"code":"phone_number_deleted","message":"The phone number was ' ..
  'deleted before this message was sent.","retryable":false}'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A number given to redis.call is formatted with sprintf (as by tostring), which costs more than
-- the write it is for: a per-message write uses text made once per call (a time), or a count's
-- text made once per value and call (fence, attempts: mostly 1). (Made as they are asked for:
-- this file runs at every call of every script.)
local COUNT_TEXT = {}
local function count_text(n)
  local text = COUNT_TEXT[n]
  if not text then
    text = string.format('%d', n)
    COUNT_TEXT[n] = text
  end
  return text
end

-- A message being sent (API.md's `sending`) is written nothing by its take: it keeps `s` queued,
-- and `f` and `a` of its attempt before, and its lease "<id>#<fence>" in the shard's lease set
-- (take.lua) is what says it is out, under the next fence. Every step that ends an attempt
-- without ending the message (a settle putting it back or on the retry set, a lapsed lease
-- taken back) writes that attempt's fence to `f`, so an op of an attempt is current exactly
-- while its lease stands. (A take writing `s` sending, `f` and `a` cost a write per message, 5%
-- of its server instructions; the version before did, and a message it took is read as such.)
-- The attempts spent counting the attempt `fence` (text) when that attempt is the message's
-- current one, from its `s`, `f` and `a`; nil when it is not (a stale op).
local function attempt_of(s, f, a, fence)
  if s == 'queued' then
    if tonumber(f or '0') + 1 == tonumber(fence) then return tonumber(a or '0') + 1 end
  elseif s == 'sending' and f == fence then
    return tonumber(a or '0') -- (taken by the version before: its take counted it)
  end
  return nil
end

-- The deadline of the lease under which a `queued` message with fence `f` is out, if it is.
local function lease_of(id, f)
  return redis.call('ZSCORE', key_lease(), id .. '#' .. count_text(tonumber(f or '0') + 1))
end

-- A time (ms) as text, a whole ms rounded up (never early): the scores of the `ready` and `lease`
-- sets, and a pair's tat. A small sorted set keeps its scores as text: an integer one is read
-- back as an integer, one with decimals is parsed as a float for every entry an insert or a
-- range read passes (that made a lease cost more than the message's own writes). A whole tat is
-- also the pair's expiry as it is (PXAT), with no sum made and written as text.
local function whole_ms(x)
  return string.format('%d', math.ceil(x))
end

-- The lane list a message waits on: its lane, with "m" for marketing.
local function list_of(lane, category)
  if category == 'marketing' then return lane .. 'm' end
  return lane
end

-- Status callbacks (`gateway.callbacks`). Every status change after accept of a message with a
-- callback URL writes one event, in the same script as the change, so no change is ever without
-- its callback and none has two. A message's events go out in order: only its first pending
-- event is on the shard's outbox (event id -> due ms, as `eh` on the message); later ones wait on
-- `evq:<id>` until it is done (`callback_done.lua`).
-- Event hash fields: m message id, s status, t time of the change (ms), u url, pn, to,
-- r client_reference, w upstream message id, e error JSON (failed only), n attempts so far.
-- The event id is "<message id>.<n-th event>": the `webhook-id` of every attempt of it.
local function emit_event(id, status, now, retention)
  local k = key_msg(id)
  local m = redis.call('HMGET', k, 'cb', 'pn', 'p', 'r', 'w', 'e', 'eh')
  if not m[1] then return end
  local eid = id .. '.' .. redis.call('HINCRBY', k, 'ev', 1)
  local to = ''
  local ok, payload = pcall(cjson.decode, m[3] or '')
  if ok and type(payload) == 'table' and type(payload.to) == 'string' then to = payload.to end
  local fields = {'m', id, 's', status, 't', now, 'u', m[1], 'pn', m[2] or '', 'to', to, 'n', 0}
  if m[4] then fields[#fields + 1] = 'r'; fields[#fields + 1] = m[4] end
  if m[5] then fields[#fields + 1] = 'w'; fields[#fields + 1] = m[5] end
  if status == 'failed' and m[6] then fields[#fields + 1] = 'e'; fields[#fields + 1] = m[6] end
  local ek = key_cbevent(eid)
  redis.call('HSET', ek, unpack(fields))
  redis.call('EXPIRE', ek, retention)
  if m[7] then
    redis.call('RPUSH', key_cbqueue(id), eid)
    redis.call('EXPIRE', key_cbqueue(id), retention)
  else
    redis.call('HSET', k, 'eh', eid)
    redis.call('ZADD', key_outbox(), now, eid)
    redis.call('LPUSH', key_cbwake(), '1')
    redis.call('LTRIM', key_cbwake(), 0, 0)
  end
end

-- Delivery receipts (`gateway.receipts`): Meta's statuses of a sent message arrive in any order
-- and any number of times. The status only moves up RECEIPT_RANK (`sent` is the base); each of
-- da, ra, pa, fa is set once, from Meta's time; a `failed` below the status (e.g. after
-- `delivered`) only keeps its error in `e`, with no event. Returns 1 when the status changed
-- (its event emitted), 2 when only a time or the error was recorded, 0 when nothing changed.
local RECEIPT_RANK = {sent = 1, failed = 2, delivered = 3, read = 4, played = 5}
local RECEIPT_TIME = {failed = 'fa', delivered = 'da', read = 'ra', played = 'pa'}

local function apply_receipt(id, status, at, error_json, now, retention)
  local k = key_msg(id)
  local m = redis.call('HMGET', k, 's', 'e')
  local rank, current = RECEIPT_RANK[status], RECEIPT_RANK[m[1] or '']
  if not rank or not current then return 0 end
  local code = 0
  local field = RECEIPT_TIME[status]
  if field and redis.call('HSETNX', k, field, at) == 1 then code = 2 end
  if rank > current then
    if status == 'failed' then
      redis.call('HSET', k, 's', status, 'ua', now, 'e', error_json)
    else
      redis.call('HSET', k, 's', status, 'ua', now)
    end
    code = 1
  elseif status == 'failed' and not m[2] and error_json ~= '' then
    redis.call('HSET', k, 'e', error_json)
    code = 2
  end
  if code == 0 then return 0 end
  if code == 2 then redis.call('HSET', k, 'ua', now) end
  redis.call('EXPIRE', k, retention)
  if code == 1 then emit_event(id, status, now, retention) end
  return code
end

-- Applies, in arrival order, the statuses held for `wamid` (`receipts.lua`) to message `id`,
-- which just got that wamid. A held entry is the JSON array [status, at ms, error JSON].
local function apply_held(id, wamid, now, retention)
  local hk = key_held(wamid)
  local held = redis.call('LRANGE', hk, 0, -1)
  if #held == 0 then return end
  redis.call('DEL', hk)
  for _, entry in ipairs(held) do
    local ok, r = pcall(cjson.decode, entry)
    if ok and type(r) == 'table' and type(r[1]) == 'string' and tonumber(r[2]) then
      apply_receipt(id, r[1], tonumber(r[2]), r[3] or '', now, retention)
    end
  end
end

local ALL_LISTS = {'h', 'hm', 'n', 'nm', 'l', 'lm'}

-- The cfg fields `depth_of` reads, in its order: dead entries, then parked messages, per list.
local DEPTH_FIELDS = {'d_h', 'd_hm', 'd_n', 'd_nm', 'd_l', 'd_lm',
                      'p_h', 'p_hm', 'p_n', 'p_nm', 'p_l', 'p_lm'}

-- The lane lists a number has queued to, as cfg `ls` keeps them: a letter per list, and `S`
-- when it has scheduled a message. Push adds to it (never removes), so a list missing from it is
-- empty: every message put back on a list (a retry, a requeue, a lapsed lease, a parked or
-- scheduled message) was pushed to that list first. Push counts a number's depth from these
-- alone: an LLEN of a list that is not there costs a `redis.call` as one that is, and six per
-- number per push, with the scheduled set's ZCARD and the counts' parsing, were 14% of the
-- accept's server instructions for a batch over 1,000 numbers (`bench redis-instructions
-- --numbers 1000`).
local LIST_LETTER = {h = 'h', hm = 'H', n = 'n', nm = 'N', l = 'l', lm = 'L'}

local function uses_list(ls, letter)
  return string.find(ls, letter, 1, true) ~= nil
end

-- `ls` with `letter` added, when it is not there yet.
local function with_list(ls, letter)
  if uses_list(ls, letter) then return ls end
  return ls .. letter
end

-- Queued messages of a number: its lane lists plus its parked messages (`pk:<pn>:<user>`, counted
-- in cfg p_<list>), minus the dead entries of both (d_<list>). `counts` holds the number's
-- DEPTH_FIELDS (as HMGET returns them); `ls`, the lists to read (cfg `ls`; nil: all six).
-- Also returns, when `ls` is nil, the letters of the lists that are not empty ('' otherwise).
local function depth_of(pn, counts, ls)
  local n, found = 0, ''
  for i, list in ipairs(ALL_LISTS) do
    local letter = LIST_LETTER[list]
    if not ls or uses_list(ls, letter) then
      local length = redis.call('LLEN', key_lane(pn, list))
      if length > 0 and not ls then found = found .. letter end
      n = n + length
    end
    -- (mostly absent: a `tonumber` parses with strtod, dearer than the test)
    local dead, parked = counts[i], counts[i + 6]
    if dead then n = n - tonumber(dead) end
    if parked then n = n + tonumber(parked) end
  end
  if n < 0 then n = 0 end
  return n, found
end

-- Puts a number on the ready set no later than `at` (never later than it already is), and
-- leaves a wake token when that changed anything.
local function schedule(pn, at)
  if redis.call('ZADD', key_ready(), 'LT', 'CH', whole_ms(at), pn) > 0 then
    redis.call('LPUSH', key_wake(), '1')
    redis.call('LTRIM', key_wake(), 0, 0)
  end
end

-- As `schedule`, but a number that must wait (paced or paused, cfg `nx`) is scheduled at that
-- time instead.
local function mark_ready(pn, at)
  local nx = tonumber(redis.call('HGET', key_cfg(pn), 'nx') or '0')
  if nx > at then at = nx end
  schedule(pn, at)
end

-- Recipients (API.md "Recipients"). With pacing on, each (number, recipient) pair sends one
-- message at a time, in lane order: the message being sent, or waiting for a retry or for its
-- pair allowance, holds the pair; the pair's later messages, popped from their lane meanwhile,
-- park on `pk:<pn>:<user>` (counted in cfg p_<list>, so queue depths stay right). When the
-- holder ends, its first parked message goes back to the head of its lane and holds the pair in
-- turn: no scan, no cost for the number's other recipients.
--
-- A pair `pr:<pn>:<user>` is one string, "<holder> <tat> <parked>": the message holding it ('':
-- none), its GCRA theoretical arrival time in ms ('': none) and how many messages are parked
-- behind it. One string, so that a change is one write and its expiry comes with it: written
-- while held it has none (SET drops it), idle it expires when its allowance is whole again.
-- (It was a hash, and a message cost two calls more: a pair written before is read as one.)
local function pair_parse(v)
  local h, t, k = string.match(v, '^(%S*) (%S*) (%d+)$')
  return {h = h or '', t = t or '', k = tonumber(k or '0')}
end

-- The pair as a GET (or a GET option) answered `v`: a string, nil (false), or the error of a key
-- that is not a string (a hash of the version before, read here).
local function pair_of(pn, user, v)
  if type(v) == 'table' and v.err then
    -- a hash of the version before: h holder, t tat, its parked list as long as it is
    local pk = key_pair(pn, user)
    local old = redis.call('HMGET', pk, 'h', 't')
    local parked = redis.call('LLEN', key_parked(pn, user))
    return {h = old[1] or '', t = old[2] or '', k = parked}
  end
  if not v then return {h = '', t = '', k = 0} end
  return pair_parse(v)
end

local function pair_get(pn, user)
  return pair_of(pn, user, redis.pcall('GET', key_pair(pn, user)))
end

-- Writes a pair that is held (or has parked messages): it must not expire. Returns the value.
local function pair_hold(pn, user, pair)
  -- (SET replaces a hash of the version before too)
  local v = pair.h .. ' ' .. pair.t .. ' ' .. pair.k
  redis.call('SET', key_pair(pn, user), v)
  return v
end

-- Writes an idle pair: it lives until its allowance is whole again.
local function pair_idle(pk, t, now)
  local tat = tonumber(t) or 0
  if tat > now then
    redis.call('SET', pk, ' ' .. t .. ' 0', 'PX', math.ceil(tat - now))
  else
    redis.call('DEL', pk)
  end
end

-- The quick release, for a message whose take wrote the pair as `written` ("<id> <t> 0": it
-- held it with nothing parked behind; `t` its tat): one call writes the pair idle and answers
-- what it was. That was `written` unless a message parked behind it since; then the pair is as
-- it found it and the one read is returned, for the full release to go on from (nil: done).
local function release_quick(id, pn, user, now, written, t)
  local pk = key_pair(pn, user)
  local was
  if t == '' then
    was = redis.pcall('GETDEL', pk)
  elseif not string.find(t, '.', 1, true) then
    -- a whole tat (whole_ms) is the idle pair's expiry; one already past deletes it
    was = redis.pcall('SET', pk, ' ' .. t .. ' 0', 'PXAT', t, 'GET')
  elseif tonumber(t) > now then
    -- (a tat with decimals: written by the version before)
    was = redis.pcall('SET', pk, ' ' .. t .. ' 0', 'PX', math.ceil(tonumber(t) - now), 'GET')
  else
    was = redis.pcall('GETDEL', pk)
  end
  if was == written then return nil end
  -- (an error wrote nothing: the key was a hash of the version before)
  local pair = pair_of(pn, user, was)
  if type(was) == 'string' and pair.h ~= id then
    -- another holds it, or nobody: put back what was there
    if pair.h ~= '' then redis.call('SET', pk, was) else pair_idle(pk, pair.t, now) end
  elseif not was then
    redis.call('DEL', pk)
  end
  -- (held by `id` with messages parked: the full release writes it)
  return pair
end

-- Lets go of the pair `id` holds, if it holds it (`user` may be false: a message from before).
-- `written` and `t`: the pair as this message's take wrote it with nothing parked behind, and
-- its tat (the take's item context), when known.
local function release_pair(id, pn, user, now, retention, written, t)
  if not user then return end
  local pair
  if written and written ~= '' then
    pair = release_quick(id, pn, user, now, written, t or '')
    if not pair then return end
  else
    pair = pair_get(pn, user)
  end
  if pair.h ~= id then return end
  local parked = key_parked(pn, user)
  local cfg = key_cfg(pn)
  -- the number's status matters only to a parked message: read when there is one
  local deleted = nil
  while pair.k > 0 do
    local next_id = redis.call('LPOP', parked)
    if not next_id then break end
    pair.k = pair.k - 1
    if deleted == nil then deleted = redis.call('HGET', cfg, 'status') == 'deleted' end
    local k = key_msg(next_id)
    local m = redis.call('HMGET', k, 's', 'l', 'c')
    local list = list_of(m[2] or 'n', m[3])
    redis.call('HINCRBY', cfg, 'p_' .. list, -1)
    if m[1] ~= 'queued' then
      -- ended while parked (canceled, expired): a dead entry, no longer counted
      if redis.call('HINCRBY', cfg, 'd_' .. list, -1) < 0 then
        redis.call('HSET', cfg, 'd_' .. list, 0)
      end
    elseif deleted then
      -- nothing drains a deleted number's lanes: its parked messages end here
      redis.call('HSET', k, 's', 'failed', 'ua', now, 'e', DELETED_ERROR)
      redis.call('EXPIRE', k, retention)
      emit_event(next_id, 'failed', now, retention)
    else
      pair.h = next_id
      pair_hold(pn, user, pair)
      redis.call('LPUSH', key_lane(pn, list), next_id)
      mark_ready(pn, now)
      return
    end
  end
  -- idle: the pair's state lives only until its allowance is whole again
  pair_idle(key_pair(pn, user), pair.t, now)
end

-- Ends a message that is still `queued` (in a lane list, its retry set or parked) or `scheduled`
-- with a terminal status. A message in a lane list or parked stays there as a dead entry,
-- counted in cfg `d_<list>` so queue depths stay right, and is dropped when it is popped.
local function end_queued(id, pn, list, status, now, retention, error_json)
  local k = key_msg(id)
  local m = redis.call('HMGET', k, 's', 'sk', 't')
  if m[1] == 'scheduled' then
    redis.call('ZREM', key_sched(pn), m[2])
  elseif redis.call('ZREM', key_retry(pn), id) == 0 then
    redis.call('HINCRBY', key_cfg(pn), 'd_' .. list, 1)
  end
  if error_json then
    redis.call('HSET', k, 's', status, 'ua', now, 'e', error_json)
  else
    redis.call('HSET', k, 's', status, 'ua', now)
  end
  redis.call('EXPIRE', k, retention)
  emit_event(id, status, now, retention)
  release_pair(id, pn, m[3], now, retention)
end
