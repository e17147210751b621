"""The accept path end to end over real HTTP and a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import ADMIN, SEND, register, text_message


async def test_send_then_read_status(client: TestClient[Any, Any]) -> None:
    await register(client, throughput_tier="medium")
    response = await client.post(
        "/v1/messages", json=text_message(client_reference="r1"), headers=SEND
    )
    assert response.status == 202
    accepted = await response.json()
    assert accepted["status"] == "queued"
    status = await (await client.get(f"/v1/messages/{accepted['id']}", headers=SEND)).json()
    assert status["status"] == "queued"
    assert status["client_reference"] == "r1"
    number = await (await client.get("/v1/phone-numbers/555123456789", headers=ADMIN)).json()
    assert number["queue_depth"] == {"high": 0, "normal": 1, "low": 0}


async def test_answers_name_the_product_not_its_versions(client: TestClient[Any, Any]) -> None:
    for path in ("/healthz", "/nowhere", "/v1/messages/x"):
        response = await client.get(path)
        assert response.headers["Server"] == "whatsapp-gateway"


async def test_a_405_says_what_is_allowed(client: TestClient[Any, Any]) -> None:
    response = await client.post("/healthz")
    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
    assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_the_batch_route_allows_only_post(client: TestClient[Any, Any]) -> None:
    for method in ("GET", "DELETE", "OPTIONS"):
        response = await client.request(method, "/v1/messages/batch", headers=SEND)
        assert response.status == 405, method
        assert response.headers["Allow"] == "POST"


async def test_a_chunked_body_over_the_limit_is_refused(client: TestClient[Any, Any]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        yield b"x" * (70 * 1024)
        yield b'"}'

    response = await client.post(
        "/v1/messages",
        data=chunks(),
        headers={**SEND, "Content-Type": "application/json"},
    )
    assert response.status == 413
    assert "64 KiB" in (await response.json())["error"]["message"]
