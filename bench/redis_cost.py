"""`python -m bench redis-cost`: the Redis server's own CPU per message, accept to settle.

What limits one Redis node (DESIGN.md, "Scale-out on Redis Cluster") is the server's CPU per
message end to end: the accept's `push`, then the worker's `take` and `settle` and what runs
beside them (leases, wake tokens, gauges). For each shape, on a private `redis-server`:
1. the backlog is queued through the gateway's own accept code, no worker running (accept);
2. one `gateway worker` process drains it into the sandbox (drain: from its start until the
   sandbox has every message, plus half a second for the last settles).
Per phase the server's CPU is `INFO cpu` (`used_cpu_user` + `used_cpu_sys`, every thread) after
minus before, and where it went is `INFO commandstats` after minus before. The shapes: one
`unlimited` number, 10 `high` numbers, 1,000 numbers of mixed tiers (as `bench drain`).

Commandstats counts every script as EVALSHA, and counts the commands a script calls both inside
the script's time and on their own lines. So a second, smaller pass per shape logs every command
in the slow log (`slowlog-log-slower-than 0`): top-level entries name each script by its SHA,
and the entries of the script's own client (`?:0`) just before a script's entry are the commands
it called. Logging every command costs the server more (up to half as much again), so that
pass gives the split (time per call, shares, commands per message), never the headline figure.

Commandstats and the slow log measure wall time: a server preempted inside a command counts the
wait. The headline is CPU time. A plain pipelined `HSET` measured in the same run is the
yardstick for a slow or fast day (`in_hsets`: a message's cost in simple writes); so is the floor
(bench/floor.py: the least Redis work API.md's guarantees ask per message, as plain as it can
be), run over as many messages before and after the shapes (`in_floors`: a message's cost in
floors, which a faster or slower machine moves little).

The worker runs with the gateway's defaults, per-recipient order and pair pacing on (a call on
the message's pair at take and at settle, more when messages park behind it);
`--no-recipient-rules` turns both off, to show what they cost.

Target (issue 9): at most 12 µs of server CPU per message; one node carries 1e6 ÷ that msg/s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

from bench import stack
from bench.drain import numbers_of
from bench.floor import Floor
from gateway.store.scripts import NAMES, source

TARGET_US = 12.0
SHAPES = ("unlimited-1", "high-10", "mixed-1000")
SCRIPT_COMMANDS = frozenset({"evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro"})
# the client address the slow log gives a command a script called
SCRIPT_CLIENT = "?:0"
TOP = 8
SLOWLOG_LEN = 2_000_000
REFERENCE_HSETS = 50_000
IDLE_S = 2.0
# the bench's own calls (snapshots, slow log), not the gateway's work
BENCH_COMMANDS = frozenset({"info", "slowlog", "config", "script"})
# `--no-recipient-rules`: the worker without per-recipient order and pair pacing
NO_RECIPIENT_RULES = {"GATEWAY_PAIR_INTERVAL": "0", "GATEWAY_RECIPIENT_ORDER": "false"}
# the worker on one CPU; Redis and the sandbox on the other (as `bench drain`)
WORKER_CPU, SERVER_CPU = {0}, {1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=20_000, help="per shape")
    parser.add_argument(
        "--split-messages",
        type=int,
        default=5_000,
        help="per shape in the slow-log pass that splits the cost by script (0: no such pass)",
    )
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument(
        "--no-recipient-rules",
        action="store_true",
        help="the worker without per-recipient order and pair pacing (GATEWAY_PAIR_INTERVAL=0, "
        "GATEWAY_RECIPIENT_ORDER=false): what those rules cost per message",
    )
    parser.add_argument("--shapes", default=",".join(SHAPES))


# --- pure: from what the server reports to figures ---


def command_delta(
    before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """Calls and µs per command between two `INFO commandstats` (as redis-py parses them).

    Keys are command names (`cmdstat_` dropped, lower case); commands that did not run are left
    out.
    """
    delta = {}
    for key, stats in after.items():
        was = before.get(key, {})
        calls = int(stats["calls"]) - int(was.get("calls", 0))
        usec = int(stats["usec"]) - int(was.get("usec", 0))
        if calls > 0 or usec > 0:
            delta[key.removeprefix("cmdstat_").lower()] = {"calls": calls, "usec": usec}
    return delta


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def slowlog_split(
    entries: Iterable[Mapping[str, Any]], names_by_sha: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Top-level commands of `SLOWLOG GET` entries, each script with the commands it called.

    A script run by SHA counts as `script:<name>` (`script:<sha>` when unknown); any other
    top-level command under its own name. The entries of the scripts' client (`?:0`) are
    pushed as those commands finish, before their script's own entry: each is counted in
    `inner` of the next script entry. Per key: `calls`, `usec`, `inner_calls`, `inner`
    (command -> calls).
    """
    totals: dict[str, dict[str, Any]] = {}
    pending: dict[str, int] = {}
    for entry in sorted(entries, key=lambda e: int(e["id"])):
        words = _text(entry["command"]).split(" ", 2)
        name = words[0].lower()
        if _text(entry.get("client_address", "")) == SCRIPT_CLIENT:
            pending[name] = pending.get(name, 0) + 1
            continue
        if name in SCRIPT_COMMANDS and len(words) > 1:
            name = "script:" + names_by_sha.get(words[1].lower(), words[1].lower())
        total = totals.setdefault(name, {"calls": 0, "usec": 0, "inner_calls": 0, "inner": {}})
        total["calls"] += 1
        total["usec"] += int(entry["duration"])
        if name.startswith("script:"):
            for command, calls in pending.items():
                total["inner"][command] = total["inner"].get(command, 0) + calls
                total["inner_calls"] += calls
            pending = {}
    return totals


def per_message(
    costs: Mapping[str, Mapping[str, int]], messages: int, top: int = TOP
) -> list[dict[str, Any]]:
    """The `top` entries by µs, each with its calls, µs per message and per call."""
    ranked = sorted(costs.items(), key=lambda item: item[1]["usec"], reverse=True)[:top]
    return [
        {
            "command": name,
            "calls": c["calls"],
            "us_per_message": round(c["usec"] / max(messages, 1), 2),
            "us_per_call": round(c["usec"] / max(c["calls"], 1), 1),
        }
        for name, c in ranked
    ]


def script_split(split: Mapping[str, Mapping[str, Any]], messages: int) -> list[dict[str, Any]]:
    """Each script's share of all scripts' time, per call and per message, and what it called."""
    scripts = {n: c for n, c in split.items() if n.startswith("script:")}
    all_usec = sum(c["usec"] for c in scripts.values()) or 1
    rows = []
    for row in per_message(scripts, messages, top=len(scripts)):
        c = scripts[row["command"]]
        inner = sorted(c["inner"].items(), key=lambda item: item[1], reverse=True)
        rows.append(
            {
                "script": row["command"].removeprefix("script:"),
                "calls": row["calls"],
                "share": round(c["usec"] / all_usec, 3),
                "us_per_call": row["us_per_call"],
                "us_per_message": row["us_per_message"],
                "commands_per_message": round(c["inner_calls"] / max(messages, 1), 1),
                "top_commands_per_message": {
                    k: round(v / max(messages, 1), 2) for k, v in inner[:5]
                },
            }
        )
    return rows


def merged(*parts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Calls and µs per command summed over phases."""
    total: dict[str, dict[str, int]] = {}
    for part in parts:
        for name, c in part.items():
            into = total.setdefault(name, {"calls": 0, "usec": 0})
            into["calls"] += c["calls"]
            into["usec"] += c["usec"]
    return total


def ceiling_per_s(us_per_message: float) -> int:
    """Messages per second one node carries at this server CPU per message (one core)."""
    return round(1e6 / us_per_message) if us_per_message > 0 else 0


# --- measuring ---


def script_shas() -> dict[str, str]:
    """SHA1 of each gateway script, as EVALSHA names it -> the script's name."""
    return {hashlib.sha1(source(name).encode()).hexdigest(): name for name in NAMES}


class Server:
    """The bench's private Redis: snapshots of its CPU and commandstats, and its slow log."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.client.config_set("slowlog-max-len", SLOWLOG_LEN)
        self.slowlog(on=False)
        # loaded now, so no script is compiled inside a measured phase (the cache is the server's)
        for name in NAMES:
            self.client.script_load(source(name))

    def slowlog(self, *, on: bool) -> None:
        self.client.config_set("slowlog-log-slower-than", 0 if on else -1)
        self.client.slowlog_reset()

    def inner_commands_counted(self) -> bool:
        """Whether commandstats counts a command a script calls (Redis 7 and valkey 8 do)."""
        before = self.client.info("commandstats").get("cmdstat_exists", {"calls": 0})
        self.client.eval("return redis.call('exists', KEYS[1])", 1, "bench:probe")
        after = self.client.info("commandstats").get("cmdstat_exists", {"calls": 0})
        return int(after["calls"]) > int(before["calls"])

    def hset_reference(self) -> float:
        """Server CPU µs of one plain `HSET` of a 4-field hash, sent in pipelines of 100."""
        fields = ["to", "5490000000001", "type", "text", "body", "x" * 80, "pn", "555800000000"]
        before, _ = self.snapshot()
        for start in range(0, REFERENCE_HSETS, 100):
            pipe = self.client.pipeline(transaction=False)
            for i in range(start, start + 100):
                pipe.hset(f"bench:ref:{i}", items=fields)
            pipe.execute()
        after, _ = self.snapshot()
        self.client.flushdb()
        return round((after - before) / REFERENCE_HSETS * 1e6, 3)

    def floor_reference(self, messages: int) -> float:
        """Server CPU µs per message of the floor (bench/floor.py): accept, take and settle."""
        floor = Floor(self.client)
        before, _ = self.snapshot()
        floor.accept(messages)
        sent = floor.drain()
        after, _ = self.snapshot()
        floor.clear()
        return round((after - before) / max(sent, 1) * 1e6, 2)

    def snapshot(self) -> tuple[float, dict[str, Any]]:
        cpu = self.client.info("cpu")
        stats = self.client.info("commandstats")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), stats

    def entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.client.slowlog_get(-1)
        return entries

    def close(self) -> None:
        self.client.close()


class Phase:
    """The server's CPU seconds and commandstats from one snapshot to the next."""

    def __init__(self, server: Server, start: tuple[float, dict[str, Any]] | None = None) -> None:
        self.server = server
        self.cpu, self.stats = start or server.snapshot()

    def end(self) -> Phase:
        """This phase ended now; the next one, returned, starts here."""
        now = self.server.snapshot()
        self.cpu_s = now[0] - self.cpu
        self.commands = command_delta(self.stats, now[1])
        return Phase(self.server, now)


async def _shape(
    redis_url: str,
    server: Server,
    root: str,
    shape: str,
    messages: int,
    concurrency: int,
    drained: Callable[[], None] = lambda: None,
    worker_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Queue (accept), then drain with one worker; the server's cost of each.

    `drained` is called when the drain phase has ended, before the worker idles.
    """
    tiers = numbers_of(shape)
    store = stack.store_for(redis_url)
    await store.redis.flushdb()
    await stack.sandbox_clear(root)
    await stack.register(store, {pn: {"throughput_tier": t} for pn, t in tiers.items()})
    server.client.slowlog_reset()
    accept = Phase(server)
    total = await stack.queue(store, dict.fromkeys(tiers, max(1, messages // len(tiers))))
    drain = accept.end()
    await store.close()
    started = time.monotonic()
    with stack.gateway(
        "worker",
        redis_url,
        root,
        WORKER_CPU,
        GATEWAY_WORKERS="1",
        GATEWAY_WORKER_CONCURRENCY=str(concurrency),
        **(worker_env or {}),
    ):
        await stack.wait_sent(root, total, 300)
        await asyncio.sleep(0.5)  # the last settles land
        seconds = time.monotonic() - started
        idle = drain.end()
        drained()
        # what the worker costs the server with nothing to send (leases, wake waits, gauges)
        await asyncio.sleep(IDLE_S)
        idle.end()
    commands = merged(accept.commands, drain.commands)
    cpu_us = (accept.cpu_s + drain.cpu_s) / total * 1e6
    scripts_us = sum(c["usec"] for n, c in commands.items() if n in SCRIPT_COMMANDS) / total
    return {
        "shape": shape,
        "numbers": len(tiers),
        "messages": total,
        "server_cpu_us_per_message": round(cpu_us, 2),
        "accept_cpu_us_per_message": round(accept.cpu_s / total * 1e6, 2),
        "drain_cpu_us_per_message": round(drain.cpu_s / total * 1e6, 2),
        "scripts_us_per_message": round(scripts_us, 2),
        "ceiling_msg_per_s": ceiling_per_s(cpu_us),
        "top_commands": per_message(commands, total),
        "drain_seconds": round(seconds, 1),
        "idle_worker_server_cpu_ms_per_s": round(idle.cpu_s / IDLE_S * 1e3, 2),
    }


def _split(
    redis_url: str,
    server: Server,
    root: str,
    shape: str,
    messages: int,
    concurrency: int,
    worker_env: Mapping[str, str],
) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    server.slowlog(on=True)
    try:
        run = asyncio.run(
            _shape(
                redis_url,
                server,
                root,
                shape,
                messages,
                concurrency,
                drained=lambda: entries.extend(server.entries()),
                worker_env=worker_env,
            )
        )
    finally:
        server.slowlog(on=False)
    split = slowlog_split(entries, script_shas())
    evalsha = next((c for c in run["top_commands"] if c["command"] == "evalsha"), None)
    logged = sum(c["calls"] for n, c in split.items() if n.startswith("script:"))
    called = sum(c["inner_calls"] for n, c in split.items() if n.startswith("script:"))
    return {
        "messages": run["messages"],
        "server_cpu_us_per_message_with_slowlog": run["server_cpu_us_per_message"],
        "complete": evalsha is not None and logged >= evalsha["calls"],
        # a count, not a speed: it reads the same on a slow machine and a fast one
        "script_commands_per_message": round(called / run["messages"], 1),
        "scripts": script_split(split, run["messages"]),
        "other_top_level": per_message(
            {
                n: c
                for n, c in split.items()
                if not n.startswith("script:") and n not in BENCH_COMMANDS
            },
            run["messages"],
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    shapes = [s for s in args.shapes.split(",") if s]
    worker_env = NO_RECIPIENT_RULES if args.no_recipient_rules else {}
    load_before = os.getloadavg()[0]
    with stack.redis_server(SERVER_CPU) as redis_url, stack.sandbox(SERVER_CPU) as root:
        server = Server(redis_url)
        try:
            inner = server.inner_commands_counted()
            references = [server.hset_reference()]
            floors = [server.floor_reference(args.messages)]
            runs = [
                asyncio.run(
                    _shape(
                        redis_url,
                        server,
                        root,
                        s,
                        args.messages,
                        args.concurrency,
                        worker_env=worker_env,
                    )
                )
                for s in shapes
            ]
            if args.split_messages > 0:
                for r in runs:
                    r["split"] = _split(
                        redis_url,
                        server,
                        root,
                        r["shape"],
                        args.split_messages,
                        args.concurrency,
                        worker_env,
                    )
            # the machine drifts within minutes: the yardstick is taken before and after
            references.append(server.hset_reference())
            floors.append(server.floor_reference(args.messages))
        finally:
            server.close()
    reference = sum(references) / len(references)
    floor = sum(floors) / len(floors)
    for r in runs:
        r["in_hsets"] = round(r["server_cpu_us_per_message"] / reference, 1)
        r["in_floors"] = round(r["server_cpu_us_per_message"] / floor, 2)
    worst = max(r["server_cpu_us_per_message"] for r in runs)
    return {
        "runs": runs,
        "summary": {
            r["shape"]: {
                "server_cpu_us_per_message": r["server_cpu_us_per_message"],
                "scripts_us_per_message": r["scripts_us_per_message"],
                "ceiling_msg_per_s": r["ceiling_msg_per_s"],
                "in_hsets": r["in_hsets"],
                "in_floors": r["in_floors"],
                "script_commands_per_message": r.get("split", {}).get(
                    "script_commands_per_message"
                ),
            }
            for r in runs
        },
        "reference_hset_us": round(reference, 3),
        "reference_hset_us_before_after": references,
        "floor_us_per_message": round(floor, 2),
        "floor_us_per_message_before_after": floors,
        "inner_commands_in_commandstats": inner,
        # the machine is shared: other processes' load makes a busy day's figures higher
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "target_us_per_message": TARGET_US,
        "met": worst <= TARGET_US,
        "concurrency": args.concurrency,
        "recipient_rules": not args.no_recipient_rules,
    }
