"""`python -m bench latency`: accept → upstream arrival for messages to idle numbers.

`gateway run` (one process: API and drain) sends to the sandbox. The benchmark posts single
messages, one at a time at a modest pace, each to a number with nothing queued, and matches each
arrival at the sandbox (same machine, same monotonic clock) to the moment its POST started.
Targets: p50 ≤ 3 ms, p99 ≤ 10 ms. The figure includes the accept's own HTTP round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp

from bench import stack

TARGET_P50_MS = 3.0
TARGET_P99_MS = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--numbers", type=int, default=1000)
    parser.add_argument("--per-second", type=float, default=50.0)
    parser.add_argument(
        "--warm-up", type=int, default=20, help="first sends not counted (connections, scripts)"
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


async def _measure(base: str, root: str, args: argparse.Namespace) -> list[float]:
    numbers = [f"5554{i:08d}" for i in range(args.numbers)]
    headers = {"Authorization": "Bearer bench-send"}
    started: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for i in range(args.warm_up + args.messages):
            pn = numbers[i % len(numbers)]
            tag = f"latency-{i}"
            body = {
                "phone_number_id": pn,
                "to": f"549{i:010d}",  # Meta's pair rate never sets the pace
                "type": "text",
                "text": {"body": tag},
            }
            started[tag] = time.monotonic()
            async with http.post(f"{base}/v1/messages", json=body, headers=headers) as response:
                assert response.status == 202, await response.text()
            await asyncio.sleep(1.0 / args.per_second)
        await asyncio.sleep(1.0)
    requests = (await stack.sandbox_get(root, "requests?limit=1000000"))["requests"]
    counted = {f"latency-{i}" for i in range(args.warm_up, args.warm_up + args.messages)}
    return [
        (r["time"] - started[r["body"]["text"]["body"]]) * 1000.0
        for r in requests
        if r["outcome"] == "ok" and r["body"]["text"]["body"] in counted
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    numbers = {f"5554{i:08d}": {"throughput_tier": "standard"} for i in range(args.numbers)}
    with stack.redis_server() as redis_url, stack.sandbox() as root:

        async def prepare() -> None:
            store = stack.store_for(redis_url)
            await stack.register(store, numbers)
            await store.close()

        asyncio.run(prepare())
        with stack.gateway("run", redis_url, root, None, GATEWAY_WORKERS="1") as gateway:
            base = f"http://127.0.0.1:{gateway.port}"  # type: ignore[attr-defined]
            lags = asyncio.run(_measure(base, root, args))
    p50, p99 = percentile(lags, 0.5), percentile(lags, 0.99)
    return {
        "messages": len(lags),
        "p50_ms": round(p50, 2),
        "p90_ms": round(percentile(lags, 0.9), 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(max(lags), 2),
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS},
        "met": p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS,
    }
