"""`python -m bench scale`: does a message cost the same with 10 or 10,000 active numbers?

The same backlog is queued over 10 numbers, then over 10,000, and drained by one `gateway
worker` process into the sandbox; for unlimited numbers (only the drain itself limits the
pace), all `high` numbers and a mixed fleet (10% high, 30% medium, 60% standard). Per run: the
CPU time per message of the worker and of Redis (Redis's includes accepting the backlog, the
same work in every run). Targets: the cost per message with 10,000 numbers within 1.25x of the
cost with 10, for every tier mix; each rate-limited run's cost is also reported as a ratio to
the unlimited run of the same spread.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import redis

from bench import stack

TARGET = 1.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--spreads", default="10,10000")
    parser.add_argument("--tiers", default="unlimited,high,mixed")


def _redis_cpu(url: str) -> float:
    client = redis.Redis.from_url(url)
    info = client.info("cpu")
    client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _tier(kind: str, i: int) -> str:
    if kind != "mixed":
        return kind
    return "high" if i % 10 == 0 else "medium" if i % 10 < 4 else "standard"


async def _one(redis_url: str, root: str, numbers: int, messages: int, kind: str) -> dict[str, Any]:
    """Start the worker idle, then queue the backlog: it drains while we watch its CPU."""
    pns = [f"5556{i:08d}" for i in range(numbers)]
    store = stack.store_for(redis_url)
    await store.redis.flushdb()
    await stack.sandbox_clear(root)
    await stack.register(
        store, {pn: {"throughput_tier": _tier(kind, i)} for i, pn in enumerate(pns)}
    )
    total = (messages // numbers) * numbers
    with stack.gateway("worker", redis_url, root, None, GATEWAY_WORKERS="1") as worker:
        await asyncio.sleep(1.0)  # shard leases claimed, worker idle
        worker_before = stack.cpu_seconds(worker.pid)
        redis_before = _redis_cpu(redis_url)
        await stack.queue(store, dict.fromkeys(pns, messages // numbers))
        await stack.wait_sent(root, total, 300)
        worker_cpu = stack.cpu_seconds(worker.pid) - worker_before
        redis_cpu = _redis_cpu(redis_url) - redis_before
    await store.close()
    return {
        "tiers": kind,
        "numbers": numbers,
        "messages": total,
        "worker_cpu_us_per_message": round(worker_cpu / total * 1e6, 1),
        "redis_cpu_us_per_message": round(redis_cpu / total * 1e6, 1),
        "cost_us_per_message": round((worker_cpu + redis_cpu) / total * 1e6, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    spreads = [int(s) for s in args.spreads.split(",")]
    kinds = [k for k in args.tiers.split(",") if k]
    with stack.redis_server() as redis_url, stack.sandbox() as root:
        runs = [
            asyncio.run(_one(redis_url, root, n, args.messages, kind))
            for kind in kinds
            for n in spreads
        ]
    by = {(r["tiers"], r["numbers"]): r for r in runs}
    ratios = {}
    for kind in kinds:
        few, many = by[(kind, spreads[0])], by[(kind, spreads[-1])]
        ratios[kind] = round(many["cost_us_per_message"] / few["cost_us_per_message"], 3)
        if kind != "unlimited" and "unlimited" in kinds:
            for n in spreads:
                by[(kind, n)]["cost_ratio_to_unlimited"] = round(
                    by[(kind, n)]["cost_us_per_message"]
                    / by[("unlimited", n)]["cost_us_per_message"],
                    3,
                )
    return {
        "runs": runs,
        "cost_ratio_many_to_few": ratios,
        "target": TARGET,
        "met": all(r <= TARGET for r in ratios.values()),
    }
