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
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway import keys
from gateway.errors import StoreUnavailable
from gateway.settings import Settings, is_cluster_url
from gateway.store.cluster import ClusterScripts, connect_cluster
from gateway.store.durability import Durability
from gateway.store.packing import with_hiredis_packing
from gateway.store.scripts import NAMES, Scripts, source

log = logging.getLogger("gateway.store")

DURABLE_CONNECTIONS = 1024  # connections of the client whose calls wait for durability

# Message hashes keep their ~150-byte payload field in the compact encoding from this on.
LISTPACK_VALUE = 1024

_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    # a cluster between maps (a node failed, a failover under way, the map unreadable)
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
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


def connect(
    url: str,
    *,
    max_connections: int = 128,
    socket_timeout: float = 0.75,
    **extra: Any,
) -> Redis:
    """A client for `url` (redis://, rediss://, unix://, with password) with short timeouts.

    For `redis+cluster://` (`rediss+cluster://`) it is redis-py's cluster client
    (`gateway.store.cluster`), which answers the same commands for single keys; typed as
    `Redis` so that the code using plain commands is the same for both.
    """
    if is_cluster_url(url):
        return cast(
            Redis,
            connect_cluster(
                url, max_connections=max_connections, socket_timeout=socket_timeout, **extra
            ),
        )
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
    pool.connection_class = with_hiredis_packing(pool.connection_class)
    return Redis(connection_pool=pool)


class Store:
    """A Redis client, its loaded scripts and the deployment's shard count."""

    def __init__(self, client: Redis, settings: Settings) -> None:
        self.redis = client
        self.shards = settings.shards
        self.settings = settings
        # On a cluster every script call goes through `cluster` (one call per node).
        self.cluster: ClusterScripts | None = None
        if isinstance(client, RedisCluster):
            self.cluster = ClusterScripts(client, {name: source(name) for name in NAMES})
        self.scripts = Scripts(client)
        # What a 202 waits for; the waits run on a client of their own (`from_settings`).
        self.durability = Durability(settings.ack_durability, settings.ack_timeout)
        self.durable: Redis | None = None
        self.durable_cluster: ClusterScripts | None = None

    @classmethod
    def from_settings(cls, settings: Settings, url: str, **extra: Any) -> Store:
        store = cls(connect(url, **extra), settings)
        if store.durability.waits:
            # each call holds its connection for its wait: room for many webhooks and sends
            store.durable = connect(
                url,
                max_connections=DURABLE_CONNECTIONS,
                socket_timeout=settings.ack_timeout + 1.0,
                **extra,
            )
            if isinstance(store.durable, RedisCluster):
                sources = {name: source(name) for name in NAMES}
                store.durable_cluster = ClusterScripts(store.durable, sources)
        return store

    async def script(self, name: str, shard: int, args: list[Any], *, durable: bool = False) -> Any:
        """Run a script for one shard; `durable`: and wait for `GATEWAY_ACK_DURABILITY`."""
        if self.cluster is not None:
            return await self._one_node(name, [shard], args, durable=durable)
        with unavailable_on_redis_errors():
            if durable and self.durable is not None:
                script = self.scripts.get(name)
                return await self.durability.run(self.durable, script, [keys.prefix(shard)], args)
            return await self.scripts.run(name, shard, args)

    async def script_on(self, name: str, shards: list[int], args: list[Any]) -> Any:
        """One call of a script for several shards' prefixes: on a cluster, only for shards
        of one node (those `script_per_node` hands out); spanning nodes is a bug there."""
        if self.cluster is not None:
            return await self._one_node(name, shards, args)
        with unavailable_on_redis_errors():
            return await self.scripts.run_on(name, shards, args)

    async def script_at(self, name: str, prefix: str, args: list[Any]) -> Any:
        """Run a script on keys of a prefix of their own, outside every shard (the fleet's):
        one call, on a cluster to the node serving that prefix."""
        with unavailable_on_redis_errors():
            if self.cluster is not None:
                return await self.cluster.run_at(name, prefix, args)
            return await self.scripts.run_at(name, prefix, args)

    async def script_per_node(
        self,
        name: str,
        shards: list[int],
        build: Callable[[list[int]], list[Any]],
        *,
        durable: bool = False,
        patient: bool = True,
    ) -> list[tuple[list[int], Any]]:
        """Run a script that takes many shards, one call per node serving some of them.

        `build(part)` is the ARGV for the shards `part` (in that order). Returns (part,
        reply) per call. On one Redis node that is one call for all of `shards`, and Redis
        failing raises `StoreUnavailable` as `script_on` does; on a cluster a node that fails
        gives (part, StoreUnavailable) instead, the other nodes' replies standing: the caller
        merges the replies and decides what the failed part means. `durable`: each call also
        waits for `GATEWAY_ACK_DURABILITY` (see `gateway.store.durability`). `patient`: see
        `ClusterScripts.run_groups`.
        """
        if self.cluster is None:
            with unavailable_on_redis_errors():
                if durable and self.durable is not None:
                    script = self.scripts.get(name)
                    prefixes = [keys.prefix(s) for s in shards]
                    reply = await self.durability.run(self.durable, script, prefixes, build(shards))
                    return [(shards, reply)]
                return [(shards, await self.scripts.run_on(name, shards, build(shards)))]
        # (the groups' own errors come back in their results; this is reading the slot map)
        with unavailable_on_redis_errors():
            if durable and self.durable_cluster is not None:
                return await self.durable_cluster.run_groups(
                    name, shards, build, _as_unavailable, patient=patient, wait=self.durability
                )
            return await self.cluster.run_groups(
                name, shards, build, _as_unavailable, patient=patient
            )

    def node_parts(self, shards: list[int]) -> list[list[int]]:
        """`shards` by the node serving them, as the slot map is known now (one node: one)."""
        if self.cluster is None:
            return [shards]
        groups, lost = self.cluster.groups(shards)
        return [part for _, part in groups] + ([lost] if lost else [])

    async def _one_node(
        self, name: str, shards: list[int], args: list[Any], *, durable: bool = False
    ) -> Any:
        assert self.cluster is not None
        with unavailable_on_redis_errors():
            if durable and self.durable_cluster is not None:
                results = await self.durable_cluster.run_groups(
                    name, shards, lambda _: args, _as_unavailable, wait=self.durability
                )
            else:
                results = await self.cluster.run_groups(
                    name, shards, lambda _: args, _as_unavailable
                )
        if len(results) != 1:
            failed = [o for _, o in results if isinstance(o, BaseException)]
            if failed:
                raise failed[0]
            raise AssertionError(f"script {name} called for shards of several cluster nodes")
        outcome = results[0][1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def pipelined(self, build: Callable[[Pipeline], Awaitable[None] | None]) -> list[Any]:
        """Run the commands `build` queues in one round trip (not a transaction).

        redis-py retries a single command on a dropped connection but not a pipeline, so a
        pipeline that meets a connection Redis closed (it restarted) is built and sent once
        more; one that timed out is not (see the module's docstring).
        """
        if self.cluster is not None:
            return await self._cluster_pipelined(build)
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

    async def _cluster_pipelined(
        self, build: Callable[[Pipeline], Awaitable[None] | None]
    ) -> list[Any]:
        """redis-py's cluster pipeline (a round trip per node, MOVED/ASK followed per
        command), which refuses TIME: a TIME is asked of one node apart, its reply put back in
        its place."""
        pipe = _TimedPipeline(self.redis.pipeline())
        queued = build(cast(Pipeline, pipe))
        if queued is not None:
            await queued
        with unavailable_on_redis_errors():
            replies = list(await pipe.pipe.execute())
            for extra, position in enumerate(pipe.times):
                replies.insert(position + extra, await self.redis.time())
        return replies

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
        await close_client(self.redis)
        if self.durable is not None:
            await close_client(self.durable)


class _TimedPipeline:
    """A cluster pipeline that notes where TIME was asked for (see `_cluster_pipelined`)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.times: list[int] = []

    def time(self) -> _TimedPipeline:
        self.times.append(len(self.pipe))
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


async def close_client(client: Redis) -> None:
    """Close a client of `connect` (a cluster client has no single pool)."""
    await client.aclose()
    if not isinstance(client, RedisCluster):
        await client.connection_pool.disconnect()


def _as_unavailable(error: BaseException) -> BaseException:
    """A Redis error of one cluster node as the gateway's (bugs stay as they are)."""
    try:
        with unavailable_on_redis_errors():
            raise error
    except BaseException as exc:  # the translation, returned rather than raised
        return exc
    raise AssertionError("unreachable")
