"""The accept path end to end over real HTTP and a real Redis."""

from __future__ import annotations

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
