-- take: hand a worker the messages of some shards it can start sending on schedule, within each
-- number's rate, and lease them to it. One call covers every shard the worker finds due (a call
-- per shard cost a round trip each, and with many numbers each paced shard has only a few
-- messages due at a time: the round trips, not the sends, set the drain's pace).
-- KEYS: the prefixes of the shards, in the order to serve them (the budget may run out).
-- ARGV: budget (most messages to hand out), max_numbers, lease_ms, window_ms, pace_ms,
--       min_chunk, headroom, unlimited_chunk, retention_s,
--       start_us (when the worker can start the first of them, on this server's clock;
--                 0 = now), spacing_us (how far apart it can start them), max_lead_ms,
--       lookahead_ms, quantum_ms, pair_interval_ms (0 = no pair pacing), pair_burst,
--       recipient_order (1: one message at a time per recipient, in order; pacing implies it),
--       fleet_bound_ms (0 or absent: none; else start_us is the first slot the fleet's upstream
--                       cap reserved, and no grant is stamped later than this after its slot)
-- Returns {now_ms, expired, tiers of the numbers whose window was full (comma-separated),
--          n_groups, lapsed messages failed because their number was deleted, base_us (the first
--          slot), slots (how many slots were used),
--          per shard (in KEYS order): next_due_ms (-1: nothing scheduled),
--          per group: pn, limit (0 = unlimited), tier, access_token ('' = none), n_items,
--          per item: id, fence, attempts, payload, created_ms, expires_ms ('' = none),
--                    stamp (ms, three decimals; an unlimited number's: µs, an integer),
--                    context ('' = none: see below)}.
--
-- A lease is the member "<id>#<fence>" of the shard's lease set: it stands for one attempt, so
-- that a settle can tell the current attempt from a stale one without reading the message, and
-- it is all that marks the message `sending`: the take writes nothing to the message (lib.lua,
-- attempt_of). The
-- item's context is what a settle of a first attempt that was sent needs to record it without
-- reading the message back (settle.lua, `sent_quick`): "<pn> <release><callback> <user> <tat>",
-- release `q` (the attempt holds its pair as this take wrote it, nothing parked behind: one call
-- frees it), `f` (a full release) or `n` (no pair), callback `c` (the message has a callback
-- URL) or `-`, user and tat as the pair knows them ('' none).
--
-- Every message handed out gets a send time, its stamp. The worker can start one message per
-- slot (start + k * spacing for the k-th of the take, counting across numbers) and starts each
-- at its stamp, so the gap between stamp and arrival upstream is only timer jitter, never this
-- call's round trip. A rate-limited number's stamps are its slots (or later, when its window
-- frees), rounded up to a grid of `quantum_ms`, so that the worker starts them a handful at a
-- time: an event loop turn per send would cost more CPU than the send. They are not spread at
-- the number's own rate: the pacing below already spreads a number's sends over its second, and
-- spreading a take's grants too made a small tier's grants wait up to 200 ms in the worker for
-- their stamps, holding its sender slots (2026-11-29: 1,000 mixed numbers drained at 0.41-0.48
-- of one unlimited number with the worker's CPU half idle, 0.8-0.9 packed).
--
-- The rate is a sliding-window log (`rl:<pn>`: stamps in ms, newest first, at most `limit`
-- entries). The j-th grant of a take is allowed from the moment the entry that would then be the
-- limit-th newest (old index limit - 1 - j) is `window_ms` old; so no window of `window_ms` ever
-- holds more than `limit` stamps. Its stamp is the later of its place and that moment, so a
-- number at its rate re-uses each slot of its window the moment it frees (a slot granted late is
-- rate lost for good: the log remembers it a second later too). A take may grant slots that free
-- up to `lookahead_ms` after its first slot; the number is taken again that much before its next
-- slot frees. Grants are also paced: about limit * pace_ms / 1000 per take (at least
-- min_chunk), up to twice that to catch up after a late take.
--
-- Under the fleet's upstream cap (gateway.drain.fleet) the k-th grant of the take has the k-th
-- slot the fleet reserved for it, start_us + k * spacing_us, and its stamp must lie between that
-- slot and `fleet_bound_ms` after it: the slots are laid from start_us whenever this call runs
-- (never moved back to within max_lead_ms: the reserve already kept start_us within it), a
-- rate-limited number stops taking at its first stamp past the bound, and a call so late that
-- its first slot would be past it grants nothing.
--
-- Recipients (lib.lua, release_pair): a popped message whose recipient is held by another
-- parks behind it; one over its pair allowance (a GCRA on its stamp: interval, burst) waits on
-- the retry set until `nb`, holding its pair. Neither takes a slot of the number's rate, and
-- the take goes on with the number's next message, so other recipients never wait.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = now_us / 1000
local now_i = math.floor(now)
local budget = tonumber(ARGV[1])
local max_numbers = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local pace = tonumber(ARGV[5])
local min_chunk = tonumber(ARGV[6])
local headroom = tonumber(ARGV[7])
local unlimited_chunk = tonumber(ARGV[8])
local retention = tonumber(ARGV[9])
local spacing_us = tonumber(ARGV[11])
local max_lead_us = tonumber(ARGV[12]) * 1000
local lookahead = tonumber(ARGV[13])
local quantum = tonumber(ARGV[14])
local pair_interval = tonumber(ARGV[15] or '0')
local pair_tau = pair_interval * (tonumber(ARGV[16] or '1') - 1)
local in_order = pair_interval > 0 or ARGV[17] == '1'
local fleet_bound = tonumber(ARGV[18] or '0')
-- parks per number per take at most: a long run of one recipient's messages costs a few takes
local MAX_PARKED = 256
-- A rate window's log is trimmed back to `limit` entries when it holds this many chunks more.
local LOG_TRIM_CHUNKS = 4
-- How long past what it needs a rate window's log is kept when its expiry is renewed (ms).
local LOG_KEEP_MS = 30000
-- The first stamp: when the worker asked for, never in the past, never far ahead.
local asked_us = tonumber(ARGV[10])
local base_us = math.max(asked_us, now_us)
if fleet_bound <= 0 and base_us > now_us + max_lead_us then base_us = now_us + max_lead_us end
local base = base_us / 1000
-- Under the fleet's cap: how much later than the fleet's slots this take's are.
local fleet_shift = (base_us - asked_us) / 1000
if fleet_bound > 0 and fleet_shift > fleet_bound then budget = 0 end
local expired, deleted, rate_limited = 0, 0, {}

-- A time in ms with three decimals, as '%.3f' gives it but without formatting a float: printf's
-- float conversion was the costliest single part of a take's Lua (5% of a drain's server
-- instructions under callgrind, with two per message).
local function ms(x)
  local us = math.floor(x * 1000 + 0.5)
  local whole = math.floor(us / 1000)
  return string.format('%d.%03d', whole, us - whole * 1000)
end
-- A stamp as written to a window: rounded up to the microsecond, never below the time checked.
-- A take's stamps come in runs of one value (its grants share a slot of the `quantum` grid, or
-- the moment the window frees): the last one's text is kept (string.format is costly, above).
local last_stamp, last_stamp_text = nil, nil
local function stamp_text(x)
  if x ~= last_stamp then
    last_stamp, last_stamp_text = x, ms(math.ceil(x * 1000) / 1000)
  end
  return last_stamp_text
end

-- Leases that ran out belong to a worker that died or hung: back to the head of their lane.
-- Returns the first lease deadline when none had run out (false: no lease), nil when some had:
-- `next_due` needs it, and nothing else in this take removes a lease.
local function take_back_lapsed(lease)
  local first = redis.call('ZRANGEBYSCORE', lease, '-inf', '(inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if not first[2] then return false end
  if tonumber(first[2]) > now then return tonumber(first[2]) end
  local lapsed = redis.call('ZRANGEBYSCORE', lease, '-inf', now, 'LIMIT', 0, 256)
  for _, member in ipairs(lapsed) do
    redis.call('ZREM', lease, member)
    -- "<id>#<fence>" (a lease of the version before the last is the id alone)
    local id, fence = string.match(member, '^([^#]+)#?(.*)$')
    local k = key_msg(id)
    local m = redis.call('HMGET', k, 's', 'pn', 'l', 'c', 'f', 't', 'a')
    if fence == '' and m[1] == 'sending' then fence = m[5] end
    -- (lib.lua, attempt_of: nil when the lease was not the message's current attempt)
    local spent = attempt_of(m[1], m[5], m[7], fence)
    if spent then
      redis.call('HINCRBY', key_cfg(m[2]), 'inflight', -1)
      if redis.call('HGET', key_cfg(m[2]), 'status') == 'deleted' then
        -- its number was deleted meanwhile: nothing will drain that queue again
        redis.call('HSET', k, 's', 'failed', 'f', fence, 'a', spent, 'ua', now_i,
                   'e', DELETED_ERROR)
        redis.call('EXPIRE', k, retention)
        emit_event(id, 'failed', now_i, retention)
        release_pair(id, m[2], m[6], now_i, retention)
        deleted = deleted + 1
      else
        -- its attempt spent: the next take hands it out under the next fence
        redis.call('HSET', k, 's', 'queued', 'f', fence, 'a', spent, 'ua', now_i)
        redis.call('LPUSH', key_lane(m[2], list_of(m[3], m[4])), id)
        mark_ready(m[2], now_i)
      end
    end
  end
end

-- A number's lane lists as this take reads them: per list, the ids read from its head
-- (`ahead`), how many of those were taken (`used`: still in the list until `lanes_flush`), and
-- whether the read reached its end (`ended`). One LRANGE per list looked at and one LTRIM per
-- list taken from, per number per take, instead of a LINDEX per head looked at and an LPOP per
-- message. Nothing else in the take writes to the number's lanes except `release_pair` (which
-- may put a parked message back): flush and forget what was read before calling it.
local function lanes_of(pn, hold_marketing)
  return {pn = pn, hold = hold_marketing, ahead = {}, count = {}, used = {}, ended = {},
          popped = {}}
end

-- The head of `list` not yet taken (nil: none), reading `n` more ids when all read are taken.
-- (`count`: how many ids `ahead` holds, kept apart: `#t` is a search of the table)
local function lanes_head(r, list, n)
  local ahead, count = r.ahead[list], r.count[list]
  if not ahead then
    ahead, count = {}, 0
    r.ahead[list], r.count[list], r.used[list] = ahead, 0, 0
  end
  local used = r.used[list]
  if used >= count and not r.ended[list] then
    local got = redis.call('LRANGE', key_lane(r.pn, list), count, count + n - 1)
    local read = #got
    if count == 0 then
      ahead = got
      r.ahead[list] = got
    else
      for i = 1, read do ahead[count + i] = got[i] end
    end
    r.count[list] = count + read
    if read < n then r.ended[list] = true end
  end
  return ahead[used + 1]
end

-- (constant tables made once: a table made per message was garbage to collect per message)
local LANES = {'h', 'n', 'l'}
local LANE_LISTS = {h = {'h', 'hm'}, n = {'n', 'nm'}, l = {'l', 'lm'}}

-- Takes the next message of a number: lanes high, normal, low; within a lane, the older of the
-- heads of its plain and marketing lists (ids sort by creation), marketing skipped when held.
-- `n`: how many ids to read ahead when a list's read ones are all taken.
local function lanes_pop(r, n)
  for _, lane in ipairs(LANES) do
    local marketing = LANE_LISTS[lane][2]
    local a = lanes_head(r, lane, n)
    local b = nil
    if not r.hold then b = lanes_head(r, marketing, n) end
    if a and (not b or a <= b) then
      r.used[lane] = r.used[lane] + 1
      return a, lane
    elseif b then
      r.used[marketing] = r.used[marketing] + 1
      return b, marketing
    end
  end
  return nil, nil
end

-- Removes the ids taken from their lists (what is read and not taken stays known), and notes
-- those lists as taken from (`popped`).
local function lanes_flush(r)
  for list, used in pairs(r.used) do
    if used > 0 then
      r.popped[list] = true
      redis.call('LTRIM', key_lane(r.pn, list), used, -1)
      local ahead, rest = r.ahead[list], {}
      local count = r.count[list]
      for i = used + 1, count do rest[i - used] = ahead[i] end
      r.ahead[list], r.count[list], r.used[list] = rest, count - used, 0
    end
  end
end

-- Flushes, then forgets what was read: the lanes are about to change.
local function lanes_forget(r)
  lanes_flush(r)
  r.ahead, r.count, r.used, r.ended = {}, {}, {}, {}
end

-- Whether the number has a message to send in a lane it may send from (after `lanes_flush`):
-- from what was read when that settles it, else the list's length.
local function lanes_any(r)
  for _, lane in ipairs(LANES) do
    for _, list in ipairs(LANE_LISTS[lane]) do
      if list == lane or not r.hold then
        local ahead = r.ahead[list]
        if ahead and r.count[list] > r.used[list] then return true end
        if not (ahead and r.ended[list])
            and redis.call('LLEN', key_lane(r.pn, list)) > 0 then
          return true
        end
      end
    end
  end
  return false
end

-- The stamps (ms) of up to `want` grants for a number whose slots start at first_us, one per
-- slot: each at its slot or when the window frees for it, whichever is later, in order, and
-- within `lookahead` of the first slot; and under the fleet's cap, within its bound.
-- Also returns the log's entries from index `lo` to limit - 1 as read (one before those the
-- stamps need, so that the entry at limit - 1 after the grants are pushed is known without a
-- read), and `lo`.
local function window_stamps(log, limit, want, first_us)
  local first = first_us / 1000
  local step = spacing_us / 1000
  local lo = math.max(limit - want - 1, 0)
  local olds = redis.call('LRANGE', log, lo, limit - 1)
  local head = olds[1]
  if lo > 0 then head = redis.call('LINDEX', log, 0) end
  local prev = -1
  if head then prev = tonumber(head) end
  local stamps = {}
  for j = 0, want - 1 do
    -- its place on the grid, or when the window frees for it: rounding that moment up too
    -- would shift the number's sends a little later every second, rate lost for good
    local at = math.ceil((first + j * step) / quantum) * quantum
    local e = olds[limit - j - lo] -- the entry at index limit - 1 - j
    if e and tonumber(e) + window > at then at = tonumber(e) + window end
    if prev > at then at = prev end
    if at > first + lookahead then break end
    -- (its fleet slot: its own, `first + j * spacing`, less the take's shift; a microsecond
    -- inside the bound, as the stamp written is rounded up to the microsecond)
    if fleet_bound > 0
        and at > first + j * spacing_us / 1000 - fleet_shift + fleet_bound - 0.001 then
      break
    end
    stamps[j + 1] = at
    prev = at
  end
  return stamps, olds, lo
end

-- The reply, made in place: the header and each shard's due time first (filled in at the end),
-- then the groups as they are taken, so nothing is copied at the end. Tables are appended to
-- with counts of their own: `#t` is a search of the table, once per value (2% of a drain's
-- server instructions, callgrind).
local HEADER = 7
local out = {}
local n_out = HEADER + #KEYS
local n_groups = 0
local handed = 0 -- messages handed out so far in this take: the next one's stamp index
-- Every lease of this take runs out at the same time; a shard's are added in one ZADD (score,
-- id, ...) at the end of its turn (nothing in the take reads them before).
local lease_at = whole_ms(now + lease_ms)
-- A member of every lease set, scored +inf (so no read of the leases meets it), longer than a
-- small sorted set's longest member (`zset-max-listpack-value`, 64 by default): it keeps the set
-- a skiplist, where an insert or a removal is a lookup. As a flat list (up to 128 members) each
-- lease inserted was a search from the head past every lease before it: 8.8% of a drain's
-- server instructions (`bench redis-instructions`).
local LEASE_SENTINEL = string.rep('~', 80) .. ' keeps this set a skiplist (take.lua)'
local leased, n_leased

local function take_due(ready, lease)
  -- (the set's sentinel first, in the same ZADD: a no-op once it is there)
  leased, n_leased = {'inf', LEASE_SENTINEL}, 2
  local due = redis.call('ZRANGEBYSCORE', ready, '-inf', base, 'LIMIT', 0, max_numbers)
  for _, pn in ipairs(due) do
    if budget <= 0 then break end
    local cfg = key_cfg(pn)
    local c = redis.call('HMGET', cfg, 'status', 'quality_rating', 'rate', 'nx', 'throughput_tier',
                         'access_token', 'lx', 'ls')
    local nx = tonumber(c[4] or '0')
    local first_us = base_us + handed * spacing_us
    local first = first_us / 1000
    if c[1] ~= 'active' then
      redis.call('ZREM', ready, pn)
    elseif nx > first then
      redis.call('ZADD', ready, whole_ms(nx), pn)
    else
      local hold_marketing = c[2] == 'red'
      -- The first retry and scheduled send, read before the range reads: usually there are none
      -- due, and then they are also what "due again at" below needs (false: none; nil: not
      -- known, read it again).
      -- (one EXISTS finds both sets empty, as they mostly are: a read each cost a call each)
      local retry = key_retry(pn)
      local sched = key_sched(pn)
      local waiting = redis.call('EXISTS', retry, sched) > 0
      local retry_next = false
      if waiting then
        retry_next = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')[2] or false
        if retry_next then retry_next = tonumber(retry_next) end
      end
      if retry_next and retry_next <= now then
        retry_next = nil
        local back = redis.call('ZRANGEBYSCORE', retry, '-inf', now, 'LIMIT', 0, 256)
        for i = #back, 1, -1 do
          local id = back[i]
          local m = redis.call('HMGET', key_msg(id), 'l', 'c')
          if m[1] then redis.call('LPUSH', key_lane(pn, list_of(m[1], m[2])), id) end
          redis.call('ZREM', retry, id)
        end
      end
      -- Scheduled messages whose send_at has come (by this number's first slot: nothing is
      -- sent before its stamp) join the tail of their lane, those due together in accept order
      -- (the members sort by it). One range read per due number, as for retries.
      local sched_next = false
      if waiting then
        sched_next = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')[2] or false
        if sched_next then sched_next = tonumber(sched_next) end
      end
      if sched_next and sched_next <= first then
        sched_next = nil
        local released = redis.call('ZRANGEBYSCORE', sched, '-inf', first, 'LIMIT', 0, 256)
        for _, member in ipairs(released) do
          local id = string.sub(member, SCHED_ID_AT)
          local k = key_msg(id)
          local m = redis.call('HMGET', k, 's', 'l', 'c')
          if m[1] == 'scheduled' then
            redis.call('HSET', k, 's', 'queued', 'ua', now_i)
            redis.call('RPUSH', key_lane(pn, list_of(m[2], m[3])), id)
          end
        end
        if #released > 0 then redis.call('ZREM', sched, unpack(released)) end
      end

      local rate = tonumber(c[3] or '0')
      local limit = 0
      if rate > 0 then limit = math.max(1, math.floor(rate * (1 - headroom) + 1e-9)) end
      local chunk, want, log, stamps, olds, lo = 0, 0, nil, nil, nil, 0
      local log_until = nil -- the log's new expiry (ms), when this take renewed it
      if limit > 0 then
        chunk = math.min(limit, math.max(min_chunk, math.ceil(limit * pace / 1000)))
        -- a chunk when taken on its pacing time; what it fell behind since, when taken later
        -- (a take serves many numbers, one after another), up to a second chunk
        local behind = math.floor(math.max(first - nx, 0) * limit / 1000)
        local ask = math.min(chunk + behind, 2 * chunk, budget, limit)
        log = key_window(pn)
        stamps, olds, lo = window_stamps(log, limit, ask, first_us)
        want = #stamps
        if want == 0 then rate_limited[#rate_limited + 1] = c[5] or '' end
      else
        want = math.min(budget, unlimited_chunk)
      end

      -- this group's items go straight into the reply, after its header's slots (`head`)
      local written = {}
      local granted, parked = 0, 0
      local head = n_out
      n_out = n_out + 5
      local lanes = lanes_of(pn, hold_marketing)
      while granted < want and parked < MAX_PARKED do
        local id, list = lanes_pop(lanes, want - granted)
        if not id then break end
        local k = key_msg(id)
        local m = redis.call('HMGET', k, 's', 'x', 'f', 'a', 'p', 'ca', 't', 'nb', 'cb')
        local waits = false
        -- when this take made the message its pair's holder: how its settle lets go of it
        -- (`q` or `f`, as in its context) and the pair's tat
        local release, tat_text = nil, ''
        if m[1] == 'queued' and not (m[2] and tonumber(m[2]) <= now) and in_order and m[7] then
          -- its recipient: busy with another message, or over its pair allowance at its stamp?
          -- (the stamp it would get)
          local at = first + granted * spacing_us / 1000
          if limit > 0 then at = stamps[granted + 1] end
          -- Most recipients have no state (their first message in a while): one SET claims
          -- the pair for this message if it has none, else answers what it holds.
          local claim_t = pair_interval > 0 and whole_ms(at + pair_interval) or ''
          local claim = id .. ' ' .. claim_t .. ' 0'
          local held = redis.pcall('SET', key_pair(pn, m[7]), claim, 'NX', 'GET')
          local pair = held and pair_of(pn, m[7], held)
          if not held then
            release, tat_text = 'q', claim_t
            if m[8] then redis.call('HDEL', k, 'nb') end
          elseif pair.h ~= '' and pair.h ~= id then
            redis.call('RPUSH', key_parked(pn, m[7]), id)
            redis.call('HINCRBY', cfg, 'p_' .. list, 1)
            pair.k = pair.k + 1
            pair_hold(pn, m[7], pair)
            parked = parked + 1
            waits = true
          elseif pair_interval <= 0 then
            -- order only: it holds its recipient until it ends
            pair.h = id
            pair_hold(pn, m[7], pair)
            release, tat_text = pair.k == 0 and 'q' or 'f', pair.t
          else
            local tat = math.max(tonumber(pair.t) or 0, at)
            pair.h = id
            if tat - pair_tau > at then
              local not_before = math.ceil(tat - pair_tau)
              pair_hold(pn, m[7], pair)
              redis.call('ZADD', retry, not_before, id)
              retry_next = nil
              redis.call('HSET', k, 'nb', not_before, 'ua', now_i)
              waits = true
            else
              pair.t = whole_ms(tat + pair_interval)
              pair_hold(pn, m[7], pair)
              release, tat_text = pair.k == 0 and 'q' or 'f', pair.t
              if m[8] then redis.call('HDEL', k, 'nb') end
            end
          end
        end
        if waits then
          -- parked, or paced on the retry set: no slot of the number's rate spent
        elseif m[1] == 'queued' then
          if m[2] and tonumber(m[2]) <= now then
            redis.call('HSET', k, 's', 'expired', 'ua', now_i)
            redis.call('EXPIRE', k, retention)
            emit_event(id, 'expired', now_i, retention)
            -- it may put a parked message back on a lane
            lanes_forget(lanes)
            release_pair(id, pn, m[7], now_i, retention)
            expired = expired + 1
          else
            -- out under the next fence: its lease alone says so (lib.lua, attempt_of)
            -- (a first attempt has neither: a `tonumber` parses with strtod, dearer than the
            -- test)
            local fence = m[3] and tonumber(m[3]) + 1 or 1
            local attempts = m[4] and tonumber(m[4]) + 1 or 1
            local fence_text = count_text(fence)
            leased[n_leased + 1] = lease_at
            -- (a number joined to a string is formatted with sprintf too: its text, made above)
            leased[n_leased + 2] = id .. '#' .. fence_text
            n_leased = n_leased + 2
            out[n_out + 1] = id
            out[n_out + 2] = fence
            out[n_out + 3] = attempts
            out[n_out + 4] = m[5]
            out[n_out + 5] = m[6]
            out[n_out + 6] = m[2] or ''
            granted = granted + 1
            if limit > 0 then
              written[granted] = stamp_text(stamps[granted])
              out[n_out + 7] = written[granted]
            else
              -- (in µs, a number: the reply's integer, with no text made here)
              out[n_out + 7] = first_us + (granted - 1) * spacing_us
            end
            -- its context (see the top): none for a later attempt, which may have an earlier
            -- attempt's error to clear; `f` for one that holds no pair this take knows of
            -- (taken without the recipient rules, it may still hold one from before)
            if attempts == 1 and m[7] then
              out[n_out + 8] = pn .. ' ' .. (release or 'f') .. (m[9] and 'c' or '-') .. ' '
                               .. m[7] .. ' ' .. tat_text
            elseif attempts == 1 then
              out[n_out + 8] = pn .. (m[9] and ' nc  ' or ' n-  ')
            else
              out[n_out + 8] = ''
            end
            n_out = n_out + 8
          end
        elseif m[1] then
          -- canceled or expired while it waited: a dead entry, no longer counted
          if redis.call('HINCRBY', cfg, 'd_' .. list, -1) < 0 then
            redis.call('HSET', cfg, 'd_' .. list, 0)
          end
        end
      end

      lanes_flush(lanes)
      -- A list the number's cfg `ls` lacks was queued to by a version before it (lib.lua,
      -- LIST_LETTER; push counts the backlog from those lists only): added once it is met.
      if c[8] then
        local ls = c[8]
        for list in pairs(lanes.popped) do
          ls = with_list(ls, LIST_LETTER[list])
        end
        if ls ~= c[8] then redis.call('HSET', cfg, 'ls', ls) end
      end
      if granted > 0 then
        budget = budget - granted
        handed = handed + granted
        redis.call('HINCRBY', cfg, 'inflight', granted)
        if limit > 0 then
          -- The log must outlive its newest stamp by a window. Its expiry is set with room to
          -- spare and its time kept in cfg `lx`, so that it is renewed only when that room runs
          -- low (or the log is new), not at every take; and it is trimmed to `limit` entries
          -- only once it holds a few chunks more (the entries past `limit` are never read).
          local length = redis.call('LPUSH', log, unpack(written))
          if length > limit + LOG_TRIM_CHUNKS * chunk then
            redis.call('LTRIM', log, 0, limit - 1)
          end
          local needed = tonumber(written[granted]) + window
          if length == granted or tonumber(c[7] or '0') < needed then
            log_until = needed + LOG_KEEP_MS
            redis.call('PEXPIRE', log, math.ceil(log_until - now))
          end
        end
        n_groups = n_groups + 1
        out[head + 1] = pn
        out[head + 2] = limit
        out[head + 3] = c[5] or ''
        out[head + 4] = c[6] or ''
        out[head + 5] = granted
      else
        n_out = head -- (its header's slots, unused)
      end

      -- When may this number send next?
      -- `nx` is "not before" (pacing, window, pause); a wait for a retry is only a ready score,
      -- so that a new message is not held back behind it.
      local next_at, not_before = nil, nil
      if lanes_any(lanes) then
        if limit > 0 then
          -- paced from its previous schedule, so a late take does not slow the rate down
          local sched = first
          if nx > first - pace then sched = math.max(nx, first - pace) end
          next_at = sched + granted * 1000 / limit
          if next_at < first then next_at = first end
          -- and taken again `lookahead` before its next slot frees
          -- (the entry at limit - 1 of the log: the first written when the grants filled it,
          -- else the one `granted` places nearer the head before they were pushed)
          local oldest = olds[limit - granted - lo]
          if granted >= limit then oldest = written[granted - limit + 1] end
          if oldest and tonumber(oldest) + window - lookahead > next_at then
            next_at = tonumber(oldest) + window - lookahead
          end
          not_before = next_at
        else
          next_at = now_i -- (due now: a score rounded up would wait for the next ms)
        end
      else
        -- nothing to send now: due again at its first retry or scheduled send
        if retry_next == nil then
          local first_retry = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
          retry_next = first_retry[2] and tonumber(first_retry[2]) or false
        end
        if sched_next == nil then
          local first_sched = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
          sched_next = first_sched[2] and tonumber(first_sched[2]) or false
        end
        if retry_next then next_at = retry_next end
        if sched_next and (not next_at or sched_next < next_at) then next_at = sched_next end
      end
      if next_at then
        redis.call('ZADD', ready, whole_ms(next_at), pn)
      else
        redis.call('ZREM', ready, pn)
      end
      local writes = {}
      if not_before then writes = {'nx', ms(not_before)} end
      if log_until then writes[#writes + 1] = 'lx'; writes[#writes + 1] = ms(log_until) end
      if #writes > 0 then redis.call('HSET', cfg, unpack(writes)) end
      if not not_before and c[4] then redis.call('HDEL', cfg, 'nx') end
    end
  end
  if n_leased == 2 then return false end
  for i = 1, n_leased, 1000 do
    redis.call('ZADD', lease, unpack(leased, i, math.min(i + 999, n_leased)))
  end
  return true
end

-- When this shard has something to do next: its earliest ready number or lease deadline.
-- `first_lease`: the first lease deadline if known (false: none), nil to read it.
local function next_due(ready, lease, first_lease)
  local at = -1
  local first = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
  if first[2] then at = tonumber(first[2]) end
  if first_lease == nil then
    first_lease = redis.call('ZRANGEBYSCORE', lease, '-inf', '(inf', 'WITHSCORES', 'LIMIT', 0,
                             1)[2] or false
    if first_lease then first_lease = tonumber(first_lease) end
  end
  if first_lease and (at < 0 or first_lease < at) then at = first_lease end
  return at
end

for s = 1, #KEYS do
  -- the prelude's key functions all read P: point it at this shard
  P = KEYS[s]
  local ready, lease = key_ready(), key_lease()
  local first_lease = take_back_lapsed(lease)
  if budget > 0 and take_due(ready, lease) and first_lease ~= nil then
    -- leases were added: the first may be one of them
    local added = tonumber(lease_at)
    if first_lease == false or added < first_lease then first_lease = added end
  end
  out[HEADER + s] = ms(next_due(ready, lease, first_lease))
end

out[1], out[2], out[3], out[4] = ms(now), expired, table.concat(rate_limited, ','), n_groups
out[5], out[6], out[7] = deleted, string.format('%d', base_us), handed
return out
