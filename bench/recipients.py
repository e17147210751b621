"""`python -m bench recipients`: what per-recipient order and Meta's pair rate cost the drain.

In one run, one `gateway worker` process drains a backlog on one `unlimited` number (only the
drain itself sets the pace), every message to a recipient of its own:
1. with pair pacing on (the default, 6 s and a burst of 45) and off (`GATEWAY_PAIR_INTERVAL=0`;
   per-recipient order stays on), alternately, twice each: drain rate on ÷ off (target ≥ 0.95);
2. CPU per message (worker + Redis) with the backlog spread over as many recipients as messages
   (100,000 by default) against the same backlog over 100 recipients, pacing on with a 1 ms
   interval so that order is kept but the allowance never makes a message wait: the pair state
   must not make a message cost more when there are many recipients (target ≤ 1.25x).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench import stack
from bench.scale import _redis_cpu

TARGET_PACING = 0.95
TARGET_SCALE = 1.25
PN = "555800000001"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=30_000, help="backlog of the on/off runs")
    parser.add_argument("--spread", type=int, default=100_000, help="backlog of the cost runs")


async def _drain(redis_url: str, root: str, count: int, interval: str) -> float:
    """msg/s of one worker draining `count` messages to distinct recipients."""
    store = stack.store_for(redis_url)
    await store.redis.flushdb()
    await stack.sandbox_clear(root)
    await stack.register(store, {PN: {"throughput_tier": "unlimited"}})
    total = await stack.queue(store, {PN: count})
    await store.close()
    with stack.gateway("worker", redis_url, root, {0}, GATEWAY_PAIR_INTERVAL=interval):
        await stack.wait_sent(root, total, 600)
    records = (await stack.sandbox_get(root, "requests?limit=10000000"))["requests"]
    times = sorted(r["time"] for r in records if r["outcome"] == "ok")
    return float((len(times) - 1) / (times[-1] - times[0]))


async def _cost(redis_url: str, root: str, count: int, recipients: int) -> dict[str, Any]:
    """CPU µs per message (worker + Redis) to drain `count` messages over `recipients`."""
    store = stack.store_for(redis_url)
    await store.redis.flushdb()
    await stack.sandbox_clear(root)
    await stack.register(store, {PN: {"throughput_tier": "unlimited"}})
    with stack.gateway("worker", redis_url, root, {0}, GATEWAY_PAIR_INTERVAL="1ms") as worker:
        await asyncio.sleep(1.0)  # shard leases claimed, worker idle
        worker_before = stack.cpu_seconds(worker.pid)
        redis_before = _redis_cpu(redis_url)
        total = await stack.queue(store, {PN: count}, recipients=recipients)
        await stack.wait_sent(root, total, 600)
        worker_cpu = stack.cpu_seconds(worker.pid) - worker_before
        redis_cpu = _redis_cpu(redis_url) - redis_before
    await store.close()
    return {
        "recipients": recipients,
        "messages": total,
        "worker_cpu_us_per_message": round(worker_cpu / total * 1e6, 1),
        "redis_cpu_us_per_message": round(redis_cpu / total * 1e6, 1),
        "cost_us_per_message": round((worker_cpu + redis_cpu) / total * 1e6, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with stack.redis_server({1}) as redis_url, stack.sandbox({1}) as root:
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(2):
            for mode, interval in (("off", "0"), ("on", "6")):
                rates[mode].append(asyncio.run(_drain(redis_url, root, args.messages, interval)))
        many = asyncio.run(_cost(redis_url, root, args.spread, args.spread))
        few = asyncio.run(_cost(redis_url, root, args.spread, 100))
    on, off = sum(rates["on"]) / 2, sum(rates["off"]) / 2
    pacing_ratio = round(on / off, 3)
    scale_ratio = round(many["cost_us_per_message"] / few["cost_us_per_message"], 3)
    return {
        "pacing_on_per_s": [round(r) for r in rates["on"]],
        "pacing_off_per_s": [round(r) for r in rates["off"]],
        "pacing_on_ratio_to_off": pacing_ratio,
        "cost_runs": [many, few],
        "cost_ratio_many_to_few_recipients": scale_ratio,
        "targets": {"pacing_on_ratio_to_off": TARGET_PACING, "cost_ratio": TARGET_SCALE},
        "met": pacing_ratio >= TARGET_PACING and scale_ratio <= TARGET_SCALE,
    }
