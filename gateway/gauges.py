"""Gauges that describe Redis: queue depth, in-flight sends, numbers, capacity, backlog ETA.

They are the same for every process, so one process in the whole deployment computes them
(a leader elected with a short Redis lease) every few seconds; a scrape only reads the files
prometheus_client keeps. A process that loses the lease sets what it published to zero, so
`sum` and `max` over instances both stay right. The sums are made in Redis (`gauges.lua`, a
page of numbers per call): the leader is also a drain worker, and reading every number's
record into Python stalled its sends for tens of milliseconds with thousands of numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, cast

from gateway import keys, metrics
from gateway.errors import StoreUnavailable
from gateway.registry.model import TIER_RATES
from gateway.store import Store, as_text, unavailable_on_redis_errors

log = logging.getLogger("gateway.gauges")

REFRESH_S = 5.0
PAGE = 1000  # numbers per script call: a few milliseconds of Redis time
_LANES = ("high", "normal", "low")  # the order gauges.lua sums them in
_STATUSES = ("pending", "active", "disconnected", "deleted")


class GaugePublisher:
    def __init__(self, store: Store, worker_id: str) -> None:
        self.store = store
        self.worker_id = worker_id
        self.leading = False
        self._published: list[tuple[Any, tuple[str, ...]]] = []

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                if await self._lead():
                    await self.refresh()
                elif self.leading:
                    self._zero()
            except StoreUnavailable:
                pass  # the API and the drain report the outage
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), REFRESH_S)

    async def _lead(self) -> bool:
        ttl_ms = int(REFRESH_S * 3 * 1000)
        redis = self.store.redis
        with unavailable_on_redis_errors():
            if await redis.set(keys.GAUGES_LEADER, self.worker_id, nx=True, px=ttl_ms):
                return True
            holder = await redis.get(keys.GAUGES_LEADER)
            if holder is not None and as_text(holder) == self.worker_id:
                await redis.pexpire(keys.GAUGES_LEADER, ttl_ms)
                return True
        return False

    def _zero(self) -> None:
        for gauge, labels in self._published:
            (gauge.labels(*labels) if labels else gauge).set(0)
        self.leading = False

    async def refresh(self) -> None:
        """Add up every number's state (in Redis, a page at a time) and publish the gauges."""
        self.leading = True
        tiers = list(TIER_RATES)
        n = len(tiers)
        counts = [0] * (len(_STATUSES) * n)
        depth = [0] * (len(_LANES) * n)
        capacity = [0] * n
        eta = [0.0] * n
        inflight = 0
        async for reply in self._pages(tiers):
            sums = [int(v) for v in reply[: len(counts) + len(depth) + n]]
            counts = [a + b for a, b in zip(counts, sums, strict=False)]
            depth = [a + b for a, b in zip(depth, sums[len(counts) :], strict=False)]
            at = len(counts) + len(depth)
            capacity = [a + b for a, b in zip(capacity, sums[at:], strict=False)]
            at += n
            eta = [max(a, float(b)) for a, b in zip(eta, reply[at : at + n], strict=True)]
            inflight += int(reply[at + n])
            rows = reply[at + n + 1 :]
            for i in range(0, len(rows), 3):
                pn = as_text(rows[i])
                metrics.NUMBER_QUEUE_DEPTH.labels(pn).set(int(rows[i + 1]))
                metrics.NUMBER_RATE.labels(pn).set(int(rows[i + 2]))
        published: list[tuple[Any, tuple[str, ...]]] = []
        for t, tier in enumerate(tiers):
            for lane_index, lane_name in enumerate(_LANES):
                metrics.QUEUE_DEPTH.labels(tier, lane_name).set(depth[t * len(_LANES) + lane_index])
                published.append((metrics.QUEUE_DEPTH, (tier, lane_name)))
            metrics.TIER_CAPACITY.labels(tier).set(capacity[t])
            metrics.BACKLOG_ETA.labels(tier).set(eta[t])
            published += [(metrics.TIER_CAPACITY, (tier,)), (metrics.BACKLOG_ETA, (tier,))]
            for s, status in enumerate(_STATUSES):
                metrics.NUMBERS.labels(status, tier).set(counts[s * n + t])
                published.append((metrics.NUMBERS, (status, tier)))
        metrics.INFLIGHT.set(inflight)
        published.append((metrics.INFLIGHT, ()))
        self._published = published

    async def _pages(self, tiers: list[str]) -> AsyncIterator[list[Any]]:
        """The sums of `gauges.lua` for each page of registered numbers."""
        redis = self.store.redis
        settings = self.store.settings
        start = "-"
        while True:
            with unavailable_on_redis_errors():
                page = cast(
                    list[bytes],
                    await redis.zrange(keys.NUMBERS, start, "+", bylex=True, offset=0, num=PAGE),
                )
            if not page:
                return
            pns = [pn.decode() for pn in page]
            by_shard: dict[int, list[str]] = defaultdict(list)
            for pn in pns:
                by_shard[keys.shard_of(pn, self.store.shards)].append(pn)

            def args_for(part: list[int], by_shard: dict[int, list[str]] = by_shard) -> list[Any]:
                args: list[Any] = [
                    settings.rate_headroom,
                    "1" if settings.metrics_per_number else "0",
                    ",".join(tiers),
                ]
                for index, shard in enumerate(part, start=1):
                    args += [index, len(by_shard[shard]), *by_shard[shard]]
                return args

            # one reply per Redis node (their sums add up like pages)
            for _, reply in await self.store.script_per_node("gauges", list(by_shard), args_for):
                if isinstance(reply, Exception):
                    raise reply
                yield reply
            if len(pns) < PAGE:
                return
            start = f"({pns[-1]}"
