"""The sandbox plays Meta's webhooks: signed status notifications to a real receiver over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.errors import ConfigError
from gateway.sandbox import StaticRates, StatusConfig, start_sandbox
from gateway.sandbox.statuses import status_config
from gateway.settings import Settings, load
from tests.servers import serving

SECRET = "sandbox-test-app-secret"
AUTH = {"Authorization": "Bearer token"}


def message(to: str = "+5491140123456", **fields: Any) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": "hi"},
        **fields,
    }


class Receiver:
    """Meta's webhook as the gateway receives it: checks the signature and the envelope."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = answers or []  # statuses to answer with first, then 200
        self.posts: list[dict[str, Any]] = []
        self.bad: list[str] = []
        self.url = ""
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Hub-Signature-256", ""), expected):
            self.bad.append("signature")
            return web.Response(status=401)
        if request.content_type != "application/json":
            self.bad.append("content type")
        if self.answers:
            return web.Response(status=self.answers.pop(0))
        self.posts.append(orjson.loads(raw))
        self.arrived.set()
        return web.Response(text="ok")

    def statuses(self) -> list[dict[str, Any]]:
        return [
            status
            for post in self.posts
            for entry in post["entry"]
            for change in entry["changes"]
            for status in change["value"]["statuses"]
        ]

    def by_wamid(self) -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for status in self.statuses():
            seen.setdefault(status["id"], []).append(status["status"])
        return seen

    async def wait_for(self, count: int, within_s: float = 10.0) -> None:
        async def enough() -> None:
            while len(self.statuses()) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), within_s)


@asynccontextmanager
async def running_receiver(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/v1/webhooks/meta", receiver.handle)
    async with serving(app) as base:
        receiver.url = f"{base}/v1/webhooks/meta"
        yield receiver


@asynccontextmanager
async def sandbox_posting_to(receiver: Receiver, **config: Any) -> AsyncIterator[Sandbox]:
    statuses = StatusConfig(receiver.url, SECRET, **{"delays": (0.05, 0.1), "seed": 7, **config})
    runner, url = await start_sandbox("127.0.0.1", 0, StaticRates(), statuses)
    async with aiohttp.ClientSession() as http:
        try:
            yield Sandbox(url, http)
        finally:
            await runner.cleanup()


@dataclasses.dataclass
class Sandbox:
    url: str
    http: aiohttp.ClientSession

    async def send(self, pn: str = "555123456789", **fields: Any) -> str:
        async with self.http.post(
            f"{self.url}/{pn}/messages", json=message(**fields), headers=AUTH
        ) as response:
            assert response.status == 200
            wamid: str = (await response.json())["messages"][0]["id"]
            return wamid

    async def webhooks(self) -> dict[str, Any]:
        root = self.url.rsplit("/", 1)[0]
        async with self.http.get(f"{root}/_sandbox/webhooks") as response:
            body: dict[str, Any] = await response.json()
            return body


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver(Receiver()) as running:
        yield running


async def test_each_accepted_message_is_reported_sent_delivered_read(receiver: Receiver) -> None:
    async with sandbox_posting_to(receiver) as sandbox:
        wamids = [await sandbox.send(to=f"+549114012345{i}") for i in range(3)]
        await receiver.wait_for(9)
        assert receiver.by_wamid() == {w: ["sent", "delivered", "read"] for w in wamids}
        assert receiver.bad == []
        assert (await sandbox.webhooks())["posted"] == 9


async def test_the_body_is_metas_envelope(receiver: Receiver) -> None:
    async with sandbox_posting_to(receiver) as sandbox:
        wamid = await sandbox.send(biz_opaque_callback_data="order-7")
        await receiver.wait_for(3)
    post = receiver.posts[0]
    assert post["object"] == "whatsapp_business_account"
    [entry] = post["entry"]
    assert entry["id"].isdigit()
    [change] = entry["changes"]
    assert change["field"] == "messages"
    value = change["value"]
    assert value["messaging_product"] == "whatsapp"
    assert value["metadata"]["phone_number_id"] == "555123456789"
    assert value["metadata"]["display_phone_number"].isdigit()
    sent, delivered, read = receiver.statuses()
    assert sent["id"] == wamid and sent["status"] == "sent"
    assert sent["recipient_id"] == "5491140123456"
    assert sent["biz_opaque_callback_data"] == "order-7"
    assert sent["conversation"]["origin"]["type"] == "service"
    assert sent["conversation"]["expiration_timestamp"].isdigit()
    assert sent["pricing"]["billable"] is True
    assert delivered["conversation"] == sent["conversation"]
    assert "errors" not in read
    for status in (sent, delivered, read):
        assert status["timestamp"].isdigit()
    assert int(sent["timestamp"]) <= int(delivered["timestamp"]) <= int(read["timestamp"])


async def test_statuses_due_together_share_one_post_per_number(receiver: Receiver) -> None:
    async with sandbox_posting_to(receiver, delays=(0.3, 0.6)) as sandbox:
        sends = [
            sandbox.send(pn=pn, to=f"+54911401{i:05}") for pn in ("111", "222") for i in range(50)
        ]
        await asyncio.gather(*sends)
        await receiver.wait_for(300)
    assert len(receiver.posts) < 100  # 300 statuses; one per POST would be 300 posts
    for post in receiver.posts:
        changes = [c for e in post["entry"] for c in e["changes"]]
        assert len({c["value"]["metadata"]["phone_number_id"] for c in changes}) == 1
    assert all(seen == ["sent", "delivered", "read"] for seen in receiver.by_wamid().values())


async def test_a_failing_share_ends_failed_with_metas_error(receiver: Receiver) -> None:
    async with sandbox_posting_to(receiver, fail_share=1.0) as sandbox:
        wamids = [await sandbox.send(to=f"+549114012345{i}") for i in range(6)]
        await receiver.wait_for(12)
    assert receiver.by_wamid() == {w: ["sent", "failed"] for w in wamids}
    failed = [s for s in receiver.statuses() if s["status"] == "failed"]
    codes = set()
    for status in failed:
        [error] = status["errors"]
        codes.add(error["code"])
        assert error["title"] and error["message"] == error["title"]
        assert error["error_data"]["details"]
    assert codes <= {131026, 131047}
    assert len(codes) == 2  # with 6 messages and seed 7, both kinds come up


async def test_a_repeating_share_comes_out_of_order_and_twice(receiver: Receiver) -> None:
    async with sandbox_posting_to(receiver, repeat_share=1.0) as sandbox:
        wamid = await sandbox.send()
        await receiver.wait_for(5)
    seen = receiver.by_wamid()[wamid]
    assert sorted(seen) == ["delivered", "delivered", "read", "sent", "sent"]
    assert seen.index("read") < seen.index("delivered")


async def test_a_receiver_that_fails_gets_the_same_statuses_again() -> None:
    async with (
        running_receiver(Receiver(answers=[500, 503])) as receiver,
        sandbox_posting_to(receiver, delays=(5.0, 5.0)) as sandbox,
    ):
        wamid = await sandbox.send()
        await receiver.wait_for(1)
        stats = await sandbox.webhooks()
    assert receiver.by_wamid() == {wamid: ["sent"]}
    assert stats["retries"] == 2 and stats["posted"] == 1


async def test_without_a_url_the_sandbox_posts_nothing(tmp_path: Path) -> None:
    runner, url = await start_sandbox("127.0.0.1", 0, StaticRates())
    try:
        async with aiohttp.ClientSession() as http:
            await Sandbox(url, http).send()
            assert await Sandbox(url, http).webhooks() == {"enabled": False}
    finally:
        await runner.cleanup()


def test_settings_choose_the_webhooks(tmp_path: Path) -> None:
    settings = load(
        {
            "GATEWAY_META_APP_SECRET": SECRET,
            "GATEWAY_SANDBOX_STATUS_DELAYS": "500ms,2s",
            "GATEWAY_SANDBOX_FAIL_SHARE": "0.1",
            "GATEWAY_SANDBOX_REPEAT_SHARE": "0.2",
        }
    )
    assert status_config(settings) is None  # `gateway sandbox` without a URL posts nothing
    own = status_config(settings, "http://127.0.0.1:8080/v1/webhooks/meta")
    assert own == StatusConfig(
        "http://127.0.0.1:8080/v1/webhooks/meta", SECRET, (0.5, 2.0), 0.1, 0.2
    )
    chosen = dataclasses.replace(settings, sandbox_webhook_url="http://gw:9/v1/webhooks/meta")
    config = status_config(chosen, "http://127.0.0.1:8080/v1/webhooks/meta")
    assert config is not None and config.url == "http://gw:9/v1/webhooks/meta"
    assert status_config(Settings(), "http://127.0.0.1:8080/x") is None  # nothing to sign with
    with pytest.raises(ConfigError, match="two durations"):
        load({"GATEWAY_SANDBOX_STATUS_DELAYS": "1s"})
    with pytest.raises(ConfigError, match="sandbox_fail_share"):
        load({"GATEWAY_SANDBOX_FAIL_SHARE": "2"})


async def test_when_too_much_is_owed_new_messages_get_no_statuses_but_answers(
    receiver: Receiver,
) -> None:
    async with sandbox_posting_to(receiver, delays=(5.0, 5.0), max_pending=6) as sandbox:
        wamids = [await sandbox.send(to=f"+549114012345{i}") for i in range(4)]
        stats = await sandbox.webhooks()
    assert len(set(wamids)) == 4  # every send was answered 200 with its wamid
    assert stats["dropped"] == 2 and stats["messages_plain"] == 2 and stats["planned"] == 6


async def test_a_receiver_that_hangs_does_not_hold_the_answers_back() -> None:
    hang = asyncio.Event()

    class Hanging(Receiver):
        async def handle(self, request: web.Request) -> web.Response:
            await hang.wait()
            return web.Response(status=500)

    async with (
        running_receiver(Hanging()) as receiver,
        sandbox_posting_to(receiver, delays=(0.0, 0.0)) as sandbox,
    ):
        for i in range(50):
            await sandbox.send(to=f"+54911401{i:05}")
            await asyncio.sleep(0.005)
        stats = await sandbox.webhooks()
        hang.set()
    assert stats["in_flight"] >= 1 and stats["pending"] == 150
