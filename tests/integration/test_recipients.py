"""Per-recipient order and Meta's pair rate: real API, real Redis, the sandbox enforcing the rule.

The sandbox answers 131056 beyond a pair's allowance, as Meta does. Intervals are shortened
(0.2 s, bursts of 3) so a test sees pacing in a second; the rule is the same at 6 s and 45.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import keys
from gateway.api.app import create_app
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import ADMIN, SEND, make_settings, register, text_message
from tests.integration.drain_support import (
    Sandbox,
    drain_settings,
    eventually,
    running_drain,
    running_sandbox,
)
from tests.servers import RedisServer

PN = "555123456789"
ONE = "5491140000001"
INTERVAL_S = 0.2
BURST = 3


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with running_sandbox(pair_interval_s=INTERVAL_S, pair_burst=BURST) as box:
        yield box


def paced(settings: Settings, sandbox: Sandbox, **changes: Any) -> Settings:
    return drain_settings(
        settings, sandbox, **({"pair_interval": INTERVAL_S, "pair_burst": BURST} | changes)
    )


async def batch(client: TestClient[Any, Any], messages: list[dict[str, Any]]) -> list[str]:
    response = await client.post("/v1/messages/batch", json={"messages": messages}, headers=SEND)
    assert response.status == 200
    body = await response.json()
    assert body["rejected"] == 0, body
    return [r["id"] for r in body["results"]]


def to(user: str, label: str) -> dict[str, Any]:
    return text_message(PN, to=user, text={"body": label})


async def ok_texts(sandbox: Sandbox, user: str) -> list[tuple[float, str]]:
    """(arrival, text) of the requests to `user` the sandbox accepted, in arrival order."""
    hits = [
        (float(r["time"]), r["body"]["text"]["body"])
        for r in await sandbox.requests(PN, limit=100_000)
        if r["outcome"] == "ok" and r["body"]["to"] == user
    ]
    return sorted(hits)


async def outcomes(sandbox: Sandbox) -> list[str]:
    return [r["outcome"] for r in await sandbox.requests(PN, limit=100_000)]


async def all_sent(client: TestClient[Any, Any], ids: list[str]) -> bool:
    for message_id in ids:
        r = await client.get(f"/v1/messages/{message_id}", headers=SEND)
        # (a 503 after a Redis restart, while the pool's old connections find it gone)
        if r.status != 200 or (await r.json())["status"] != "sent":
            return False
    return True


async def test_one_recipient_is_paced_in_order_while_the_others_go_at_once(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    # a `high` number: paced at its own rate, a `standard` number's 48 sends take 0.6 s (80/s),
    # longer than the recipient's first interval; here only the recipient's pace may show
    await register(client, PN, throughput_tier="high")
    mine = [to(ONE, f"one {i}") for i in range(8)]
    others = [to(f"54911400{i:05d}", f"other {i}") for i in range(2, 42)]
    ids = await batch(client, mine + others)
    seen_not_before: list[str] = []

    async def done() -> bool:
        for message_id in ids[:8]:
            view = await (await client.get(f"/v1/messages/{message_id}", headers=SEND)).json()
            if view["status"] == "queued" and "not_before" in view:
                seen_not_before.append(view["not_before"])
        return await all_sent(client, ids)

    async with running_drain(paced(settings, sandbox), store):
        await eventually(done, 15.0, "every message sent")
    assert "error:131056" not in await outcomes(sandbox)
    arrivals = await ok_texts(sandbox, ONE)
    assert [text for _, text in arrivals] == [f"one {i}" for i in range(8)]
    # beyond the burst, one per interval (the sandbox would have refused any faster)
    assert arrivals[-1][0] - arrivals[0][0] >= (8 - BURST) * INTERVAL_S * 0.85
    # the others were not held back behind the paced recipient
    other_times = [
        float(r["time"])
        for r in await sandbox.requests(PN, limit=100_000)
        if r["body"]["to"] != ONE
    ]
    assert len(other_times) == 40
    assert max(other_times) < arrivals[BURST][0]
    assert seen_not_before, "a paced message shows not_before"
    number = await (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).json()
    assert number["queue_depth"] == {"high": 0, "normal": 0, "low": 0}


async def test_pacing_off_sends_them_at_once_and_meta_refuses_the_excess(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    ids = await batch(client, [to(ONE, f"one {i}") for i in range(8)])
    async with running_drain(drain_settings(settings, sandbox, pair_interval=0.0), store):
        await eventually(lambda: all_sent(client, ids), 20.0, "every message sent")
    assert "error:131056" in await outcomes(sandbox)


async def test_order_holds_with_pacing_off(
    client: TestClient[Any, Any], settings: Settings, store: Store
) -> None:
    """GATEWAY_PAIR_INTERVAL=0 turns pacing off, not order (API.md): one at a time, in order."""
    await register(client, PN)
    labels = [f"one {i}" for i in range(12)]
    ids = await batch(client, [to(ONE, label) for label in labels])
    async with running_sandbox() as box:  # Meta's pair rule off: only order can hold them
        # slow answers: sent together, the requests would all arrive before the first answer
        await box.faults(latency_ms=100)
        ordered = drain_settings(settings, box, pair_interval=0.0, recipient_order=True)
        async with running_drain(ordered, store):
            await eventually(lambda: all_sent(client, ids), 30.0, "every message sent")
        arrivals = await ok_texts(box, ONE)
    assert [text for _, text in arrivals] == labels
    # one at a time: each request came after the previous one's answer
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.09, gaps


async def test_order_holds_through_a_transient_error_and_its_retry(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": 500}]})
    ids = await batch(client, [to(ONE, f"one {i}") for i in range(5)])
    async with running_drain(paced(settings, sandbox), store):
        await eventually(lambda: all_sent(client, ids), 15.0, "every message sent")
    requests = sorted(await sandbox.requests(PN), key=lambda r: float(r["time"]))
    failed = [r["body"]["text"]["body"] for r in requests if r["outcome"] == "error:2"]
    assert failed == ["one 0"]
    assert [text for _, text in await ok_texts(sandbox, ONE)] == [f"one {i}" for i in range(5)]


async def test_a_parked_message_counts_as_queued_and_can_be_canceled(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    # a slow upstream keeps the first message in flight while the take parks the rest
    await sandbox.faults(latency_ms=600)
    ids = await batch(client, [to(ONE, f"one {i}") for i in range(4)])
    async with running_drain(paced(settings, sandbox), store):

        async def first_in_flight() -> bool:
            view = await (await client.get(f"/v1/messages/{ids[0]}", headers=SEND)).json()
            return bool(view["status"] == "sending")

        await eventually(first_in_flight, 5.0, "the first message in flight")
        number = await (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).json()
        assert sum(number["queue_depth"].values()) == 3
        response = await client.delete(f"/v1/messages/{ids[2]}", headers=SEND)
        assert response.status == 200
        number = await (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).json()
        assert sum(number["queue_depth"].values()) == 2
        await eventually(lambda: all_sent(client, [ids[0], ids[1], ids[3]]), 15.0, "sent")
    texts = [text for _, text in await ok_texts(sandbox, ONE)]
    assert texts == ["one 0", "one 1", "one 3"]
    number = await (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).json()
    assert number["queue_depth"] == {"high": 0, "normal": 0, "low": 0}


async def test_a_pair_kept_as_a_hash_by_the_version_before_is_read(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    """A pair was a hash (h holder, t tat) before it was one string: a gateway upgraded while a
    recipient had a message in flight and others parked sends them all, in order."""
    await register(client, PN)
    ids = await batch(client, [to(ONE, f"one {i}") for i in range(3)])
    shard = keys.shard_of(PN, store.shards)
    user = await store.redis.hget(keys.msg(shard, ids[0]), "t")
    assert user
    user = user.decode() if isinstance(user, bytes) else user
    # as the version before left them: the first holds the pair, the others are parked
    lane = keys.lane(shard, PN, "n")
    for parked_id in ids[1:]:
        await store.redis.lrem(lane, 1, parked_id)
        await store.redis.rpush(keys.parked(shard, PN, user), parked_id)
    await store.redis.hincrby(keys.cfg(shard, PN), "p_n", 2)
    await store.redis.hset(keys.pair(shard, PN, user), mapping={"h": ids[0], "t": "0"})
    async with running_drain(paced(settings, sandbox), store):
        await eventually(lambda: all_sent(client, ids), 10.0, "every message sent")
    assert [text for _, text in await ok_texts(sandbox, ONE)] == [f"one {i}" for i in range(3)]
    # rewritten as a string, or gone once idle and whole again
    assert await store.redis.type(keys.pair(shard, PN, user)) in (b"string", b"none")
    number = await (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).json()
    assert number["queue_depth"] == {"high": 0, "normal": 0, "low": 0}


async def test_a_redis_restart_keeps_paced_and_parked_messages(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        async with running_sandbox(pair_interval_s=1.0, pair_burst=1) as sandbox:
            base = make_settings(server.url, tmp_path / "data")
            settings = drain_settings(base, sandbox, pair_interval=1.0, pair_burst=1)
            store = Store.from_settings(settings, server.url)
            try:
                async with TestClient(TestServer(create_app(settings, store))) as client:
                    await register(client, PN)
                    ids = await batch(client, [to(ONE, f"one {i}") for i in range(3)])

                    async def paced_now() -> bool:
                        r = await client.get(f"/v1/messages/{ids[1]}", headers=SEND)
                        return "not_before" in await r.json()

                    async with running_drain(settings, store):
                        await eventually(paced_now, 5.0, "the second message paced")
                    await asyncio.to_thread(server.restart)

                    async def answers() -> bool:
                        r = await client.get(f"/v1/messages/{ids[2]}", headers=SEND)
                        return r.status == 200

                    await eventually(answers, 10.0, "the API answering after the restart")
                    async with running_drain(settings, store):
                        await eventually(lambda: all_sent(client, ids), 10.0, "every message sent")
            finally:
                await store.close()
            assert "error:131056" not in await outcomes(sandbox)
            texts = [text for _, text in await ok_texts(sandbox, ONE)]
            assert texts == ["one 0", "one 1", "one 2"]
    finally:
        server.stop()
