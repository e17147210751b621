"""Status callbacks out: accepted URLs, signed events a Standard Webhooks receiver verifies,
retries, order per message, isolation between receivers, and the outbox surviving Redis."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook

from gateway import credentials, ids, keys, metrics
from gateway.api.app import create_app
from gateway.callbacks import signing
from gateway.callbacks.urls import CallbackPolicy
from gateway.errors import ConfigError
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import ADMIN, SEND, make_settings, register, text_message
from tests.integration.drain_support import (
    Sandbox,
    drain_settings,
    eventually,
    running_drain,
    running_sandbox,
)
from tests.servers import RedisServer, serving

PN = "555123456789"
SECRET = signing.generate_secret()


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # unix time it arrived
    answer: int = 200

    def verified(self) -> dict[str, Any]:
        """The event, checked as a receiver checks it (raises when the signature is wrong)."""
        event: dict[str, Any] = Webhook(SECRET).verify(self.body, self.headers)
        return event


@dataclass
class Receiver:
    """A callback receiver on a free port: answers 200 unless told otherwise per path."""

    answers: dict[str, deque[int]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    hits: list[Hit] = field(default_factory=list)
    active: int = 0
    most_active: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    base: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        hit = Hit(request.path, dict(request.headers), body, time.time())
        self.hits.append(hit)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if request.path in self.hang:
                await self.release.wait()
            queue = self.answers.get(request.path)
            hit.answer = queue.popleft() if queue else 200
            return web.Response(status=hit.answer)
        finally:
            self.active -= 1

    def url(self, path: str) -> str:
        return self.base + path

    def at(self, path: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.path == path]


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    async with serving(app) as base:
        receiver.base = base
        try:
            yield receiver
        finally:
            receiver.release.set()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as r:
        yield r


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with running_sandbox() as box:
        yield box


@asynccontextmanager
async def gateway(
    redis_url: str, data: Path, sandbox: Sandbox, allow: tuple[str, ...], **changes: Any
) -> AsyncIterator[TestClient[Any, Any]]:
    """The API and a drain (with its callback sender) on `redis_url`."""
    base = make_settings(
        redis_url,
        data,
        callback_allow=allow,
        callback_secret=SECRET,
        callback_retry_base=0.2,
        callback_timeout=5.0,
    )
    settings = drain_settings(base, sandbox, **changes)
    store = Store.from_settings(settings, redis_url)
    try:
        async with (
            TestClient(TestServer(create_app(settings, store))) as client,
            running_drain(settings, store),
        ):
            yield client
    finally:
        await store.close()


async def send(client: TestClient[Any, Any], **fields: Any) -> str:
    response = await client.post("/v1/messages", json=text_message(PN, **fields), headers=SEND)
    assert response.status == 202, await response.text()
    return str((await response.json())["id"])


async def arrived(receiver: Receiver, path: str, count: int, within_s: float = 10.0) -> None:
    async def enough() -> bool:
        return len(receiver.at(path)) >= count

    await eventually(enough, within_s, f"{count} callback(s) at {path}")


# -- accept: which callback URLs a message may carry --------------------------------------------

ALLOW = ("https://hooks.example.com/wa/", "http://127.0.0.1:9/cb")


@pytest.fixture
async def api(settings: Settings, store: Store) -> AsyncIterator[TestClient[Any, Any]]:
    changed = make_settings(
        settings.redis_url or "", settings.data_dir, callback_allow=ALLOW, callback_secret=SECRET
    )
    async with TestClient(TestServer(create_app(changed, store))) as client:
        await register(client, PN)
        yield client


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/wa/",
        "https://hooks.example.com/wa/status?tenant=7",
        "HTTPS://Hooks.Example.COM:443/wa/x",
        "http://127.0.0.1:9/cb/one",
    ],
)
async def test_a_callback_url_under_an_allowed_prefix_is_accepted(
    api: TestClient[Any, Any], url: str
) -> None:
    response = await api.post("/v1/messages", json=text_message(PN, callback_url=url), headers=SEND)
    assert response.status == 202, await response.text()


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/other/",  # outside the prefix's path
        "https://hooks.example.com:8443/wa/",  # another port
        "http://hooks.example.com/wa/",  # another scheme (so another port)
        "https://hooks.example.com.evil.test/wa/",
        "https://hooks.example.com@evil.test/wa/",  # user info
        "https://user:pw@hooks.example.com/wa/",
        "https://hooks.example.com/wa/../admin",
        "https://hooks.example.com/wa/%2e%2e/admin",
        "ftp://hooks.example.com/wa/",
        "/wa/relative",
        "https://hooks.example.com/wa/#frag",
        "https://hooks.example.com/wa/ x",
        "https://hooks.example.com/wa/" + "a" * 2048,
        "http://127.0.0.1:99999/cb",
        "",
        42,
    ],
)
async def test_any_other_callback_url_is_400_naming_it(api: TestClient[Any, Any], url: Any) -> None:
    response = await api.post("/v1/messages", json=text_message(PN, callback_url=url), headers=SEND)
    assert response.status == 400
    body = await response.json()
    assert body["error"]["code"] == "invalid_request"
    assert [d["field"] for d in body["error"]["details"]] == ["callback_url"]


async def test_a_batch_refuses_only_the_message_with_a_bad_callback_url(
    api: TestClient[Any, Any],
) -> None:
    good = text_message(PN, callback_url="https://hooks.example.com/wa/1")
    bad = text_message(PN, callback_url="https://evil.test/wa/1")
    response = await api.post("/v1/messages/batch", json={"messages": [good, bad]}, headers=SEND)
    assert response.status == 200
    body = await response.json()
    assert (body["accepted"], body["rejected"]) == (1, 1)
    error = body["results"][1]["error"]
    assert error["code"] == "invalid_request"
    assert error["details"][0]["field"].endswith("callback_url")


async def test_without_an_allow_list_no_callback_url_is_accepted(
    client: TestClient[Any, Any],
) -> None:
    await register(client, PN)
    message = text_message(PN, callback_url="https://hooks.example.com/wa/")
    response = await client.post("/v1/messages", json=message, headers=SEND)
    assert response.status == 400


@pytest.mark.parametrize(
    ("allow", "default"),
    [
        (("ftp://hooks.example.com/",), None),
        (("hooks.example.com/wa",), None),
        (("https://u:p@hooks.example.com/",), None),
        (("https://hooks.example.com/?a=1",), None),
        ((), "https://u@hooks.example.com/"),
        ((), "not a url"),
    ],
)
def test_a_bad_allow_list_or_default_url_stops_the_start(
    allow: tuple[str, ...], default: str | None
) -> None:
    with pytest.raises(ConfigError):
        CallbackPolicy(allow, default)


def test_a_malformed_callback_secret_stops_the_start() -> None:
    for bad in ("whsec_", "whsec_not*base64", "whsec_" + "QUJD"):
        with pytest.raises(ConfigError):
            signing.secret_key(bad)


def test_secrets_missing_from_an_older_credentials_file_are_added(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    old = {"send_key": "gws_a", "admin_key": "gwa_b", "webhook_secret": "gwh_c"}
    (data / credentials.FILE_NAME).write_text(json.dumps(old))
    printed = io.StringIO()
    ensured = credentials.ensure(Settings(data_dir=data), out=printed)
    stored = json.loads((data / credentials.FILE_NAME).read_text())
    assert {k: stored[k] for k in old} == old
    assert ensured.api_keys == ("gws_a",) and ensured.webhook_secret == "gwh_c"
    assert ensured.callback_secret == stored["callback_secret"]
    assert ensured.meta_app_secret == stored["meta_app_secret"]
    assert stored["callback_secret"].startswith("whsec_")
    Webhook(stored["callback_secret"])  # a receiver's library takes it as it is
    assert (data / credentials.FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert stored["callback_secret"] not in printed.getvalue()
    assert stored["meta_app_secret"] not in printed.getvalue()
    again = credentials.ensure(Settings(data_dir=data), out=io.StringIO())
    assert again.callback_secret == ensured.callback_secret  # stored once, then read


def test_a_worker_gets_the_secrets_but_no_keys(tmp_path: Path) -> None:
    ensured = credentials.ensure(Settings(data_dir=tmp_path), out=io.StringIO(), api=False)
    assert ensured.callback_secret and ensured.meta_app_secret
    assert not ensured.api_keys and not ensured.webhook_secret
    printed = io.StringIO()
    later = credentials.ensure(Settings(data_dir=tmp_path), out=printed)
    assert later.callback_secret == ensured.callback_secret
    assert later.api_keys[0] in printed.getvalue()  # the keys are printed when first made


# -- the events ----------------------------------------------------------------------------------


async def test_a_sent_message_calls_back_a_signed_event(
    redis_url: str, tmp_path: Path, sandbox: Sandbox, receiver: Receiver
) -> None:
    async with gateway(redis_url, tmp_path, sandbox, (receiver.url("/hooks/"),)) as client:
        await register(client, PN)
        message_id = await send(
            client, callback_url=receiver.url("/hooks/a"), client_reference="ref-1"
        )
        await arrived(receiver, "/hooks/a", 1)
        status = await (await client.get(f"/v1/messages/{message_id}", headers=SEND)).json()
    [hit] = receiver.at("/hooks/a")
    event = hit.verified()
    assert event == {
        "type": "message.status",
        "message_id": message_id,
        "status": "sent",
        "timestamp": status["updated_at"],
        "phone_number_id": PN,
        "to": "5491140123456",
        "client_reference": "ref-1",
        "upstream_message_id": status["upstream_message_id"],
        "error": None,
    }
    assert hit.headers["webhook-id"].startswith(message_id)
    assert abs(int(hit.headers["webhook-timestamp"]) - hit.at) <= 2
    assert hit.headers["Content-Type"] == "application/json"
    datetime.fromisoformat(event["timestamp"])


async def test_the_default_callback_url_serves_messages_that_name_none(
    redis_url: str, tmp_path: Path, sandbox: Sandbox, receiver: Receiver
) -> None:
    default = receiver.url("/default")
    async with gateway(redis_url, tmp_path, sandbox, (), callback_url=default) as client:
        await register(client, PN)
        message_id = await send(client)
        await arrived(receiver, "/default", 1)
    assert receiver.at("/default")[0].verified()["message_id"] == message_id


async def test_canceled_expired_and_failed_are_called_back(
    redis_url: str, tmp_path: Path, sandbox: Sandbox, receiver: Receiver
) -> None:
    other = "555000000002"
    await sandbox.faults(numbers={other: {"status": 400, "code": 131026}})
    async with gateway(redis_url, tmp_path, sandbox, (receiver.url("/"),)) as client:
        await register(client, PN, status="pending")
        await register(client, other)
        canceled = await send(client, callback_url=receiver.url("/canceled"))
        expired = await send(client, callback_url=receiver.url("/expired"), ttl_seconds=1)
        message = text_message(other, callback_url=receiver.url("/failed"))
        response = await client.post("/v1/messages", json=message, headers=SEND)
        failed = (await response.json())["id"]
        assert (await client.delete(f"/v1/messages/{canceled}", headers=SEND)).status == 200
        # A pending number holds its queue; activated after the ttl ran out, the take ends the
        # message `expired` instead of sending it.
        await asyncio.sleep(1.2)
        patched = await client.patch(
            f"/v1/phone-numbers/{PN}", json={"status": "active"}, headers=ADMIN
        )
        assert patched.status == 200
        for path in ("/canceled", "/expired", "/failed"):
            await arrived(receiver, path, 1)
    events = {hit.path: hit.verified() for hit in receiver.hits}
    assert (events["/canceled"]["message_id"], events["/canceled"]["status"]) == (
        canceled,
        "canceled",
    )
    assert (events["/expired"]["message_id"], events["/expired"]["status"]) == (expired, "expired")
    assert (events["/failed"]["message_id"], events["/failed"]["status"]) == (failed, "failed")
    assert events["/failed"]["error"]["code"] == 131026
    assert events["/failed"]["phone_number_id"] == other
    assert len(receiver.hits) == 3


async def test_a_failed_callback_is_retried_with_the_same_id_and_a_fresh_signature(
    redis_url: str, tmp_path: Path, sandbox: Sandbox, receiver: Receiver
) -> None:
    receiver.answers["/flaky"] = deque([500, 503])
    retried_before = _sample("gateway_callbacks_retried_total")
    delivered_before = _sample("gateway_callbacks_delivered_total")
    # A first retry after >1 s: each attempt's timestamp (whole seconds) differs from the last.
    async with gateway(
        redis_url, tmp_path, sandbox, (receiver.url("/"),), callback_retry_base=1.3
    ) as client:
        await register(client, PN)
        await send(client, callback_url=receiver.url("/flaky"))
        await arrived(receiver, "/flaky", 3, within_s=20)
        await asyncio.sleep(0.5)
    hits = receiver.at("/flaky")
    assert [hit.answer for hit in hits] == [500, 503, 200]
    assert len({hit.headers["webhook-id"] for hit in hits}) == 1
    assert len({hit.headers["webhook-timestamp"] for hit in hits}) == 3
    assert len({hit.headers["webhook-signature"] for hit in hits}) == 3
    assert len({hit.body for hit in hits}) == 1
    for hit in hits:
        hit.verified()
    assert hits[1].at - hits[0].at >= 1.0  # backoff, then doubling
    assert hits[2].at - hits[1].at >= hits[1].at - hits[0].at
    assert _sample("gateway_callbacks_retried_total") == retried_before + 2
    assert _sample("gateway_callbacks_delivered_total") == delivered_before + 1


async def test_410_stops_the_callbacks_of_that_event(
    redis_url: str, tmp_path: Path, sandbox: Sandbox, receiver: Receiver
) -> None:
    receiver.answers["/gone"] = deque([410])
    dropped_before = _sample("gateway_callbacks_dropped_total", reason="gone")
    async with gateway(redis_url, tmp_path, sandbox, (receiver.url("/"),)) as client:
        await register(client, PN)
        await send(client, callback_url=receiver.url("/gone"))
        await arrived(receiver, "/gone", 1)
        await asyncio.sleep(1.0)  # five first-retry delays
    assert len(receiver.at("/gone")) == 1
    assert _sample("gateway_callbacks_dropped_total", reason="gone") == dropped_before + 1


def _sample(name: str, **labels: str) -> float:
    metrics.flush_local()
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def emit(store: Store, message_id: str, status: str) -> None:
    """A status change the way Meta's webhooks apply one (`emit_event` in the same script)."""
    lib = (resources.files("gateway.store") / "lua" / "lib.lua").read_text()
    source = keys.lua_prelude() + lib + "emit_event(ARGV[1], ARGV[2], now_ms(), 3600)\nreturn 1"
    shard = ids.shard_of_id(message_id)
    assert shard is not None
    await store.redis.eval(source, 1, keys.prefix(shard), message_id, status)  # type: ignore[misc]


async def test_one_messages_events_go_in_order_each_after_the_last_succeeded(
    redis_url: str, tmp_path: Path, sandbox: Sandbox, receiver: Receiver
) -> None:
    receiver.answers["/ordered"] = deque([500, 500])
    async with gateway(redis_url, tmp_path, sandbox, (receiver.url("/"),)) as client:
        store = Store.from_settings(make_settings(redis_url, tmp_path), redis_url)
        try:
            await register(client, PN)
            message_id = await send(client, callback_url=receiver.url("/ordered"))
            await arrived(receiver, "/ordered", 1)
            await emit(store, message_id, "delivered")
            await emit(store, message_id, "read")
            await arrived(receiver, "/ordered", 5)
        finally:
            await store.close()
    hits = receiver.at("/ordered")
    statuses = [(hit.verified()["status"], hit.answer) for hit in hits]
    assert statuses == [
        ("sent", 500),
        ("sent", 500),
        ("sent", 200),
        ("delivered", 200),
        ("read", 200),
    ]
    assert [hit.headers["webhook-id"] for hit in hits[2:]] == [
        f"{message_id}.1",
        f"{message_id}.2",
        f"{message_id}.3",
    ]


async def test_a_hanging_receiver_holds_back_neither_sends_nor_other_receivers(
    redis_url: str, tmp_path: Path, sandbox: Sandbox, receiver: Receiver
) -> None:
    receiver.hang.add("/slow")
    async with receiving() as other:
        allow = (receiver.url("/"), other.url("/"))
        async with gateway(
            redis_url, tmp_path, sandbox, allow, callback_concurrency=2, callback_timeout=30.0
        ) as client:
            await register(client, PN)
            slow = [await send(client, callback_url=receiver.url("/slow")) for _ in range(6)]
            await arrived(receiver, "/slow", 2)
            fast = await send(client, callback_url=other.url("/fast"))
            await arrived(other, "/fast", 1)
            # Meanwhile every message was sent: the receiver's hang is no send's business.
            for message_id in [*slow, fast]:

                async def sent(message_id: str = message_id) -> bool:
                    r = await client.get(f"/v1/messages/{message_id}", headers=SEND)
                    return bool((await r.json())["status"] == "sent")

                await eventually(sent, 10.0, f"{message_id} sent")
            assert (len(receiver.at("/slow")), receiver.most_active) == (2, 2)
            receiver.release.set()
            await arrived(receiver, "/slow", 6)
    assert receiver.most_active <= 2
    assert other.at("/fast")[0].verified()["message_id"] == fast


async def test_the_outbox_survives_a_redis_restart(
    tmp_path: Path, sandbox: Sandbox, receiver: Receiver
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        receiver.answers["/later"] = deque([503] * 3)
        async with gateway(server.url, tmp_path / "data", sandbox, (receiver.url("/"),)) as client:
            await register(client, PN)
            sent = {await send(client, callback_url=receiver.url("/later")) for _ in range(3)}
            await arrived(receiver, "/later", 3)  # all refused so far
            await asyncio.to_thread(server.restart)
            await arrived(receiver, "/later", 6, within_s=20)
            await asyncio.sleep(0.5)
        delivered = [hit.verified() for hit in receiver.at("/later") if hit.answer == 200]
        assert {event["message_id"] for event in delivered} == sent
        assert len(delivered) == 3
    finally:
        server.stop()
