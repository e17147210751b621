"""`python -m bench handover`: how long a number pauses when its shard changes workers.

Two shards and two `high` numbers (1,000 msg/s, one on each shard) with a backlog. One `gateway
worker` drains them; a second joins (and is handed one shard); later the first is stopped with
SIGTERM (and hands the other shard over). Every arrival at the sandbox is timed, so for each
number in one run:
- the longest gap between two arrivals while one worker drains alone (the steady reference:
  what this machine's scheduling costs anyway);
- the longest gap in the seconds after the join and after the SIGTERM (each number's shard
  moves once in one of them, and may be briefly disturbed in the other).
The figure is the longest handover gap (target ≤ 50 ms), reported with the ratio to the steady
one. Before handover existed (release, then claim at the next refresh) it was 0.85-1.0 s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
from typing import Any

from bench import stack
from gateway import keys
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store

TARGET_GAP_MS = 50.0
NUMBERS = ("555000001000", "555000001004")  # shards 0 and 1 of 2
RATE = 1000
SETTLE_S = 1.5  # after a start, before the next event
AFTER_S = 2.5  # how long after an event its gaps are counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=7, help="backlog per number, in seconds")


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float]:
    """The longest gap (s) between consecutive arrivals with the later one in [start, end),
    and how long after `start` it ended."""
    gaps = [(b - a, b - start) for a, b in itertools.pairwise(times) if start <= b < end]
    return max(gaps, default=(0.0, 0.0))


async def _run(redis_url: str, root: str, seconds: int) -> dict[str, Any]:
    settings = Settings(redis_url=redis_url, shards=2, max_backlog=10_000_000)
    store = Store.from_settings(settings, redis_url)
    assert {keys.shard_of(pn, 2) for pn in NUMBERS} == {0, 1}
    await store.redis.flushdb()
    await stack.sandbox_clear(root)
    registry = Registry(store)
    await stack.register(
        store, {pn: {"throughput_tier": "high", "status": "pending"} for pn in NUMBERS}
    )
    total = await stack.queue(store, {pn: RATE * seconds for pn in NUMBERS})
    env = {"GATEWAY_SHARDS": "2", "GATEWAY_WORKERS": "1"}
    with stack.gateway("worker", redis_url, root, **env) as first:
        await asyncio.sleep(SETTLE_S)  # it holds both shards
        for pn in NUMBERS:
            await registry.patch(pn, {"status": "active"})
        started = time.monotonic()
        await asyncio.sleep(SETTLE_S)
        joined = time.monotonic()
        with stack.gateway("worker", redis_url, root, **env):
            await asyncio.sleep(SETTLE_S + 1.0)
            stopped = time.monotonic()
            first.popen.send_signal(signal.SIGTERM)
            await stack.wait_sent(root, total, 120)
    await store.close()
    figures: dict[str, Any] = {}
    worst = 0.0
    for pn in NUMBERS:
        # the sandbox stamps arrivals with this machine's monotonic clock
        times = sorted((await stack.sandbox_get(root, f"arrivals?phone_number_id={pn}"))["times"])
        steady, _ = longest_gap(times, started + 0.3, joined)
        on_join, join_at = longest_gap(times, joined, joined + AFTER_S)
        on_stop, stop_at = longest_gap(times, stopped, stopped + AFTER_S)
        worst = max(worst, on_join, on_stop)
        figures[pn] = {
            "arrivals": len(times),
            "steady_longest_gap_ms": round(steady * 1000, 1),
            "join_longest_gap_ms": round(on_join * 1000, 1),
            "join_gap_ended_after_s": round(join_at, 3),
            "stop_longest_gap_ms": round(on_stop * 1000, 1),
            "stop_gap_ended_after_s": round(stop_at, 3),
        }
    steady_worst = max(f["steady_longest_gap_ms"] for f in figures.values())
    return {
        "numbers": figures,
        "handover_gap_ms": round(worst * 1000, 1),
        "steady_gap_ms": steady_worst,
        "handover_gap_ratio_to_steady": round(worst * 1000 / max(steady_worst, 0.1), 2),
        "target_gap_ms": TARGET_GAP_MS,
        "met": worst * 1000 <= TARGET_GAP_MS,
        "backlog_seconds": seconds,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with stack.redis_server() as redis_url, stack.sandbox() as root:
        return asyncio.run(_run(redis_url, root, args.seconds))
