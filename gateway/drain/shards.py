"""Which shards this worker drains: short shard leases shared by every worker on every host.

Each worker beats a heartbeat (`members`), aims to hold ceil(shards / live workers) shards and
renews them every second (`claim`, a lease of a few seconds). A worker that stops beating loses
its shards when their leases run out, and the others claim them. Ownership is only about who
does the work: rates and leases are enforced in Redis, so two workers briefly draining one shard
is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random

from gateway.errors import StoreUnavailable
from gateway.store import Store

log = logging.getLogger("gateway.drain")

LEASE_MS = 5000
REFRESH_S = 1.0


class ShardOwnership:
    def __init__(self, store: Store, worker_id: str) -> None:
        self.store = store
        self.worker_id = worker_id
        self.owned: frozenset[int] = frozenset()
        self.changed = asyncio.Event()

    async def _claim(self, shards: list[int], mode: str) -> list[int]:
        """The shards of `shards` this worker holds after claiming (or releasing) them."""
        if not shards:
            return []
        replies = await self.store.script_on("claim", shards, [self.worker_id, LEASE_MS, mode])
        return [shard for shard, got in zip(shards, replies, strict=True) if int(got) == 1]

    async def refresh(self) -> None:
        """Beat, renew what is held, claim up to the fair share, release above it."""
        alive = await self.store.script("members", 0, [self.worker_id, LEASE_MS, "beat"])
        target = math.ceil(self.store.shards / max(int(alive), 1))
        held = set(await self._claim(sorted(self.owned), "claim"))
        if len(held) < target:
            free = [s for s in range(self.store.shards) if s not in held]
            random.shuffle(free)
            held.update(await self._claim(free, "claim"))
        if len(held) > target:
            extra = sorted(held)[target:]
            await self._claim(extra, "release")
            held.difference_update(extra)
        self._set(frozenset(held))

    def _set(self, held: frozenset[int]) -> None:
        if held != self.owned:
            log.info("draining %d of %d shards", len(held), self.store.shards)
            self.owned = held
            self.changed.set()

    async def current(self, within_s: float) -> list[int]:
        """The shards owned now, in order; with none, first wait up to `within_s` for some."""
        owned = sorted(self.owned)
        if not owned:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    await self.changed.wait()
        return owned

    async def run(self, stopping: asyncio.Event) -> None:
        """Refresh every second until `stopping` is set."""
        down = False
        while not stopping.is_set():
            try:
                await self.refresh()
                if down:
                    log.info("redis is back: shard leases renewed")
                down = False
            except StoreUnavailable as exc:
                if not down:
                    log.warning("redis unavailable, cannot renew shard leases: %s", exc)
                down = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), REFRESH_S)

    async def leave(self) -> None:
        """Give every shard back and leave the member list (on shutdown)."""
        try:
            await self._claim(sorted(self.owned), "release")
            await self.store.script("members", 0, [self.worker_id, LEASE_MS, "leave"])
        except StoreUnavailable:
            pass
        self._set(frozenset())
