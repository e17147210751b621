"""The sandbox Cloud API over real HTTP: Meta's answers, the per-number window, faults."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.sandbox import StaticRates, create_sandbox_app, mask_token
from gateway.sandbox.app import Record
from gateway.sandbox.app import Sandbox as SandboxState
from tests.integration.drain_support import Sandbox, running_sandbox

PN = "555123456789"
BODY = {
    "messaging_product": "whatsapp",
    "recipient_type": "individual",
    "to": "+5491140123456",
    "type": "text",
    "text": {"body": "hi"},
}
AUTH = {"Authorization": "Bearer token"}


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with running_sandbox() as box:
        yield box


async def post(
    box: Sandbox, body: Any = BODY, headers: dict[str, str] = AUTH, pn: str = PN
) -> tuple[int, dict[str, Any]]:
    async with box.http.post(f"{box.url}/{pn}/messages", json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_success_looks_like_the_cloud_api(sandbox: Sandbox) -> None:
    first = await post(sandbox)
    second = await post(sandbox)
    assert first[0] == 200
    assert first[1]["messaging_product"] == "whatsapp"
    assert first[1]["contacts"] == [{"input": "+5491140123456", "wa_id": "5491140123456"}]
    ids = {first[1]["messages"][0]["id"], second[1]["messages"][0]["id"]}
    assert len(ids) == 2 and all(i.startswith("wamid.") for i in ids)


async def test_the_version_prefix_is_optional(sandbox: Sandbox) -> None:
    async with sandbox.http.post(f"{sandbox.root}/{PN}/messages", json=BODY, headers=AUTH) as r:
        assert r.status == 200


async def test_no_token_is_401_code_190(sandbox: Sandbox) -> None:
    status, body = await post(sandbox, headers={})
    assert status == 401
    assert body["error"]["code"] == 190
    assert body["error"]["type"] == "OAuthException"
    assert body["error"]["fbtrace_id"]


@pytest.mark.parametrize(
    "body",
    [{**BODY, "messaging_product": "sms"}, {**BODY, "to": ""}, {**BODY, "text": "hi"}, [1]],
)
async def test_a_bad_body_is_400_code_100(sandbox: Sandbox, body: Any) -> None:
    status, answer = await post(sandbox, body=body)
    assert status == 400
    assert answer["error"]["code"] == 100


async def test_the_rate_is_a_sliding_second_per_number(sandbox: Sandbox) -> None:
    sandbox.rates.set(PN, 10)
    answers = await asyncio.gather(*(post(sandbox) for _ in range(15)))
    codes = sorted(a[1].get("error", {}).get("code", 0) for a in answers)
    assert codes == [0] * 10 + [130429] * 5
    assert len(await sandbox.arrivals(PN)) == 10
    assert (await post(sandbox, pn="555000000001"))[0] == 200  # other numbers are unaffected


async def test_unlimited_never_throttles(sandbox: Sandbox) -> None:
    sandbox.rates.set(PN, None)
    answers = await asyncio.gather(*(post(sandbox) for _ in range(200)))
    assert {a[0] for a in answers} == {200}


async def test_the_rate_can_be_set_through_the_admin_route(sandbox: Sandbox) -> None:
    await sandbox.admin("PUT", f"numbers/{PN}", {"mps": 2})
    answers = [await post(sandbox) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 400]


async def test_a_script_answers_in_order_then_normally(sandbox: Sandbox) -> None:
    await sandbox.faults(
        script={PN: [{"status": 400, "code": 131056}, {"status": 500}, {"status": 200}]}
    )
    answers = [await post(sandbox) for _ in range(4)]
    assert [a[0] for a in answers] == [400, 500, 200, 200]
    assert answers[0][1]["error"]["code"] == 131056
    assert answers[1][1]["error"]["code"] == 2


async def test_a_fixed_fault_holds_until_cleared(sandbox: Sandbox) -> None:
    await sandbox.faults(numbers={PN: {"status": 401, "code": 190}})
    assert (await post(sandbox))[0] == 401
    assert (await post(sandbox))[0] == 401
    assert (await post(sandbox, pn="555000000001"))[0] == 200
    await sandbox.admin("DELETE", "faults")
    assert (await post(sandbox))[0] == 200


async def test_latency_is_added(sandbox: Sandbox) -> None:
    await sandbox.faults(latency_ms=200)
    started = time.monotonic()
    await post(sandbox)
    assert time.monotonic() - started >= 0.2


async def test_random_faults_follow_their_rates(sandbox: Sandbox) -> None:
    await sandbox.faults(error_rate=1.0)
    status, body = await post(sandbox)
    assert (status, body["error"]["code"]) == (503, 2)
    await sandbox.faults(throttle_rate=1.0)
    status, body = await post(sandbox)
    assert (status, body["error"]["code"]) == (429, 130429)


async def test_a_nonsense_fault_document_is_refused(sandbox: Sandbox) -> None:
    async with sandbox.http.put(
        f"{sandbox.root}/_sandbox/faults", json={"error_rate": 2}
    ) as response:
        assert response.status == 400


async def test_requests_are_recorded_and_can_be_cleared(sandbox: Sandbox) -> None:
    await post(sandbox)
    [request] = await sandbox.requests(PN)
    assert request["token"] == mask_token("token")
    assert request["body"] == BODY
    assert request["outcome"] == "ok"
    stats = await sandbox.admin("GET", "stats")
    assert stats["numbers"][PN] == {"ok": 1}
    await sandbox.admin("DELETE", "records")
    assert await sandbox.requests(PN) == []


async def test_recorded_access_tokens_are_masked(sandbox: Sandbox) -> None:
    token = "EAAGm0PX4ZCpsBAKZCyZBqQ1secretsecretsecret"
    other = "EAAGm0PX4ZCpsBAKZCyZBqQ1another-token-value"
    await post(sandbox, headers={"Authorization": f"Bearer {token}"})
    await post(sandbox, headers={"Authorization": f"Bearer {other}"})
    await post(sandbox, headers={"Authorization": "Bearer short"})
    async with sandbox.http.get(f"{sandbox.root}/_sandbox/requests") as response:
        raw = await response.text()
    for secret in (token, other, "short", token[4:12], "secret"):
        assert secret not in raw
    shown = [r["token"] for r in await sandbox.requests(PN)]
    assert shown == [mask_token(token), mask_token(other), mask_token("short")]
    assert shown[0].startswith("EAAG…") and shown[0] != shown[1]  # a kind, and which token
    assert shown[2].startswith("…")  # a short token shows none of itself
    assert len(set(shown)) == 3


async def test_recordings_are_bounded() -> None:
    app = create_sandbox_app(StaticRates(), record_limit=5)
    async with TestClient(TestServer(app)) as client:
        for _ in range(8):
            await client.post(f"/v21.0/{PN}/messages", json=BODY, headers=AUTH)
        body = await (await client.get(f"/_sandbox/requests?phone_number_id={PN}&limit=100")).json()
        assert len(body["requests"]) == 5


def test_records_cost_a_full_collection_nothing() -> None:
    """Thousands of records must not make the sandbox stall in the garbage collector."""
    sandbox = SandboxState(StaticRates(), record_limit=5000)
    for i in range(5000):
        sandbox.keep(Record(float(i), "555000000001", "ok", "token", b'{"to": "1"}'))
    gc.collect()
    assert not any(gc.is_tracked(record) for record in sandbox.records)
    assert [r.time for r in sandbox.recorded()][:3] == [0.0, 1.0, 2.0]
