"""Bearer keys on every /v1 route: none → 401, a send key on an admin route → 403."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ADMIN, ADMIN_KEY, SEND, SEND_KEY, register, text_message

MESSAGE_ROUTES = [
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/batch"),
    ("GET", "/v1/messages/1-01M87GH5XW1SMrcTe3o0tg"),
    ("DELETE", "/v1/messages/1-01M87GH5XW1SMrcTe3o0tg"),
]
ADMIN_ROUTES = [
    ("PUT", "/v1/phone-numbers/555123456789"),
    ("PATCH", "/v1/phone-numbers/555123456789"),
    ("GET", "/v1/phone-numbers/555123456789"),
    ("DELETE", "/v1/phone-numbers/555123456789"),
    ("GET", "/v1/phone-numbers"),
]


@pytest.mark.parametrize(("method", "path"), MESSAGE_ROUTES + ADMIN_ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": SEND_KEY},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"Authorization": "Bearer "},
    ],
)
async def test_no_valid_key_is_401(
    client: TestClient[Any, Any], method: str, path: str, headers: dict[str, str]
) -> None:
    response = await client.request(method, path, json={}, headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="whatsapp-gateway"'
    body = await response.json()
    assert body["error"]["code"] == "unauthorized"
    assert SEND_KEY not in str(body) and ADMIN_KEY not in str(body)


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_a_send_key_on_an_admin_route_is_403(
    client: TestClient[Any, Any], method: str, path: str
) -> None:
    response = await client.request(method, path, json={}, headers=SEND)
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"


@pytest.mark.parametrize(("method", "path"), MESSAGE_ROUTES + ADMIN_ROUTES)
async def test_an_admin_key_passes_everywhere(
    client: TestClient[Any, Any], method: str, path: str
) -> None:
    response = await client.request(method, path, json={}, headers=ADMIN)
    assert response.status not in (401, 403)


async def test_a_send_key_sends(client: TestClient[Any, Any]) -> None:
    await register(client)
    assert (await client.post("/v1/messages", json=text_message(), headers=SEND)).status == 202


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
async def test_operations_routes_need_no_key(client: TestClient[Any, Any], path: str) -> None:
    assert (await client.get(path)).status == 200


async def test_a_key_that_is_not_ascii_is_401_not_an_error(client: TestClient[Any, Any]) -> None:
    # Non-ASCII in the header matches no key (tests/security/test_wire.py sends raw bytes).
    response = await client.get(
        "/v1/phone-numbers", headers={"Authorization": "Bearer k\u00e9y\u2028"}
    )
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"
