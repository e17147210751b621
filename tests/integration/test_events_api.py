"""POST /v1/events: phone-number webhooks, authenticated by their HMAC signature."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ADMIN, SEND, WEBHOOK_SECRET, register, text_message

PN = "555123456789"


def signed(body: Any, secret: str = WEBHOOK_SECRET) -> tuple[bytes, dict[str, str]]:
    raw = orjson.dumps(body)
    digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return raw, {"X-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


async def post_event(client: TestClient[Any, Any], body: Any) -> tuple[int, dict[str, Any]]:
    raw, headers = signed(body)
    response = await client.post("/v1/events", data=raw, headers=headers)
    return response.status, await response.json()


def rfc3339(seconds_from_now: float = 0.0) -> str:
    moment = datetime.fromtimestamp(time.time() + seconds_from_now, tz=UTC)
    return moment.isoformat().replace("+00:00", "Z")


def event(kind: str, event_id: str = "evt_1", **data: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": f"whatsapp.phone_number.{kind}",
        "created_at": rfc3339(),
        "data": {"phone_number_id": PN, **data},
    }


async def number(client: TestClient[Any, Any]) -> dict[str, Any]:
    response = await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)
    body: dict[str, Any] = await response.json()
    return body


async def test_created_upserts_the_number(client: TestClient[Any, Any]) -> None:
    status, body = await post_event(
        client, event("created", throughput_tier="MEDIUM", display_name="Acme", waba_id="1234")
    )
    assert (status, body) == (200, {"applied": True})
    view = await number(client)
    assert view["throughput_tier"] == "medium"
    assert view["display_name"] == "Acme"
    assert view["status"] == "active"
    await post_event(client, event("created", "evt_2", display_name="Acme 2"))
    view = await number(client)
    assert view["display_name"] == "Acme 2"
    assert view["throughput_tier"] == "medium"


async def test_quality_update_changes_quality_and_tier(client: TestClient[Any, Any]) -> None:
    await register(client)
    status, body = await post_event(
        client, event("quality_update", quality_rating="RED", throughput_tier="high")
    )
    assert (status, body) == (200, {"applied": True})
    view = await number(client)
    assert view["quality_rating"] == "red"
    assert view["throughput_tier"] == "high"


async def test_quality_update_for_an_unknown_number_is_ignored(
    client: TestClient[Any, Any],
) -> None:
    status, body = await post_event(client, event("quality_update", quality_rating="green"))
    assert status == 200
    assert body["ignored"] is True
    assert (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).status == 404


async def test_deleted_deletes_and_fails_the_queue(client: TestClient[Any, Any]) -> None:
    await register(client)
    sent = await client.post("/v1/messages", json=text_message(), headers=SEND)
    message_id = (await sent.json())["id"]
    status, body = await post_event(client, event("deleted"))
    assert (status, body) == (200, {"applied": True})
    assert (await number(client))["status"] == "deleted"
    message = await (await client.get(f"/v1/messages/{message_id}", headers=SEND)).json()
    assert message["error"]["code"] == "phone_number_deleted"


async def test_a_repeated_event_id_is_applied_once(client: TestClient[Any, Any]) -> None:
    await register(client)
    first = event("quality_update", "evt_same", quality_rating="red")
    assert await post_event(client, first) == (200, {"applied": True})
    await client.patch(f"/v1/phone-numbers/{PN}", json={"quality_rating": "green"}, headers=ADMIN)
    assert await post_event(client, first) == (200, {"duplicate": True})
    assert (await number(client))["quality_rating"] == "green"


async def test_an_unknown_type_is_ignored(client: TestClient[Any, Any]) -> None:
    body = {"id": "evt_x", "type": "whatsapp.something.else", "created_at": rfc3339(), "data": {}}
    assert await post_event(client, body) == (200, {"ignored": True})


async def test_a_missing_or_wrong_signature_is_401(client: TestClient[Any, Any]) -> None:
    body = event("created")
    raw, headers = signed(body, secret="not-the-secret")
    for sent_headers in (
        headers,
        {"Content-Type": "application/json"},
        {**headers, "X-Signature-256": "md5=abc"},
    ):
        response = await client.post("/v1/events", data=raw, headers=sent_headers)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
    assert (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).status == 404


async def test_a_bearer_key_is_not_a_signature(client: TestClient[Any, Any]) -> None:
    response = await client.post("/v1/events", json=event("created"), headers=ADMIN)
    assert response.status == 401


async def test_malformed_events_are_400(client: TestClient[Any, Any]) -> None:
    now = rfc3339()
    for body in (
        {"type": "whatsapp.phone_number.created", "created_at": now, "data": {}},
        {"id": "e", "type": "whatsapp.phone_number.created", "created_at": now, "data": "x"},
        {
            "id": "e",
            "type": "whatsapp.phone_number.created",
            "created_at": now,
            "data": {"phone_number_id": "+1 555"},
        },
        {
            "id": "e2",
            "type": "whatsapp.phone_number.quality_update",
            "created_at": now,
            "data": {"phone_number_id": PN},
        },
    ):
        status, answer = await post_event(client, body)
        assert status == 400, answer
        assert answer["error"]["code"] == "invalid_request"
    raw = b"{not json"
    digest = hmac.new(WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    response = await client.post(
        "/v1/events",
        data=raw,
        headers={"X-Signature-256": f"sha256={digest}", "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_json"


async def test_a_refused_event_can_be_sent_again(client: TestClient[Any, Any]) -> None:
    bad = event("created", "evt_retry", throughput_tier="premium")
    assert (await post_event(client, bad))[0] == 400
    good = event("created", "evt_retry", throughput_tier="high")
    assert await post_event(client, good) == (200, {"applied": True})


async def test_an_event_older_than_its_id_is_remembered_is_stale(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    old = {**event("quality_update", "evt_old", quality_rating="red")}
    old["created_at"] = rfc3339(-(7 * 86400 + 60))
    status, body = await post_event(client, old)
    assert status == 400
    assert body["error"]["code"] == "stale_event"
    assert (await number(client))["quality_rating"] == "unknown"
    # refused before its id was marked: the same id, fresh, still applies
    old["created_at"] = rfc3339(-(6 * 86400))
    assert await post_event(client, old) == (200, {"applied": True})


async def test_an_event_from_more_than_5_minutes_ahead_is_stale(
    client: TestClient[Any, Any],
) -> None:
    await register(client)
    ahead = event("quality_update", "evt_ahead", quality_rating="red")
    ahead["created_at"] = rfc3339(600)
    status, body = await post_event(client, ahead)
    assert (status, body["error"]["code"]) == (400, "stale_event")
    ahead["created_at"] = rfc3339(60)  # a little clock skew is fine
    assert await post_event(client, ahead) == (200, {"applied": True})


@pytest.mark.parametrize(
    "created_at", [None, "", "yesterday", 1764400000, "2026-11-29T08:00:00", "2026-02-30T00:00:00Z"]
)
async def test_created_at_is_required_as_rfc_3339(
    client: TestClient[Any, Any], created_at: Any
) -> None:
    body = event("created")
    if created_at is None:
        del body["created_at"]
    else:
        body["created_at"] = created_at
    status, answer = await post_event(client, body)
    assert status == 400
    assert answer["error"]["code"] == "invalid_request"
    assert [d["field"] for d in answer["error"]["details"]] == ["created_at"]
