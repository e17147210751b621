"""`GATEWAY_ACK_DURABILITY=replica` on a Redis Cluster: a `202` means the shard's replica has
the message, so a primary SIGKILLed right after (its replica promoted) loses none of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import keys
from gateway.api.app import create_app
from gateway.errors import StoreUnavailable
from gateway.messages import Messages
from gateway.store import Store
from tests.cluster import LocalCluster
from tests.conftest import SEND, make_settings, register, text_message

SHARDS = 16


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path / "cluster", replicas=1)
    local.start()
    local.wait_replicas()
    yield local
    local.stop()


@pytest.fixture
async def api(
    cluster: LocalCluster, tmp_path: Path
) -> AsyncIterator[tuple[TestClient[Any, Any], Store]]:
    settings = make_settings(
        cluster.url, tmp_path / "data", shards=SHARDS, ack_durability="replica", ack_timeout=2.0
    )
    store = Store.from_settings(settings, cluster.url)
    async with TestClient(TestServer(create_app(settings, store))) as client:
        yield client, store
    await store.close()


async def test_a_202_on_a_cluster_is_on_the_replica_and_survives_its_primary(
    cluster: LocalCluster, api: tuple[TestClient[Any, Any], Store]
) -> None:
    client, store = api
    numbers = [f"5550002{i:05d}" for i in range(12)]
    primaries = {cluster.primary_for(keys.prefix(keys.shard_of(pn, SHARDS))).port for pn in numbers}
    assert len(primaries) == 3  # numbers on every node
    accepted: list[str] = []
    for pn in numbers:
        await register(client, pn, status="pending")
        for _ in range(5):
            response = await client.post("/v1/messages", json=text_message(pn), headers=SEND)
            assert response.status == 202, await response.text()
            accepted.append((await response.json())["id"])
    batch = {"messages": [text_message(pn) for pn in numbers for _ in range(10)]}
    response = await client.post("/v1/messages/batch", json=batch, headers=SEND)
    results = (await response.json())["results"]
    assert all("id" in r for r in results), results
    accepted += [r["id"] for r in results]
    # each is on its primary's replica now (WAIT 1 answered before the 202)
    for message_id in accepted:
        shard = int(message_id.split("-", 1)[0])
        primary = cluster.primary_for(keys.prefix(shard))
        with cluster.replica_of(primary).client() as replica:
            replica.execute_command("READONLY")
            assert replica.exists(keys.msg(shard, message_id)), message_id
    # the primary of the first number dies at once; its replica takes over
    doomed = cluster.primary_for(keys.prefix(keys.shard_of(numbers[0], SHARDS)))
    successor = cluster.replica_of(doomed)
    cluster.kill(doomed)
    cluster.wait_promoted(successor)
    messages = Messages(store)
    for message_id in accepted:
        assert (await _get(messages, message_id))["status"] == "queued", message_id


async def _get(messages: Messages, message_id: str) -> dict[str, Any]:
    """A message's view; the client's slot map may still name the dead primary for a moment
    (it reads the map again after a failed call)."""
    for _ in range(50):
        try:
            return await messages.get(message_id)
        except StoreUnavailable:
            await asyncio.sleep(0.1)
    return await messages.get(message_id)
