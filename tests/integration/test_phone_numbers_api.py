"""The registry routes: PUT, PATCH, GET, DELETE and the paginated list."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ADMIN, SEND, register, text_message

PN = "555123456789"


async def get(client: TestClient[Any, Any], pn: str = PN) -> dict[str, Any]:
    response = await client.get(f"/v1/phone-numbers/{pn}", headers=ADMIN)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_put_creates_with_the_defaults_then_replaces(client: TestClient[Any, Any]) -> None:
    response = await client.put(f"/v1/phone-numbers/{PN}", json={}, headers=ADMIN)
    assert response.status == 201
    created = await response.json()
    assert created["throughput_tier"] == "standard"
    assert created["quality_rating"] == "unknown"
    assert created["connection_type"] == "dedicated"
    assert created["status"] == "active"
    assert created["rate_limit_mps"] == 80
    response = await client.put(
        f"/v1/phone-numbers/{PN}",
        json={
            "throughput_tier": "HIGH",
            "waba_id": "102290129340398",
            "display_phone_number": "+1 555 0100",
            "display_name": "Acme",
            "verified_name": "Acme Inc",
            "quality_rating": "GREEN",
        },
        headers=ADMIN,
    )
    assert response.status == 200
    replaced = await response.json()
    assert replaced["throughput_tier"] == "high"
    assert replaced["quality_rating"] == "green"
    assert replaced["rate_limit_mps"] == 1000
    assert replaced["display_name"] == "Acme"
    assert replaced["created_at"] == created["created_at"]


async def test_the_view_has_every_field_and_live_figures(client: TestClient[Any, Any]) -> None:
    await register(client, throughput_tier="medium")
    for _ in range(3):
        await client.post("/v1/messages", json=text_message(priority="low"), headers=SEND)
    view = await get(client)
    assert set(view) >= {
        "phone_number_id",
        "waba_id",
        "display_phone_number",
        "display_name",
        "verified_name",
        "quality_rating",
        "throughput_tier",
        "connection_type",
        "status",
        "max_mps",
        "has_access_token",
        "queue_depth",
        "inflight",
        "rate_limit_mps",
        "sent_last_minute",
        "eta_seconds",
    }
    assert view["queue_depth"] == {"high": 0, "normal": 0, "low": 3}
    assert view["inflight"] == 0
    assert view["sent_last_minute"] == 0
    assert view["rate_limit_mps"] == 200
    assert view["eta_seconds"] == pytest.approx(3 / 200, abs=0.1)


async def test_the_access_token_is_write_only(client: TestClient[Any, Any]) -> None:
    created = await register(client, access_token="EAAG-secret-token")
    assert created["has_access_token"] is True
    for body in (created, await get(client)):
        assert "access_token" not in body
        assert "EAAG-secret-token" not in str(body)
    listing = await (await client.get("/v1/phone-numbers", headers=ADMIN)).text()
    assert "EAAG-secret-token" not in listing
    await client.patch(f"/v1/phone-numbers/{PN}", json={"access_token": None}, headers=ADMIN)
    assert (await get(client))["has_access_token"] is False


@pytest.mark.parametrize(
    ("fields", "rate"),
    [
        ({"throughput_tier": "standard"}, 80),
        ({"throughput_tier": "Medium"}, 200),
        ({"throughput_tier": "high"}, 1000),
        ({"throughput_tier": "unlimited"}, None),
        ({"throughput_tier": "high", "connection_type": "coexistence"}, 20),
        ({"throughput_tier": "unlimited", "connection_type": "coexistence"}, 20),
        ({"throughput_tier": "high", "max_mps": 250}, 250),
        ({"throughput_tier": "standard", "max_mps": 500}, 80),
        ({"throughput_tier": "unlimited", "max_mps": 50}, 50),
        ({"throughput_tier": "high", "max_mps": 250.0}, 250),
    ],
)
async def test_the_rate_in_force(
    client: TestClient[Any, Any], fields: dict[str, Any], rate: int | None
) -> None:
    view = await register(client, **fields)
    assert view["rate_limit_mps"] == rate
    if rate is None:
        assert view["eta_seconds"] is None


async def test_patch_changes_only_what_it_names(client: TestClient[Any, Any]) -> None:
    await register(client, display_name="Acme", throughput_tier="medium", max_mps=100)
    response = await client.patch(
        f"/v1/phone-numbers/{PN}", json={"quality_rating": "red"}, headers=ADMIN
    )
    assert response.status == 200
    view = await response.json()
    assert view["quality_rating"] == "red"
    assert view["display_name"] == "Acme"
    assert view["rate_limit_mps"] == 100
    view = await (
        await client.patch(f"/v1/phone-numbers/{PN}", json={"max_mps": None}, headers=ADMIN)
    ).json()
    assert view["max_mps"] is None
    assert view["rate_limit_mps"] == 200


async def test_patch_of_an_unknown_number_is_404(client: TestClient[Any, Any]) -> None:
    response = await client.patch("/v1/phone-numbers/777", json={"status": "active"}, headers=ADMIN)
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"throughput_tier": "premium"},
        {"quality_rating": "blue"},
        {"status": "paused"},
        {"connection_type": "shared"},
        {"max_mps": 0},
        {"max_mps": 2.5},
        {"waba_id": "abc"},
        {"nickname": "x"},
        {"phone_number_id": "123"},
        {"access_token": ""},
        # a token goes in an Authorization header: nothing that ends or forges a header line
        {"access_token": "EAAG\r\nX-Injected: 1"},
        {"access_token": "EAAG secret"},
        {"access_token": "EAAG\u00e9"},
    ],
)
async def test_invalid_fields_are_400(client: TestClient[Any, Any], body: dict[str, Any]) -> None:
    response = await client.put(f"/v1/phone-numbers/{PN}", json=body, headers=ADMIN)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "invalid_request"
    assert error["details"][0]["field"] == next(iter(body))
    assert (await client.get(f"/v1/phone-numbers/{PN}", headers=ADMIN)).status == 404


async def test_a_display_number_in_the_path_is_400(client: TestClient[Any, Any]) -> None:
    response = await client.put("/v1/phone-numbers/+5491155551234", json={}, headers=ADMIN)
    assert response.status == 400
    assert "phone_number_id" in (await response.json())["error"]["details"][0]["message"]


async def test_view_fields_sent_back_are_ignored(client: TestClient[Any, Any]) -> None:
    view = await register(client)
    view["display_name"] = "Renamed"
    response = await client.put(f"/v1/phone-numbers/{PN}", json=view, headers=ADMIN)
    assert response.status == 200
    assert (await response.json())["display_name"] == "Renamed"


async def test_delete_fails_the_queue(client: TestClient[Any, Any]) -> None:
    await register(client)
    ids = []
    for _ in range(3):
        sent = await client.post("/v1/messages", json=text_message(), headers=SEND)
        ids.append((await sent.json())["id"])
    response = await client.delete(f"/v1/phone-numbers/{PN}", headers=ADMIN)
    assert response.status == 200
    view = await response.json()
    assert view["status"] == "deleted"
    assert view["queue_depth"] == {"high": 0, "normal": 0, "low": 0}
    for message_id in ids:
        status = await (await client.get(f"/v1/messages/{message_id}", headers=SEND)).json()
        assert status["status"] == "failed"
        assert status["error"]["code"] == "phone_number_deleted"
    assert (await client.delete("/v1/phone-numbers/777", headers=ADMIN)).status == 404


async def test_the_list_pages_in_order(client: TestClient[Any, Any]) -> None:
    numbers = sorted(f"5551000{i:03d}" for i in range(7))
    for pn in reversed(numbers):
        await register(client, pn)
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(f"/v1/phone-numbers{query}", headers=ADMIN)).json()
        seen += [n["phone_number_id"] for n in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == numbers
    everything = await (await client.get("/v1/phone-numbers", headers=ADMIN)).json()
    assert [n["phone_number_id"] for n in everything["data"]] == numbers
    assert everything["next_cursor"] is None


@pytest.mark.parametrize("query", ["?limit=0", "?limit=501", "?limit=x", "?cursor=%2B1"])
async def test_bad_list_parameters_are_400(client: TestClient[Any, Any], query: str) -> None:
    response = await client.get(f"/v1/phone-numbers{query}", headers=ADMIN)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"


async def test_max_mps_takes_integral_floats_and_reads_back_as_an_integer(
    client: TestClient[Any, Any],
) -> None:
    view = await register(client, max_mps=25.0)
    assert view["max_mps"] == 25
    assert isinstance(view["max_mps"], int)
    for bad in (25.5, True, 0, 1e20):
        response = await client.patch(
            f"/v1/phone-numbers/{PN}", json={"max_mps": bad}, headers=ADMIN
        )
        assert response.status == 400
        assert (await response.json())["error"]["details"][0]["field"] == "max_mps"


@pytest.mark.parametrize("limit", ["\u00b2", "\u0663", "1\n", "0", "501", "1.0", ""])
async def test_limit_is_ascii_digits_from_1_to_500(
    client: TestClient[Any, Any], limit: str
) -> None:
    response = await client.get("/v1/phone-numbers", params={"limit": limit}, headers=ADMIN)
    assert response.status == 400
    assert (await response.json())["error"]["details"][0]["field"] == "limit"
