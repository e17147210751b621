"""The least Redis work a message needs: the yardstick of `redis-cost` and `redis-instructions`.

Whatever the scripts do, API.md's guarantees ask Redis for a few writes per message: a record
readable by id from accept on (`GET /v1/messages/{id}`), the record again when the message ends,
kept for the status retention, a wamid index so Meta's statuses find it, and a lease per attempt
so a dead worker's messages come back. These three scripts do that and nothing more, each write
in the cheapest form Redis has (a string per record, one list and one sorted set per batch),
batched as the gateway batches (pushes of 1,000, takes of 128):
- push: a string per message (status, time, recipient, payload), the ids onto one list;
- take: the ids off the list, their records in one `MGET`, their leases in one `ZADD`;
- settle: each record rewritten `sent` with its expiry, the wamid's index entry with its expiry,
  the leases removed in one `ZREM`.

No rate, no lanes, no recipients, no callbacks, no migration: a floor under any design that keeps
those guarantees on Redis, not a design. Its cost measured in the same run as the gateway's tells
how far the scripts are from what the guarantees cost on that machine, whatever its speed.
"""

from __future__ import annotations

import time
from typing import Any

import redis

# (every key under one hash tag: one slot, as a shard's)
PREFIX = "floor:{0}:"
PUSH_BATCH = 1_000
TAKE_BATCH = 128
RETENTION_S = 3_600
LEASE_MS = 600_000
PAYLOAD = '{"type":"text","text":{"body":"' + "x" * 100 + '"}}'

# KEYS[1]: the prefix. ARGV: now (ms), then per message: id, recipient, payload.
PUSH = """
local p = KEYS[1]
local ids, n = {}, 0
for i = 2, #ARGV, 3 do
  n = n + 1
  ids[n] = ARGV[i]
  redis.call('SET', p .. 'm:' .. ARGV[i], 'queued ' .. ARGV[1] .. ' ' .. ARGV[i + 1] .. ' '
             .. ARGV[i + 2])
end
redis.call('RPUSH', p .. 'lane', unpack(ids))
return n
"""

# KEYS[1]: the prefix. ARGV: how many, lease deadline (ms). Returns id, record, id, record, ...
TAKE = """
local p = KEYS[1]
local ids = redis.call('LPOP', p .. 'lane', ARGV[1])
if not ids then return {} end
-- (with a member longer than a small set's, as the gateway's: the set stays a skiplist, where
-- an insert is a lookup, not a search of a flat list)
local records, leases = {}, {'inf', string.rep('~', 80)}
for i, id in ipairs(ids) do
  records[i] = p .. 'm:' .. id
  leases[2 * i + 1] = ARGV[2]
  leases[2 * i + 2] = id .. '#1'
end
records = redis.call('MGET', unpack(records))
redis.call('ZADD', p .. 'lease', unpack(leases))
local out = {}
for i, id in ipairs(ids) do
  out[2 * i - 1] = id
  out[2 * i] = records[i]
end
return out
"""

# KEYS[1]: the prefix. ARGV: retention (s), now (ms), then per message: id, wamid.
SETTLE = """
local p = KEYS[1]
local leases, n = {}, 0
for i = 3, #ARGV, 2 do
  local id, wamid = ARGV[i], ARGV[i + 1]
  redis.call('SET', p .. 'm:' .. id, 'sent ' .. ARGV[2] .. ' ' .. wamid, 'EX', ARGV[1])
  redis.call('SET', p .. 'w:' .. wamid, id, 'EX', ARGV[1])
  n = n + 1
  leases[n] = id .. '#1'
end
redis.call('ZREM', p .. 'lease', unpack(leases))
return n
"""


class Floor:
    """The three scripts, loaded on one server (so that none is compiled while measured)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.push = client.register_script(PUSH)
        self.take = client.register_script(TAKE)
        self.settle = client.register_script(SETTLE)
        for script in (self.push, self.take, self.settle):
            client.script_load(script.script)

    def accept(self, messages: int) -> None:
        now = str(int(time.time() * 1000))
        for start in range(0, messages, PUSH_BATCH):
            args: list[Any] = [now]
            for i in range(start, min(start + PUSH_BATCH, messages)):
                args += [f"{i:012d}", f"549114{i:07d}", PAYLOAD]
            self.push(keys=[PREFIX], args=args)

    def drain(self) -> int:
        """Takes and settles until the list is empty; the messages settled."""
        sent = 0
        while True:
            now = int(time.time() * 1000)
            taken = self.take(keys=[PREFIX], args=[TAKE_BATCH, now + LEASE_MS])
            if not taken:
                return sent
            args: list[Any] = [RETENTION_S, now]
            for id_ in taken[::2]:
                args += [id_, b"wamid." + id_]
            sent += int(self.settle(keys=[PREFIX], args=args))

    def clear(self) -> None:
        keys = list(self.client.scan_iter(match=PREFIX + "*", count=1_000))
        for start in range(0, len(keys), 1_000):
            self.client.delete(*keys[start : start + 1_000])
