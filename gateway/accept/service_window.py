"""The 24-hour customer-service window, checked at accept (`GATEWAY_ENFORCE_SERVICE_WINDOW`).

Meta delivers a non-template message only to a user who wrote to the number in the last 24 h;
any other fails upstream with 131047. `gateway.receipts` keeps each user's last inbound time
per number in `in:<pn>:<user>`, expiring when the window it opened closes, so "inside" is "the
key exists". With enforcement on, such a send is refused at once (`422 outside_service_window`)
instead of being queued to fail. A request (single send or batch) costs one round trip for all
of its messages, and none when enforcement is off or every message is a template.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import orjson
from redis.asyncio.client import Pipeline

from gateway import keys
from gateway.accept.validation import Outbound
from gateway.errors import ApiError
from gateway.settings import Settings
from gateway.store import Store


class _Entry(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def message(self) -> Outbound: ...


E = TypeVar("E", bound=_Entry)


def outside_service_window(pn: str) -> ApiError:
    return ApiError(
        422,
        "outside_service_window",
        f"The recipient has not written to {pn} in the last 24 hours, so only a template "
        "message may be sent to them.",
    )


def _recipient(message: Outbound) -> str | None:
    """The user a non-template message goes to (no leading +), or None for a template."""
    payload = orjson.loads(message.payload)
    if payload.get("type") == "template":
        return None
    return str(payload["to"]).removeprefix("+")


class ServiceWindow:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.enforce = settings.enforce_service_window

    async def outside(self, messages: list[Outbound]) -> set[int]:
        """The positions in `messages` that the window refuses."""
        if not self.enforce:
            return set()
        shards = self.store.shards
        checked: list[tuple[int, str]] = []
        for position, message in enumerate(messages):
            user = _recipient(message)
            if user is not None:
                pn = message.phone_number_id
                checked.append((position, keys.inbound(keys.shard_of(pn, shards), pn, user)))
        if not checked:
            return set()

        def build(pipe: Pipeline) -> None:
            # one EXISTS per message, all in one round trip (an MGET would cross slots)
            for _, key in checked:
                pipe.exists(key)

        found: list[Any] = await self.store.pipelined(build)
        return {position for (position, _), n in zip(checked, found, strict=True) if not n}

    async def require(self, message: Outbound) -> None:
        """Raise `422 outside_service_window` when the window refuses this single send."""
        if self.enforce and await self.outside([message]):
            raise outside_service_window(message.phone_number_id)

    async def screen(self, entries: list[E], results: list[Any]) -> list[E]:
        """The entries the window lets through; a refused one gets its error in `results`."""
        refused = await self.outside([entry.message for entry in entries])
        for position in refused:
            entry = entries[position]
            results[entry.index] = outside_service_window(entry.message.phone_number_id).body()
        return [entry for position, entry in enumerate(entries) if position not in refused]
