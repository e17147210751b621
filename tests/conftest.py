"""Fixtures shared by every test: real Redis servers, settings and an API client."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from aiohttp.test_utils import TestClient, TestServer

from gateway.api.app import create_app
from gateway.settings import Settings
from gateway.store import Store
from tests.servers import RedisServer

SEND_KEY = "test-send-key"
ADMIN_KEY = "test-admin-key"
WEBHOOK_SECRET = "test-webhook-secret"
SEND = {"Authorization": f"Bearer {SEND_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; `redis_url` flushes it before each test."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(shared_redis: RedisServer) -> str:
    client = redis_sync.Redis.from_url(shared_redis.url)
    client.flushall()
    client.close()
    return shared_redis.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which it may stop and start."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def make_settings(redis_url: str, data_dir: Path, **changes: Any) -> Settings:
    base = Settings(
        redis_url=redis_url,
        data_dir=data_dir,
        api_keys=(SEND_KEY,),
        admin_keys=(ADMIN_KEY,),
        webhook_secret=WEBHOOK_SECRET,
        workers=1,
        shards=16,
        # Meta's pair rate paces one recipient at 1 per 6 s: the tests that send many messages
        # to one recipient are about other things (tests/integration/test_recipients.py sets it)
        pair_interval=0.0,
        recipient_order=False,
    )
    return dataclasses.replace(base, **changes).validate()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(redis_url, tmp_path / "data")


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    assert settings.redis_url is not None
    store = Store.from_settings(settings, settings.redis_url)
    yield store
    await store.close()


@pytest.fixture
async def client(settings: Settings, store: Store) -> AsyncIterator[TestClient[Any, Any]]:
    """An HTTP client of the real API app on a free port."""
    async with TestClient(TestServer(create_app(settings, store))) as test_client:
        yield test_client


async def register(
    client: TestClient[Any, Any], pn: str = "555123456789", **fields: Any
) -> dict[str, Any]:
    response = await client.put(f"/v1/phone-numbers/{pn}", json=fields, headers=ADMIN)
    assert response.status in (200, 201), await response.text()
    body: dict[str, Any] = await response.json()
    return body


def text_message(pn: str = "555123456789", **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "phone_number_id": pn,
        "to": "5491140123456",
        "type": "text",
        "text": {"body": "Your code is 123456"},
    }
    message.update(fields)
    return message
