"""The gateway on a real local Redis Cluster (3 primaries): the API unchanged, and the drain
exact however the shards spread over nodes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import keys
from gateway.api.app import create_app
from gateway.settings import Settings
from gateway.store import Store
from tests.cluster import LocalCluster
from tests.conftest import ADMIN, SEND, make_settings, register, text_message
from tests.integration.drain_support import (
    drain_settings,
    eventually,
    max_in_window,
    running_drain,
    running_sandbox,
    sustained_rate,
)

SHARDS = 32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster for the tests that only use it; each starts from empty primaries. No
    replicas: nothing here fails over (tests/acceptance/test_cluster_processes.py does)."""
    local = LocalCluster(tmp_path_factory.mktemp("cluster"), replicas=0)
    local.start()
    yield local
    local.stop()


def _flush(cluster: LocalCluster) -> None:
    for node in {id(n): n for n in cluster.slot_owners().values()}.values():
        with node.client() as client:
            client.flushall()


@pytest.fixture
def cluster_settings(cluster: LocalCluster, tmp_path: Path) -> Settings:
    _flush(cluster)
    return make_settings(cluster.url, tmp_path / "data", shards=SHARDS)


@pytest.fixture
async def cluster_store(cluster_settings: Settings) -> AsyncIterator[Store]:
    assert cluster_settings.redis_url is not None
    store = Store.from_settings(cluster_settings, cluster_settings.redis_url)
    yield store
    await store.close()


@pytest.fixture
async def api(
    cluster_settings: Settings, cluster_store: Store
) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(cluster_settings, cluster_store))) as client:
        yield client


def numbers_on_every_node(cluster: LocalCluster, count: int) -> list[str]:
    """`count` phone numbers whose shards are served by all three primaries."""
    numbers = [f"5550001{i:05d}" for i in range(count)]
    owners = {cluster.primary_for(keys.prefix(keys.shard_of(pn, SHARDS))).port for pn in numbers}
    assert len(owners) == 3
    return numbers


async def test_the_api_works_unchanged_on_a_cluster(
    api: TestClient[Any, Any], cluster: LocalCluster
) -> None:
    numbers = numbers_on_every_node(cluster, 30)
    for pn in numbers:
        await register(api, pn)
    # singles (coalesced together when they arrive at once) on every node
    singles = await asyncio.gather(
        *(api.post("/v1/messages", json=text_message(pn), headers=SEND) for pn in numbers)
    )
    assert [r.status for r in singles] == [202] * len(numbers)
    # a batch across every shard and node, with an unknown number in it
    messages = [text_message(pn) for pn in numbers for _ in range(10)] + [text_message("4242")]
    response = await api.post("/v1/messages/batch", json={"messages": messages}, headers=SEND)
    body = await response.json()
    assert body["accepted"] == 300 and body["rejected"] == 1
    assert body["results"][-1]["error"]["code"] == "unknown_phone_number"
    ids = [r["id"] for r in body["results"][:-1]]
    assert len(set(ids)) == 300
    for pn in numbers:
        view = await (await api.get(f"/v1/phone-numbers/{pn}", headers=ADMIN)).json()
        assert view["queue_depth"] == {"high": 0, "normal": 11, "low": 0}
    # status and cancel of messages on every node
    for message_id in ids[::10]:
        status = await (await api.get(f"/v1/messages/{message_id}", headers=SEND)).json()
        assert status["status"] == "queued"
        canceled = await api.delete(f"/v1/messages/{message_id}", headers=SEND)
        assert (await canceled.json())["status"] == "canceled"
    # an idempotent send, replayed
    key = {"Idempotency-Key": "order-1", **SEND}
    first = await (
        await api.post("/v1/messages", json=text_message(numbers[0]), headers=key)
    ).json()
    again = await api.post("/v1/messages", json=text_message(numbers[0]), headers=key)
    assert (await again.json())["id"] == first["id"]
    # phone number admin: the list (a global key) and a delete
    listing = await (await api.get("/v1/phone-numbers", headers=ADMIN)).json()
    assert sorted(n["phone_number_id"] for n in listing["data"]) == sorted(numbers)
    deleted = await api.delete(f"/v1/phone-numbers/{numbers[1]}", headers=ADMIN)
    assert deleted.status in (200, 202, 204)
    gone = await api.post("/v1/messages", json=text_message(numbers[1]), headers=SEND)
    assert gone.status == 409
    # the data really is spread: every primary holds some of it
    for node in {id(n): n for n in cluster.slot_owners().values()}.values():
        with node.client() as client:
            assert client.dbsize() > 10


async def test_a_fresh_process_takes_a_burst_of_requests_at_once(
    api: TestClient[Any, Any], cluster: LocalCluster
) -> None:
    """The first requests of a process come at once (here 100 registrations, then reads of
    them): every one is answered. (redis-py 8.1 picks a keyed command's node before its client
    has read the slot map: a fresh client's first burst went to wrong nodes, and the reconnects
    that followed broke the calls under way with 500s and 503s, 2-19 of 50 in each try.)"""
    numbers = numbers_on_every_node(cluster, 100)
    puts = await asyncio.gather(
        *(api.put(f"/v1/phone-numbers/{pn}", json={}, headers=ADMIN) for pn in numbers)
    )
    assert [r.status for r in puts] == [201] * len(numbers)
    gets = await asyncio.gather(
        *(api.get(f"/v1/phone-numbers/{pn}", headers=ADMIN) for pn in numbers)
    )
    assert [r.status for r in gets] == [200] * len(numbers)


async def test_a_cluster_url_must_name_host_port_seeds() -> None:
    from gateway.errors import ConfigError

    for bad in ("redis+cluster://", "redis+cluster://host", "redis+cluster://h:1/3"):
        with pytest.raises(ConfigError, match="cluster"):
            make_settings(bad, Path("/tmp/x"))
    good = make_settings("rediss+cluster://:s3cret@a:7000,b:7001", Path("/tmp/x"))
    assert "s3cret" not in repr(good)


async def test_the_drain_holds_numbers_on_every_node_to_their_rates(
    api: TestClient[Any, Any], cluster: LocalCluster, cluster_settings: Settings
) -> None:
    """test_drain's exactness test, with the shards over three nodes (one drain in this
    process, as there: several worker processes are tests/acceptance/test_cluster_processes)."""
    rates = {"555000000080": ("standard", 80), "555000000200": ("medium", 200)}
    spread = numbers_on_every_node(cluster, 6)
    for pn, (tier, rate) in rates.items():
        await register(api, pn, throughput_tier=tier, status="pending")
        batch = [text_message(pn) for _ in range(int(rate * 2.5))]
        response = await api.post("/v1/messages/batch", json={"messages": batch}, headers=SEND)
        assert (await response.json())["accepted"] == len(batch)
    for pn in spread:  # a few messages on numbers of every node, sent alongside
        await register(api, pn, throughput_tier="standard")
        batch = [text_message(pn) for _ in range(20)]
        await api.post("/v1/messages/batch", json={"messages": batch}, headers=SEND)
    async with running_sandbox() as sandbox:
        settings = drain_settings(cluster_settings, sandbox)
        store = Store.from_settings(settings, cluster.url)
        try:
            async with running_drain(settings, store):
                await shards_shared_on_cluster(store, 1)
                for pn in rates:
                    await api.patch(
                        f"/v1/phone-numbers/{pn}", json={"status": "active"}, headers=ADMIN
                    )
                for pn in [*rates, *spread]:
                    await eventually(lambda pn=pn: _drained(api, pn), 15.0, f"{pn} draining")
        finally:
            await store.close()
        for pn, (_, rate) in rates.items():
            times = await sandbox.arrivals(pn)
            assert len(times) == int(rate * 2.5)
            assert max_in_window(times) <= rate
            gaps = sorted((round(b - a, 3), round(a - times[0], 3)) for a, b in pairwise(times))
            # test_drain asks 97% of one node; here six redis-servers share this 2-core
            # machine with the drain, and the 80/s number was seen at 92% (73.6/s) under load.
            # The drain must keep going; exactness above is not relaxed.
            assert sustained_rate(times) >= 0.9 * rate, (
                f"{pn}: {sustained_rate(times):.1f}/s (longest gaps, and when: {gaps[-3:]})"
            )
        for pn in spread:
            assert len(await sandbox.arrivals(pn)) == 20


async def shards_shared_on_cluster(store: Store, workers: int) -> None:
    """Until `workers` drains hold every shard in fair shares (`shards_shared`, key by key:
    a cluster refuses an MGET across slots)."""
    fair = -(-store.shards // workers)

    async def shared() -> bool:
        owners = [await store.redis.get(keys.owner(s)) for s in range(store.shards)]
        held = Counter(owners)
        return None not in held and len(held) == workers and max(held.values()) <= fair

    await eventually(shared, 30.0, f"{workers} drains sharing the shards", every_s=0.1)


async def _drained(api: TestClient[Any, Any], pn: str) -> bool:
    body = await (await api.get(f"/v1/phone-numbers/{pn}", headers=ADMIN)).json()
    return bool(sum(body["queue_depth"].values()) == 0 and body["inflight"] == 0)


async def test_the_upstream_cap_holds_for_numbers_on_every_node(
    api: TestClient[Any, Any], cluster: LocalCluster, cluster_settings: Settings
) -> None:
    """The fleet's cap lives on one node (`{gw:fleet}`); the takes run on all three."""
    cap = 150
    numbers = numbers_on_every_node(cluster, 6)
    for pn in numbers:
        await register(api, pn, throughput_tier="unlimited", status="pending")
        batch = [text_message(pn) for _ in range(75)]
        response = await api.post("/v1/messages/batch", json={"messages": batch}, headers=SEND)
        assert (await response.json())["accepted"] == len(batch)
    async with running_sandbox() as sandbox:
        settings = drain_settings(cluster_settings, sandbox, upstream_max_mps=float(cap))
        store = Store.from_settings(settings, cluster.url)
        try:
            async with running_drain(settings, store):
                await shards_shared_on_cluster(store, 1)
                for pn in numbers:
                    await api.patch(
                        f"/v1/phone-numbers/{pn}", json={"status": "active"}, headers=ADMIN
                    )
                for pn in numbers:
                    await eventually(lambda pn=pn: _drained(api, pn), 15.0, f"{pn} draining")
        finally:
            await store.close()
        times: list[float] = []
        for pn in numbers:
            arrived = await sandbox.arrivals(pn)
            assert len(arrived) == 75
            times += arrived
    times.sort()
    assert max_in_window(times) <= cap
    # three seconds' worth: the cap, not the drain, set the pace
    assert times[-1] - times[0] >= 2.0
