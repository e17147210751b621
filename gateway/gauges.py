"""Gauges that describe Redis: queue depth, in-flight sends, numbers, capacity, backlog ETA.

They are the same for every process, so one process in the whole deployment computes them
(a leader elected with a short Redis lease) every few seconds; a scrape only reads the files
prometheus_client keeps. A process that loses the lease sets what it published to zero, so
`sum` and `max` over instances both stay right.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, cast

from redis.asyncio.client import Pipeline

from gateway import keys, metrics
from gateway.errors import StoreUnavailable
from gateway.registry.model import TIER_RATES, rate_in_force
from gateway.store import Store, as_text, unavailable_on_redis_errors

log = logging.getLogger("gateway.gauges")

REFRESH_S = 5.0
PAGE = 100  # numbers per round trip: small enough not to stall the event loop
_LANES = (("high", "h"), ("normal", "n"), ("low", "l"))


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
        """Read every number's state and publish the gauges."""
        self.leading = True
        depth: dict[tuple[str, str], int] = defaultdict(int)
        numbers: dict[tuple[str, str], int] = defaultdict(int)
        capacity: dict[str, float] = defaultdict(float)
        eta: dict[str, float] = defaultdict(float)
        inflight = 0
        headroom = self.store.settings.rate_headroom
        per_number = self.store.settings.metrics_per_number
        async for batch in self._numbers():
            for pn, record, lengths in batch:
                status = record.get("status", "active")
                tier = record.get("throughput_tier", "standard")
                numbers[(status, tier)] += 1
                inflight += max(int(record.get("inflight", 0)), 0)
                waiting = 0
                for lane_name, lane in _LANES:
                    n = 0
                    for lane_list in (lane, lane + "m"):
                        n += lengths[lane_list] - int(record.get(f"d_{lane_list}", 0))
                    depth[(tier, lane_name)] += max(n, 0)
                    waiting += max(n, 0)
                rate = rate_in_force(int(record.get("rate", 0)), headroom)
                if status == "active" and rate is not None:
                    capacity[tier] += rate
                    eta[tier] = max(eta[tier], waiting / rate)
                if per_number:
                    metrics.NUMBER_QUEUE_DEPTH.labels(pn).set(waiting)
                    metrics.NUMBER_RATE.labels(pn).set(rate or 0)
        published: list[tuple[Any, tuple[str, ...]]] = []
        for tier in TIER_RATES:
            for lane_name, _ in _LANES:
                metrics.QUEUE_DEPTH.labels(tier, lane_name).set(depth[(tier, lane_name)])
                published.append((metrics.QUEUE_DEPTH, (tier, lane_name)))
            metrics.TIER_CAPACITY.labels(tier).set(capacity[tier])
            metrics.BACKLOG_ETA.labels(tier).set(eta[tier])
            published += [(metrics.TIER_CAPACITY, (tier,)), (metrics.BACKLOG_ETA, (tier,))]
            for status in ("pending", "active", "disconnected", "deleted"):
                metrics.NUMBERS.labels(status, tier).set(numbers[(status, tier)])
                published.append((metrics.NUMBERS, (status, tier)))
        metrics.INFLIGHT.set(inflight)
        published.append((metrics.INFLIGHT, ()))
        self._published = published

    async def _numbers(self) -> AsyncIterator[list[tuple[str, dict[str, str], dict[str, int]]]]:
        """Pages of (phone_number_id, cfg record, lane lengths) of every registered number."""
        redis = self.store.redis
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

            def build(pipe: Pipeline, pns: list[str] = pns) -> None:
                for pn in pns:
                    shard = keys.shard_of(pn, self.store.shards)
                    pipe.hgetall(keys.cfg(shard, pn))
                    for lane_list in keys.LANE_LISTS:
                        pipe.llen(keys.lane(shard, pn, lane_list))

            replies = await self.store.pipelined(build)
            step = 1 + len(keys.LANE_LISTS)
            batch = []
            for index, pn in enumerate(pns):
                raw = replies[index * step]
                record = {k.decode(): v.decode() for k, v in raw.items()}
                lengths = dict(
                    zip(
                        keys.LANE_LISTS, replies[index * step + 1 : (index + 1) * step], strict=True
                    )
                )
                batch.append((pn, record, lengths))
            yield batch
            if len(pns) < PAGE:
                return
            start = f"({pns[-1]}"
