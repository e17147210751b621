"""Idempotency-Key on POST /v1/messages: one message per key and body for 24 h."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import ADMIN, SEND, register, text_message

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
