"""The sandbox plays Meta's webhooks: signed status notifications for the messages it accepted.

After a `200` with a wamid the sandbox reports `sent` at once, then `delivered` and `read` after
the configured delays; a share of messages ends `failed` (131026 undeliverable or 131047 outside
the 24-hour window) instead, and a share gets its statuses repeated and out of order, as Meta's
own webhooks sometimes come. What is due is grouped every `TICK_S` into one POST per phone number
(Meta's envelope, many statuses in it), signed with `X-Hub-Signature-256` over the raw body.

None of this may slow the sandbox's answers: accepting a message only pushes onto a heap; one
background loop posts, at most `MAX_IN_FLIGHT` posts at once, and a message whose statuses do
not fit in `MAX_PENDING` (statuses owed) gets none: it is dropped and counted. A POST answered
with anything but `2xx` (or not answered) is tried again with growing delays, `MAX_ATTEMPTS`
times in all, then abandoned and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import itertools
import logging
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.settings import Settings

log = logging.getLogger("gateway.sandbox.statuses")

TICK_S = 0.05
MAX_PENDING = 200_000  # statuses waiting to be posted, retries included
MAX_IN_FLIGHT = 8
MAX_PER_POST = 1_000  # keeps a body well under the 4 MiB the intake takes
MAX_ATTEMPTS = 5
RETRY_BASE_S = 0.5
POST_TIMEOUT_S = 10.0
# The sandbox's one pretend WhatsApp Business Account (entry[].id).
WABA_ID = "100000000000000"
CONVERSATION_S = 24 * 3600

# Meta's titles and details for the failures the sandbox reports.
FAILURES = {
    131026: (
        "Message undeliverable",
        "Message failed to send because the recipient's phone number is not on WhatsApp, or "
        "the recipient has not accepted the latest terms of service.",
    ),
    131047: (
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer "
        "last replied to this number.",
    ),
}


@dataclass(frozen=True)
class StatusConfig:
    """Where and how the sandbox reports statuses (see `Settings.sandbox_*`)."""

    url: str
    app_secret: str
    delays: tuple[float, float] = (1.0, 3.0)  # delivered, read: seconds after sent
    fail_share: float = 0.0
    repeat_share: float = 0.0
    seed: int | None = None
    max_pending: int = MAX_PENDING


def signature(body: bytes, app_secret: str) -> str:
    """The `X-Hub-Signature-256` value Meta sends: `sha256=<hex HMAC-SHA256 of the body>`."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def envelope(phone_number_id: str, statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """Meta's webhook body for one number's statuses."""
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": WABA_ID,
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "1555" + phone_number_id[-7:],
                                "phone_number_id": phone_number_id,
                            },
                            "statuses": statuses,
                        },
                    }
                ],
            }
        ],
    }


@dataclass(order=True)
class _Due:
    """A status (or a batch being retried) waiting for its time."""

    at: float
    seq: int
    pn: str = field(compare=False)
    statuses: list[dict[str, Any]] = field(compare=False)
    attempt: int = field(compare=False, default=0)


class StatusWebhooks:
    """The statuses the sandbox owes, and the loop that posts them."""

    def __init__(self, config: StatusConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.heap: list[_Due] = []
        self.seq = itertools.count()
        self.pending = 0  # statuses in the heap or in flight
        self.counts: Counter[str] = Counter()
        self.in_flight: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    def _push(self, at: float, pn: str, statuses: list[dict[str, Any]], attempt: int = 0) -> None:
        heapq.heappush(self.heap, _Due(at, next(self.seq), pn, statuses, attempt))

    def accepted(self, pn: str, wamid: str, request: dict[str, Any]) -> None:
        """Schedule the statuses of a message the sandbox just answered `200` for."""
        now = time.monotonic()
        wall = time.time()
        delivered_s, read_s = self.config.delays
        to = str(request.get("to", "")).lstrip("+")
        origin = "utility" if request.get("type") == "template" else "service"
        conversation = {
            "id": os.urandom(16).hex(),
            "expiration_timestamp": str(int(wall) + CONVERSATION_S),
            "origin": {"type": origin},
        }
        pricing = {"billable": True, "pricing_model": "PMP", "type": "regular", "category": origin}

        def status(name: str, after_s: float, **extra: Any) -> dict[str, Any]:
            body: dict[str, Any] = {
                "id": wamid,
                "status": name,
                "timestamp": str(int(wall + after_s)),
                "recipient_id": to,
            }
            if "biz_opaque_callback_data" in request:
                body["biz_opaque_callback_data"] = request["biz_opaque_callback_data"]
            body.update(extra)
            return body

        sent = status("sent", 0.0, conversation=conversation, pricing=pricing)
        plan: list[tuple[float, dict[str, Any]]] = [(0.0, sent)]
        kind = "plain"
        if self.config.fail_share and self.rng.random() < self.config.fail_share:
            code = self.rng.choice(sorted(FAILURES))
            title, details = FAILURES[code]
            error = {
                "code": code,
                "title": title,
                "message": title,
                "error_data": {"details": details},
                "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
            }
            plan.append((delivered_s, status("failed", delivered_s, errors=[error])))
            kind = "failed"
        else:
            delivered = status("delivered", delivered_s, conversation=conversation, pricing=pricing)
            read = status("read", read_s)
            if self.config.repeat_share and self.rng.random() < self.config.repeat_share:
                # Out of order (read before delivered) and repeated (sent and delivered twice).
                plan += [(read_s, read), (read_s + TICK_S, delivered), (read_s + 2 * TICK_S, sent)]
                plan.append((read_s + 3 * TICK_S, delivered))
                kind = "disordered"
            else:
                plan += [(delivered_s, delivered), (read_s, read)]
        if self.pending + len(plan) > self.config.max_pending:
            self.counts["dropped"] += 1  # messages, not statuses
            return
        for after_s, body in plan:
            self._push(now + after_s, pn, [body])
        self.pending += len(plan)
        self.counts["planned"] += len(plan)
        self.counts[f"messages_{kind}"] += 1

    def stats(self) -> dict[str, int]:
        return {"pending": self.pending, "in_flight": len(self.in_flight), **self.counts}

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Post what is due every tick until cancelled; a failure is logged, never fatal."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._post_due(session)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop boundary: one bad tick must not end the webhooks
                log.exception("sandbox status webhooks: a tick failed")

    async def _post_due(self, session: aiohttp.ClientSession) -> None:
        now = time.monotonic()
        fresh: dict[str, list[dict[str, Any]]] = {}
        while self.heap and self.heap[0].at <= now:
            due = heapq.heappop(self.heap)
            if due.attempt:  # a batch being retried goes again as it was
                await self._start_post(session, due.pn, due.statuses, due.attempt)
            else:
                fresh.setdefault(due.pn, []).extend(due.statuses)
        for pn, statuses in fresh.items():
            for start in range(0, len(statuses), MAX_PER_POST):
                await self._start_post(session, pn, statuses[start : start + MAX_PER_POST], 0)

    async def _start_post(
        self, session: aiohttp.ClientSession, pn: str, statuses: list[dict[str, Any]], attempt: int
    ) -> None:
        # Waiting for a slot here holds the loop back, not the sandbox's answers: due statuses
        # simply wait in the heap, which `MAX_PENDING` bounds.
        await self.slots.acquire()
        task = asyncio.create_task(
            self._post(session, pn, statuses, attempt), name=f"sandbox-status-post-{pn}"
        )
        self.in_flight.add(task)
        task.add_done_callback(self._post_done)

    def _post_done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("sandbox status post failed: %r", task.exception())

    async def _post(
        self, session: aiohttp.ClientSession, pn: str, statuses: list[dict[str, Any]], attempt: int
    ) -> None:
        body = orjson.dumps(envelope(pn, statuses))
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": signature(body, self.config.app_secret),
        }
        try:
            async with session.post(self.config.url, data=body, headers=headers) as response:
                await response.read()
                ok = 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            self.pending -= len(statuses)
            self.counts["posted"] += len(statuses)
            self.counts["posts"] += 1
            return
        attempt += 1
        if attempt >= MAX_ATTEMPTS:
            self.pending -= len(statuses)
            self.counts["abandoned"] += len(statuses)
            log.warning("sandbox gave up posting %d statuses to %s", len(statuses), self.config.url)
            return
        self.counts["retries"] += 1
        delay = RETRY_BASE_S * 2 ** (attempt - 1) * (0.5 + self.rng.random())
        self._push(time.monotonic() + delay, pn, statuses, attempt)


STATUSES = web.AppKey("sandbox_statuses", StatusWebhooks)


async def status_loop(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx`: the poster's HTTP session and loop live as long as the sandbox app."""
    webhooks = app[STATUSES]
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        loop = asyncio.create_task(webhooks.run(session), name="sandbox-status-webhooks")
        try:
            yield
        finally:
            loop.cancel()
            for task in list(webhooks.in_flight):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await asyncio.gather(*webhooks.in_flight, return_exceptions=True)


def status_config(settings: Settings, own_url: str | None = None) -> StatusConfig | None:
    """The webhooks the settings ask for: `sandbox_webhook_url`, else `own_url`, else none.

    Without an app secret there is nothing to sign with, so no webhooks either (said once).
    """
    url = settings.sandbox_webhook_url or own_url
    if url is None:
        return None
    if not settings.meta_app_secret:
        log.warning("sandbox status webhooks are off: GATEWAY_META_APP_SECRET is not set")
        return None
    return StatusConfig(
        url=url,
        app_secret=settings.meta_app_secret,
        delays=settings.sandbox_status_delays,
        fail_share=settings.sandbox_fail_share,
        repeat_share=settings.sandbox_repeat_share,
    )
