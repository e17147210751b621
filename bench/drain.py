"""`python -m bench drain`: one worker process draining unlimited numbers, against a raw client.

In one run, on the same machine and cores: (1) `bench.raw_client` posts to the sandbox as fast
as aiohttp can, (2) a `gateway worker` (one process) drains a backlog on unlimited numbers to
the same sandbox. The figure is the drain's rate as a fraction of the raw client's (target
≥ 0.8), both measured by the sandbox's own arrival times.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from typing import Any

from bench import stack

TARGET = 0.8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--numbers", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=256)


def _rate(times: list[float]) -> float:
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


async def _arrival_rate(root: str, numbers: list[str]) -> float:
    times: list[float] = []
    for pn in numbers:
        times += (await stack.sandbox_get(root, f"arrivals?phone_number_id={pn}"))["times"]
    return _rate(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    numbers = [f"5559{i:08d}" for i in range(args.numbers)]
    worker_cpu, other_cpu = {0}, {1}
    with stack.redis_server(other_cpu) as redis_url, stack.sandbox(other_cpu) as root:
        raw = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.raw_client",
                f"{root}/v21.0",
                str(args.messages),
                str(args.concurrency),
            ],
            capture_output=True,
            check=True,
            preexec_fn=lambda: stack.pin(0, worker_cpu),
        )
        raw_rate = asyncio.run(_arrival_rate(root, [f"55500000{i}" for i in range(10)]))

        async def prepare() -> None:
            store = stack.store_for(redis_url)
            await stack.register(store, {pn: {"throughput_tier": "unlimited"} for pn in numbers})
            per_number = {pn: args.messages // len(numbers) for pn in numbers}
            await stack.queue(store, per_number)
            await stack.sandbox_put(root, "faults", {})
            await store.close()

        asyncio.run(prepare())
        expected = (args.messages // len(numbers)) * len(numbers)
        with stack.gateway(
            "worker",
            redis_url,
            root,
            worker_cpu,
            GATEWAY_WORKERS="1",
            GATEWAY_WORKER_CONCURRENCY=str(args.concurrency),
        ):
            asyncio.run(stack.wait_sent(root, expected + args.messages, 300))
        drain_rate = asyncio.run(_arrival_rate(root, numbers))
    ratio = drain_rate / raw_rate if raw_rate else 0.0
    return {
        "raw_client_per_s": round(raw_rate),
        "raw_client_reported": raw.stdout.decode().strip(),
        "drain_per_s": round(drain_rate),
        "ratio": round(ratio, 3),
        "target": TARGET,
        "met": ratio >= TARGET,
        "messages": expected,
        "numbers": len(numbers),
        "concurrency": args.concurrency,
    }
