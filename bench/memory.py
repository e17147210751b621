"""`python -m bench memory`: Redis bytes per queued 100-byte text message (target ≤ 400 B).

A fresh redis-server, ten registered numbers, then 200,000 messages with a 100-character text
body queued through the gateway's own accept code; the figure is the growth of `used_memory`
divided by the messages. It also shows `MEMORY USAGE` of one message hash.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from typing import Any

from bench import stack
from gateway import keys
from gateway.embedded_redis import find_server

TARGET = 400


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=200_000)


async def _measure(redis_url: str, count: int) -> dict[str, Any]:
    store = stack.store_for(redis_url)
    numbers = [f"5558{i:08d}" for i in range(10)]
    await stack.register(store, {pn: {"throughput_tier": "standard"} for pn in numbers})
    before = int((await store.redis.info("memory"))["used_memory"])
    per_number = {pn: count // len(numbers) for pn in numbers}
    body = "x" * (100 - len("5558000000000-000000-"))  # bodies are `<pn>-<n>-<pad>`: ~100 chars
    total = await stack.queue(store, per_number, body=body)
    after = int((await store.redis.info("memory"))["used_memory"])
    pn = numbers[0]
    shard = keys.shard_of(pn, store.shards)
    first_id = (await store.redis.lrange(keys.lane(shard, pn, "n"), 0, 0))[0].decode()
    message_bytes = await store.redis.memory_usage(keys.msg(shard, first_id))
    lane_bytes = await store.redis.memory_usage(keys.lane(shard, pn, "n"))
    await store.close()
    return {
        "messages": total,
        "bytes_per_message": round((after - before) / total, 1),
        "message_hash_bytes": message_bytes,
        "lane_entry_bytes": round(lane_bytes / (count // len(numbers)), 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = find_server()
    version = subprocess.run(
        [server, "--version"], capture_output=True, text=True, check=True
    ).stdout
    with stack.redis_server() as redis_url:
        result = asyncio.run(_measure(redis_url, args.messages))
    return {
        **result,
        "server": server,
        "server_version": version.strip(),
        "target_bytes": TARGET,
        "met": result["bytes_per_message"] <= TARGET,
    }
