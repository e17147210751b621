"""Operations routes: liveness, readiness, metrics, the OpenAPI document."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import SEND, register, text_message


async def test_healthz_and_readyz(client: TestClient[Any, Any]) -> None:
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    assert await (await client.get("/readyz")).json() == {"status": "ready"}


async def test_metrics_count_requests_and_accepted_messages(client: TestClient[Any, Any]) -> None:
    await register(client, throughput_tier="medium")
    await client.post("/v1/messages", json=text_message(category="marketing"), headers=SEND)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert 'gateway_messages_accepted_total{category="marketing",tier="medium"}' in text
    assert 'gateway_http_requests_total{route="/v1/messages",status="202"}' in text
    assert 'gateway_http_request_duration_seconds_bucket{le="0.005",route="/v1/messages"}' in text


async def test_the_openapi_document_is_served(client: TestClient[Any, Any]) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert "/v1/messages" in document["paths"]
