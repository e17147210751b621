"""The accept path: valid messages into their numbers' lanes, one script call at a time.

A batch groups its valid messages by number and queues them all with one `push` call; that is
what makes a batch far cheaper per message than single sends. Single sends arriving together are
coalesced the same way (see `Acceptor._coalesced`); a send with an Idempotency-Key is one `push`
of its own (after the key's marker).

Idempotency is what makes a `503` safe to retry: Redis may still apply a write whose answer
never came back. A key's record is written by `push` itself, atomically with its message, so a
retry with the same key finds the message whenever the first attempt landed, and queues nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline

from gateway import ids, keys, metrics
from gateway.accept.service_window import ServiceWindow
from gateway.accept.validation import (
    Outbound,
    body_digest,
    idempotency_key_problem,
    parse_message,
)
from gateway.callbacks.urls import CallbackPolicy
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
MAX_BATCH = 1000


def key_scope(api_key: str) -> str:
    """The scope of idempotency keys: each API key has its own."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key, scoped to the API key that sent it."""

    scope: str
    key: str

    @classmethod
    def from_header(cls, value: str, api_key: str) -> Idempotency:
        # aiohttp hands over bytes that are not UTF-8 as surrogates: refused here, before they
        # reach a Redis key name.
        why = idempotency_key_problem(value)
        if why is not None:
            raise invalid_request([FieldProblem("Idempotency-Key", why)])
        return cls(key_scope(api_key), value)


@dataclass(frozen=True)
class Accepted:
    id: str
    phone_number_id: str
    replayed: bool = False
    scheduled: bool = False

    def body(self) -> dict[str, str]:
        status = "scheduled" if self.scheduled else "queued"
        return {"id": self.id, "status": status, "phone_number_id": self.phone_number_id}


def accepted_status(message: Outbound) -> str:
    """The status a send answers with: `scheduled` when it has a `send_at` (a replay too)."""
    return "scheduled" if message.send_at_ms else "queued"


@dataclass(slots=True)
class _Pending:
    """A valid message on its way to `push`: its place in the request, and its key if any."""

    index: int
    message: Outbound
    key: str = ""
    digest: str = ""

    @property
    def marker_value(self) -> str:
        return f"{self.message.phone_number_id} {self.digest}"


Groups = dict[str, list[_Pending]]
# What `push` did with each message, by index: its id (queued, or replayed when the index is
# in the set of replays) or the error it was refused with.
Outcome = tuple[dict[int, str | ApiError], set[int]]


def _group_error(code: str, pn: str, limit: int) -> ApiError:
    if code == "unknown":
        return unknown_phone_number(pn)
    if code == "deleted":
        return phone_number_deleted(pn)
    return backlog_full(pn, limit)


def _grouped(pending: list[_Pending]) -> Groups:
    groups: Groups = defaultdict(list)
    for entry in pending:
        groups[entry.message.phone_number_id].append(entry)
    return groups


class Acceptor:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.max_backlog = settings.max_backlog
        self.window = ServiceWindow(store, settings)
        # Parsed once; a bad allow list or default URL stops the process at start (ConfigError).
        self.callbacks = CallbackPolicy.from_settings(settings)
        self._waiting: list[tuple[Outbound, asyncio.Future[Accepted]]] = []
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def send(self, body: Any, idempotency: Idempotency | None) -> Accepted:
        message = parse_message(body, callbacks=self.callbacks)
        await self.window.require(message)
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
        pending = [_Pending(index, message) for index, (message, _) in enumerate(entries)]
        failed: dict[int, Exception] = {}
        try:
            outcome, _ = await self._push(_grouped(pending), "", failed)
        except Exception as exc:  # handed to every waiting request (StoreUnavailable, mostly)
            for _, done in entries:
                if not done.done():
                    done.set_exception(exc)
            return
        for index, (_, done) in enumerate(entries):
            if done.done():
                continue  # the client went away; the message is queued all the same
            if index in failed:  # its Redis Cluster node failed; the others' sends stand
                done.set_exception(failed[index])
                continue
            result = outcome[index]
            if isinstance(result, str):
                message = pending[index].message
                done.set_result(
                    Accepted(result, message.phone_number_id, scheduled=bool(message.send_at_ms))
                )
            else:
                done.set_exception(result)

    async def _send_idempotent(
        self, body: Any, message: Outbound, idempotency: Idempotency
    ) -> Accepted:
        entry = _Pending(0, message, idempotency.key, body_digest(body))
        if await self._claim_keys(idempotency.scope, [entry]):
            raise _idempotency_conflict()
        outcome, replays = await self._push(_grouped([entry]), idempotency.scope)
        result = outcome[0]
        if isinstance(result, str):
            return Accepted(
                result,
                message.phone_number_id,
                replayed=0 in replays,
                scheduled=bool(message.send_at_ms),
            )
        if result.code != "idempotency_conflict":
            await self._release_keys(idempotency.scope, [entry])
        raise result

    async def _claim_keys(self, scope: str, entries: list[_Pending]) -> set[int]:
        """Bind each key to its number and body for 24 h; the indexes of keys bound to others.

        A key's record of the first response lives in its number's shard, where `push` reads
        and writes it atomically with the message; these markers, all set in one round trip,
        catch a key reused for another number (whose shard holds no record of it).
        """

        def build(pipe: Pipeline) -> None:
            for entry in entries:
                marker = keys.idempotency_marker(scope, entry.key)
                pipe.set(marker, entry.marker_value, nx=True, get=True, ex=IDEMPOTENCY_TTL_S)

        replies = await self.store.pipelined(build)
        return {
            entry.index
            for entry, previous in zip(entries, replies, strict=True)
            if isinstance(previous, (bytes, str)) and as_text(previous) != entry.marker_value
        }

    async def _release_keys(self, scope: str, entries: list[_Pending]) -> None:
        # A refused first request must not bind its key: the caller may fix it and retry.
        markers = {keys.idempotency_marker(scope, entry.key) for entry in entries}
        with unavailable_on_redis_errors():
            await self.store.redis.delete(*markers)

    async def send_batch(self, body: Any, api_key: str = "") -> dict[str, Any]:
        """Queue a batch: every valid message, each answered on its own, in request order.

        A message's `idempotency_key` costs its batch one round trip for all of the keys (the
        markers), and nothing per message beyond a digest of its body.
        """
        messages = _batch_messages(body)
        results: list[dict[str, Any] | None] = [None] * len(messages)
        pending: list[_Pending] = []
        keyed: list[_Pending] = []
        for index, raw in enumerate(messages):
            try:
                message = parse_message(raw, in_batch=True, callbacks=self.callbacks)
            except ApiError as exc:
                results[index] = exc.body()
                continue
            if message.idempotency_key:
                entry = _Pending(index, message, message.idempotency_key, body_digest(raw))
                keyed.append(entry)
            else:
                entry = _Pending(index, message)
            pending.append(entry)
        pending = await self.window.screen(pending, results)
        keyed = [entry for entry in keyed if results[entry.index] is None]
        scope = ""
        if keyed:
            scope = key_scope(api_key)
            conflicts = await self._claim_keys(scope, keyed)
            if conflicts:
                for index in conflicts:
                    results[index] = _idempotency_conflict().body()
                pending = [entry for entry in pending if entry.index not in conflicts]
        total = 0
        release: list[_Pending] = []
        if pending:
            outcome, replays = await self._push(_grouped(pending), scope)
            for entry in pending:
                result = outcome[entry.index]
                if isinstance(result, str):
                    status = accepted_status(entry.message)
                    if entry.index in replays:
                        results[entry.index] = {"id": result, "status": status, "replayed": True}
                    else:
                        results[entry.index] = {"id": result, "status": status}
                    total += 1
                else:
                    results[entry.index] = result.body()
                    if entry.key and result.code != "idempotency_conflict":
                        release.append(entry)
        if release:
            await self._release_keys(scope, release)
        return {"accepted": total, "rejected": len(messages) - total, "results": results}

    async def _push(
        self, groups: Groups, scope: str, failed: dict[int, Exception] | None = None
    ) -> Outcome:
        """Queue the messages of every group (a number's messages) in one `push` call.

        One call covers every shard involved: on the single Redis node the gateway runs on,
        a call per shard costs a round trip and ~40 µs of client CPU each, which made a batch
        or a burst of single sends spread over many shards several times slower. On a Redis
        Cluster it is one call per node (`Store.script_per_node`). Returns each message's
        outcome by its index (see `Outcome`). When a cluster node fails, its messages' error
        goes in `failed` by index if given (coalesced single sends are each their own request),
        else it is raised (a batch is one request: its answer is `503`, the outcome unknown).
        """
        shard_count = self.store.shards
        group_shards = [keys.shard_of(pn, shard_count) for pn in groups]
        fresh = iter(
            ids.ids_for([s for s, g in zip(group_shards, groups.values(), strict=True) for _ in g])
        )
        message_ids: dict[int, str] = {}
        by_shard: dict[int, list[list[Any]]] = {}  # shard -> its groups' args (push.lua)
        numbers: dict[int, list[str]] = {}
        for shard, (pn, group) in zip(group_shards, groups.items(), strict=True):
            numbers.setdefault(shard, []).append(pn)
            args = [pn, len(group)]
            by_shard.setdefault(shard, []).append(args)
            for entry in group:
                message_id = next(fresh)
                message_ids[entry.index] = message_id
                message = entry.message
                args += [
                    message_id,
                    message.lane_list,
                    message.category,
                    message.payload,
                    message.recipient,
                ]
                extras = (
                    message.reference,
                    message.ttl_seconds,
                    entry.key,
                    entry.digest,
                    message.callback_url,
                    message.send_at_ms,
                )
                # (most messages have none: each value costs the script as much as a write)
                if any(extras):
                    args += [len(extras), *extras]
                else:
                    args.append(0)

        def args_for(part: list[int]) -> list[Any]:
            args: list[Any] = [self.max_backlog, scope, IDEMPOTENCY_TTL_S]
            for key_index, shard in enumerate(part, start=1):
                for group_args in by_shard[shard]:
                    args.append(key_index)
                    args += group_args
            return args

        # A reply has a run of values per number, in its call's order: by shard, then number.
        reply: list[Any] = []
        order: list[str] = []
        for part, part_reply in await self.store.script_per_node(
            "push", list(by_shard), args_for, durable=True
        ):
            if isinstance(part_reply, Exception):
                if failed is None:
                    raise part_reply
                for pn in (pn for shard in part for pn in numbers[shard]):
                    failed.update(dict.fromkeys((e.index for e in groups[pn]), part_reply))
                continue
            reply += part_reply
            order += [pn for shard in part for pn in numbers[shard]]
        outcome: dict[int, str | ApiError] = {}
        replays: set[int] = set()
        at = 0
        for pn in order:
            group = groups[pn]
            code, accepted, tier = reply[at].decode(), int(reply[at + 1]), reply[at + 2].decode()
            seen = {
                int(reply[b]): (reply[b + 1], reply[b + 2])
                for b in range(at + 4, at + 4 + 3 * int(reply[at + 3]), 3)
            }
            at += 4 + 3 * len(seen)
            queued = 0
            for position, entry in enumerate(group):
                earlier = seen.get(position)
                if earlier is not None:
                    kind, first_id = earlier
                    if kind == b"replay":
                        outcome[entry.index] = first_id.decode()
                        replays.add(entry.index)
                    else:
                        outcome[entry.index] = _idempotency_conflict()
                elif queued < accepted:
                    queued += 1
                    metrics.local_accepted.inc(entry.message.category, tier)
                    outcome[entry.index] = message_ids[entry.index]
                else:
                    outcome[entry.index] = _group_error(code, pn, self.max_backlog)
        return outcome, replays


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
        "This idempotency key was already used with a different request body.",
    )
