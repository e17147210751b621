"""The rate in force of a number as the sandbox sees it, read from the registry in Redis."""

from __future__ import annotations

from gateway import keys
from gateway.registry.model import rate_in_force
from gateway.store import Store, unavailable_on_redis_errors


class RegistryRates:
    """A sandbox `RateSource` backed by the gateway's registry: what a real Meta enforces."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def rate_for(self, phone_number_id: str) -> int | None:
        shard = keys.shard_of(phone_number_id, self.store.shards)
        with unavailable_on_redis_errors():
            raw = await self.store.redis.hget(keys.cfg(shard, phone_number_id), "rate")
        return rate_in_force(int(raw or 0), self.store.settings.rate_headroom)
