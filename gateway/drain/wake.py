"""Listening for wake tokens of the shards this worker drains.

BLPOP runs here, on a connection of its own, with a long timeout: the server checks blocking
timeouts only about every 1/hz seconds (100 ms by default), far too coarse for due times, so
the take loop waits on a local timer and this listener only cuts that wait short.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from gateway import keys
from gateway.drain.outage import RedisOutage
from gateway.errors import StoreUnavailable
from gateway.store import as_text, connect, unavailable_on_redis_errors

MAX_WAIT_S = 1.0


class WakeListener:
    def __init__(self, redis_url: str, outage: RedisOutage) -> None:
        # BLPOP blocks its connection: a client of its own, with a timeout above the longest wait.
        self.client: Redis = connect(redis_url, max_connections=2, socket_timeout=MAX_WAIT_S + 2)
        self.outage = outage
        self.woken: set[int] = set()
        self.event = asyncio.Event()

    async def run(
        self, stopping: asyncio.Event, owned_shards: Callable[[], Awaitable[list[int]]]
    ) -> None:
        while not stopping.is_set():
            owned = await owned_shards()
            if not owned:
                continue
            names = [keys.wake(s) for s in owned]
            try:
                with unavailable_on_redis_errors():
                    reply = await self.client.blpop(names, timeout=MAX_WAIT_S)
            except StoreUnavailable as exc:
                self.outage.failed(exc)
                await asyncio.sleep(0.2)  # outage backoff
                continue
            if reply is not None:
                self.woken.add(owned[names.index(as_text(reply[0]))])
                self.event.set()

    def take_woken(self) -> set[int]:
        woken, self.woken = self.woken, set()
        return woken

    async def wait(self, wait_s: float) -> None:
        """Sleep until `wait_s` passes or a wake token arrives."""
        if self.woken:
            return
        self.event.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self.event.wait()

    async def close(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
