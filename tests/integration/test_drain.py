"""The drain end to end in one process: real API, real Redis, the sandbox as the Cloud API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from gateway import keys, metrics
from gateway.drain.classify import Answer, Outcome
from gateway.drain.upstream import CloudApi, TimedBody
from gateway.sandbox import mask_token
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import ADMIN, SEND, register, text_message
from tests.integration.drain_support import (
    DEFAULT_TOKEN,
    Sandbox,
    drain_settings,
    eventually,
    max_in_window,
    running_drain,
    running_sandbox,
    sustained_rate,
)

PN = "555123456789"
OTHER = "555000000002"


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with running_sandbox() as box:
        yield box


async def send(client: TestClient[Any, Any], **fields: Any) -> str:
    response = await client.post("/v1/messages", json=text_message(**fields), headers=SEND)
    assert response.status == 202, await response.text()
    return str((await response.json())["id"])


async def status(client: TestClient[Any, Any], message_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/messages/{message_id}", headers=SEND)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def number(client: TestClient[Any, Any], pn: str = PN) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get(f"/v1/phone-numbers/{pn}", headers=ADMIN)).json()
    return body


async def wait_status(
    client: TestClient[Any, Any], message_id: str, wanted: str, within_s: float = 10.0
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await status(client, message_id))
        return seen["status"] == wanted

    await eventually(reached, within_s, f"message {message_id} reaching {wanted} (last: {seen})")
    return seen


async def test_a_message_is_sent_with_the_exact_cloud_api_request(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN, access_token="number-token")
    async with running_drain(drain_settings(settings, sandbox), store):
        message_id = await send(
            client,
            category="marketing",
            priority="high",
            client_reference="ref-1",
            ttl_seconds=600,
            context={"message_id": "wamid.PREV"},
            biz_opaque_callback_data="opaque",
        )
        sent = await wait_status(client, message_id, "sent")
    assert sent["upstream_message_id"].startswith("wamid.")
    assert sent["attempts"] == 1
    assert sent["sent_at"] is not None
    [request] = await sandbox.requests(PN)
    assert request["token"] == mask_token("number-token")
    body = request["body"]
    assert body == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "5491140123456",
        "type": "text",
        "text": {"body": "Your code is 123456"},
        "context": {"message_id": "wamid.PREV"},
        "biz_opaque_callback_data": "opaque",
    }


async def test_a_number_without_its_own_token_uses_the_default(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    async with running_drain(drain_settings(settings, sandbox), store):
        await wait_status(client, await send(client), "sent")
    [request] = await sandbox.requests(PN)
    assert request["token"] == mask_token(DEFAULT_TOKEN)


async def test_lanes_drain_high_then_normal_then_low(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN, status="pending", throughput_tier="unlimited")
    low = [await send(client, priority="low", client_reference=f"low{i}") for i in range(3)]
    normal = [await send(client, client_reference=f"normal{i}") for i in range(3)]
    high = [await send(client, category="authentication") for _ in range(3)]
    one_at_a_time = drain_settings(settings, sandbox, worker_concurrency=1)
    async with running_drain(one_at_a_time, store):
        response = await client.patch(
            f"/v1/phone-numbers/{PN}", json={"status": "active"}, headers=ADMIN
        )
        assert response.status == 200
        for message_id in low:
            await wait_status(client, message_id, "sent")
    sent_at = {m: (await status(client, m))["sent_at"] for m in high + normal + low}
    order = sorted(sent_at, key=lambda m: (sent_at[m], (high + normal + low).index(m)))
    assert order == high + normal + low


async def test_red_quality_holds_marketing_and_lets_the_rest_go(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN, quality_rating="red")
    async with running_drain(drain_settings(settings, sandbox), store):
        marketing = await send(client, category="marketing")
        utility = await send(client)
        await wait_status(client, utility, "sent")
        assert (await status(client, marketing))["status"] == "queued"
        await client.patch(
            f"/v1/phone-numbers/{PN}", json={"quality_rating": "green"}, headers=ADMIN
        )
        await wait_status(client, marketing, "sent")


async def test_a_pending_number_is_held_until_active(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN, status="pending")
    async with running_drain(drain_settings(settings, sandbox), store):
        message_id = await send(client)
        expiring = await send(client, ttl_seconds=1)
        await eventually(
            lambda: _status_is(client, expiring, "expired"), 5.0, "the ttl running out"
        )
        assert (await status(client, message_id))["status"] == "queued"
        await client.patch(f"/v1/phone-numbers/{PN}", json={"status": "active"}, headers=ADMIN)
        await wait_status(client, message_id, "sent")
    assert len(await sandbox.requests(PN)) == 1  # the expired one never left


async def _status_is(client: TestClient[Any, Any], message_id: str, wanted: str) -> bool:
    return (await status(client, message_id))["status"] == wanted


async def test_a_transient_error_is_retried_then_sent(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": 500, "code": 131000}, {"status": 503, "code": 2}]})
    async with running_drain(drain_settings(settings, sandbox), store):
        sent = await wait_status(client, await send(client), "sent")
    assert sent["attempts"] == 3


async def test_transient_errors_fail_after_max_attempts(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(numbers={PN: {"status": 500, "code": 131000}})
    async with running_drain(drain_settings(settings, sandbox, max_attempts=3), store):
        failed = await wait_status(client, await send(client), "failed")
    assert failed["attempts"] == 3
    assert failed["error"]["code"] == 131000
    assert failed["error"]["retryable"] is False


async def test_an_upstream_timeout_is_transient(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": 200, "timeout_ms": 1500}]})
    quick = drain_settings(settings, sandbox, upstream_timeout=0.3)
    async with running_drain(quick, store):
        sent = await wait_status(client, await send(client), "sent")
    assert sent["attempts"] == 2


async def test_a_permanent_error_fails_at_once_with_the_upstream_code(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": 400, "code": 131026}]})
    async with running_drain(drain_settings(settings, sandbox), store):
        failed = await wait_status(client, await send(client), "failed")
    assert failed["attempts"] == 1
    assert failed["error"]["code"] == 131026


async def test_throughput_errors_requeue_without_spending_an_attempt(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": 400, "code": 130429}, {"status": 429}]})
    async with running_drain(drain_settings(settings, sandbox), store):
        sent = await wait_status(client, await send(client), "sent", within_s=15)
    assert sent["attempts"] == 1
    times = sorted(r["time"] for r in await sandbox.requests(PN))
    # paused about 1 s after the first refusal, then about 2 s (doubling) after the second
    assert times[1] - times[0] >= 0.9
    assert times[2] - times[1] >= 1.8


async def test_pair_rate_retries_that_message_later_and_the_rest_go_on(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": 400, "code": 131056}]})
    async with running_drain(drain_settings(settings, sandbox, worker_concurrency=1), store):
        paired = await send(client)
        other = await send(client, to="5491140999999")
        await wait_status(client, other, "sent")
        assert (await status(client, paired))["status"] == "queued"
        assert (await number(client))["retry_waiting"] == 1


async def test_an_upgrade_in_progress_holds_the_number(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": 400, "code": 131057}]})
    async with running_drain(drain_settings(settings, sandbox), store):
        held = await send(client)
        await eventually(lambda: _requests_seen(sandbox, 1), 5.0, "the first attempt")
        later = await send(client)
        # held about 60 s: neither is sent now, and both stay queued
        for message_id in (held, later):
            assert (await status(client, message_id))["status"] in ("queued", "sending")
        await eventually(lambda: _status_is(client, later, "queued"), 2.0, "later queued")
    assert len(await sandbox.requests(PN)) == 1


async def _requests_seen(sandbox: Sandbox, count: int) -> bool:
    return len(await sandbox.requests(PN)) >= count


@pytest.mark.parametrize(("status_code", "code"), [(401, 190), (400, 368)])
async def test_auth_and_blocked_disconnect_the_number_and_hold_the_message(
    client: TestClient[Any, Any],
    settings: Settings,
    store: Store,
    sandbox: Sandbox,
    status_code: int,
    code: int,
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": status_code, "code": code}]})
    async with running_drain(drain_settings(settings, sandbox), store):
        message_id = await send(client)
        await eventually(
            lambda: _number_status_is(client, "disconnected"), 5.0, "the number disconnecting"
        )
        held = await status(client, message_id)
        assert held["status"] == "queued"
        assert held["attempts"] == 0
        await client.patch(f"/v1/phone-numbers/{PN}", json={"status": "active"}, headers=ADMIN)
        await wait_status(client, message_id, "sent")


async def test_a_stored_token_that_cannot_be_a_header_disconnects_its_number_only(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    """A token with a control character (stored before tokens were checked at the API) is
    never written: its number is disconnected as for a refused token, and the worker goes on
    with the other numbers. (aiohttp refused to write the header, and the sender task's error
    stopped the whole gateway.)"""
    await register(client, PN, access_token="EAAG-good")
    await register(client, OTHER)
    cfg = keys.cfg(keys.shard_of(PN, store.shards), PN)
    await store.redis.hset(cfg, "access_token", "EAAG\r\nX-Injected: 1")
    async with running_drain(drain_settings(settings, sandbox), store):
        held_id = await send(client)
        await eventually(
            lambda: _number_status_is(client, "disconnected"), 5.0, "the number disconnecting"
        )
        assert (await status(client, held_id))["status"] == "queued"
        await wait_status(client, await send(client, phone_number_id=OTHER), "sent")
    assert await sandbox.requests(PN) == []


class _BreaksOnPN(CloudApi):
    """A client with a bug that only one number's sends meet."""

    async def send(self, phone_number_id: str, token: str | None, body: TimedBody) -> Answer:
        if phone_number_id == PN:
            raise RuntimeError("a bug in the gateway")
        return await super().send(phone_number_id, token, body)


async def test_an_unexpected_error_in_a_send_is_retried_and_the_worker_goes_on(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    """An error of our own in one send (not an upstream answer) is retried as a transient
    failure until its attempts run out, and every other send goes on: it stopped the sender
    task, and with it the whole process."""
    await register(client, PN)
    await register(client, OTHER)
    errors_before = _send_errors()
    drain = drain_settings(settings, sandbox, max_attempts=3)
    async with running_drain(drain, store, api_class=_BreaksOnPN):
        broken = await send(client)
        await wait_status(client, broken, "failed")
        fine = [await send(client, phone_number_id=OTHER) for _ in range(3)]
        for message_id in fine:
            await wait_status(client, message_id, "sent")
    failed = await status(client, broken)
    assert failed["attempts"] == 3
    assert failed["error"]["code"] == "gateway_send_error"
    assert "RuntimeError" in failed["error"]["message"]
    assert _send_errors() - errors_before == 3
    assert await sandbox.requests(PN) == []


def _send_errors() -> float:
    return REGISTRY.get_sample_value("gateway_send_errors_total") or 0.0


async def _number_status_is(client: TestClient[Any, Any], wanted: str) -> bool:
    return (await number(client))["status"] == wanted


async def test_number_gone_deletes_the_number_and_fails_its_queue(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN, status="pending")
    ids = [await send(client) for _ in range(3)]
    await sandbox.faults(numbers={PN: {"status": 400, "code": 33}})
    async with running_drain(drain_settings(settings, sandbox, worker_concurrency=1), store):
        await client.patch(f"/v1/phone-numbers/{PN}", json={"status": "active"}, headers=ADMIN)
        await eventually(lambda: _number_status_is(client, "deleted"), 5.0, "the deletion")
        for message_id in ids:
            await wait_status(client, message_id, "failed")
    errors = [str((await status(client, m))["error"]["code"]) for m in ids]
    # The first one met the upstream's code 33; the others failed with the number, unless a
    # take had already handed them to the sender (they meet 33 themselves): never sent to a
    # number the gateway had deleted, never left queued.
    assert errors[0] == "33"
    assert set(errors[1:]) <= {"33", "phone_number_deleted"}
    assert len(await sandbox.requests(PN)) == errors.count("33")


async def test_cancel_reaches_a_message_waiting_for_its_retry(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN)
    await sandbox.faults(script={PN: [{"status": 500, "code": 1}]})
    async with running_drain(drain_settings(settings, sandbox, retry_base=30.0), store):
        message_id = await send(client)
        await eventually(lambda: _retry_waiting(client), 5.0, "the retry wait")
        response = await client.delete(f"/v1/messages/{message_id}", headers=SEND)
        assert response.status == 200
        assert (await status(client, message_id))["status"] == "canceled"
    assert (await number(client))["retry_waiting"] == 0


async def _retry_waiting(client: TestClient[Any, Any]) -> bool:
    return bool((await number(client))["retry_waiting"] == 1)


async def test_each_number_drains_at_its_rate(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    rates = {"555000000080": ("standard", 80), "555000000200": ("medium", 200)}
    for pn, (tier, _) in rates.items():
        await register(client, pn, throughput_tier=tier, status="pending")
        batch = [text_message(pn) for _ in range(int(rates[pn][1] * 2.5))]
        response = await client.post("/v1/messages/batch", json={"messages": batch}, headers=SEND)
        assert (await response.json())["accepted"] == len(batch)
    async with running_drain(drain_settings(settings, sandbox), store):
        for pn in rates:
            await client.patch(f"/v1/phone-numbers/{pn}", json={"status": "active"}, headers=ADMIN)
        for pn in rates:
            await eventually(lambda pn=pn: _depth_is_zero(client, pn), 10.0, f"{pn} draining")
    for pn, (_, rate) in rates.items():
        times = await sandbox.arrivals(pn)
        assert len(times) == int(rate * 2.5)
        assert max_in_window(times) <= rate
        assert sustained_rate(times) >= 0.97 * rate


async def test_a_stopping_worker_sends_what_it_has_stamped_rather_than_putting_it_back(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    """Its stamps are a few tens of ms ahead and the successor's come after them: put back,
    they left a gap that long in the number's sends while its shard changed hands."""
    await register(client, PN, throughput_tier="high", status="pending")
    batch = [text_message(PN) for _ in range(1000)]
    response = await client.post("/v1/messages/batch", json={"messages": batch}, headers=SEND)
    ids = [item["id"] for item in (await response.json())["results"]]
    returned_before = _grants_returned()
    async with running_drain(drain_settings(settings, sandbox), store) as drain:
        await client.patch(f"/v1/phone-numbers/{PN}", json={"status": "active"}, headers=ADMIN)

        async def stamped_ahead() -> bool:
            return len(drain.senders.waiting) >= 10

        await eventually(stamped_ahead, 10.0, "sends waiting for their stamps", every_s=0.001)
    shard = keys.shard_of(PN, store.shards)
    fields = [await store.redis.hmget(keys.msg(shard, m), "s", "f") for m in ids]
    sent = [m for m, (state, _) in zip(ids, fields, strict=True) if state == b"sent"]
    # taken (fenced) and back in the queue: put back, by the stop or, before it, as a send
    # that could not start in time (a busy machine: counted, and not what this is about)
    put_back = [
        m for m, (state, fence) in zip(ids, fields, strict=True) if state == b"queued" and fence
    ]
    late = _grants_returned() - returned_before
    assert sent
    assert len(put_back) <= late, f"{len(put_back) - late:.0f} messages put back at the stop"
    assert len(await sandbox.arrivals(PN)) == len(sent)


def _grants_returned() -> float:
    """Sends given back by this process as too late to start (all tiers and stages)."""
    metrics.flush_local()
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "gateway_grants_returned"
        for sample in family.samples
        if sample.name == "gateway_grants_returned_total"
    )


async def _depth_is_zero(client: TestClient[Any, Any], pn: str) -> bool:
    body = await number(client, pn)
    return sum(body["queue_depth"].values()) == 0 and body["inflight"] == 0


async def test_the_upstream_cap_bounds_unlimited_numbers(
    client: TestClient[Any, Any], settings: Settings, store: Store, sandbox: Sandbox
) -> None:
    await register(client, PN, throughput_tier="unlimited", status="pending")
    batch = [text_message(PN) for _ in range(60)]
    await client.post("/v1/messages/batch", json={"messages": batch}, headers=SEND)
    capped = drain_settings(settings, sandbox, upstream_max_mps=20.0)
    async with running_drain(capped, store):
        await client.patch(f"/v1/phone-numbers/{PN}", json={"status": "active"}, headers=ADMIN)
        await eventually(lambda: _depth_is_zero(client, PN), 15.0, "the capped drain")
    times = await sandbox.arrivals(PN)
    assert len(times) == 60
    # a sliding window, not a bucket: 20 in any second, so the last 20 a second after the first
    assert max_in_window(times) <= 20
    assert times[-1] - times[0] >= 2.0


async def test_a_timed_body_reaches_the_upstream_at_its_time_and_not_before() -> None:
    """A sender gets its message ahead of the stamp; the request leaves at the stamp."""
    pn = "555000000042"
    body = orjson.dumps(
        {
            "messaging_product": "whatsapp",
            "to": "5491140123456",
            "type": "text",
            "text": {"body": "on time"},
        }
    )
    async with running_sandbox() as sandbox:
        api = CloudApi(sandbox.url, DEFAULT_TOKEN, timeout_s=5.0, pool_size=2)
        await api.start()
        try:
            not_before = time.monotonic() + 0.05
            timed = TimedBody(body, not_before=not_before)
            answer = await api.send(pn, None, timed)
            late = TimedBody(body, deadline=time.monotonic() - 0.001)
            refused = await api.send(pn, None, late)
        finally:
            await api.close()
        arrivals = await sandbox.arrivals(pn)
    assert answer.outcome is Outcome.OK
    assert timed.written_at is not None and timed.written_at >= not_before
    assert len(arrivals) == 1 and arrivals[0] >= not_before
    assert refused.outcome is Outcome.LATE and late.written_at is None
