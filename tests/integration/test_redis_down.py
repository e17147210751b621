"""Redis gone: every route that needs it answers 503 within 2 s, and recovers by itself."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.api.app import create_app
from gateway.store import Store
from tests.conftest import ADMIN, SEND, make_settings, register, text_message
from tests.servers import RedisServer

ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/messages", text_message()),
    ("POST", "/v1/messages/batch", {"messages": [text_message()]}),
    ("GET", "/v1/messages/1-01M87GH5XW1SMrcTe3o0tg", None),
    ("DELETE", "/v1/messages/1-01M87GH5XW1SMrcTe3o0tg", None),
    ("PUT", "/v1/phone-numbers/555123456789", {}),
    ("PATCH", "/v1/phone-numbers/555123456789", {}),
    ("GET", "/v1/phone-numbers/555123456789", None),
    ("DELETE", "/v1/phone-numbers/555123456789", None),
    ("GET", "/v1/phone-numbers", None),
]


@pytest.fixture
async def down_client(
    private_redis: RedisServer, tmp_path: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    settings = make_settings(private_redis.url, tmp_path / "data")
    store = Store.from_settings(settings, private_redis.url)
    async with TestClient(TestServer(create_app(settings, store))) as client:
        yield client
    await store.close()


async def test_503_while_redis_is_down_then_back_to_normal(
    down_client: TestClient[Any, Any], private_redis: RedisServer
) -> None:
    client = down_client
    await register(client)
    private_redis.stop()
    for method, path, body in ROUTES:
        headers = ADMIN if "phone-numbers" in path else SEND
        started = time.monotonic()
        response = await client.request(method, path, json=body, headers=headers)
        elapsed = time.monotonic() - started
        assert response.status == 503, (method, path, await response.text())
        assert (await response.json())["error"]["code"] == "unavailable"
        assert int(response.headers["Retry-After"]) > 0
        assert elapsed < 2.5, (method, path, elapsed)
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 503
    private_redis.start()
    await register(client)
    assert (await client.get("/readyz")).status == 200
    response = await client.post("/v1/messages", json=text_message(), headers=SEND)
    assert response.status == 202
