"""The Lua scripts, loaded once per client and run by SHA.

Each script is `keys.lua_prelude()` + `lua/lib.lua` + `lua/<name>.lua`. A call is EVALSHA, and
the script is loaded again when the server answers NOSCRIPT (after a restart or a SCRIPT
FLUSH), so it is sent in full only once per server. Calls go straight to `execute_command`:
redis-py's `Script.__call__` and `evalsha` wrappers cost as much client CPU as the call itself
on the drain's hot path.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from gateway import keys

NAMES = (
    "push",
    "status",
    "cancel",
    "number_put",
    "purge",
    "take",
    "settle",
    "claim",
    "members",
    "gauges",
    "callback_claim",
    "callback_done",
    "receipts",
    "fleet",
)


def source(name: str) -> str:
    lua = resources.files("gateway.store") / "lua"
    return keys.lua_prelude() + (lua / "lib.lua").read_text() + (lua / f"{name}.lua").read_text()


class Scripts:
    """One attribute per script; call it with `(shard, args)`."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source(name)) for name in NAMES
        }

    def get(self, name: str) -> AsyncScript:
        return self._scripts[name]

    async def run(self, name: str, shard: int, args: list[Any]) -> Any:
        return await self._call(name, [keys.prefix(shard)], args)

    async def run_on(self, name: str, shards: list[int], args: list[Any]) -> Any:
        """Run a script that takes the prefixes of several shards (`push`, `settle`)."""
        return await self._call(name, [keys.prefix(s) for s in shards], args)

    async def run_at(self, name: str, prefix: str, args: list[Any]) -> Any:
        """Run a script on keys of a prefix of their own (the fleet's: `fleet.lua`)."""
        return await self._call(name, [prefix], args)

    async def _call(self, name: str, prefixes: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        try:
            return await self._client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", script.sha, len(prefixes), *prefixes, *args
            )
        except NoScriptError:
            script.sha = await self._client.script_load(script.script)
            return await self._client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", script.sha, len(prefixes), *prefixes, *args
            )
