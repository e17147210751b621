"""Registry operations on Redis: create, change, read, list and delete phone numbers.

A number's record and its drain state share one `cfg` hash; every change goes through the
`number_put` script, which also applies what the change means for the drain (a number becoming
active is marked ready, one leaving `active` is taken off the ready set). Deleting a number then
fails its queued messages in bounded chunks (`purge`), so Redis never blocks on a long queue.
"""

from __future__ import annotations

from typing import Any, cast

import orjson
from redis.asyncio.client import Pipeline

from gateway import keys, metrics
from gateway.clock import rfc3339
from gateway.errors import FieldProblem, invalid_request, not_found
from gateway.registry import model
from gateway.store import Store, unavailable_on_redis_errors

_TIER_RATES_ARG = ",".join(f"{name}={rate}" for name, rate in model.TIER_RATES.items())
_PURGE_CHUNK = 1000
DELETED_ERROR = orjson.dumps(
    {
        "code": "phone_number_deleted",
        "message": "The phone number was deleted before this message was sent.",
        "retryable": False,
    }
)
_LANE_FIGURES = (("high", "h"), ("normal", "n"), ("low", "l"))


def _text(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.headroom = store.settings.rate_headroom

    def _shard(self, pn: str) -> int:
        return keys.shard_of(pn, self.store.shards)

    async def _write(self, pn: str, mode: str, sets: dict[str, str], removes: list[str]) -> str:
        args: list[Any] = [pn, mode, _TIER_RATES_ARG, model.COEXISTENCE_CAP, len(sets)]
        for name, value in sets.items():
            args += [name, value]
        args += [len(removes), *removes]
        if mode == "put":
            args += [name for name in model.RECORD_FIELDS if name not in sets]
        if mode != "patch":
            with unavailable_on_redis_errors():
                await self.store.redis.zadd(keys.NUMBERS, {pn: 0})
        result, previous = await self.store.script("number_put", self._shard(pn), args)
        if sets.get("status") == "deleted" and previous != b"deleted":
            await self.purge(pn)
        return str(result.decode())

    async def put(self, pn: str, body: object) -> tuple[dict[str, Any], bool]:
        """Create or replace; True when it was created."""
        sets, removes = model.parse_changes(pn, body, replace=True)
        result = await self._write(pn, "put", sets, removes)
        return await self._view_or_404(pn), result == "created"

    async def patch(self, pn: str, body: object) -> dict[str, Any]:
        sets, removes = model.parse_changes(pn, body, replace=False)
        if await self._write(pn, "patch", sets, removes) == "not_found":
            raise not_found("phone number")
        return await self._view_or_404(pn)

    async def upsert(self, pn: str, data: dict[str, Any]) -> None:
        """Change the fields `data` names, creating the number (with defaults) when absent."""
        known = {k: v for k, v in data.items() if k in model.RECORD_FIELDS}
        sets, removes = model.parse_changes(pn, known, replace=False)
        if not await self.exists(pn):
            for name, default in model.DEFAULTS.items():
                sets.setdefault(name, default)
        await self._write(pn, "upsert", sets, removes)

    async def change(self, pn: str, data: dict[str, Any]) -> bool:
        """Change an existing number; False when it is not registered."""
        sets, removes = model.parse_changes(pn, data, replace=False)
        return await self._write(pn, "patch", sets, removes) != "not_found"

    async def delete(self, pn: str) -> dict[str, Any]:
        """Mark deleted (which fails its queued messages); 404 when not registered."""
        if not await self.change(pn, {"status": "deleted"}):
            raise not_found("phone number")
        return await self._view_or_404(pn)

    async def purge(self, pn: str) -> int:
        """Fail every queued message of a deleted number; how many were failed."""
        total = 0
        retention = int(self.store.settings.status_retention)
        while True:
            remaining, failed = await self.store.script(
                "purge", self._shard(pn), [pn, _PURGE_CHUNK, retention, DELETED_ERROR]
            )
            total += int(failed)
            if int(remaining) == 0:
                break
        if total:
            metrics.MESSAGES_FAILED.labels("phone_number_deleted").inc(total)
        return total

    async def exists(self, pn: str) -> bool:
        with unavailable_on_redis_errors():
            return bool(await self.store.redis.exists(keys.cfg(self._shard(pn), pn)))

    async def get(self, pn: str) -> dict[str, Any] | None:
        views = await self.views([pn])
        return views[0]

    async def _view_or_404(self, pn: str) -> dict[str, Any]:
        found = await self.get(pn)
        if found is None:
            raise not_found("phone number")
        return found

    async def page(self, cursor: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """One page ordered by phone_number_id, and the cursor of the next page (None: last)."""
        if cursor is not None and model.phone_number_id_problem(cursor) is not None:
            raise invalid_request([FieldProblem("cursor", "is not a cursor this API returned")])
        start = f"({cursor}" if cursor else "-"
        with unavailable_on_redis_errors():
            page = await self.store.redis.zrange(
                keys.NUMBERS, start, "+", bylex=True, offset=0, num=limit + 1
            )
        pns = [pn.decode() for pn in cast(list[bytes], page)]
        more = len(pns) > limit
        pns = pns[:limit]
        views = [v for v in await self.views(pns) if v is not None]
        return views, (pns[-1] if more and pns else None)

    async def views(self, pns: list[str]) -> list[dict[str, Any] | None]:
        """Records with live figures, read in one round trip."""
        if not pns:
            return []

        def build(pipe: Pipeline) -> None:
            pipe.time()
            for pn in pns:
                shard = self._shard(pn)
                pipe.hgetall(keys.cfg(shard, pn))
                for lane_list in keys.LANE_LISTS:
                    pipe.llen(keys.lane(shard, pn, lane_list))
                pipe.zcard(keys.retry(shard, pn))
                pipe.hgetall(keys.sent(shard, pn))

        replies = await self.store.pipelined(build)
        now_s = int(replies[0][0])
        per_number = 3 + len(keys.LANE_LISTS)
        out: list[dict[str, Any] | None] = []
        for index, pn in enumerate(pns):
            base = 1 + index * per_number
            record = _text(replies[base])
            if not record:
                out.append(None)
                continue
            lengths = dict(zip(keys.LANE_LISTS, replies[base + 1 : base + 7], strict=True))
            retry_waiting = int(replies[base + 7])
            sent = replies[base + 8]
            out.append(
                self._view(
                    pn,
                    record=record,
                    lengths=lengths,
                    retry_waiting=retry_waiting,
                    sent=sent,
                    now_s=now_s,
                )
            )
        return out

    def _view(
        self,
        pn: str,
        *,
        record: dict[str, str],
        lengths: dict[str, int],
        retry_waiting: int,
        sent: dict[bytes, bytes],
        now_s: int,
    ) -> dict[str, Any]:
        depth: dict[str, int] = {}
        for name, lane in _LANE_FIGURES:
            n = 0
            for lane_list in (lane, lane + "m"):
                # dead entries (d_) are in the lists; parked messages (p_, see lib.lua) are not
                n += (
                    int(lengths[lane_list])
                    - int(record.get(f"d_{lane_list}", 0))
                    + int(record.get(f"p_{lane_list}", 0))
                )
            depth[name] = max(n, 0)
        rate = model.rate_in_force(int(record.get("rate", 0)), self.headroom)
        waiting = sum(depth.values()) + retry_waiting
        sent_last_minute = sum(
            int(count) for second, count in sent.items() if int(second) > now_s - 60
        )
        eta = None if rate is None else round(waiting / rate, 1)
        figures = {
            "queue_depth": depth,
            "retry_waiting": retry_waiting,
            "inflight": max(int(record.get("inflight", 0)), 0),
            "rate_limit_mps": rate,
            "sent_last_minute": sent_last_minute,
            "eta_seconds": eta,
            "created_at": rfc3339(record.get("created_at")),
            "updated_at": rfc3339(record.get("updated_at")),
        }
        return model.view(pn, record, figures)
