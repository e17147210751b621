"""What a `202` waits for: `GATEWAY_ACK_DURABILITY`.

- `primary` (default): the script that queued the message returned, so the Redis primary has it.
  A Redis crash may lose the last second of writes (`appendfsync everysec`), a failover the
  writes its replica had not received yet.
- `fsync`: `WAITAOF 1 0` after the script, on the same connection: the primary has written the
  message to its append-only file and fsynced it. A Redis SIGKILL right after loses none of them.
  Needs Redis 7.2 or valkey 8 with `appendonly yes`; the start is refused otherwise. With
  `appendfsync everysec` each answer waits for the next fsync (up to a second); with
  `appendfsync always` (what the embedded Redis uses in this mode) it does not wait.
- `replica`: `WAIT 1` after the script, on the same connection: a replica has it too, so a
  failover (the replica promoted) loses none of them.

The wait is bounded by `GATEWAY_ACK_TIMEOUT`; past it the call raises `StoreUnavailable`, the
API answers `503`, and the message stays queued: a retry with the same `Idempotency-Key`
answers with the first id. The wait shares the script's round trip (one pipeline) and runs on a
client of its own, whose socket timeout is above the wait.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from gateway.errors import ConfigError, StoreUnavailable

log = logging.getLogger("gateway.store")


class Durability:
    def __init__(self, mode: str, timeout_s: float) -> None:
        self.mode = mode
        self.timeout_ms = max(1, int(timeout_s * 1000))

    @property
    def waits(self) -> bool:
        return self.mode != "primary"

    def command(self) -> tuple[Any, ...]:
        if self.mode == "fsync":
            return ("WAITAOF", 1, 0, self.timeout_ms)
        return ("WAIT", 1, self.timeout_ms)

    def confirmed(self, reply: Any) -> bool:
        """Whether the wait's reply says the writes before it are durable."""
        if self.mode == "fsync":  # [local fsynced, replicas fsynced]
            return isinstance(reply, list) and bool(reply) and int(reply[0]) >= 1
        return isinstance(reply, int) and reply >= 1

    async def run(
        self, client: Redis, script: AsyncScript, prefixes: Sequence[str], args: Sequence[Any]
    ) -> Any:
        """Run `script` and wait for its writes to be durable, in one round trip."""
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", script.sha, len(prefixes), *prefixes, *args)
            pipe.execute_command(*self.command())
            reply, waited = await pipe.execute(raise_on_error=False)
            if isinstance(reply, redis_errors.NoScriptError) and attempt == 1:
                script.sha = await client.script_load(script.script)
                continue
            if isinstance(reply, Exception):
                raise reply
            if isinstance(waited, Exception):
                raise waited
            if not self.confirmed(waited):
                raise StoreUnavailable(
                    f"{self.mode} durability not confirmed within {self.timeout_ms} ms"
                )
            return reply
        raise AssertionError("unreachable")

    async def check_server(self, client: Redis) -> None:
        """Refuse a server that cannot keep the promise; warn of one that keeps it slowly."""
        if self.mode == "fsync":
            try:  # asks for nothing, so it answers at once where the command exists
                await client.execute_command("WAITAOF", 0, 0, 0)  # type: ignore[no-untyped-call]
            except redis_errors.ResponseError as exc:
                raise ConfigError(
                    "GATEWAY_ACK_DURABILITY=fsync needs WAITAOF (Redis 7.2 or later, valkey 7.2 "
                    f"or later); this Redis server refused it: {exc}"
                ) from exc
            appendonly = await _config(client, "appendonly")
            if appendonly == "no":
                raise ConfigError(
                    "GATEWAY_ACK_DURABILITY=fsync needs the Redis server's append-only file: "
                    "set appendonly yes"
                )
            if await _config(client, "appendfsync") not in (None, "always"):
                log.warning(
                    "GATEWAY_ACK_DURABILITY=fsync with appendfsync everysec: each 202 waits for "
                    "the next fsync, up to a second; appendfsync always answers at once"
                )
        elif self.mode == "replica":
            info = await client.info("replication")
            if "role" in info:
                replicas = int(info.get("connected_slaves", 0))
            else:  # a cluster client answers per node: the primary with the fewest counts
                primaries = [v for v in info.values() if isinstance(v, dict)]
                counts = [
                    int(v.get("connected_slaves", 0))
                    for v in primaries
                    if v.get("role") == "master"
                ]
                replicas = min(counts, default=0)
            if replicas < 1:
                log.warning(
                    "GATEWAY_ACK_DURABILITY=replica but the Redis primary has no replica: "
                    "sends are answered 503 until one is connected"
                )


async def _config(client: Redis, name: str) -> str | None:
    """A server setting, or None when CONFIG is disabled (managed Redis)."""
    try:
        found = await client.config_get(name)
    except redis_errors.ResponseError:
        return None
    value = found.get(name)
    return value.decode() if isinstance(value, bytes) else value
