"""The one-time check of the Redis server's settings at start."""

from __future__ import annotations

import logging

import pytest
import redis as redis_sync

from gateway.store import Store


async def test_a_low_listpack_limit_is_reported_once(
    store: Store, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    previous = client.config_get("hash-max-listpack-value")["hash-max-listpack-value"]
    try:
        client.config_set("hash-max-listpack-value", 64)
        with caplog.at_level(logging.WARNING, logger="gateway.store"):
            await store.check_server_settings()
        assert "hash-max-listpack-value is 64" in caplog.text
        caplog.clear()
        client.config_set("hash-max-listpack-value", 1024)
        with caplog.at_level(logging.WARNING, logger="gateway.store"):
            await store.check_server_settings()
        assert caplog.text == ""
    finally:
        client.config_set("hash-max-listpack-value", previous)
        client.close()
