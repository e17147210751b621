"""The Lua scripts, loaded once per client and run by SHA.

Each script is `keys.lua_prelude()` + `lua/lib.lua` + `lua/<name>.lua`. redis-py's Script runs
EVALSHA and loads the script again when the server answers NOSCRIPT (after a restart or a
SCRIPT FLUSH), so a script is sent in full only once per server.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from gateway import keys

NAMES = ("push", "status", "cancel", "number_put", "purge", "take", "settle", "claim", "members")


def source(name: str) -> str:
    lua = resources.files("gateway.store") / "lua"
    return keys.lua_prelude() + (lua / "lib.lua").read_text() + (lua / f"{name}.lua").read_text()


class Scripts:
    """One attribute per script; call it with `(shard, args)`."""

    def __init__(self, client: Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source(name)) for name in NAMES
        }

    async def run(self, name: str, shard: int, args: list[Any]) -> Any:
        return await self._scripts[name](keys=[keys.prefix(shard)], args=args)

    async def run_on(self, name: str, shards: list[int], args: list[Any]) -> Any:
        """Run a script that takes the prefixes of several shards (only `push` does)."""
        return await self._scripts[name](keys=[keys.prefix(s) for s in shards], args=args)

    async def run_in(self, pipe: Pipeline, name: str, shard: int, args: list[Any]) -> None:
        """Queue a script call on a pipeline (redis-py loads it first if the server lacks it)."""
        await self._scripts[name](keys=[keys.prefix(shard)], args=args, client=pipe)
