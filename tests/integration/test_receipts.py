"""GET|POST /v1/webhooks/meta: Meta's delivery receipts and inbound messages, on a real Redis.

Messages are taken and settled with the drain's own scripts (as a worker does), so they are
`sent` with a known wamid; then webhooks in Meta's shapes move them on, and `GET
/v1/messages/{id}` shows what a user would check. A message's callback URL is set on its record
as accept sets it, so the outbox events the status changes write can be read back.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from gateway import keys
from gateway.api.app import create_app
from gateway.drain.take import parse_take, take_args
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import SEND, make_settings, register, text_message
from tests.servers import RedisServer

PN = "555123456789"
OTHER_PN = "555000111223"
USER = "5491140123456"
APP_SECRET = "test-meta-app-secret"
VERIFY_TOKEN = "test-meta-verify-token"
CALLBACK = "http://127.0.0.1:9/status"
UNDELIVERABLE = {
    "code": 131026,
    "title": "Message undeliverable",
    "message": "Message undeliverable",
    "error_data": {"details": "Message Undeliverable."},
    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
}
Client = TestClient[Any, Any]


def meta_settings(redis_url: str, data_dir: Path, **changes: Any) -> Settings:
    return make_settings(
        redis_url, data_dir, meta_app_secret=APP_SECRET, meta_verify_token=VERIFY_TOKEN, **changes
    )


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return meta_settings(redis_url, tmp_path / "data")


async def serve(settings: Settings, store: Store) -> Client:
    return TestClient(TestServer(create_app(settings, store)))


# Meta's shapes --------------------------------------------------------------------------------


def status(
    wamid: str, value: str, seconds: int, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": wamid,
        "status": value,
        "timestamp": str(seconds),
        "recipient_id": USER,
    }
    if value in ("sent", "delivered"):
        item["conversation"] = {"id": "c1", "origin": {"type": "utility"}}
        item["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "utility"}
    if errors is not None:
        item["errors"] = errors
    return item


def inbound(user: str, seconds: int) -> dict[str, Any]:
    return {
        "from": user,
        "id": f"wamid.in{seconds}",
        "timestamp": str(seconds),
        "type": "text",
        "text": {"body": "hi"},
    }


def change(
    statuses: list[dict[str, Any]] | None = None,
    messages: list[dict[str, Any]] | None = None,
    pn: str = PN,
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": pn},
    }
    if statuses is not None:
        value["statuses"] = statuses
    if messages is not None:
        value["contacts"] = [{"profile": {"name": "Sheena"}, "wa_id": USER}]
        value["messages"] = messages
    return {"value": value, "field": "messages"}


def envelope(*changes: dict[str, Any], entries: int = 1) -> dict[str, Any]:
    """Meta's body: `changes` spread over `entries` entries."""
    per = -(-len(changes) // entries) if changes else 0
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {"id": "102290129340398", "changes": list(changes[i * per : (i + 1) * per])}
            for i in range(entries)
        ],
    }


def sign(raw: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


async def post_meta(client: Client, body: Any, secret: str = APP_SECRET) -> tuple[int, Any]:
    raw = orjson.dumps(body)
    headers = {"X-Hub-Signature-256": sign(raw, secret), "Content-Type": "application/json"}
    response = await client.post("/v1/webhooks/meta", data=raw, headers=headers)
    return response.status, await response.json()


# Messages sent with a wamid -------------------------------------------------------------------


async def accepted(client: Client, pn: str = PN, **fields: Any) -> str:
    response = await client.post("/v1/messages", json=text_message(pn, **fields), headers=SEND)
    assert response.status == 202, await response.text()
    message_id: str = (await response.json())["id"]
    return message_id


async def take_one(store: Store, pn: str = PN) -> tuple[str, str]:
    shard = keys.shard_of(pn, store.shards)
    args = take_args(
        1000.0,
        budget=10,
        lease_ms=30_000,
        headroom=0.0,
        retention_s=3600,
        start_us=0,
        spacing_us=100,
    )
    taken = parse_take([shard], await store.script("take", shard, args))
    assert len(taken.items) == 1, taken
    return taken.items[0].id, taken.items[0].fence


async def settle_sent(store: Store, message_id: str, fence: str, wamid: str, pn: str = PN) -> None:
    shard = keys.shard_of(pn, store.shards)
    codes = await store.script("settle", shard, [3600, 1, 1, "S", message_id, fence, wamid, ""])
    assert [int(c) for c in codes] == [1]


async def sent_message(client: Client, store: Store, wamid: str, pn: str = PN) -> str:
    """A message `sent` as `wamid`, whose status changes write callback events."""
    await register(client, pn, throughput_tier="unlimited")
    message_id = await accepted(client, pn)
    await store.redis.hset(keys.msg(keys.shard_of(pn, store.shards), message_id), "cb", CALLBACK)
    taken_id, fence = await take_one(store, pn)
    assert taken_id == message_id
    await settle_sent(store, message_id, fence, wamid, pn)
    return message_id


async def view(client: Client, message_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/messages/{message_id}", headers=SEND)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def events(store: Store, message_id: str, pn: str = PN) -> list[str]:
    """The statuses of the callback events written for a message, in order."""
    shard = keys.shard_of(pn, store.shards)
    count = int(await store.redis.hget(keys.msg(shard, message_id), "ev") or 0)
    found = []
    for n in range(1, count + 1):
        value = await store.redis.hget(keys.cbevent(shard, f"{message_id}.{n}"), "s")
        assert isinstance(value, bytes)
        found.append(value.decode())
    return found


def rfc3339(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(seconds))


def metric(name: str, **labels: str) -> float:
    from gateway import metrics

    metrics.flush_local()
    return REGISTRY.get_sample_value(name, labels) or 0.0


# The subscription check -----------------------------------------------------------------------


async def test_verification_answers_the_challenge(client: Client) -> None:
    query = {
        "hub.mode": "subscribe",
        "hub.verify_token": VERIFY_TOKEN,
        "hub.challenge": "1158201444",
    }
    response = await client.get("/v1/webhooks/meta", params=query)
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "1158201444"


@pytest.mark.parametrize(
    "query",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {},
    ],
)
async def test_verification_refuses_a_wrong_or_missing_token(
    client: Client, query: dict[str, str]
) -> None:
    response = await client.get("/v1/webhooks/meta", params=query)
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "forbidden"
    assert "1158201444" not in await response.text()


async def test_verification_without_a_challenge_is_a_400(client: Client) -> None:
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN}
    response = await client.get("/v1/webhooks/meta", params=query)
    assert response.status == 400


async def test_verification_is_refused_when_no_token_is_configured(
    redis_url: str, tmp_path: Path, store: Store
) -> None:
    settings = make_settings(redis_url, tmp_path / "data", meta_app_secret=APP_SECRET)
    async with await serve(settings, store) as client:
        query = {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"}
        assert (await client.get("/v1/webhooks/meta", params=query)).status == 403
        query["hub.verify_token"] = "None"
        assert (await client.get("/v1/webhooks/meta", params=query)).status == 403


# Signatures ------------------------------------------------------------------------------------


async def test_a_missing_or_wrong_signature_is_a_401(client: Client, store: Store) -> None:
    message_id = await sent_message(client, store, "wamid.SIG")
    body = orjson.dumps(envelope(change([status("wamid.SIG", "delivered", 1_750_000_000)])))
    before = metric("gateway_webhook_bad_signature_total")
    cases = [
        {},
        {"X-Hub-Signature-256": sign(body, "another-secret")},
        {"X-Hub-Signature-256": sign(body + b" ")},
        {"X-Hub-Signature-256": sign(body).removeprefix("sha256=")},
        {"X-Hub-Signature-256": "sha1=" + hashlib.sha1(body).hexdigest()},
    ]
    for headers in cases:
        response = await client.post(
            "/v1/webhooks/meta", data=body, headers={**headers, "Content-Type": "application/json"}
        )
        assert response.status == 401, headers
        assert (await response.json())["error"]["code"] == "unauthorized"
    assert metric("gateway_webhook_bad_signature_total") == before + len(cases)
    assert (await view(client, message_id))["status"] == "sent"
    # no API key is needed: the signature is the authentication
    good = {"X-Hub-Signature-256": sign(body), "Content-Type": "application/json"}
    assert (await client.post("/v1/webhooks/meta", data=body, headers=good)).status == 200
    assert (await view(client, message_id))["status"] == "delivered"


async def test_no_app_secret_configured_refuses_every_post(
    redis_url: str, tmp_path: Path, store: Store
) -> None:
    settings = make_settings(redis_url, tmp_path / "data")
    async with await serve(settings, store) as client:
        status_code, body = await post_meta(client, envelope())
        assert status_code == 401, body


# Transitions and precedence --------------------------------------------------------------------


async def test_delivered_then_read(client: Client, store: Store) -> None:
    message_id = await sent_message(client, store, "wamid.A")
    code, body = await post_meta(
        client, envelope(change([status("wamid.A", "delivered", 1_750_000_010)]))
    )
    assert (code, body["applied"]) == (200, 1)
    shown = await view(client, message_id)
    assert shown["status"] == "delivered"
    assert shown["delivered_at"] == rfc3339(1_750_000_010)
    assert "read_at" not in shown and "failed_at" not in shown
    assert shown["error"] is None
    await post_meta(client, envelope(change([status("wamid.A", "read", 1_750_000_020)])))
    shown = await view(client, message_id)
    assert shown["status"] == "read"
    assert (shown["delivered_at"], shown["read_at"]) == (
        rfc3339(1_750_000_010),
        rfc3339(1_750_000_020),
    )
    assert shown["upstream_message_id"] == "wamid.A"
    assert await events(store, message_id) == ["sent", "delivered", "read"]
    shard = keys.shard_of(PN, store.shards)
    delivered = await store.redis.hgetall(keys.cbevent(shard, f"{message_id}.2"))
    assert delivered[b"m"] == message_id.encode()
    assert delivered[b"w"] == b"wamid.A"
    assert delivered[b"u"] == CALLBACK.encode()


async def test_read_then_delivered_stays_read(client: Client, store: Store) -> None:
    message_id = await sent_message(client, store, "wamid.B")
    await post_meta(client, envelope(change([status("wamid.B", "read", 1_750_000_020)])))
    code, body = await post_meta(
        client, envelope(change([status("wamid.B", "delivered", 1_750_000_010)]))
    )
    assert (code, body["applied"], body["recorded"]) == (200, 0, 1)
    shown = await view(client, message_id)
    assert shown["status"] == "read"
    assert shown["delivered_at"] == rfc3339(1_750_000_010)
    assert shown["read_at"] == rfc3339(1_750_000_020)
    assert await events(store, message_id) == ["sent", "read"]


async def test_repeats_change_nothing(client: Client, store: Store) -> None:
    message_id = await sent_message(client, store, "wamid.C")
    delivered = status("wamid.C", "delivered", 1_750_000_010)
    await post_meta(client, envelope(change([delivered])))
    again = dict(delivered, timestamp="1750000099")
    code, body = await post_meta(client, envelope(change([delivered, again, delivered])))
    assert (code, body["applied"], body["unchanged"]) == (200, 0, 3)
    shown = await view(client, message_id)
    assert shown["delivered_at"] == rfc3339(1_750_000_010)  # set once
    assert await events(store, message_id) == ["sent", "delivered"]
    # Meta's own `sent` is below what the message has: nothing
    _, body = await post_meta(client, envelope(change([status("wamid.C", "sent", 1_750_000_005)])))
    assert body["unchanged"] == 1


async def test_failed_then_delivered_moves_up(client: Client, store: Store) -> None:
    message_id = await sent_message(client, store, "wamid.D")
    await post_meta(
        client, envelope(change([status("wamid.D", "failed", 1_750_000_010, [UNDELIVERABLE])]))
    )
    shown = await view(client, message_id)
    assert shown["status"] == "failed"
    assert shown["failed_at"] == rfc3339(1_750_000_010)
    assert shown["error"]["code"] == 131026
    assert shown["error"]["retryable"] is False
    assert "Message Undeliverable." in shown["error"]["message"]
    await post_meta(client, envelope(change([status("wamid.D", "delivered", 1_750_000_020)])))
    shown = await view(client, message_id)
    assert shown["status"] == "delivered"
    assert shown["delivered_at"] == rfc3339(1_750_000_020)
    assert shown["failed_at"] == rfc3339(1_750_000_010)
    assert await events(store, message_id) == ["sent", "failed", "delivered"]
    shard = keys.shard_of(PN, store.shards)
    failed_event = await store.redis.hget(keys.cbevent(shard, f"{message_id}.2"), "e")
    assert isinstance(failed_event, bytes)
    assert orjson.loads(failed_event)["code"] == 131026


async def test_failed_after_delivered_is_kept_in_error(client: Client, store: Store) -> None:
    message_id = await sent_message(client, store, "wamid.E")
    await post_meta(client, envelope(change([status("wamid.E", "delivered", 1_750_000_010)])))
    code, body = await post_meta(
        client, envelope(change([status("wamid.E", "failed", 1_750_000_020, [UNDELIVERABLE])]))
    )
    assert (code, body["applied"], body["recorded"]) == (200, 0, 1)
    shown = await view(client, message_id)
    assert shown["status"] == "delivered"
    assert shown["error"]["code"] == 131026
    assert shown["failed_at"] == rfc3339(1_750_000_020)
    assert await events(store, message_id) == ["sent", "delivered"]  # no event for it


async def test_played_tops_the_order(client: Client, store: Store) -> None:
    message_id = await sent_message(client, store, "wamid.F")
    # a voice message: read and played, `delivered` skipped, out of order
    await post_meta(
        client,
        envelope(
            change(
                [
                    status("wamid.F", "played", 1_750_000_030),
                    status("wamid.F", "read", 1_750_000_020),
                ]
            )
        ),
    )
    shown = await view(client, message_id)
    assert shown["status"] == "played"
    assert shown["played_at"] == rfc3339(1_750_000_030)
    assert shown["read_at"] == rfc3339(1_750_000_020)
    assert "delivered_at" not in shown
    assert await events(store, message_id) == ["sent", "played"]


async def test_many_entries_changes_and_statuses_in_one_request(
    client: Client, store: Store
) -> None:
    first = await sent_message(client, store, "wamid.M1")
    second = await sent_message(client, store, "wamid.M2")
    other = await sent_message(client, store, "wamid.O1", OTHER_PN)
    assert keys.shard_of(PN, store.shards) != keys.shard_of(OTHER_PN, store.shards)
    before = metric("gateway_webhook_ignored_total", field="account_update")
    body = envelope(
        change([status("wamid.M1", "delivered", 1_750_000_010)]),
        change(
            [
                status("wamid.M2", "delivered", 1_750_000_011),
                status("wamid.M1", "read", 1_750_000_012),
            ]
        ),
        {"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}},
        change(
            [status("wamid.O1", "read", 1_750_000_013)], [inbound(USER, int(time.time()))], OTHER_PN
        ),
        entries=2,
    )
    assert len(body["entry"]) == 2
    code, result = await post_meta(client, body)
    assert code == 200
    assert result == {"applied": 4, "recorded": 0, "unchanged": 0, "held": 0, "inbound": 1}
    assert (await view(client, first))["status"] == "read"
    assert (await view(client, second))["status"] == "delivered"
    assert (await view(client, other))["status"] == "read"
    assert metric("gateway_webhook_ignored_total", field="account_update") == before + 1


async def test_a_status_before_its_wamid_is_held_then_applied(client: Client, store: Store) -> None:
    await register(client, PN, throughput_tier="unlimited")
    message_id = await accepted(client)
    taken_id, fence = await take_one(store)
    # Meta's webhooks overtake the send's own answer
    before = metric("gateway_receipts_held_total")
    code, body = await post_meta(
        client,
        envelope(
            change(
                [
                    status("wamid.EARLY", "read", 1_750_000_020),
                    status("wamid.EARLY", "delivered", 1_750_000_010),
                ]
            )
        ),
    )
    assert (code, body["held"]) == (200, 2)
    assert metric("gateway_receipts_held_total") == before + 2
    assert (await view(client, message_id))["status"] == "sending"
    await settle_sent(store, taken_id, fence, "wamid.EARLY")
    shown = await view(client, message_id)
    assert shown["status"] == "read"
    assert shown["delivered_at"] == rfc3339(1_750_000_010)
    assert shown["read_at"] == rfc3339(1_750_000_020)
    shard = keys.shard_of(PN, store.shards)
    assert not await store.redis.exists(keys.held(shard, "wamid.EARLY"))
    assert await store.redis.get(keys.wamid(shard, "wamid.EARLY")) == message_id.encode()


async def test_a_wamid_that_never_comes_is_held_for_a_while(
    redis_url: str, tmp_path: Path, store: Store
) -> None:
    settings = meta_settings(redis_url, tmp_path / "data", receipt_hold=30.0)
    async with await serve(settings, store) as client:
        before = metric("gateway_receipts_held_total")
        code, body = await post_meta(
            client, envelope(change([status("wamid.NEVER", "delivered", 1_750_000_010)]))
        )
        assert (code, body["held"], body["applied"]) == (200, 1, 0)
        assert metric("gateway_receipts_held_total") == before + 1
        held = keys.held(keys.shard_of(PN, store.shards), "wamid.NEVER")
        assert 0 < await store.redis.ttl(held) <= 30


# Malformed bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"object": "page", "entry": []}, "object"),
        ({"object": "whatsapp_business_account"}, "entry"),
        ({"object": "whatsapp_business_account", "entry": [{"id": "1"}]}, "entry[0].changes"),
        (envelope({"value": {}}), "entry[0].changes[0].field"),
        (envelope({"field": "messages", "value": []}), "entry[0].changes[0].value"),
        (
            envelope({"field": "messages", "value": {"statuses": [status("w", "read", 1)]}}),
            "entry[0].changes[0].value.metadata.phone_number_id",
        ),
        (
            envelope(change([status("w", "read", 1)], pn="+1 555 0100")),
            "entry[0].changes[0].value.metadata.phone_number_id",
        ),
        (
            envelope({"field": "messages", "value": {"statuses": {}}}),
            "entry[0].changes[0].value.statuses",
        ),
        (
            envelope(change(["wamid"])),  # type: ignore[list-item]
            "entry[0].changes[0].value.statuses[0]",
        ),
        (
            envelope(change([{"status": "read", "timestamp": "1"}])),
            "entry[0].changes[0].value.statuses[0].id",
        ),
        (
            envelope(change([dict(status("w", "read", 1), timestamp="soon")])),
            "entry[0].changes[0].value.statuses[0].timestamp",
        ),
        (
            envelope(change([dict(status("w", "read", 1), timestamp=-5)])),
            "entry[0].changes[0].value.statuses[0].timestamp",
        ),
        (
            envelope(change([dict(status("w", "read", 1), status=7)])),
            "entry[0].changes[0].value.statuses[0].status",
        ),
        (
            envelope(change([status("w", "failed", 1, [{"title": "x"}])])),
            "entry[0].changes[0].value.statuses[0].errors[0].code",
        ),
        (
            envelope(change([status("w", "failed", 1, [{"code": 1, "error_data": "x"}])])),
            "entry[0].changes[0].value.statuses[0].errors[0].error_data",
        ),
        (
            envelope(change([dict(status("w", "failed", 1), errors="bad")])),
            "entry[0].changes[0].value.statuses[0].errors",
        ),
        (
            envelope(change(None, [{"from": "", "timestamp": "1"}])),
            "entry[0].changes[0].value.messages[0].from",
        ),
        (
            envelope(change(None, [{"from": USER}])),
            "entry[0].changes[0].value.messages[0].timestamp",
        ),
    ],
)
async def test_a_malformed_body_is_a_400_naming_the_fault(
    client: Client, body: Any, field: str
) -> None:
    code, answer = await post_meta(client, body)
    assert code == 400, answer
    assert answer["error"]["code"] == "invalid_request"
    assert field in [detail["field"] for detail in answer["error"]["details"]]


async def test_not_json_is_a_400_and_other_fields_are_ignored(client: Client) -> None:
    raw = b"{not json"
    headers = {"X-Hub-Signature-256": sign(raw), "Content-Type": "application/json"}
    response = await client.post("/v1/webhooks/meta", data=raw, headers=headers)
    assert response.status == 400
    code, body = await post_meta(
        client,
        envelope(
            {"field": "message_template_status_update", "value": {"event": "APPROVED"}},
            change([status("wamid.X", "deleted", 1_750_000_000)]),  # a status value Meta may add
        ),
    )
    assert (code, body["applied"], body["held"]) == (200, 0, 0)


# Inbound messages and the service window ------------------------------------------------------


async def window_client(redis_url: str, tmp_path: Path, store: Store, enforce: bool) -> Client:
    settings = meta_settings(redis_url, tmp_path / "data", enforce_service_window=enforce)
    return await serve(settings, store)


TEMPLATE = {"type": "template", "template": {"name": "hello_world", "language": {"code": "en"}}}


async def test_the_service_window_refuses_users_who_have_not_written(
    redis_url: str, tmp_path: Path, store: Store
) -> None:
    async with await window_client(redis_url, tmp_path, store, True) as client:
        await register(client)
        response = await client.post("/v1/messages", json=text_message(), headers=SEND)
        assert response.status == 422
        assert (await response.json())["error"]["code"] == "outside_service_window"
        template = {k: v for k, v in text_message().items() if k not in ("text", "type")}
        response = await client.post("/v1/messages", json=template | TEMPLATE, headers=SEND)
        assert response.status == 202
        # an inbound message older than 24 h opens nothing
        stale = int(time.time()) - 86_400 - 60
        code, body = await post_meta(client, envelope(change(None, [inbound(USER, stale)])))
        assert (code, body["inbound"]) == (200, 1)
        response = await client.post("/v1/messages", json=text_message(), headers=SEND)
        assert response.status == 422
        before = metric("gateway_inbound_messages_total")
        await post_meta(client, envelope(change(None, [inbound(USER, int(time.time()) - 60)])))
        assert metric("gateway_inbound_messages_total") == before + 1
        for to in (USER, "+" + USER):
            response = await client.post("/v1/messages", json=text_message(to=to), headers=SEND)
            assert response.status == 202, await response.text()
        # the window is per number: the same user has not written to another one
        await register(client, OTHER_PN)
        response = await client.post("/v1/messages", json=text_message(OTHER_PN), headers=SEND)
        assert response.status == 422
        shard = keys.shard_of(PN, store.shards)
        ttl = await store.redis.pttl(keys.inbound(shard, PN, USER))
        assert 86_400_000 - 120_000 < ttl <= 86_400_000 - 60_000 + 1_000


async def test_the_service_window_in_a_batch_is_per_message(
    redis_url: str, tmp_path: Path, store: Store
) -> None:
    async with await window_client(redis_url, tmp_path, store, True) as client:
        await register(client)
        await post_meta(
            client, envelope(change(None, [inbound("5491100000001", int(time.time()))]))
        )
        template = {k: v for k, v in text_message().items() if k not in ("text", "type")}
        batch = [
            text_message(to="5491100000001"),
            text_message(to="5491100000002", idempotency_key="k2"),
            template | TEMPLATE,
            text_message(to="5491100000002"),
        ]
        response = await client.post("/v1/messages/batch", json={"messages": batch}, headers=SEND)
        body = await response.json()
        assert (body["accepted"], body["rejected"]) == (2, 2)
        results = body["results"]
        assert results[0]["status"] == "queued"
        assert results[1]["error"]["code"] == "outside_service_window"
        assert results[2]["status"] == "queued"
        assert results[3]["error"]["code"] == "outside_service_window"
        # the refused message did not bind its idempotency key: fixed, it is accepted
        await post_meta(
            client, envelope(change(None, [inbound("5491100000002", int(time.time()))]))
        )
        batch = [text_message(to="5491100000002", idempotency_key="k2")]
        response = await client.post("/v1/messages/batch", json={"messages": batch}, headers=SEND)
        assert (await response.json())["accepted"] == 1


async def test_without_enforcement_every_send_is_accepted(
    redis_url: str, tmp_path: Path, store: Store
) -> None:
    async with await window_client(redis_url, tmp_path, store, False) as client:
        await register(client)
        response = await client.post("/v1/messages", json=text_message(), headers=SEND)
        assert response.status == 202
        batch = {"messages": [text_message(to="5491100000009")]}
        response = await client.post("/v1/messages/batch", json=batch, headers=SEND)
        assert (await response.json())["accepted"] == 1


# Redis down -----------------------------------------------------------------------------------


@pytest.fixture
async def down_client(private_redis: RedisServer, tmp_path: Path) -> AsyncIterator[Client]:
    settings = meta_settings(private_redis.url, tmp_path / "data")
    store = Store.from_settings(settings, private_redis.url)
    async with await serve(settings, store) as client:
        yield client
    await store.close()


async def test_503_while_redis_is_down(down_client: Client, private_redis: RedisServer) -> None:
    body = envelope(change([status("wamid.Z", "delivered", 1_750_000_000)]))
    private_redis.stop()
    code, answer = await post_meta(down_client, body)
    assert code == 503
    assert answer["error"]["code"] == "unavailable"
    private_redis.start()
    code, answer = await post_meta(down_client, body)
    assert (code, answer["held"]) == (200, 1)
