"""`GatewayClient`: the same API without an event loop, over the standard library's urllib.

Why urllib and not aiohttp on a private loop in a thread: it works wherever it is called from
(a script, a thread pool, a web framework, even inside a running event loop) with nothing to
start or stop, no thread that outlives an interrupted call, and nothing that breaks on fork.
Each call opens its own connection; a service that sends much uses `send_batch` (1,000
messages a request) or the async client, whose session keeps connections open.
"""

from __future__ import annotations

import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from email.message import Message
from types import TracebackType
from typing import Any

from gateway.client import wire
from gateway.client.errors import GatewayConnectionError
from gateway.client.wire import Accepted, Call, Rejected


class GatewayClient:
    """Send, batch, status and cancel, with safe retries of `429` and `503` (blocking calls)."""

    def __init__(
        self, base_url: str, api_key: str, *, timeout: float = 10.0, max_retries: int = 3
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be at least 0")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._rng = random.Random()
        # Only http(s) to the gateway: no redirects followed, no proxies from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Nothing is held between calls; here for symmetry with the async client."""

    def send(
        self,
        message: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Accepted:
        """Queue one message (`message`, with `fields` on top); generates a key when none given."""
        call, key = wire.send_call(message, fields, idempotency_key)
        status, headers, body = self._call(call)
        replayed = headers.get("idempotent-replayed") == "true"
        return wire.accepted(wire.expect_object(status, body), key, replayed)

    def send_batch(self, messages: Iterable[Mapping[str, Any]]) -> list[Accepted | Rejected]:
        """Queue many, 1,000 per request; one result per message, in the order given."""
        results: list[Accepted | Rejected] = []
        for call, chunk in wire.batch_calls(messages):
            status, _, body = self._call(call)
            results += wire.batch_results(wire.expect_object(status, body), chunk)
        return results

    def status(self, message_id: str) -> dict[str, Any]:
        status, _, body = self._call(Call("GET", wire.message_path(message_id)))
        return wire.expect_object(status, body)

    def cancel(self, message_id: str) -> dict[str, Any]:
        status, _, body = self._call(Call("DELETE", wire.message_path(message_id)))
        return wire.expect_object(status, body)

    def _exchange(self, call: Call) -> tuple[int, Mapping[str, str], bytes]:
        request = urllib.request.Request(
            self.base_url + call.path,
            data=call.body,
            method=call.method,
            headers={**self._auth, **call.headers},
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, _lowered(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _lowered(exc.headers), exc.read()

    def _call(self, call: Call) -> tuple[int, Mapping[str, str], bytes]:
        attempt = 0
        while True:
            try:
                status, headers, body = self._exchange(call)
            except (OSError, TimeoutError) as exc:  # URLError is an OSError
                if attempt >= self.max_retries:
                    raise GatewayConnectionError(f"{call.method} {call.path}: {exc!r}") from exc
                time.sleep(wire.retry_delay(attempt, None, self._rng))
                attempt += 1
                continue
            if 200 <= status < 300:
                return status, headers, body
            error = wire.error_from(status, body, headers.get("retry-after"))
            if status not in wire.RETRY_STATUSES or attempt >= self.max_retries:
                raise error
            time.sleep(wire.retry_delay(attempt, error.retry_after, self._rng))
            attempt += 1


def _lowered(headers: Message) -> dict[str, str]:
    """Header names in lower case: urllib's own lookups are case-insensitive, a dict's are not."""
    return {name.lower(): value for name, value in headers.items()}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The gateway never redirects: a 3xx is an answer, not somewhere to send the key."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
