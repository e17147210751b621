"""The accept path: valid messages into their numbers' lanes, one script call at a time.

A batch groups its valid messages by number and queues them all with one `push` call; that is
what makes a batch far cheaper per message than single sends. Single sends arriving together are
coalesced the same way (see `Acceptor._coalesced`); a send with an Idempotency-Key is one `push`
of its own (after the key's marker).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import ids, keys, metrics
from gateway.accept.validation import Outbound, parse_message
from gateway.errors import (
    ApiError,
    FieldProblem,
    backlog_full,
    invalid_request,
    phone_number_deleted,
    unknown_phone_number,
)
from gateway.settings import Settings
from gateway.store import Store, as_text, unavailable_on_redis_errors

IDEMPOTENCY_TTL_S = 86_400
MAX_IDEMPOTENCY_KEY = 255
MAX_BATCH = 1000


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key, scoped to the API key that sent it."""

    scope: str
    key: str

    @classmethod
    def from_header(cls, value: str, api_key: str) -> Idempotency:
        if not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY:
            raise invalid_request([FieldProblem("Idempotency-Key", "must be 1-255 characters")])
        scope = hashlib.sha256(api_key.encode()).hexdigest()[:16]
        return cls(scope, value)


@dataclass(frozen=True)
class Accepted:
    id: str
    phone_number_id: str
    replayed: bool = False

    def body(self) -> dict[str, str]:
        return {"id": self.id, "status": "queued", "phone_number_id": self.phone_number_id}


def _group_error(code: str, pn: str, limit: int) -> ApiError:
    if code == "unknown":
        return unknown_phone_number(pn)
    if code == "deleted":
        return phone_number_deleted(pn)
    return backlog_full(pn, limit)


class Acceptor:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.max_backlog = settings.max_backlog
        self._waiting: list[tuple[Outbound, asyncio.Future[Accepted]]] = []
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def send(self, body: Any, idempotency: Idempotency | None) -> Accepted:
        message = parse_message(body)
        if idempotency is not None:
            return await self._send_idempotent(body, message, idempotency)
        return await self._coalesced(message)

    async def _coalesced(self, message: Outbound) -> Accepted:
        """Queue one message, sharing a `push` call with the sends of the same loop turn.

        Under load many single sends arrive in one turn of the event loop; they wait for that
        turn to end and go to Redis together in one `push`, so a single send costs
        about what a message of a batch costs. Alone, a send waits for nothing but that turn.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Accepted] = loop.create_future()
        self._waiting.append((message, done))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await done

    def _flush(self) -> None:
        self._flush_scheduled = False
        waiting, self._waiting = self._waiting, []
        task = asyncio.create_task(self._push_waiting(waiting))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _push_waiting(self, entries: list[tuple[Outbound, asyncio.Future[Accepted]]]) -> None:
        groups: dict[str, list[tuple[int, Outbound]]] = defaultdict(list)
        for index, (message, _) in enumerate(entries):
            groups[message.phone_number_id].append((index, message))
        try:
            message_ids, outcome = await self._push(groups)
        except Exception as exc:  # handed to every waiting request (StoreUnavailable, mostly)
            for _, done in entries:
                if not done.done():
                    done.set_exception(exc)
            return
        for (pn, group), (code, accepted, tier) in zip(groups.items(), outcome, strict=True):
            for position, (index, message) in enumerate(group):
                done = entries[index][1]
                if done.done():
                    continue  # the client went away; the message is queued all the same
                if position < accepted:
                    metrics.local_accepted.inc(message.category, tier)
                    done.set_result(Accepted(message_ids[index], pn))
                else:
                    done.set_exception(_group_error(code, pn, self.max_backlog))

    async def _send_idempotent(
        self, body: Any, message: Outbound, idempotency: Idempotency
    ) -> Accepted:
        pn = message.phone_number_id
        shard = keys.shard_of(pn, self.store.shards)
        message_id = ids.new_id(shard)
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        marker = await self._claim_key(idempotency, pn, digest)
        idem_args = [idempotency.scope, idempotency.key, digest, IDEMPOTENCY_TTL_S]
        reply = await self.store.script(
            "push",
            shard,
            [self.max_backlog, *idem_args, 1, pn, 1, *_message_args(message_id, message)],
        )
        outcome = reply[0].decode()
        if outcome == "replay":
            return Accepted(reply[1].decode(), pn, replayed=True)
        if outcome == "conflict":
            raise _idempotency_conflict()
        accepted, tier = int(reply[1]), reply[2].decode()
        if outcome != "ok" or accepted == 0:
            await self._release_key(marker)
            raise _group_error(outcome, pn, self.max_backlog)
        metrics.local_accepted.inc(message.category, tier)
        return Accepted(message_id, pn)

    async def _claim_key(self, idempotency: Idempotency, pn: str, digest: str) -> str:
        """Bind the key to this number and body for 24 h; 409 when it is bound to another.

        The key's record of the first response lives in the number's shard (so `push` reads it
        atomically); this marker catches the same key reused for another number.
        """
        marker = keys.idempotency_marker(idempotency.scope, idempotency.key)
        value = f"{pn} {digest}"
        with unavailable_on_redis_errors():
            previous = await self.store.redis.set(
                marker, value, nx=True, get=True, ex=IDEMPOTENCY_TTL_S
            )
        if isinstance(previous, (bytes, str)) and as_text(previous) != value:
            raise _idempotency_conflict()
        return marker

    async def _release_key(self, marker: str) -> None:
        # A refused first request must not bind the key: the caller may fix it and retry.
        with unavailable_on_redis_errors():
            await self.store.redis.delete(marker)

    async def send_batch(self, body: Any) -> dict[str, Any]:
        messages = _batch_messages(body)
        results: list[dict[str, Any] | None] = [None] * len(messages)
        groups: dict[str, list[tuple[int, Outbound]]] = defaultdict(list)
        for index, raw in enumerate(messages):
            try:
                message = parse_message(raw)
            except ApiError as exc:
                results[index] = exc.body()
                continue
            groups[message.phone_number_id].append((index, message))
        total = 0
        if groups:
            message_ids, outcome = await self._push(groups)
            for (pn, group), (code, accepted, tier) in zip(groups.items(), outcome, strict=True):
                for position, (index, message) in enumerate(group):
                    if position < accepted:
                        results[index] = {"id": message_ids[index], "status": "queued"}
                        metrics.local_accepted.inc(message.category, tier)
                    else:
                        results[index] = _group_error(code, pn, self.max_backlog).body()
                total += accepted
        return {"accepted": total, "rejected": len(messages) - total, "results": results}

    async def _push(
        self, groups: dict[str, list[tuple[int, Outbound]]]
    ) -> tuple[dict[int, str], list[tuple[str, int, str]]]:
        """Queue the messages of every group (a number's messages) in one `push` call.

        One call covers every shard involved: on the single Redis node the gateway runs on,
        a call per shard costs a round trip and ~40 µs of client CPU each, which made a batch
        or a burst of single sends spread over many shards several times slower. Keys stay
        hash-tagged by shard, so splitting this call per shard is all a cluster would need.
        """
        shard_count = self.store.shards
        group_shards = [keys.shard_of(pn, shard_count) for pn in groups]
        fresh = iter(
            ids.ids_for([s for s, g in zip(group_shards, groups.values(), strict=True) for _ in g])
        )
        shard_keys: dict[int, int] = {}
        message_ids: dict[int, str] = {}
        args: list[Any] = [self.max_backlog, "", "", "", 0]
        for shard, (pn, group) in zip(group_shards, groups.items(), strict=True):
            key_index = shard_keys.setdefault(shard, len(shard_keys) + 1)
            args += [key_index, pn, len(group)]
            for index, message in group:
                message_id = next(fresh)
                message_ids[index] = message_id
                args += _message_args(message_id, message)
        reply = await self.store.script_on("push", list(shard_keys), args)
        outcome = [
            (reply[i].decode(), int(reply[i + 1]), reply[i + 2].decode())
            for i in range(0, len(reply), 3)
        ]
        return message_ids, outcome


def _message_args(message_id: str, message: Outbound) -> list[Any]:
    return [
        message_id,
        message.lane_list,
        message.category,
        message.payload,
        message.reference,
        message.ttl_seconds,
    ]


def _batch_messages(body: Any) -> list[Any]:
    if not isinstance(body, dict):
        raise invalid_request([FieldProblem("body", "must be a JSON object")])
    extra = [name for name in body if name != "messages"]
    if extra:
        raise invalid_request([FieldProblem(name, "is not a field of a batch") for name in extra])
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_BATCH:
        raise invalid_request([FieldProblem("messages", "must be a list of 1 to 1000 messages")])
    return messages


def _idempotency_conflict() -> ApiError:
    return ApiError(
        409,
        "idempotency_conflict",
        "This Idempotency-Key was already used with a different request body.",
    )
