"""The gateway on a Redis Cluster, through redis-py's own cluster client.

`GATEWAY_REDIS_URL=redis+cluster://host:port[,host:port…]` (`rediss+cluster://` with TLS; a
password as in `redis://`) names seed nodes; `redis.asyncio.cluster.RedisCluster` learns the
slot map from them, routes every plain command by its key, and follows MOVED/ASK. What it
cannot route is a script that takes many shards: each shard is its own slot (`{gw:sN}`), and
Redis refuses a command whose declared keys span slots (CROSSSLOT), even on one node and even
for a script flagged `allow-cross-slot-keys`. So on a cluster:

- A call that spans shards is split per node (`groups`, from the client's slot cache):
  one call per primary, concurrently, for the shards that node serves.
- Each call declares no keys; the shard prefixes travel first in ARGV (`n, n prefixes, ...`)
  and the script carries `#!lua flags=allow-cross-slot-keys`. A preamble moves them back into
  `KEYS`, so the scripts themselves are the same files as on one node.
- The preamble first touches each shard's slot (`EXISTS` of the prefix, a name no key has),
  by `redis.pcall`, before the script writes anything. A slot this node does not serve, or is
  migrating away (its keys may be half moved), makes the whole call refuse with
  `GWMOVED <indexes>`: nothing ran, so nothing is half done. The runner refreshes the slot
  map and runs the refused shards again in a call of their own (a slot being migrated pauses
  until its move ends, then is served whole by its new node); the others run again at once.
  (So a reshard needs nothing of the gateway; redis-cli's default of ten keys per MIGRATE is
  fine. The key named by a bare prefix must never exist.)
- A node that fails (connection refused, timed out, a failover under way) fails only its own
  group: the caller gets the other groups' replies and that group's `StoreUnavailable`. A
  timed-out call is not run again (see `connection.py`: it may still run); a refused one is.
- The servers need `cluster-require-full-coverage no`: with the default, every node refuses
  every command while one primary is down, and no shard could keep sending.

A script's effects are atomic per call, so per node; a reply merged from several nodes is the
sum of independent per-node steps, each of which keeps DESIGN.md's invariants on its own (a
number lives in one shard, so its rate window, lanes and messages are always on one node).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway import keys
from gateway.errors import StoreUnavailable
from gateway.settings import parse_cluster_url
from gateway.store.durability import Durability
from gateway.store.packing import with_hiredis_packing

log = logging.getLogger("gateway.store")

REFUSED = "GWMOVED"
# How often a refused shard is tried again before its caller hears StoreUnavailable, and the
# pause between tries (a slot migration of a busy shard takes a few hundred ms).
REFUSED_TRIES = 40
REFUSED_PAUSE_S = 0.025

# Before the script: take the shard prefixes from ARGV, check each shard's slot is served here.
PREAMBLE = """#!lua flags=allow-cross-slot-keys
local KEYS, ARGV = KEYS, ARGV
do
  local n = tonumber(ARGV[1])
  local prefixes, rest, away = {}, {}, {}
  for i = 1, n do
    prefixes[i] = ARGV[i + 1]
    local found = redis.pcall('EXISTS', prefixes[i])
    if type(found) == 'table' and found.err then away[#away + 1] = i end
  end
  if #away > 0 then return redis.error_reply('GWMOVED ' .. table.concat(away, ' ')) end
  for i = n + 2, #ARGV do rest[i - n - 1] = ARGV[i] end
  KEYS, ARGV = prefixes, rest
end
"""


class _Cluster(RedisCluster):
    """redis-py's cluster client, which reads the slot map before its first command, and whose
    nodes' connections pack commands with hiredis as the single-node client's do.

    redis-py 8.1 picks a command's node before it has read the slot map: a fresh client's
    keyed commands went to whatever node, and when many came at once (a process's first burst
    of requests) the reconnects after their MOVED answers broke the calls under way
    (`AttributeError` on a closed connection, "Connection closed by server"). `initialize`
    reads the map once (callers wait on its lock) and is a no-op after.

    Packing in Python was 3.5% of a worker draining 1,000 numbers on a cluster (py-spy). The
    nodes found by reading the slot map are made with the client's connection options
    (`get_connection_kwargs`); the seed nodes, only asked for the map, keep redis-py's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.get_connection_kwargs()
        plain = options["connection_class"]
        assert plain is not None
        options["connection_class"] = with_hiredis_packing(plain)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.initialize()
        return await super().execute_command(*args, **kwargs)


def connect_cluster(
    url: str, *, max_connections: int = 128, socket_timeout: float = 0.75, **extra: Any
) -> RedisCluster:
    """A cluster client for `url`, with the same short timeouts as a single-node client.

    It does not check the slots cover the whole keyspace: with one primary down (before its
    replica takes over) the shards on the other nodes keep working.
    """
    seeds, options = parse_cluster_url(url)
    return _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        require_full_coverage=False,
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=0.5,
        # a plain command is sent once more after a node failed, on a fresh slot map
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
        **options,
        **extra,
    )


class SlotMap:
    """Reads a cluster client's slot map again, at most every `STALE_REFRESH_S` unless forced.

    Calls go to nodes directly (`ClusterNode.execute_command`), not through the client's own
    `execute_command`: after a connection error that one re-reads the whole topology (and
    the server's COMMAND table, ~tens of ms of CPU) before its next command, on every node,
    which a failover turned into stalls of healthy nodes' sends. Here only the slot map is
    read, and not more often than that.
    """

    STALE_REFRESH_S = 0.25

    def __init__(self, client: RedisCluster) -> None:
        self.client = client
        self._at = -1e9

    async def refresh(self, *, force: bool = False) -> bool:
        """Whether the map was read (not too soon after the last time, and it answered)."""
        now = time.monotonic()
        if not force and now - self._at < self.STALE_REFRESH_S:
            return False
        self._at = now
        try:
            await self.client.nodes_manager.initialize()
        except (redis_errors.RedisError, OSError) as exc:
            log.warning("cluster slot map not refreshed: %s", exc)
            return False
        return True

    def node_of(self, slot: int) -> ClusterNode | None:
        serving = self.client.nodes_manager.slots_cache.get(slot)
        return serving[0] if serving else None


class Refused(Exception):
    """A node served none of a call: these shards' slots are not (all) its own."""

    def __init__(self, positions: list[int]) -> None:
        super().__init__(positions)
        self.positions = positions


class ClusterScripts:
    """Runs the gateway's scripts on a cluster, one call per node (see the module's text)."""

    def __init__(self, client: RedisCluster, sources: dict[str, str]) -> None:
        self.client = client
        self._sources = {name: PREAMBLE + text for name, text in sources.items()}
        self._shas: dict[str, str] = {}
        self._slots: dict[int, int] = {}
        self.slots = SlotMap(client)
        self._stale = False

    def slot_of(self, shard: int) -> int:
        slot = self._slots.get(shard)
        if slot is None:
            slot = self._slots[shard] = self.client.keyslot(keys.prefix(shard))
        return slot

    async def _ready(self) -> None:
        if self._stale and await self.slots.refresh():
            self._stale = False
        # the first call reads the slot map (a no-op after)
        await self.client.initialize()

    def groups(
        self, shards: Sequence[int]
    ) -> tuple[list[tuple[ClusterNode, list[int]]], list[int]]:
        """The shards by the primary serving them; and those no known node serves."""
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        lost: list[int] = []
        slots = self.client.nodes_manager.slots_cache
        for shard in shards:
            serving = slots.get(self.slot_of(shard))
            if not serving:
                lost.append(shard)
                continue
            node = serving[0]
            entry = by_node.get(node.name)
            if entry is None:
                by_node[node.name] = (node, [shard])
            else:
                entry[1].append(shard)
        return list(by_node.values()), lost

    async def call(
        self,
        node: ClusterNode,
        name: str,
        shards: list[int],
        args: list[Any],
        wait: Durability | None = None,
    ) -> Any:
        """One script call on `node` for `shards` (their prefixes are prepended to ARGV);
        with `wait`, followed on the same connection by its durability wait."""
        return await self._call(node, name, [keys.prefix(s) for s in shards], args, wait)

    async def run_at(self, name: str, prefix: str, args: list[Any]) -> Any:
        """Run `name` on keys of a prefix of their own (the fleet's), on the node serving it.

        A node that fails raises as `call` does. A slot being migrated is refused, as for a
        take: tried once more on a fresh slot map, then `StoreUnavailable`.
        """
        await self._ready()
        slot = self.client.keyslot(prefix)
        for attempt in range(2):
            node = self.slots.node_of(slot)
            if node is not None:
                try:
                    return await self._call(node, name, [prefix], args)
                except Refused:
                    pass
            if attempt == 0:
                await self.slots.refresh(force=True)
        raise StoreUnavailable(f"no cluster node serves {prefix}")

    async def _call(
        self,
        node: ClusterNode,
        name: str,
        prefixes: list[str],
        args: list[Any],
        wait: Durability | None = None,
    ) -> Any:
        sha = self._shas.get(name)
        if sha is None:
            sha = self._shas[name] = _sha1(self._sources[name])
        argv = [len(prefixes), *prefixes, *args]
        try:
            try:
                return await _evalsha(node, sha, argv, wait)
            except redis_errors.ConnectionError as exc:
                if isinstance(exc, redis_errors.TimeoutError):
                    raise
                # a connection the node closed (it restarted): once more, on a new one
                return await _evalsha(node, sha, argv, wait)
        except redis_errors.NoScriptError:
            await node.execute_command("SCRIPT LOAD", self._sources[name])
            return await _evalsha(node, sha, argv, wait)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
            self._stale = True  # the node may be gone: read the slot map before the next call
            raise
        except redis_errors.ResponseError as exc:
            text = str(exc)
            if text.startswith(REFUSED):
                raise Refused([int(p) - 1 for p in text.split()[1:]]) from None
            raise

    async def run_groups(
        self,
        name: str,
        shards: Sequence[int],
        build: Callable[[list[int]], list[Any]],
        wrap: Callable[[BaseException], BaseException],
        *,
        patient: bool = True,
        wait: Durability | None = None,
    ) -> list[tuple[list[int], Any]]:
        """Run `name` for `shards`, one call per node, each with `build(its shards)` as ARGV.

        Returns (shards, reply) per call that ran, and (shards, exception) per group that
        failed (`wrap` turns a Redis error into the gateway's): the caller merges the replies
        and decides for the failed ones. A shard whose slot is being migrated is refused until
        the move ends: `patient` calls (a request's push, a settle) try it again for up to
        about a second; others (a take: its caller comes back soon anyway) give it up at
        once, so that no other shard's reply waits for it.
        """
        await self._ready()
        done: list[tuple[list[int], Any]] = []
        pending = list(shards)
        suspect: set[int] = set()  # refused once: called apart from the others
        tries = REFUSED_TRIES if patient else 2
        for attempt in range(tries):
            groups, lost = self.groups(pending)
            pending = []
            if lost:
                if attempt:  # no node serves them even in a fresh map
                    done.append((lost, StoreUnavailable(f"no cluster node serves {lost}")))
                else:
                    pending += lost
            calls: list[tuple[ClusterNode, list[int]]] = []
            for node, group in groups:
                calls += [
                    (node, part)
                    for part in (
                        [s for s in group if s not in suspect],
                        [s for s in group if s in suspect],
                    )
                    if part
                ]
            outcomes = await asyncio.gather(
                *(self._guarded(node, name, group, build, wait) for node, group in calls),
                return_exceptions=True,
            )
            moved = bool(lost)
            for (_, group), outcome in zip(calls, outcomes, strict=True):
                if isinstance(outcome, Refused):
                    # nothing ran; the shards this node does serve go again at once
                    suspect.update(group[p] for p in outcome.positions if 0 <= p < len(group))
                    pending += group
                    moved = True
                elif isinstance(outcome, BaseException):
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    done.append((group, wrap(outcome)))
                else:
                    done.append((group, outcome))
            if not pending:
                return done
            if moved:
                await self.slots.refresh(force=True)
            if attempt and attempt + 1 < tries:
                await asyncio.sleep(REFUSED_PAUSE_S * random.uniform(0.5, 1.5))
        done.append((pending, StoreUnavailable(f"cluster slots of shards {pending} not served")))
        return done

    async def _guarded(
        self,
        node: ClusterNode,
        name: str,
        group: list[int],
        build: Callable[[list[int]], list[Any]],
        wait: Durability | None = None,
    ) -> Any:
        return await self.call(node, name, group, build(group), wait)


async def _evalsha(node: ClusterNode, sha: str, argv: list[Any], wait: Durability | None) -> Any:
    """EVALSHA on `node`; with `wait`, and its WAIT or WAITAOF, in one round trip on one of
    the node's connections (a wait counts the writes of its own connection)."""
    if wait is None:
        return await node.execute_command("EVALSHA", sha, 0, *argv)
    commands = [PipelineCommand(0, "EVALSHA", sha, 0, *argv), PipelineCommand(1, *wait.command())]
    await node.execute_pipeline(commands)
    reply, waited = commands[0].result, commands[1].result
    if isinstance(reply, Exception):
        raise reply
    if isinstance(waited, Exception):
        raise waited
    if not wait.confirmed(waited):
        raise StoreUnavailable(f"{wait.mode} durability not confirmed within {wait.timeout_ms} ms")
    return reply


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()
