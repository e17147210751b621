"""POST/GET/DELETE /v1/messages and the batch route, over HTTP on a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.api.app import create_app
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import ADMIN, SEND, register, text_message

PN = "555123456789"


async def depth(client: TestClient[Any, Any], pn: str = PN) -> dict[str, int]:
    body = await (await client.get(f"/v1/phone-numbers/{pn}", headers=ADMIN)).json()
    return dict(body["queue_depth"])


async def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


async def test_send_answers_202_with_an_url_safe_id(client: TestClient[Any, Any]) -> None:
    await register(client)
    response = await client.post("/v1/messages", json=text_message(), headers=SEND)
    assert response.status == 202
    body = await response.json()
    assert body["status"] == "queued"
    assert body["phone_number_id"] == PN
    assert len(body["id"]) <= 64
    assert all(c.isalnum() or c in "-_" for c in body["id"])
    assert await depth(client) == {"high": 0, "normal": 1, "low": 0}


async def test_status_shows_every_field(client: TestClient[Any, Any]) -> None:
    await register(client)
    sent = await client.post(
        "/v1/messages",
        json=text_message(category="marketing", client_reference="otp-8812", ttl_seconds=300),
        headers=SEND,
    )
    message_id = (await sent.json())["id"]
    status = await (await client.get(f"/v1/messages/{message_id}", headers=SEND)).json()
    assert status == {
        "id": message_id,
        "phone_number_id": PN,
        "to": "5491140123456",
        "status": "queued",
        "category": "marketing",
        "priority": "low",
        "client_reference": "otp-8812",
        "attempts": 0,
        "created_at": status["created_at"],
        "updated_at": status["updated_at"],
        "sent_at": None,
        "upstream_message_id": None,
        "error": None,
    }
    assert status["created_at"].endswith("Z")


@pytest.mark.parametrize(
    ("fields", "lane"),
    [
        ({"category": "authentication"}, "high"),
        ({"category": "marketing"}, "low"),
        ({}, "normal"),
        ({"category": "marketing", "priority": "high"}, "high"),
    ],
)
async def test_messages_land_in_their_lane(
    client: TestClient[Any, Any], fields: dict[str, str], lane: str
) -> None:
    await register(client)
    assert (
        await client.post("/v1/messages", json=text_message(**fields), headers=SEND)
    ).status == 202
    assert (await depth(client))[lane] == 1


async def test_an_unknown_number_is_404(client: TestClient[Any, Any]) -> None:
    response = await client.post("/v1/messages", json=text_message("999"), headers=SEND)
    error = await error_of(response, 404, "unknown_phone_number")
    assert "999" in error["message"]


async def test_a_deleted_number_is_409(client: TestClient[Any, Any]) -> None:
    await register(client)
    assert (await client.delete(f"/v1/phone-numbers/{PN}", headers=ADMIN)).status == 200
    response = await client.post("/v1/messages", json=text_message(), headers=SEND)
    await error_of(response, 409, "phone_number_deleted")


async def test_pending_and_disconnected_numbers_accept_and_hold(
    client: TestClient[Any, Any],
) -> None:
    await register(client, status="pending")
    assert (await client.post("/v1/messages", json=text_message(), headers=SEND)).status == 202
    await client.patch(f"/v1/phone-numbers/{PN}", json={"status": "disconnected"}, headers=ADMIN)
    assert (await client.post("/v1/messages", json=text_message(), headers=SEND)).status == 202
    assert (await depth(client))["normal"] == 2


async def test_invalid_fields_are_400_with_details(client: TestClient[Any, Any]) -> None:
    await register(client)
    response = await client.post(
        "/v1/messages", json=text_message(to="12", priority="urgent"), headers=SEND
    )
    error = await error_of(response, 400, "invalid_request")
    assert {d["field"] for d in error["details"]} == {"to", "priority"}
    assert await depth(client) == {"high": 0, "normal": 0, "low": 0}


async def test_a_display_number_gets_a_message_naming_phone_number_id(
    client: TestClient[Any, Any],
) -> None:
    response = await client.post("/v1/messages", json=text_message("+5491155551234"), headers=SEND)
    error = await error_of(response, 400, "invalid_request")
    assert "phone_number_id" in error["details"][0]["message"]


async def test_malformed_json_is_400_invalid_json(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/v1/messages", data=b'{"to": ', headers={**SEND, "Content-Type": "application/json"}
    )
    await error_of(response, 400, "invalid_json")


async def test_a_non_json_content_type_is_415(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/v1/messages", data=b"to=1", headers={**SEND, "Content-Type": "text/plain"}
    )
    await error_of(response, 415, "unsupported_media_type")


async def test_a_body_over_64_kib_is_413(client: TestClient[Any, Any]) -> None:
    await register(client)
    big = text_message(text={"body": "x" * (64 * 1024)})
    await error_of(
        await client.post("/v1/messages", json=big, headers=SEND), 413, "payload_too_large"
    )
    assert await depth(client) == {"high": 0, "normal": 0, "low": 0}


async def test_a_full_backlog_is_429_with_retry_after(settings: Settings, store: Store) -> None:
    small = dataclasses.replace(settings, max_backlog=2)
    async with TestClient(TestServer(create_app(small, store))) as client:
        await register(client)
        for _ in range(2):
            assert (
                await client.post("/v1/messages", json=text_message(), headers=SEND)
            ).status == 202
        response = await client.post("/v1/messages", json=text_message(), headers=SEND)
        await error_of(response, 429, "backlog_full")
        assert int(response.headers["Retry-After"]) > 0
        batch = {"messages": [text_message(), text_message()]}
        result = await (await client.post("/v1/messages/batch", json=batch, headers=SEND)).json()
        assert result["accepted"] == 0
        assert [r["error"]["code"] for r in result["results"]] == ["backlog_full"] * 2


async def test_an_unknown_message_is_404(client: TestClient[Any, Any]) -> None:
    for message_id in ("3-01M87GH5XW1SMrcTe3o0tg", "nonsense", "99999-01M87GH5XW1SMrcTe3o0tg"):
        response = await client.get(f"/v1/messages/{message_id}", headers=SEND)
        await error_of(response, 404, "not_found")
        response = await client.delete(f"/v1/messages/{message_id}", headers=SEND)
        await error_of(response, 404, "not_found")


async def test_cancel_a_queued_message_once(client: TestClient[Any, Any]) -> None:
    await register(client)
    message_id = (
        await (await client.post("/v1/messages", json=text_message(), headers=SEND)).json()
    )["id"]
    response = await client.delete(f"/v1/messages/{message_id}", headers=SEND)
    assert response.status == 200
    assert await response.json() == {"id": message_id, "status": "canceled"}
    assert await depth(client) == {"high": 0, "normal": 0, "low": 0}
    again = await client.delete(f"/v1/messages/{message_id}", headers=SEND)
    error = await error_of(again, 409, "not_cancelable")
    assert "canceled" in error["message"]
    status = await (await client.get(f"/v1/messages/{message_id}", headers=SEND)).json()
    assert status["status"] == "canceled"


async def test_a_message_whose_ttl_ran_out_reads_expired(client: TestClient[Any, Any]) -> None:
    await register(client, status="pending")
    message_id = (
        await (
            await client.post("/v1/messages", json=text_message(ttl_seconds=1), headers=SEND)
        ).json()
    )["id"]
    await asyncio.sleep(1.1)
    status = await (await client.get(f"/v1/messages/{message_id}", headers=SEND)).json()
    assert status["status"] == "expired"
    await error_of(
        await client.delete(f"/v1/messages/{message_id}", headers=SEND), 409, "not_cancelable"
    )
    assert await depth(client) == {"high": 0, "normal": 0, "low": 0}


async def test_batch_validates_each_message_on_its_own(client: TestClient[Any, Any]) -> None:
    await register(client)
    messages = [
        text_message(),
        text_message(to="x"),
        text_message("424242"),
        text_message(category="authentication"),
    ]
    response = await client.post("/v1/messages/batch", json={"messages": messages}, headers=SEND)
    assert response.status == 200
    body = await response.json()
    assert body["accepted"] == 2
    assert body["rejected"] == 2
    results = body["results"]
    assert results[0]["status"] == "queued" and results[3]["status"] == "queued"
    assert results[1]["error"]["code"] == "invalid_request"
    assert results[2]["error"]["code"] == "unknown_phone_number"
    assert await depth(client) == {"high": 1, "normal": 1, "low": 0}
    for result in (results[0], results[3]):
        status = await client.get(f"/v1/messages/{result['id']}", headers=SEND)
        assert (await status.json())["status"] == "queued"


async def test_a_batch_spans_numbers_and_shards(client: TestClient[Any, Any]) -> None:
    numbers = [f"55500000{i:04d}" for i in range(40)]
    for pn in numbers:
        await register(client, pn)
    messages = [text_message(pn) for pn in numbers for _ in range(25)]
    body = await (
        await client.post("/v1/messages/batch", json={"messages": messages}, headers=SEND)
    ).json()
    assert body["accepted"] == 1000
    assert len({r["id"] for r in body["results"]}) == 1000
    for pn in numbers[:3]:
        assert (await depth(client, pn))["normal"] == 25


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{}] * 1001},
        {"messages": "x"},
        {},
        [],
        {"messages": [], "extra": 1},
    ],
)
async def test_a_batch_needs_1_to_1000_messages(client: TestClient[Any, Any], body: Any) -> None:
    response = await client.post("/v1/messages/batch", json=body, headers=SEND)
    await error_of(response, 400, "invalid_request")


async def test_a_batch_over_4_mib_is_413(client: TestClient[Any, Any]) -> None:
    messages = [text_message(text={"body": "x" * 5000}) for _ in range(900)]
    raw = io.BytesIO(orjson.dumps({"messages": messages}))
    response = await client.post(
        "/v1/messages/batch", data=raw, headers={**SEND, "Content-Type": "application/json"}
    )
    await error_of(response, 413, "payload_too_large")


async def test_a_batch_refuses_an_idempotency_key(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/v1/messages/batch",
        json={"messages": [text_message()]},
        headers={**SEND, "Idempotency-Key": "k"},
    )
    error = await error_of(response, 400, "invalid_request")
    assert error["details"][0]["field"] == "Idempotency-Key"
    assert "idempotency_key" in error["details"][0]["message"]


async def test_ttl_seconds_takes_an_integral_float_as_json_schema_does(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    sent = await client.post("/v1/messages", json=text_message(ttl_seconds=204102.0), headers=SEND)
    assert sent.status == 202, await sent.text()
    out = await (
        await client.post(
            "/v1/messages/batch",
            json={"messages": [text_message(ttl_seconds=60.0), text_message(ttl_seconds=60.5)]},
            headers=SEND,
        )
    ).json()
    assert (out["accepted"], out["rejected"]) == (1, 1)
    assert out["results"][1]["error"]["details"][0]["field"] == "ttl_seconds"


async def test_a_wrong_method_is_405_in_the_error_shape(client: TestClient[Any, Any]) -> None:
    response = await client.put("/v1/messages", json={}, headers=SEND)
    await error_of(response, 405, "method_not_allowed")


async def test_an_unknown_route_is_404_in_the_error_shape(client: TestClient[Any, Any]) -> None:
    await error_of(await client.get("/v1/nothing", headers=ADMIN), 404, "not_found")
