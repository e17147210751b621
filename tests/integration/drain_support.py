"""Pieces the drain tests share: a sandbox upstream on a free port and drains on it."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from gateway import keys
from gateway.drain.upstream import CloudApi
from gateway.drain.worker import Drain
from gateway.process import freeze_startup_objects
from gateway.sandbox import StaticRates, start_sandbox
from gateway.settings import Settings
from gateway.store import Store

DEFAULT_TOKEN = "default-upstream-token"


@dataclasses.dataclass
class Sandbox:
    """The sandbox Cloud API of a test, and its admin routes."""

    url: str  # the GATEWAY_UPSTREAM_URL to use
    root: str  # where /_sandbox/ lives
    rates: StaticRates
    http: aiohttp.ClientSession
    runner: web.AppRunner

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, f"{self.root}/_sandbox/{path}", json=body) as r:
            assert r.status < 300, await r.text()
            return await r.json() if r.content_type == "application/json" else None

    async def faults(self, **faults: Any) -> None:
        await self.admin("PUT", "faults", faults)

    async def arrivals(self, pn: str) -> list[float]:
        body = await self.admin("GET", f"arrivals?phone_number_id={pn}")
        return sorted(body["times"])

    async def requests(self, pn: str, limit: int = 1000) -> list[dict[str, Any]]:
        body = await self.admin("GET", f"requests?phone_number_id={pn}&limit={limit}")
        return list(body["requests"]) if isinstance(body, dict) else list(body)


@asynccontextmanager
async def running_sandbox(
    default_rate: int | None = None, pair_interval_s: float = 0.0, pair_burst: int = 1
) -> AsyncIterator[Sandbox]:
    rates = StaticRates(default=default_rate)
    runner, url = await start_sandbox(
        "127.0.0.1", 0, rates, pair_interval_s=pair_interval_s, pair_burst=pair_burst
    )
    root = url.rsplit("/", 1)[0]
    async with aiohttp.ClientSession() as http:
        try:
            yield Sandbox(url, root, rates, http, runner)
        finally:
            await runner.cleanup()


def drain_settings(settings: Settings, sandbox: Sandbox, **changes: Any) -> Settings:
    base = dataclasses.replace(
        settings,
        upstream_url=sandbox.url,
        upstream_token=DEFAULT_TOKEN,
        retry_base=0.05,
        upstream_timeout=2.0,
        shutdown_grace=2.0,
    )
    return dataclasses.replace(base, **changes).validate()


@asynccontextmanager
async def running_drain(
    settings: Settings, store: Store, api_class: type[CloudApi] = CloudApi
) -> AsyncIterator[Drain]:
    assert settings.upstream_url is not None
    api = api_class(
        settings.upstream_url,
        settings.upstream_token,
        timeout_s=settings.upstream_timeout,
        pool_size=settings.worker_concurrency,
    )
    await api.start()
    # As a worker process does at start (`freeze_startup_objects`): this process holds what
    # every earlier test left, and a full collection walking it paused the drain and the
    # sandbox beside it (seen after tests/unit: 70 of 80/s sustained, and once 208 arrivals in
    # one second of a 200/s number).
    freeze_startup_objects()
    drain = Drain(settings, store, api)
    await drain.start()
    try:
        yield drain
    finally:
        await drain.stop()
        await api.close()
        gc.unfreeze()


async def eventually(
    check: Callable[[], Awaitable[bool]],
    within_s: float = 10.0,
    what: str = "condition",
    every_s: float = 0.02,
) -> None:
    """Poll `check` until it holds; fail after `within_s` (a bound, not a measurement)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(every_s)
    raise AssertionError(f"{what} did not happen within {within_s}s")


async def shards_shared(store: Store, workers: int, within_s: float = 30.0) -> None:
    """Wait until `workers` worker processes hold every shard in fair shares.

    Then no shard changes hands while a test measures (the handover is not what it tests).
    """
    fair = -(-store.shards // workers)

    async def shared() -> bool:
        members = await store.redis.zcard(keys.members())
        owners = await store.redis.mget([keys.owner(shard) for shard in range(store.shards)])
        held: dict[Any, int] = {}
        for owner in owners:
            held[owner] = held.get(owner, 0) + 1
        return (
            members == workers
            and None not in held
            and len(held) == workers
            and max(held.values()) <= fair
        )

    await eventually(shared, within_s, f"{workers} workers sharing the shards", every_s=0.1)


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    """The most arrivals in any sliding window of `window_s` seconds."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def sustained_rate(times: list[float]) -> float:
    """Arrivals per second over the span they cover."""
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])
