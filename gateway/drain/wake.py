"""Listening for wake tokens of the shards this worker drains.

BLPOP runs here, on a connection of its own, with a long timeout: the server checks blocking
timeouts only about every 1/hz seconds (100 ms by default), far too coarse for due times, so
the take loop waits on a local timer and this listener only cuts that wait short.

On a Redis Cluster one BLPOP cannot wait on many shards: each shard is its own slot and Redis
refuses a command whose keys span slots, even on one node. There, `WakeTokens` keeps one
BLPOP per shard going (a task each, on the cluster client's connections to the shard's node),
and a wait is a wait for any of them to report. Each shard has one owner, so a fleet holds one
blocked connection per shard (per kind of token) whatever its size; a token arrives as fast as
on one node. The other choice, a short poll of all of a node's shards by script, would add its
period to the latency of every idle send.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import cast

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterError

from gateway import keys
from gateway.drain.outage import RedisOutage
from gateway.errors import StoreUnavailable
from gateway.store import (
    as_text,
    close_client,
    connect,
    is_cluster_url,
    unavailable_on_redis_errors,
)
from gateway.store.cluster import SlotMap

MAX_WAIT_S = 1.0
OUTAGE_BACKOFF_S = 0.2


class WakeTokens:
    """The wake tokens (`key_of(shard)`: a LIST of at most one item) of some shards."""

    def __init__(
        self,
        redis_url: str,
        key_of: Callable[[int], str],
        on_error: Callable[[StoreUnavailable], None],
        shards: int,
    ) -> None:
        self.cluster = is_cluster_url(redis_url)
        # BLPOP blocks its connection: a client of its own, with a timeout above the longest
        # wait (on a cluster: one connection per watched shard, at most every shard).
        self.client: Redis = connect(
            redis_url,
            max_connections=shards + 2 if self.cluster else 2,
            socket_timeout=MAX_WAIT_S + 2,
        )
        self.key_of = key_of
        self.slots = SlotMap(cast(RedisCluster, self.client))
        self.on_error = on_error
        self._watchers: dict[int, asyncio.Task[None]] = {}
        self._closed = False
        self._woken: set[int] = set()
        self._event = asyncio.Event()

    async def wait_any(self, shards: list[int], timeout_s: float) -> set[int]:
        """The shards whose token was taken within `timeout_s` (empty: none came).

        Raises `StoreUnavailable` on one node; on a cluster a shard whose node fails is
        reported to `on_error` and watched again after a pause.
        """
        if not self.cluster:
            names = [self.key_of(s) for s in shards]
            with unavailable_on_redis_errors():
                reply = await self.client.blpop(names, timeout=timeout_s)
            return set() if reply is None else {shards[names.index(as_text(reply[0]))]}
        # The slot map read before the watchers start (a no-op once read): many first
        # commands at once each read it and closed the connections the others had opened.
        with unavailable_on_redis_errors():
            await self.client.initialize()
        self._watch(shards)
        if not self._woken:
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._event.wait()
        woken, self._woken = self._woken & set(shards), set()
        return woken

    async def give_back(self, shards: set[int]) -> None:
        """Put back tokens taken for shards this worker no longer owns.

        A wait began before a handover (it lasts up to `MAX_WAIT_S`) may take the token of a
        shard that is another worker's by then; dropped, the shard's new owner would not learn
        of its work until its next sweep (5 s). Raises `StoreUnavailable`.
        """
        for shard in shards:
            name = self.key_of(shard)
            with unavailable_on_redis_errors():
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.lpush(name, "1")
                    pipe.ltrim(name, 0, 0)
                    await pipe.execute()

    def watch_only(self, shards: list[int]) -> None:
        """On a cluster: keep a BLPOP going for these shards' tokens, and none for others."""
        if self.cluster:
            self._watch(shards)

    def _watch(self, shards: list[int]) -> None:
        wanted = set(shards)
        for shard in list(self._watchers):
            if shard not in wanted:
                self._watchers.pop(shard).cancel()
        for shard in wanted:
            if shard not in self._watchers:
                self._watchers[shard] = asyncio.create_task(
                    self._watch_one(shard), name=f"wake-{shard}"
                )

    async def _watch_one(self, shard: int) -> None:
        # On the shard's node itself (see `gateway.store.cluster.SlotMap`); a node that moved
        # the slot (MOVED) or failed sends it back to the slot map.
        name = self.key_of(shard)
        slot = self.client.keyslot(name)  # type: ignore[attr-defined]
        me = asyncio.current_task()
        # (a cancel that meets the read's own timeout can be lost in 3.11: so a watcher also
        # stops once it is no longer the shard's)
        while not self._closed and self._watchers.get(shard) is me:
            node = self.slots.node_of(slot)
            try:
                with unavailable_on_redis_errors():
                    if node is None:
                        raise ClusterError(f"no node serves slot {slot}")
                    reply = await node.execute_command("BLPOP", name, MAX_WAIT_S)
            except redis_errors.MovedError:
                await self.slots.refresh(force=True)
                continue
            except StoreUnavailable as exc:
                self.on_error(exc)
                await asyncio.sleep(OUTAGE_BACKOFF_S)
                await self.slots.refresh()
                continue
            if reply is not None:
                self._woken.add(shard)
                self._event.set()

    async def close(self) -> None:
        self._closed = True
        watchers = list(self._watchers.values())
        self._watchers.clear()
        for task in watchers:
            task.cancel()
        if watchers:
            await asyncio.wait(watchers, timeout=MAX_WAIT_S + 2)
        await close_client(self.client)


class WakeListener:
    def __init__(self, redis_url: str, outage: RedisOutage, shards: int = 16384) -> None:
        self.tokens = WakeTokens(redis_url, keys.wake, outage.failed, shards)
        self.outage = outage
        self.woken: set[int] = set()
        self.event = asyncio.Event()

    async def run(
        self, stopping: asyncio.Event, owned_shards: Callable[[], Awaitable[list[int]]]
    ) -> None:
        while not stopping.is_set():
            owned = await owned_shards()
            if not owned:
                # no watcher left taking the tokens of shards now another worker's
                self.tokens.watch_only([])
                continue
            try:
                woken = await self.tokens.wait_any(owned, MAX_WAIT_S)
            except StoreUnavailable as exc:
                self.outage.shards_failed(owned, exc)
                await asyncio.sleep(OUTAGE_BACKOFF_S)  # outage backoff
                continue
            gone = woken - set(await owned_shards())
            if gone:  # handed over during the wait: the token is the new owner's
                woken -= gone
                with contextlib.suppress(StoreUnavailable):
                    await self.tokens.give_back(gone)
            if woken:
                self.woken |= woken
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
        await self.tokens.close()
