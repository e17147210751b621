"""Connecting to Redis, and turning its failures into `StoreUnavailable`.

Timeouts are short on purpose: API.md wants a `503` within two seconds when Redis is gone, never
a hang. A dropped connection is retried once at once (a restarted Redis leaves every pooled
connection broken); a second failure is the caller's `StoreUnavailable`. A timeout is never
retried: the command is in the server's socket and may still run (a stalled Redis resumes and
executes it), so sending it again could queue a message twice; the caller answers `503`, whose
outcome is unknown, and a client's retry with the same idempotency key is what is safe. The
bounds add up to under two seconds (connect 0.5 s, or a reply within 0.75 s, a retry only for a
dropped connection, a free connection within 0.4 s), so no request waits on a hung Redis longer
than API.md allows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.errors import StoreUnavailable
from gateway.settings import Settings
from gateway.store.scripts import Scripts

log = logging.getLogger("gateway.store")

# Message hashes keep their ~150-byte payload field in the compact encoding from this on.
LISTPACK_VALUE = 1024

_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    ConnectionError,
    TimeoutError,
    OSError,
)


@contextlib.contextmanager
def unavailable_on_redis_errors() -> Iterator[None]:
    """Re-raise Redis being unreachable as `StoreUnavailable`; other errors are bugs."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except redis_errors.ResponseError as exc:
        if str(exc).startswith(("LOADING", "BUSY", "MISCONF", "CLUSTERDOWN")):
            raise StoreUnavailable(str(exc)) from exc
        raise


def _dropped(error: BaseException | None) -> bool:
    """Whether `error` is a connection the server closed (not a timeout: that may still run)."""
    return isinstance(error, redis_errors.ConnectionError) and not isinstance(
        error, redis_errors.TimeoutError
    )


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (the clients here return bytes; the stubs allow both)."""
    return value.decode() if isinstance(value, bytes) else value


class _HiredisPacking:
    """Packs commands with hiredis' C packer.

    redis-py's asyncio connections pack every command in Python, re-joining the buffer per
    argument: about 3 ms for a 1,000-message `push` (6,000 arguments), 0.35 ms in C.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # e.g. "SCRIPT LOAD"
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a type hiredis does not pack: redis-py's own way
            packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
            return packed


_FAST_CLASSES: dict[type[Any], type[Any]] = {}


def _with_hiredis_packing(base: type[Any]) -> type[Any]:
    fast = _FAST_CLASSES.get(base)
    if fast is None:
        fast = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
        _FAST_CLASSES[base] = fast
    return fast


def connect(
    url: str,
    *,
    max_connections: int = 128,
    socket_timeout: float = 0.75,
    **extra: Any,
) -> Redis:
    """A client for `url` (redis://, rediss://, unix://, with password) with short timeouts."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=0.4,
        socket_timeout=socket_timeout,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
        retry_on_error=[redis_errors.ConnectionError],
        health_check_interval=0,
        **extra,
    )
    pool.connection_class = _with_hiredis_packing(pool.connection_class)
    return Redis(connection_pool=pool)


class Store:
    """A Redis client, its loaded scripts and the deployment's shard count."""

    def __init__(self, client: Redis, settings: Settings) -> None:
        self.redis = client
        self.scripts = Scripts(client)
        self.shards = settings.shards
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: Settings, url: str, **extra: Any) -> Store:
        return cls(connect(url, **extra), settings)

    async def script(self, name: str, shard: int, args: list[Any]) -> Any:
        with unavailable_on_redis_errors():
            return await self.scripts.run(name, shard, args)

    async def script_on(self, name: str, shards: list[int], args: list[Any]) -> Any:
        with unavailable_on_redis_errors():
            return await self.scripts.run_on(name, shards, args)

    async def pipelined(self, build: Callable[[Pipeline], Awaitable[None] | None]) -> list[Any]:
        """Run the commands `build` queues in one round trip (not a transaction).

        redis-py retries a single command on a dropped connection but not a pipeline, so a
        pipeline that meets a connection Redis closed (it restarted) is built and sent once
        more; one that timed out is not (see the module's docstring).
        """
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            queued = build(pipe)
            if queued is not None:
                await queued
            try:
                with unavailable_on_redis_errors():
                    return list(await pipe.execute())
            except StoreUnavailable as exc:
                if attempt == 2 or not _dropped(exc.__cause__):
                    raise
        raise AssertionError("unreachable")

    async def check_server_settings(self) -> None:
        """Warn once when the server's settings make the gateway expensive to run on it."""
        try:
            with unavailable_on_redis_errors():
                found = await self.redis.config_get("hash-max-listpack-value")
        except (StoreUnavailable, redis_errors.ResponseError):
            return  # CONFIG may be disabled (managed Redis): nothing to say
        value = next(iter(found.values()), None)
        if value is not None and int(value) < LISTPACK_VALUE:
            log.warning(
                "Redis hash-max-listpack-value is %s: queued messages take about twice the "
                "memory; set it to %d (the embedded Redis does)",
                as_text(value),
                LISTPACK_VALUE,
            )

    async def server_time_ms(self) -> float:
        """The server's clock (TIME), in milliseconds."""
        with unavailable_on_redis_errors():
            seconds, micros = await self.redis.time()
        return seconds * 1000.0 + micros / 1000.0

    async def ping(self) -> bool:
        try:
            with unavailable_on_redis_errors():
                return bool(await self.redis.ping())
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()
