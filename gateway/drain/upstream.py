"""The Cloud API client: one keep-alive `ClientSession` per process, a timeout on every request.

`send` never raises for an upstream problem: every answer, timeout or connection error comes
back classified (`gateway.drain.classify`). `GATEWAY_UPSTREAM_MAX_MPS` is the fleet's, granted in
Redis with the takes (`gateway.drain.fleet`), not a limit of this client.

A send may carry a deadline, when the request must leave by (a rate-limited grant is only exact
if it does), and an earlier `start_by`. A late request is never written: the answer is then
`Outcome.LATE` (its message says which check refused it) and nothing reached the upstream.
- Once the connection is in hand (`_TimedConnector`), against `start_by`: opening one (a TLS
  handshake to Meta takes far longer than a deadline allows) can make a request late; the fresh
  connection then goes back to the pool unused, so the next request finds it warm. `warm()`
  opens a first few at start, before any send waits on them.
- When aiohttp writes the body (`TimedBody`), against the deadline: on Python 3.11 that happens
  in a task of its own, a loop turn after the call; the headers are only buffered until then.
  A refusal here closes the connection (and the next send pays for a new one), so `start_by`
  leaves room for that loop turn and this check only catches a stall in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextvars import ContextVar

import aiohttp
import orjson
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.payload import BytesPayload
from aiohttp.tracing import Trace
from yarl import URL

from gateway import metrics
from gateway.drain.classify import Answer, Outcome, classify, transport_failure

log = logging.getLogger("gateway.drain")

WARM_CONNECTIONS = 64
# Numbers whose URL is kept parsed; emptied when full (a full garbage collection walks them all).
URL_CACHE = 20_000


class _TooLate(Exception):
    pass


# When the request the current task is sending must have its connection (a task is one sender).
_DEADLINE: ContextVar[float] = ContextVar("deadline", default=float("inf"))


class _TimedConnector(aiohttp.TCPConnector):
    """Gives a connection back unused when it came too late for the request's start."""

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        if time.monotonic() > _DEADLINE.get():
            conn.release()
            raise _TooLate
        return conn


class TimedBody(BytesPayload):
    """A JSON request body written in its time: not before `not_before`, never after `deadline`.

    aiohttp holds a request's headers back and sends them with the first body bytes, so
    nothing of the request reaches the upstream before the body is written.
    """

    def __init__(
        self,
        value: bytes,
        start_by: float = float("inf"),
        deadline: float = float("inf"),
        not_before: float = 0.0,
    ) -> None:
        super().__init__(value, content_type="application/json")
        self.start_by = start_by  # when the connection must be in hand
        self.deadline = deadline  # when the request must be written
        self.not_before = not_before  # when it may be written
        self.written_at: float | None = None
        self.refused = False

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        # (uvloop's timers have 1 ms resolution and may fire a little early: check again)
        while (now := time.monotonic()) < self.not_before:  # noqa: ASYNC110 (a time, not an event)
            await asyncio.sleep(self.not_before - now)
        if now > self.deadline:
            self.refused = True
            raise _TooLate
        self.written_at = now
        await super().write_with_length(writer, content_length)


class CloudApi:
    def __init__(
        self,
        base_url: str,
        default_token: str | None,
        *,
        timeout_s: float,
        pool_size: int,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.default_token = default_token
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str | None, dict[str, str]] = {}  # per access token
        # per number: parsing a URL costs 8 µs (yarl only caches a few); a parsed one also keeps
        # what aiohttp derives from it (host, path)
        self._urls: dict[str, URL] = {}

    async def start(self) -> None:
        connector = _TimedConnector(
            limit=self.pool_size, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            # the Cloud API needs no cookies, and a jar costs every request
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def warm(self, count: int = WARM_CONNECTIONS) -> None:
        """Open up to `count` connections to the upstream and leave them idle in the pool."""
        assert self._session is not None, "CloudApi.start() was not awaited"
        connector = self._session.connector
        assert connector is not None
        loop = asyncio.get_running_loop()
        url = URL(self.base_url)

        async def one() -> None:
            request = aiohttp.ClientRequest("POST", url, loop=loop)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                connection = await connector.connect(request, [], self.timeout)
                connection.release()

        await asyncio.gather(*(one() for _ in range(min(count, self.pool_size))))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, phone_number_id: str, token: str | None, body: TimedBody) -> Answer:
        """POST one message; never write it after the body's deadline."""
        assert self._session is not None, "CloudApi.start() was not awaited"
        headers = self._headers.get(token)
        if headers is None:
            bearer = token or self.default_token or ""
            if not (bearer.isascii() and bearer.isprintable()):
                # (a number registered before its token was checked: written, a control
                # character would end the header line, and aiohttp refuses to write it)
                return Answer(
                    Outcome.AUTH,
                    code="invalid_access_token",
                    message="the access token cannot be sent in an Authorization header",
                )
            headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
            self._headers[token] = headers
        url = self._urls.get(phone_number_id)
        if url is None:
            if len(self._urls) >= URL_CACHE:
                self._urls.clear()
            url = self._urls[phone_number_id] = URL(f"{self.base_url}/{phone_number_id}/messages")
        started = time.perf_counter()
        deadline = _DEADLINE.set(body.start_by)
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                raw = await response.read()
                status = response.status
        except _TooLate:
            return Answer(Outcome.LATE, message="connect")
        except TimeoutError:
            answer = transport_failure("the Cloud API did not answer in time")
        except aiohttp.ClientError as exc:
            if body.refused:
                return Answer(Outcome.LATE, message="write")
            answer = transport_failure(f"could not reach the Cloud API: {type(exc).__name__}")
        else:
            try:
                parsed = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = None
            answer = classify(status, parsed)
        finally:
            _DEADLINE.reset(deadline)
        answer.started_at = body.written_at
        metrics.local_upstream_duration.observe(time.perf_counter() - started)
        metrics.local_upstream_requests.inc(answer.outcome.value)
        return answer
