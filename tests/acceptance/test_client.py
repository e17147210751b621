"""`gateway.client` against the real `gateway run` process: send, batch, status, cancel, typed
errors, and retries of `503`/`429` that never queue a message twice.

Retries are provoked by a small proxy on a free port in front of the gateway, which answers as
each test scripts it: a `503` after forwarding (the write landed, the answer was lost: what a
Redis timeout looks like to a client), a `503` or `429` without forwarding, or a plain forward.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.client import (
    BATCH_LIMIT,
    Accepted,
    AsyncGatewayClient,
    GatewayAPIError,
    GatewayClient,
    Rejected,
)
from tests.acceptance.commands import call
from tests.acceptance.test_gateway_process import Gateway

PN = "555123456789"  # active: its messages go on to the sandbox
HELD = "555000000001"  # pending: its messages stay queued, so they can be canceled


def text(pn: str = HELD, to: str = "5491140123456", **fields: Any) -> dict[str, Any]:
    return {"phone_number_id": pn, "to": to, "type": "text", "text": {"body": "hi"}, **fields}


@dataclass
class Running:
    gateway: Gateway
    send_key: str

    @property
    def base(self) -> str:
        return self.gateway.base


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    gateway = Gateway(tmp_path_factory.mktemp("client") / "service").start()
    try:
        keys = gateway.keys()
        for pn, fields in ((PN, {}), (HELD, {"status": "pending"})):
            status, _ = call(
                gateway.base, "PUT", f"/v1/phone-numbers/{pn}", keys["admin_key"], fields
            )
            assert status in (200, 201)
        yield Running(gateway, keys["send_key"])
    finally:
        assert gateway.terminate() == 0, gateway.command.output()


@dataclass
class Seen:
    method: str
    path: str
    idempotency_key: str | None
    body: bytes
    upstream_answer: bytes | None = None


@dataclass
class Proxy:
    """In front of the gateway, in its own thread and loop (the sync client blocks this one)."""

    target: str
    script: list[tuple[str, str]] = field(default_factory=list)  # (action, Retry-After)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = Seen(request.method, request.path, request.headers.get("Idempotency-Key"), body)
        self.seen.append(seen)
        action, retry_after = self.script.pop(0) if self.script else ("forward", "")
        if action in ("forward", "forward-then-503"):
            headers = {
                k: v
                for k, v in request.headers.items()
                if k.lower() not in ("host", "content-length")
            }
            async with (
                aiohttp.ClientSession() as http,
                http.request(
                    request.method, self.target + request.path_qs, data=body, headers=headers
                ) as answer,
            ):
                seen.upstream_answer = await answer.read()
                if action == "forward":
                    out = {
                        k: v
                        for k, v in answer.headers.items()
                        if k.lower() in ("content-type", "idempotent-replayed")
                    }
                    return web.Response(
                        body=seen.upstream_answer, status=answer.status, headers=out
                    )
        status = 429 if action == "429" else 503
        code = "backlog_full" if status == 429 else "unavailable"
        return web.json_response(
            {"error": {"code": code, "message": "scripted by the test proxy"}},
            status=status,
            headers={"Retry-After": retry_after or "0"},
        )

    async def _start(self) -> web.AppRunner:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return runner

    def __enter__(self) -> Proxy:
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_send_status_and_cancel(running: Running) -> None:
    with GatewayClient(running.base, running.send_key) as client:
        accepted = client.send(text(), client_reference="c-1")
        assert (accepted.status, accepted.phone_number_id) == ("queued", HELD)
        assert accepted.idempotency_key and not accepted.replayed
        status = client.status(accepted.id)
        assert (status["status"], status["client_reference"]) == ("queued", "c-1")
        assert client.cancel(accepted.id) == {"id": accepted.id, "status": "canceled"}
        assert client.status(accepted.id)["status"] == "canceled"
        with pytest.raises(GatewayAPIError) as caught:
            client.cancel(accepted.id)
        assert (caught.value.status, caught.value.code) == (409, "not_cancelable")


async def test_the_async_client_follows_a_message_to_the_sandbox(running: Running) -> None:
    async with AsyncGatewayClient(running.base, running.send_key) as client:
        accepted = await client.send(
            phone_number_id=PN, to="5491140123456", type="text", text={"body": "hi"}
        )
        for _ in range(200):
            status = await client.status(accepted.id)
            if status["status"] != "queued" and status["status"] != "sending":
                break
            await asyncio.sleep(0.05)
        assert status["status"] in ("sent", "delivered", "read")
        assert status["upstream_message_id"].startswith("wamid.")


def test_a_batch_over_1000_goes_in_chunks_and_comes_back_in_order(running: Running) -> None:
    messages = [text(client_reference=f"b-{i}") for i in range(2 * BATCH_LIMIT + 345)]
    messages[1500] = text(to="not-a-number", client_reference="bad")
    with Proxy(running.base) as proxy, GatewayClient(proxy.url, running.send_key) as client:
        results = client.send_batch(messages)
    assert [s.path for s in proxy.seen] == ["/v1/messages/batch"] * 3
    assert len(results) == len(messages)
    rejected = results[1500]
    assert isinstance(rejected, Rejected) and rejected.code == "invalid_request"
    assert rejected.details[0]["field"] == "to"
    accepted = [r for r in results if isinstance(r, Accepted)]
    assert len(accepted) == len(messages) - 1
    assert len({r.id for r in accepted}) == len(accepted)
    with GatewayClient(running.base, running.send_key) as client:
        for index in (0, 999, 1000, 2344):
            result = results[index]
            assert isinstance(result, Accepted)
            assert client.status(result.id)["client_reference"] == f"b-{index}"


async def test_errors_carry_the_apis_code_message_and_status(running: Running) -> None:
    async with AsyncGatewayClient(running.base, running.send_key) as client:
        with pytest.raises(GatewayAPIError) as caught:
            await client.status("9-no-such-message")
        assert (caught.value.status, caught.value.code) == (404, "not_found")
        with pytest.raises(GatewayAPIError) as caught:
            await client.send(text(to="+54 9 11"))
        assert (caught.value.status, caught.value.code) == (400, "invalid_request")
        assert caught.value.details[0]["field"] == "to" and caught.value.message
        with pytest.raises(GatewayAPIError) as caught:
            await client.send(text(pn="999999"))
        assert (caught.value.status, caught.value.code) == (404, "unknown_phone_number")
    async with AsyncGatewayClient(running.base, "not-a-key") as client:
        with pytest.raises(GatewayAPIError) as caught:
            await client.send(text())
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")


def test_a_lost_answer_is_retried_with_the_same_key_and_queued_once(running: Running) -> None:
    with (
        Proxy(running.base, [("forward-then-503", "0")]) as proxy,
        GatewayClient(proxy.url, running.send_key) as client,
    ):
        accepted = client.send(text())
    first, retry = proxy.seen
    assert first.idempotency_key == retry.idempotency_key == accepted.idempotency_key
    assert first.upstream_answer is not None and accepted.id.encode() in first.upstream_answer
    assert accepted.replayed  # the gateway answered the retry with the first message


async def test_a_lost_batch_answer_is_retried_and_queues_nothing_twice(running: Running) -> None:
    messages = [text(client_reference=f"r-{i}") for i in range(3)]
    with Proxy(running.base, [("forward-then-503", "0")]) as proxy:
        async with AsyncGatewayClient(proxy.url, running.send_key) as client:
            results = await client.send_batch(messages)
    first, retry = proxy.seen
    assert first.body == retry.body  # the same per-message idempotency keys
    assert all(isinstance(r, Accepted) and r.replayed for r in results)
    assert first.upstream_answer is not None
    for result in results:
        assert isinstance(result, Accepted) and result.id.encode() in first.upstream_answer


async def test_429_and_503_are_retried_after_retry_after(running: Running) -> None:
    script = [("429", "1"), ("503", "0")]
    with Proxy(running.base, script) as proxy:
        async with AsyncGatewayClient(proxy.url, running.send_key) as client:
            started = time.monotonic()
            accepted = await client.send(text())
            waited = time.monotonic() - started
    assert len(proxy.seen) == 3 and not accepted.replayed
    assert waited >= 1.0  # Retry-After: 1 was honoured before the second try


def test_retries_are_bounded(running: Running) -> None:
    script = [("503", "0")] * 10
    with (
        Proxy(running.base, script) as proxy,
        GatewayClient(proxy.url, running.send_key, max_retries=2) as client,
        pytest.raises(GatewayAPIError) as caught,
    ):
        client.send(text())
    assert (caught.value.status, caught.value.code) == (503, "unavailable")
    assert caught.value.retry_after == 0.0
    assert len(proxy.seen) == 3
