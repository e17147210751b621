"""The drain as deployed on a Redis Cluster: `gateway worker` processes, a `gateway sandbox`
process and a real local cluster of three primaries (with replicas where one fails over).

What DESIGN.md's "Scale-out on Redis Cluster" promises, seen from the upstream: worker processes
keep every number to its rate wherever its shard lives; a primary killed mid-drain loses nothing
a `202` promised, puts no number over its rate and does not pause the other primaries' numbers;
slots moved mid-drain lose and duplicate nothing.

The test registers numbers and queues messages through the gateway's own accept code on the
cluster, then reads what arrived at the sandbox (whose clock is this machine's monotonic clock,
like the test's).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from gateway import keys
from gateway.messages import Messages
from gateway.registry import Registry
from gateway.store import Store
from tests.acceptance.test_drain_processes import (  # noqa: F401 (fixture)
    Upstream,
    drained,
    queue,
    start_workers,
    upstream,
)
from tests.cluster import LocalCluster, Node, local_cluster
from tests.conftest import make_settings
from tests.integration.drain_support import max_in_window, sustained_rate
from tests.integration.test_cluster import shards_shared_on_cluster

SHARDS = 16  # as `start_workers` runs the workers
WORKERS = 2
TIERS = {"standard": 80, "medium": 200, "high": 1000}
BACKLOG_S = 2.5
# How close to its rate a backlog drains is a figure for `bench accuracy` (target 99%); here
# the drain must keep going. On a quiet machine this test's numbers drained at 97.2-104% of
# their rates in 55 runs (the first second's shape moves a 2.5 s backlog's figure by a few
# percent either way). What took them lower was other processes on this shared 2-core machine:
# with one core kept busy by another process, 93-99%; with 1.2 cores taken by other tests, an
# 80/s number at 92%, and 1,000/s numbers at 95-96% with no gap over 57 ms (their senders
# started late, their grants were put back). On a slower machine (2026-11-30: a plain HSET cost
# the server 3.5 times the CPU it did the day before) this test failed in 8 of 12 runs, the code
# of the day before as often as that day's: a number at 71-89% of its rate (once 65/s of 80/s),
# with no gap over 0.21 s and the machine 40% idle (one worker process held the three numbers'
# shards). The tight figure is `bench cluster`'s and `bench accuracy`'s; here the drain must
# keep going, as in test_drain_processes. Exactness, above, is not relaxed.
SUSTAINED_SHARE = 0.6

# Failover: each number's backlog outlasts the failed primary's replacement (2-3 s after the
# kill here, with `cluster-node-timeout` 1 s) by a few seconds.
FAILOVER_BACKLOG_S = 5
FAILOVER_TIER, FAILOVER_RATE = "high", 1000
KILL_AFTER_S = 1.0
# Generous for a shared 2-core machine, as in test_handover: across the failover the other
# primaries' 1,000/s numbers were measured at 30-44 ms between two arrivals at most, the same
# as before the kill (the gaps a sliding-window log makes at its rate).
LONGEST_PAUSE_S = 0.3

LOST_BACKLOG_S = 3
LOST_TIER, LOST_RATE = "medium", 200

RESHARD_BACKLOG_S = 4
MOVE_AFTER_S = 1.0


@asynccontextmanager
async def cluster_store(
    cluster: LocalCluster, tmp_path: Path, **changes: Any
) -> AsyncIterator[Store]:
    settings = make_settings(cluster.url, tmp_path / "data", shards=SHARDS, **changes)
    store = Store.from_settings(settings, cluster.url)
    try:
        yield store
    finally:
        await store.close()


def node_of(cluster: LocalCluster, key: str) -> Node:
    """The primary serving `key`."""
    return cluster.primary_for(key)


def shard_node(cluster: LocalCluster, pn: str) -> Node:
    """The primary serving the shard of phone number `pn`."""
    return node_of(cluster, keys.prefix(keys.shard_of(pn, SHARDS)))


def numbers_by_primary(cluster: LocalCluster) -> dict[Node, str]:
    """A phone number for each primary (in the order of their slots), on a shard it serves."""
    owners = cluster.slot_owners()
    found: dict[Node, str] = {}
    for i in itertools.count():
        pn = f"5550003{i:05d}"
        node = owners[key_slot(keys.prefix(keys.shard_of(pn, SHARDS)).encode())]
        found.setdefault(node, pn)
        if len(found) == len(set(owners.values())):
            return {node: found[node] for node in dict.fromkeys(owners.values())}
    raise AssertionError("unreachable")


async def statuses(store: Store, ids: list[str]) -> Counter[str]:
    messages = Messages(store)
    found: Counter[str] = Counter()
    # a hundred at a time: beyond its connections, a cluster client refuses rather than waits
    for start in range(0, len(ids), 100):
        views = await asyncio.gather(*(messages.get(m) for m in ids[start : start + 100]))
        found.update(view["status"] for view in views)
    return found


def bodies_of(pn: str, count: int) -> Counter[str]:
    """Each of the `count` messages `queue` made for `pn`, once."""
    return Counter(f"{pn}-{i}" for i in range(count))


def longest_gap(times: list[float], since: float) -> tuple[float, float]:
    """The longest time without an arrival, and when it began (seconds after `since`)."""
    return max(((b - a, a - since) for a, b in itertools.pairwise(times)), default=(0.0, 0.0))


async def test_two_worker_processes_hold_numbers_on_every_primary_to_their_rates(
    tmp_path: Path,
    upstream: Upstream,  # noqa: F811
) -> None:
    """Numbers at 80, 200 and 1,000 msg/s, one on each primary, each with a backlog, drained
    by two worker processes: every message sent exactly once, no sliding second over a
    number's rate, and each number near its rate throughout."""
    async with (
        local_cluster(tmp_path / "cluster", replicas=0) as cluster,
        cluster_store(cluster, tmp_path) as store,
    ):
        numbers = numbers_by_primary(cluster).values()
        rates = dict(zip(numbers, TIERS.items(), strict=True))
        registry = Registry(store)
        ids: list[str] = []
        for pn, (tier, rate) in rates.items():
            await registry.put(pn, {"throughput_tier": tier, "status": "pending"})
            ids += await queue(store, pn, int(rate * BACKLOG_S))
        workers = start_workers(tmp_path, cluster.url, upstream, WORKERS)
        try:
            # let go the moment the shares settle, as in test_drain_processes
            await shards_shared_on_cluster(store, WORKERS)
            for pn in rates:
                await registry.patch(pn, {"status": "active"})
            await drained(store, list(rates), 30.0, workers, upstream.command)
        finally:
            workers.stop()
        assert await statuses(store, ids) == Counter({"sent": len(ids)})
    for pn, (_, rate) in rates.items():
        times = await upstream.arrivals(pn)
        assert Counter(await upstream.bodies(pn)) == bodies_of(pn, int(rate * BACKLOG_S))
        assert max_in_window(times) <= rate, f"{pn} went over {rate}/s"
        longest, at = longest_gap(times, times[0])
        assert sustained_rate(times) >= SUSTAINED_SHARE * rate, (
            f"{pn}: {sustained_rate(times):.1f}/s of {rate}/s (longest gap {longest:.3f} s, "
            f"{at:.2f} s in)"
        )


async def test_a_primary_killed_mid_drain_loses_nothing_and_pauses_no_other_primary(
    tmp_path: Path,
    upstream: Upstream,  # noqa: F811
) -> None:
    """With `GATEWAY_ACK_DURABILITY=replica`, a primary SIGKILLed while a 1,000/s number on
    each primary drains (the primary of the worker member list, too): its replica takes over;
    every message answered `202` ends `sent`; no number goes over its rate in any sliding
    second, across the failover too (the replica may lack the last grants of a window: the
    drain holds the failed node's shards for a window, `gateway.drain.outage`); and the other
    primaries' numbers neither pause nor send a message twice."""
    async with (
        local_cluster(tmp_path / "cluster", replicas=1) as cluster,
        cluster_store(cluster, tmp_path, ack_durability="replica", ack_timeout=2.0) as store,
    ):
        numbers = numbers_by_primary(cluster)
        doomed = node_of(cluster, keys.members())
        others = [pn for node, pn in numbers.items() if node is not doomed]
        registry = Registry(store)
        ids: list[str] = []
        for pn in numbers.values():
            await registry.put(pn, {"throughput_tier": FAILOVER_TIER, "status": "pending"})
            ids += await queue(store, pn, FAILOVER_RATE * FAILOVER_BACKLOG_S)
        # A message whose `sent` had not reached the replica when its primary died is sent
        # again when its lease runs out (at least once): a short lease keeps that in the test.
        workers = start_workers(
            tmp_path,
            cluster.url,
            upstream,
            WORKERS,
            GATEWAY_ACK_DURABILITY="replica",
            GATEWAY_LEASE_SECONDS="3",
            # (which shards each process drains, and when: what a failure shows, `drained`)
            GATEWAY_LOG_LEVEL="INFO",
        )
        try:
            await shards_shared_on_cluster(store, WORKERS)
            for pn in numbers.values():
                await registry.patch(pn, {"status": "active"})
            await asyncio.sleep(KILL_AFTER_S)
            successor = cluster.replica_of(doomed)
            killed_at = time.monotonic()
            cluster.kill(doomed)
            await asyncio.to_thread(cluster.wait_promoted, successor)
            await drained(store, list(numbers.values()), 30.0, workers, upstream.command)
        finally:
            workers.stop()
        assert await statuses(store, ids) == Counter({"sent": len(ids)})
    arrived = {pn: Counter(await upstream.bodies(pn)) for pn in numbers.values()}
    for pn in numbers.values():
        assert set(arrived[pn]) == set(bodies_of(pn, FAILOVER_RATE * FAILOVER_BACKLOG_S))
        times = await upstream.arrivals(pn)
        assert max_in_window(times) <= FAILOVER_RATE, f"{pn} went over {FAILOVER_RATE}/s"
    for pn in others:
        longest, at = longest_gap(await upstream.arrivals(pn), killed_at)
        assert longest < LONGEST_PAUSE_S, f"{pn} paused {longest:.3f} s, {at:.2f} s after the kill"
    for pn in others:
        # (see test_a_primary_lost_for_good_holds_up_no_other_primary)
        twice = sorted(body for body, n in arrived[pn].items() if n > 1)
        assert not twice, f"{pn}: {len(twice)} sent twice, e.g. {twice[:3]}"


async def test_a_primary_lost_for_good_holds_up_no_other_primary(
    tmp_path: Path,
    upstream: Upstream,  # noqa: F811
) -> None:
    """A primary without a replica killed mid-drain, never to come back (what
    `cluster-require-full-coverage no` is for): the other primaries' numbers drain to the end,
    every message `sent` once. What became of their sends must not wait on the lost node: an
    outcome left unsettled keeps its message `sending`, and sends it again when its lease
    runs out."""
    async with (
        local_cluster(tmp_path / "cluster", replicas=0) as cluster,
        cluster_store(cluster, tmp_path) as store,
    ):
        numbers = numbers_by_primary(cluster)
        # not the member list's node: the shards' owners stay as they are
        keeper = node_of(cluster, keys.members())
        doomed = next(node for node in numbers if node is not keeper)
        others = [pn for node, pn in numbers.items() if node is not doomed]
        registry = Registry(store)
        ids: dict[str, list[str]] = {}
        for pn in numbers.values():
            await registry.put(pn, {"throughput_tier": LOST_TIER, "status": "pending"})
            ids[pn] = await queue(store, pn, LOST_RATE * LOST_BACKLOG_S)
        # One worker process: it sends for the lost node's number and the others' alike (with
        # two, whether one process had both was down to how the shards fell).
        workers = start_workers(tmp_path, cluster.url, upstream, 1)
        try:
            await shards_shared_on_cluster(store, 1)
            for pn in numbers.values():
                await registry.patch(pn, {"status": "active"})
            await asyncio.sleep(KILL_AFTER_S)
            cluster.kill(doomed)
            await drained(store, others, 15.0, workers, upstream.command)
        finally:
            workers.stop()
        for pn in others:
            assert await statuses(store, ids[pn]) == Counter({"sent": len(ids[pn])})
    for pn in others:
        assert Counter(await upstream.bodies(pn)) == bodies_of(pn, LOST_RATE * LOST_BACKLOG_S)
        assert max_in_window(await upstream.arrivals(pn)) <= LOST_RATE


async def test_slots_moved_mid_drain_lose_and_duplicate_nothing(
    tmp_path: Path,
    upstream: Upstream,  # noqa: F811
) -> None:
    """While numbers drain, the slots of the two busiest shards move with their keys (as
    `redis-cli --cluster reshard` moves them) from their primaries to the third: every message
    is sent exactly once, no number goes over its rate in any sliding second (its window
    log moves with its slot; a take for a slot half moved is refused, not half run), and the
    moved numbers pause only while their keys move."""
    async with (
        local_cluster(tmp_path / "cluster", replicas=0) as cluster,
        cluster_store(cluster, tmp_path) as store,
    ):
        busiest, busy, staying = numbers_by_primary(cluster).values()
        rates = {busiest: ("high", 1000), busy: ("medium", 200), staying: ("standard", 80)}
        target = shard_node(cluster, staying)
        registry = Registry(store)
        ids: list[str] = []
        for pn, (tier, rate) in rates.items():
            await registry.put(pn, {"throughput_tier": tier, "status": "pending"})
            ids += await queue(store, pn, rate * RESHARD_BACKLOG_S)
        moved = [
            key_slot(keys.prefix(keys.shard_of(pn, SHARDS)).encode()) for pn in (busiest, busy)
        ]
        workers = start_workers(tmp_path, cluster.url, upstream, WORKERS)
        try:
            await shards_shared_on_cluster(store, WORKERS)
            for pn in rates:
                await registry.patch(pn, {"status": "active"})
            await asyncio.sleep(MOVE_AFTER_S)
            moving = time.monotonic()
            await asyncio.to_thread(cluster.move_slots, moved, target)
            moved_in = time.monotonic() - moving
            assert all(shard_node(cluster, pn) is target for pn in rates)
            await drained(store, list(rates), 30.0, workers, upstream.command)
        finally:
            workers.stop()
        assert await statuses(store, ids) == Counter({"sent": len(ids)})
    for pn, (_, rate) in rates.items():
        assert Counter(await upstream.bodies(pn)) == bodies_of(pn, rate * RESHARD_BACKLOG_S)
        assert max_in_window(await upstream.arrivals(pn)) <= rate, f"{pn} went over {rate}/s"
    for pn in (busiest, busy):
        # a moved number waits for its slot's keys to move (a take over keys half moved is
        # refused), then goes on: its shard stays held meanwhile. (A shard was dropped when its
        # lease was renewed mid-move, until the next renewal: 0.77-0.91 s gaps in 5 of 23 runs.)
        longest, at = longest_gap(await upstream.arrivals(pn), moving)
        bound = moved_in + LONGEST_PAUSE_S
        assert longest < bound, f"{pn} paused {longest:.3f} s, {at:.2f} s after the move began"
