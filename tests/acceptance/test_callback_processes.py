"""Status callbacks as deployed: `gateway worker` processes send them, one is SIGKILLed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from gateway.accept.service import Acceptor
from gateway.callbacks import signing
from gateway.registry import Registry
from gateway.store import Store
from tests.acceptance.test_drain_processes import (  # noqa: F401 (fixtures)
    Upstream,
    redis_server,
    start_workers,
    upstream,
)
from tests.conftest import make_settings
from tests.integration.drain_support import eventually, shards_shared
from tests.servers import RedisServer, serving

SECRET = signing.generate_secret()
PN = "555000000077"


class SlowReceiver:
    """Answers every callback 200 after `delay_s`: many are in flight at any moment."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.started: list[tuple[float, str]] = []  # (time, webhook-id) of each request
        self.answered: list[str] = []  # webhook-ids answered 200 (the sender may be gone)
        self.events: dict[str, dict[str, object]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = Webhook(SECRET).verify(body, dict(request.headers))
        event_id = request.headers["webhook-id"]
        self.started.append((time.monotonic(), event_id))
        self.events[event_id] = event
        await asyncio.sleep(self.delay_s)
        self.answered.append(event_id)
        return web.Response(status=200)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[SlowReceiver, str]]:
    slow = SlowReceiver(0.5)
    app = web.Application()
    app.router.add_post("/cb", slow.handle)
    async with serving(app) as base:
        yield slow, f"{base}/cb"


async def test_a_killed_worker_loses_no_callback(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    upstream: Upstream,  # noqa: F811
    receiver: tuple[SlowReceiver, str],
) -> None:
    slow, url = receiver
    settings = make_settings(redis_server.url, tmp_path / "data", callback_url=url)
    store = Store.from_settings(settings, redis_server.url)
    try:
        registry = Registry(store)
        await registry.put(PN, {"throughput_tier": "unlimited"})
        env = {
            "GATEWAY_CALLBACK_URL": url,
            "GATEWAY_CALLBACK_SECRET": SECRET,
            "GATEWAY_CALLBACK_TIMEOUT": "2",  # a killed worker's claims come back in 9 s
            "GATEWAY_CALLBACK_CONCURRENCY": "8",
        }
        doomed = start_workers(tmp_path, redis_server.url, upstream, 1, **env)
        survivor = start_workers(tmp_path, redis_server.url, upstream, 1, **env)
        try:
            await shards_shared(store, 2)
            message = {"phone_number_id": PN, "to": "5491140123456", "type": "text"}
            batch = [{**message, "text": {"body": f"{i}"}} for i in range(200)]
            result = await Acceptor(store, settings).send_batch({"messages": batch})
            ids = {r["id"] for r in result["results"]}

            async def some_in_flight() -> bool:
                return len(slow.started) >= 20

            await eventually(some_in_flight, 20.0, "callbacks in flight")
            doomed.kill_tree()
            killed_at = time.monotonic()

            async def all_answered() -> bool:
                return {event_id.rsplit(".", 1)[0] for event_id in slow.answered} >= ids

            await eventually(all_answered, 60.0, "every message's callback answered")
        finally:
            survivor.stop()
    finally:
        await store.close()
    assert {str(event["message_id"]) for event in slow.events.values()} == ids
    assert {str(event["status"]) for event in slow.events.values()} == {"sent"}
    requests = Counter(event_id for _, event_id in slow.started)
    duplicated = {event_id for event_id, n in requests.items() if n > 1}
    in_flight_at_kill = {event_id for at, event_id in slow.started if at <= killed_at}
    assert len(in_flight_at_kill) < len(ids)  # the kill came mid-stream
    assert duplicated <= in_flight_at_kill
