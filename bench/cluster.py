"""`python -m bench cluster`: the cost of a message on a Redis Cluster ÷ on one Redis node.

The gateway runs unchanged on a cluster (`GATEWAY_REDIS_URL=redis+cluster://...`), where a
script that spans shards is split per node and every call carries a preamble (DESIGN.md,
"Scale-out on Redis Cluster"). What that costs is measured end to end, per shape, on the same
machine in one run:
1. the backlog is queued through the gateway's own accept code (no worker running);
2. one `gateway worker` drains it into the sandbox, until the sandbox has every message (plus
   half a second for the last settles).
The cost per message is the CPU of every Redis server (`INFO cpu`: user + sys, over both phases)
plus the CPU of the worker's process tree (the supervisor and its children, from its /healthz
answering to the end) ÷ messages (the worker's: ÷ those that arrived in its window). Sides:
one plain `redis-server`, and a local cluster of 3 primaries with no replicas (a replica would
add its own work, which is not what this compares). Redis and the sandbox run on CPU 1, the
worker on CPU 0 (as `bench drain`).

This shared 2-core machine drifts within a minute, so each shape runs one node, cluster,
cluster, one node, and each side's figure is the mean of its two runs.

Target (issue 9): the cluster's cost per message at most 1.2 times one node's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench import stack
from bench.drain import numbers_of
from tests.cluster import LocalCluster

TARGET_RATIO = 1.2
SHAPES = ("unlimited-1", "high-1000", "mixed-1000")
# each shape's runs, in this order: drift weighs on both sides alike
ORDER = ("one-node", "cluster", "cluster", "one-node")
SETTLE_S = 0.5
IDLE_S = 2.0
WORKER_CPU, SERVER_CPU = {0}, {1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=20_000, help="per shape and run")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--shapes", default=",".join(SHAPES))


# --- pure: from runs to figures ---

FIGURES = ("redis_us_per_message", "worker_us_per_message", "us_per_message", "drain_per_s")


def summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per shape: each side's mean of its runs, and the cluster's cost ÷ one node's."""
    by_shape: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for r in runs:
        by_shape.setdefault(r["shape"], {}).setdefault(r["side"], []).append(r)
    out = {}
    for shape, sides in by_shape.items():
        means = {
            side: {f: round(sum(r[f] for r in rs) / len(rs), 1) for f in FIGURES}
            for side, rs in sides.items()
        }
        one, many = means["one-node"]["us_per_message"], means["cluster"]["us_per_message"]
        out[shape] = {**means, "ratio": round(many / one, 3) if one > 0 else float("inf")}
    return out


def drain_rate(times: Sequence[float]) -> float:
    """Arrivals per second from the first to the last."""
    return (len(times) - 1) / (max(times) - min(times)) if len(times) > 1 else 0.0


# --- measuring ---


@dataclass
class Side:
    """Where the gateway's Redis is: its URL, and a client of each server (to read its CPU)."""

    name: str
    url: str
    servers: list[redis.Redis]

    def cpu_s(self) -> float:
        """CPU seconds every server has used (user + sys, all threads)."""
        infos = (server.info("cpu") for server in self.servers)
        return sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos)

    def flush(self) -> None:
        for server in self.servers:
            server.flushall()

    def close(self) -> None:
        for server in self.servers:
            server.close()


@contextlib.contextmanager
def local_cluster(cpus: set[int]) -> Iterator[LocalCluster]:
    """A started 3-primary cluster without replicas, its servers on `cpus`."""
    directory = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    cluster = LocalCluster(directory, replicas=0)
    try:
        cluster.start()
        for node in cluster.nodes:
            assert node.process is not None
            stack.pin(node.process.pid, cpus)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def _sent(root: str) -> int:
    return sum((await stack.sandbox_get(root, "arrivals"))["numbers"].values())


async def _arrival_times(root: str) -> list[float]:
    records = (await stack.sandbox_get(root, "requests?limit=10000000"))["requests"]
    return [r["time"] for r in records if r["outcome"] == "ok"]


async def _run(
    side: Side, root: str, shape: str, messages: int, concurrency: int
) -> dict[str, Any]:
    tiers = numbers_of(shape)
    side.flush()
    await stack.sandbox_clear(root)
    store = stack.store_for(side.url)
    try:
        await stack.register(store, {pn: {"throughput_tier": t} for pn, t in tiers.items()})
        redis_before = side.cpu_s()
        total = await stack.queue(store, dict.fromkeys(tiers, max(1, messages // len(tiers))))
    finally:
        await store.close()
    with stack.gateway(
        "worker",
        side.url,
        root,
        WORKER_CPU,
        GATEWAY_WORKERS="1",
        GATEWAY_WORKER_CONCURRENCY=str(concurrency),
    ) as worker:
        # its start (imports, connections) is not a message's cost; what it sent meanwhile is
        # left out of its count
        worker_before, early = stack.cpu_seconds(worker.pid), await _sent(root)
        await stack.wait_sent(root, total, 300)
        await asyncio.sleep(SETTLE_S)
        worker_s = stack.cpu_seconds(worker.pid) - worker_before
        redis_s = side.cpu_s() - redis_before
    redis_us = redis_s / total * 1e6
    worker_us = worker_s / max(total - early, 1) * 1e6
    return {
        "shape": shape,
        "side": side.name,
        "messages": total,
        "redis_us_per_message": round(redis_us, 1),
        "worker_us_per_message": round(worker_us, 1),
        "us_per_message": round(redis_us + worker_us, 1),
        "drain_per_s": round(drain_rate(await _arrival_times(root))),
        "sent_before_measured": early,
    }


def _idle_ms_per_s(side: Side) -> float:
    """What the servers cost with no client (the cluster's nodes ping each other)."""
    before = side.cpu_s()
    time.sleep(IDLE_S)
    return round((side.cpu_s() - before) / IDLE_S * 1e3, 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    shapes = [s for s in args.shapes.split(",") if s]
    load_before = os.getloadavg()[0]
    # this process polls the sandbox: kept off the worker's CPU (as `bench drain`)
    stack.pin(0, SERVER_CPU)
    with (
        stack.redis_server(SERVER_CPU) as one_url,
        local_cluster(SERVER_CPU) as cluster,
        stack.sandbox(SERVER_CPU) as root,
    ):
        sides = {
            "one-node": Side("one-node", one_url, [redis.Redis.from_url(one_url)]),
            "cluster": Side("cluster", cluster.url, [node.client() for node in cluster.nodes]),
        }
        try:
            idle = {name: _idle_ms_per_s(side) for name, side in sides.items()}
            runs = [
                asyncio.run(_run(sides[name], root, shape, args.messages, args.concurrency))
                for shape in shapes
                for name in ORDER
            ]
        finally:
            for side in sides.values():
                side.close()
    figures = summary(runs)
    return {
        "summary": figures,
        "runs": runs,
        "idle_servers_cpu_ms_per_s": idle,
        # the machine is shared: other processes' load makes a busy day's figures higher
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "targets": {"ratio": TARGET_RATIO},
        "met": all(f["ratio"] <= TARGET_RATIO for f in figures.values()),
        "concurrency": args.concurrency,
    }
