"""The Cloud API client: one keep-alive `ClientSession` per process, a timeout on every request.

`send` never raises for an upstream problem: every answer, timeout or connection error comes
back classified (`gateway.drain.classify`). `GATEWAY_UPSTREAM_MAX_MPS` caps this process's
request rate with an `aiolimiter.AsyncLimiter`.
"""

from __future__ import annotations

import time

import aiohttp
import orjson
from aiolimiter import AsyncLimiter

from gateway import metrics
from gateway.drain.classify import Answer, classify, transport_failure


class CloudApi:
    def __init__(
        self,
        base_url: str,
        default_token: str | None,
        *,
        timeout_s: float,
        pool_size: int,
        max_mps: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.default_token = default_token
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.pool_size = pool_size
        self.limiter = AsyncLimiter(max_mps, 1.0) if max_mps else None
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str | None, dict[str, str]] = {}  # per access token

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.pool_size, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, phone_number_id: str, token: str | None, body: bytes) -> Answer:
        assert self._session is not None, "CloudApi.start() was not awaited"
        headers = self._headers.get(token)
        if headers is None:
            bearer = token or self.default_token or ""
            headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
            self._headers[token] = headers
        url = f"{self.base_url}/{phone_number_id}/messages"
        started = time.perf_counter()
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            answer = transport_failure("the Cloud API did not answer in time")
        except aiohttp.ClientError as exc:
            answer = transport_failure(f"could not reach the Cloud API: {type(exc).__name__}")
        else:
            try:
                parsed = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = None
            answer = classify(status, parsed)
        metrics.local_upstream_duration.observe(time.perf_counter() - started)
        metrics.local_upstream_requests.inc(answer.outcome.value)
        return answer
