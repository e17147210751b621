"""`AsyncGatewayClient`: the gateway's API over aiohttp, for services that run an event loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import aiohttp

from gateway.client import wire
from gateway.client.errors import GatewayConnectionError
from gateway.client.wire import Accepted, Call, Rejected


class AsyncGatewayClient:
    """Send, batch, status and cancel, with safe retries of `429` and `503`.

    Use it as `async with AsyncGatewayClient(url, key) as client:` or call `close()`; its HTTP
    session is made on first use, inside the running loop. Pass `session` to share one.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        max_retries: int = 3,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be at least 0")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._owns_session = session is None
        self._rng = random.Random()

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def send(
        self,
        message: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Accepted:
        """Queue one message (`message`, with `fields` on top); generates a key when none given."""
        call, key = wire.send_call(message, fields, idempotency_key)
        status, headers, body = await self._call(call)
        replayed = headers.get("Idempotent-Replayed") == "true"
        return wire.accepted(wire.expect_object(status, body), key, replayed)

    async def send_batch(self, messages: Iterable[Mapping[str, Any]]) -> list[Accepted | Rejected]:
        """Queue many, 1,000 per request; one result per message, in the order given.

        A message without `idempotency_key` gets one, so a retried chunk queues nothing twice.
        Should a chunk fail for good, the error is raised and the chunks before it stay queued.
        """
        results: list[Accepted | Rejected] = []
        for call, chunk in wire.batch_calls(messages):
            status, _, body = await self._call(call)
            results += wire.batch_results(wire.expect_object(status, body), chunk)
        return results

    async def status(self, message_id: str) -> dict[str, Any]:
        """`GET /v1/messages/{id}`: the message's status document."""
        status, _, body = await self._call(Call("GET", wire.message_path(message_id)))
        return wire.expect_object(status, body)

    async def cancel(self, message_id: str) -> dict[str, Any]:
        """`DELETE /v1/messages/{id}`: `{"id", "status": "canceled"}`, else `not_cancelable`."""
        status, _, body = await self._call(Call("DELETE", wire.message_path(message_id)))
        return wire.expect_object(status, body)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._owns_session = True
        return self._session

    async def _call(self, call: Call) -> tuple[int, Mapping[str, str], bytes]:
        """The answer to `call`, retried on 429, 503 and failed connections; errors raised."""
        session = self._open()
        headers = {**self._auth, **call.headers}
        url = self.base_url + call.path
        attempt = 0
        while True:
            try:
                async with session.request(
                    call.method, url, data=call.body, headers=headers, timeout=self._timeout
                ) as response:
                    status, answer_headers = response.status, response.headers
                    body = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt >= self.max_retries:
                    raise GatewayConnectionError(f"{call.method} {url}: {exc!r}") from exc
                await asyncio.sleep(wire.retry_delay(attempt, None, self._rng))
                attempt += 1
                continue
            if 200 <= status < 300:
                return status, answer_headers, body
            error = wire.error_from(status, body, answer_headers.get("Retry-After"))
            if status not in wire.RETRY_STATUSES or attempt >= self.max_retries:
                raise error
            await asyncio.sleep(wire.retry_delay(attempt, error.retry_after, self._rng))
            attempt += 1
