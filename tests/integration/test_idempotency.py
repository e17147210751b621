"""Idempotency-Key on POST /v1/messages: one message per key and body for 24 h."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.api.app import create_app
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import ADMIN, SEND, make_settings, register, text_message
from tests.integration.drain_support import (
    drain_settings,
    eventually,
    running_drain,
    running_sandbox,
)
from tests.servers import RedisServer

PN = "555123456789"


async def queued(client: TestClient[Any, Any], pn: str = PN) -> int:
    body = await (await client.get(f"/v1/phone-numbers/{pn}", headers=ADMIN)).json()
    return sum(body["queue_depth"].values())


async def post(
    client: TestClient[Any, Any], body: Any, key: str, auth: dict[str, str] = SEND
) -> Any:
    return await client.post("/v1/messages", json=body, headers={**auth, "Idempotency-Key": key})


async def test_a_repeat_returns_the_first_response(client: TestClient[Any, Any]) -> None:
    await register(client)
    first = await post(client, text_message(), "order-1")
    assert first.status == 202
    assert "Idempotent-Replayed" not in first.headers
    again = await post(client, text_message(), "order-1")
    assert again.status == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == await first.json()
    assert await queued(client) == 1


async def test_the_same_body_in_another_key_order_is_the_same_body(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    body = text_message(client_reference="r")
    reordered = dict(reversed(list(body.items())))
    first = await (await post(client, body, "k")).json()
    again = await post(client, reordered, "k")
    assert (await again.json())["id"] == first["id"]


async def test_the_same_key_with_another_body_is_409(client: TestClient[Any, Any]) -> None:
    await register(client)
    await register(client, "555000000002")
    assert (await post(client, text_message(), "k")).status == 202
    for other in (text_message(to="5491140999999"), text_message("555000000002")):
        response = await post(client, other, "k")
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "idempotency_conflict"
    assert await queued(client) == 1
    assert await queued(client, "555000000002") == 0


async def test_keys_belong_to_the_api_key_that_sent_them(client: TestClient[Any, Any]) -> None:
    await register(client)
    one = await (await post(client, text_message(), "shared")).json()
    other = await (await post(client, text_message(), "shared", auth=ADMIN)).json()
    assert one["id"] != other["id"]
    assert await queued(client) == 2


async def test_a_refused_first_request_does_not_bind_the_key(
    client: TestClient[Any, Any],
) -> None:
    refused = await post(client, text_message("555000000009"), "k")
    assert refused.status == 404
    await register(client)
    assert (await post(client, text_message(), "k")).status == 202


async def test_a_key_is_at_most_255_characters(client: TestClient[Any, Any]) -> None:
    await register(client)
    assert (await post(client, text_message(), "k" * 255)).status == 202
    response = await post(client, text_message(), "k" * 256)
    assert response.status == 400
    assert (await response.json())["error"]["details"][0]["field"] == "Idempotency-Key"


async def test_200_concurrent_sends_with_one_key_queue_one_message(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    responses = await asyncio.gather(*(post(client, text_message(), "burst") for _ in range(200)))
    assert {r.status for r in responses} == {202}
    ids = {(await r.json())["id"] for r in responses}
    assert len(ids) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 199
    assert await queued(client) == 1


# --- Batch messages carry their own idempotency_key (issue 8, item 2) ---


async def batch(client: TestClient[Any, Any], *messages: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/messages/batch", json={"messages": messages}, headers=SEND)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_a_batch_message_with_a_used_key_comes_back_with_its_first_id(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    first = await batch(client, text_message(idempotency_key="a"), text_message())
    assert first["accepted"] == 2
    assert "replayed" not in first["results"][0]
    again = await batch(
        client,
        text_message(idempotency_key="a"),
        text_message(idempotency_key="b"),
    )
    assert again["accepted"] == 2
    assert again["results"][0] == {
        "id": first["results"][0]["id"],
        "status": "queued",
        "replayed": True,
    }
    assert "replayed" not in again["results"][1]
    assert await queued(client) == 3


async def test_a_batch_key_reused_with_another_body_is_409_for_that_message_only(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    await register(client, "555000000002")
    await batch(client, text_message(idempotency_key="a"))
    again = await batch(
        client,
        text_message(idempotency_key="a", to="5491140999999"),
        text_message("555000000002", idempotency_key="a"),
        text_message(idempotency_key="c"),
    )
    assert [r.get("error", {}).get("code") for r in again["results"]] == [
        "idempotency_conflict",
        "idempotency_conflict",
        None,
    ]
    assert (again["accepted"], again["rejected"]) == (1, 2)
    assert await queued(client) == 2
    assert await queued(client, "555000000002") == 0


async def test_one_key_twice_in_a_batch_queues_once(client: TestClient[Any, Any]) -> None:
    await register(client)
    out = await batch(
        client,
        text_message(idempotency_key="twice"),
        text_message(idempotency_key="twice"),
        text_message(idempotency_key="twice", client_reference="other"),
    )
    first, second, third = out["results"]
    assert second == {"id": first["id"], "status": "queued", "replayed": True}
    assert third["error"]["code"] == "idempotency_conflict"
    assert await queued(client) == 1


async def test_a_batch_key_and_the_header_are_one_key(client: TestClient[Any, Any]) -> None:
    await register(client)
    single = await (await post(client, text_message(), "shared-key")).json()
    out = await batch(client, text_message(idempotency_key="shared-key"))
    assert out["results"][0] == {"id": single["id"], "status": "queued", "replayed": True}
    replayed = await post(client, text_message(), "shared-key")
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert await queued(client) == 1


async def test_a_refused_batch_message_does_not_bind_its_key(
    client: TestClient[Any, Any],
) -> None:
    out = await batch(client, text_message("555000000009", idempotency_key="k"))
    assert out["results"][0]["error"]["code"] == "unknown_phone_number"
    await register(client)
    out = await batch(client, text_message(idempotency_key="k"))
    assert out["accepted"] == 1
    assert "replayed" not in out["results"][0]


async def test_batch_keys_belong_to_the_api_key_that_sent_them(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    await batch(client, text_message(idempotency_key="k"))
    response = await client.post(
        "/v1/messages/batch",
        json={"messages": [text_message(idempotency_key="k")]},
        headers=ADMIN,
    )
    assert "replayed" not in (await response.json())["results"][0]
    assert await queued(client) == 2


# --- A 503 whose write landed anyway: the retry with the same key finds it ---


class LostReplies:
    """A TCP proxy to Redis that can lose answers: with `lose` set, a connection that sends a
    script call (EVALSHA) gets no reply any more, but the call itself reaches Redis and runs.

    This is what a Redis stall or a network cut after the write looks like to the gateway: it
    times out and answers 503 although the message is queued.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.lose = False
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> LostReplies:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        muted = False

        async def to_redis() -> None:
            nonlocal muted
            while data := await reader.read(65536):
                if self.lose and b"EVALSHA" in data:
                    muted = True  # before it is sent: its reply cannot slip through
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if not muted:
                    writer.write(data)
                    await writer.drain()
            writer.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(to_redis(), to_client())


@pytest.fixture
async def lossy(shared_redis: RedisServer, redis_url: str) -> AsyncIterator[LostReplies]:
    async with LostReplies(shared_redis.port) as proxy:  # redis_url: flushed
        yield proxy


@pytest.fixture
async def lossy_client(lossy: LostReplies, tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    settings = make_settings(lossy.url, tmp_path / "data")
    store = Store.from_settings(settings, lossy.url)
    async with TestClient(TestServer(create_app(settings, store))) as test_client:
        yield test_client
    await store.close()


@pytest.mark.parametrize("route", ["single", "batch"])
async def test_a_send_whose_answer_was_lost_is_sent_once_after_a_retry(
    lossy_client: TestClient[Any, Any],
    lossy: LostReplies,
    client: TestClient[Any, Any],
    settings: Settings,
    store: Store,
    route: str,
) -> None:
    await register(lossy_client)
    await register(lossy_client, "555000000002")
    # a first send loads the scripts, so what is lost below is the push's answer itself
    warm = await lossy_client.post("/v1/messages", json=text_message("555000000002"), headers=SEND)
    assert warm.status == 202

    async def attempt() -> tuple[int, str | None]:
        if route == "single":
            response = await post(lossy_client, text_message(), "order-77")
            body = await response.json()
            return response.status, body.get("id")
        response = await lossy_client.post(
            "/v1/messages/batch",
            json={"messages": [text_message(idempotency_key="order-77")]},
            headers=SEND,
        )
        body = await response.json()
        if response.status != 200:
            return response.status, None
        return 202, body["results"][0].get("id")

    lossy.lose = True
    status, _ = await attempt()
    assert status == 503  # the outcome is unknown...
    lossy.lose = False
    assert await queued(client) == 1  # ...and the write did land
    status, message_id = await attempt()  # the client's retry, with the same key
    assert status == 202
    assert await queued(client) == 1
    async with running_sandbox() as sandbox:
        async with running_drain(drain_settings(settings, sandbox), store):
            await eventually(lambda: is_sent(client, message_id), what="the send")
            await eventually(lambda: drained(client), what="an empty queue")
        assert len(await sandbox.requests(PN)) == 1


async def is_sent(client: TestClient[Any, Any], message_id: str | None) -> bool:
    response = await client.get(f"/v1/messages/{message_id}", headers=SEND)
    return bool((await response.json())["status"] == "sent")


async def drained(client: TestClient[Any, Any]) -> bool:
    body = await (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).json()
    return bool(sum(body["queue_depth"].values()) == 0 and body["inflight"] == 0)


async def test_a_send_during_a_redis_stall_is_never_queued_twice(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGSTOP: commands wait in Redis' socket and run when it resumes. A timed-out command is
    not sent again (that would queue it twice); the client retries with its key."""
    settings = make_settings(private_redis.url, tmp_path / "data")
    store = Store.from_settings(settings, private_redis.url)
    assert private_redis.process is not None
    pid = private_redis.process.pid
    try:
        async with TestClient(TestServer(create_app(settings, store))) as client:
            await register(client)
            await register(client, "555000000002")
            warm = await client.post(
                "/v1/messages", json=text_message("555000000002"), headers=SEND
            )
            assert warm.status == 202  # the push script is loaded: a stalled call can run
            os.kill(pid, signal.SIGSTOP)
            try:
                plain = await client.post("/v1/messages", json=text_message(), headers=SEND)
                keyed = await post(client, text_message(client_reference="k"), "stalled")
                statuses = (plain.status, keyed.status)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert statuses == (503, 503)
            retry = await post(client, text_message(client_reference="k"), "stalled")
            assert retry.status == 202
            again = await post(client, text_message(client_reference="k"), "stalled")
            assert (await again.json())["id"] == (await retry.json())["id"]
            # the plain send's 503 was not a refusal: it ran when Redis resumed, once
            assert await queued(client) == 2
    finally:
        await store.close()
