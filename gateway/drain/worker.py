"""The drain worker: take due messages, send them upstream, settle what became of them.

One `Drain` runs in each worker process, as supervised tasks:
- ownership: renews this worker's shard leases (`gateway.drain.shards`);
- take loop: for each owned shard that is due, one `take` script call hands over messages
  within every number's rate; with nothing due it sleeps until the next due time or a wake
  token (no polling sleep);
- wake listener: BLPOP on the owned shards' wake lists, cutting the take loop's sleep short;
- senders: a fixed pool of `worker_concurrency` coroutines, each sending one message at a time;
- settle loop: outcomes are batched per shard into one `settle` call each.

Rate exactness: the take script stamps each grant with the Redis server's time and keeps every
window of 1 s + `GATEWAY_RATE_SLACK` at or under the number's rate. A granted message that
cannot start within half the slack of the take call is put back (and its grant given back), so
the gap between grant and arrival upstream varies by less than the slack and arrivals never
bunch into more than the rate in any one-second window. The other half of the slack absorbs
what happens after the check (the write, the network, the upstream's own scheduling).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import keys, metrics
from gateway.accept.validation import upstream_body
from gateway.drain.classify import Answer, Outcome
from gateway.drain.shards import ShardOwnership
from gateway.drain.upstream import CloudApi
from gateway.errors import StoreUnavailable
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store, as_text, connect, unavailable_on_redis_errors

log = logging.getLogger("gateway.drain")

PACE_MS = 10.0
MAX_NUMBERS_PER_TAKE = 64
UNLIMITED_CHUNK = 128
MAX_WAIT_S = 1.0
SWEEP_EVERY_S = 5.0
UPGRADE_HOLD_MS = 60_000
PAIR_RATE_FIRST_MS = 6_000
MAX_RETRY_MS = 300_000
SETTLE_BATCH = 1000
REFRESH_GRACE_S = 2.0


@dataclass(slots=True)
class Taken:
    """A message handed to this worker by `take`."""

    shard: int
    phone_number_id: str
    limit: int
    tier: str
    token: str | None
    id: str
    fence: str
    attempts: int
    payload: bytes
    created_ms: int
    expires_ms: int | None
    stamp: str
    taken_at: float


@dataclass(slots=True)
class Op:
    """One settle operation (see settle.lua) and the failure reason to count, if any."""

    kind: str
    id: str
    fence: str
    a: str = ""
    b: str = ""
    reason: str | None = None
    tier: str = ""


@dataclass(slots=True)
class TakeReply:
    now_ms: float
    next_due_ms: float  # -1: nothing scheduled in the shard
    items: list[Taken]
    expired: int
    rate_limited_tiers: list[str]
    deleted: int  # leased messages failed because their number was deleted


def parse_take(shard: int, reply: list[Any], taken_at: float) -> TakeReply:
    now_ms = float(reply[0])
    next_due = float(reply[1])
    expired, n_groups = int(reply[2]), int(reply[4])
    rate_limited = [tier for tier in reply[3].decode().split(",") if tier]
    stamp = reply[0].decode()
    deleted = int(reply[5])
    items: list[Taken] = []
    pos = 6
    for _ in range(n_groups):
        pn = reply[pos].decode()
        limit = int(reply[pos + 1])
        tier = reply[pos + 2].decode()
        token = reply[pos + 3].decode() or None
        count = int(reply[pos + 4])
        pos += 5
        for _ in range(count):
            expires = reply[pos + 5]
            items.append(
                Taken(
                    shard=shard,
                    phone_number_id=pn,
                    limit=limit,
                    tier=tier,
                    token=token,
                    id=reply[pos].decode(),
                    fence=str(int(reply[pos + 1])),
                    attempts=int(reply[pos + 2]),
                    payload=reply[pos + 3],
                    created_ms=int(reply[pos + 4]),
                    expires_ms=int(expires) if expires else None,
                    stamp=stamp,
                    taken_at=taken_at,
                )
            )
            pos += 6
    return TakeReply(now_ms, next_due, items, expired, rate_limited, deleted)


async def _finish(task: asyncio.Task[None], within_s: float) -> bool:
    """Wait for a task to end by itself; cancel it after `within_s`. True if it ended."""
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    return True


def retry_delay_ms(attempts: int, base_s: float) -> int:
    """Exponential backoff with jitter: ~base, doubling per attempt, capped at 5 minutes."""
    raw = base_s * 1000.0 * (2 ** max(attempts - 1, 0))
    return int(min(raw, MAX_RETRY_MS) * random.uniform(0.8, 1.2))


def pair_rate_delay_ms(attempts: int) -> int:
    raw = PAIR_RATE_FIRST_MS * (2 ** max(attempts - 1, 0))
    return int(min(raw, MAX_RETRY_MS) * random.uniform(0.9, 1.1))


def _error_json(code: object, message: str) -> str:
    return orjson.dumps({"code": code, "message": message, "retryable": False}).decode()


class Drain:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        api: CloudApi,
        *,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.api = api
        self.registry = Registry(store)
        self.worker_id = (
            worker_id or f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(24):06x}"
        )
        self.ownership = ShardOwnership(store, self.worker_id)
        assert settings.redis_url is not None
        # BLPOP blocks its connection: a client of its own, with a timeout above the longest wait.
        self.blocking = connect(
            settings.redis_url, max_connections=2, socket_timeout=MAX_WAIT_S + 2
        )
        self.concurrency = settings.worker_concurrency
        self.drop_back_s = settings.rate_slack / 2
        self.refill_at = max(1, min(64, self.concurrency // 8))
        # Messages taken and not yet settled or released, and the queue senders pull from.
        self.held = 0
        self.outbox: asyncio.Queue[Taken] = asyncio.Queue()
        self.senders: list[asyncio.Task[None]] = []
        self.chores: set[asyncio.Task[None]] = set()
        self.slot_freed = asyncio.Event()
        self.settle_queue: asyncio.Queue[Op | None] = asyncio.Queue()
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.woken: set[int] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.deleting: set[str] = set()
        self.redis_down = False
        self._stopped = False
        self._take_args = [
            0,
            MAX_NUMBERS_PER_TAKE,
            int(settings.lease_seconds * 1000),
            1000.0 + settings.rate_slack * 1000.0,
            PACE_MS,
            settings.rate_headroom,
            UNLIMITED_CHUNK,
            int(settings.status_retention),
        ]

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, on_fatal: Any = None) -> None:
        self._on_fatal = on_fatal
        self.loop = asyncio.get_running_loop()
        for name, coro in (
            ("drain-ownership", self.ownership.run(self.stopping)),
            ("drain-take", self._take_loop()),
            ("drain-settle", self._settle_loop()),
            ("drain-wake", self._wake_loop()),
        ):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(self._supervise)
            self.tasks.append(task)
        # A fixed pool of senders rather than a task per message: cheaper, and it bounds the
        # sends in flight to `worker_concurrency` by construction.
        for index in range(self.concurrency):
            sender = asyncio.create_task(self._sender(), name=f"drain-sender-{index}")
            sender.add_done_callback(self._supervise)
            self.senders.append(sender)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        log.critical(
            "background task %s died: %r; stopping this process", task.get_name(), exc, exc_info=exc
        )
        if self._on_fatal is not None:
            self._on_fatal()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking, let in-flight sends finish within the grace period, release the rest.

        Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        self.stopping.set()
        grace = self.settings.shutdown_grace if grace_s is None else grace_s
        ownership, take, settle, wake = self.tasks
        # The take loop notices `stopping` within one wait; a take in progress completes, so
        # nothing it was handed is left leased without a sender.
        await _finish(take, MAX_WAIT_S + 2.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.held and loop.time() < deadline:
            self.slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.slot_freed.wait(), deadline - loop.time())
        while not self.outbox.empty():  # handed over but never started: release
            item = self.outbox.get_nowait()
            self._settle(Op("Q", item.id, item.fence))
            self.held -= 1
        for sender in self.senders:
            sender.cancel()  # one still sending releases its message (settle op Q)
        await asyncio.gather(*self.senders, return_exceptions=True)
        if self.chores:
            await asyncio.wait(set(self.chores), timeout=5.0)
        self.settle_queue.put_nowait(None)  # the settle loop ends after what is queued before
        if not await _finish(settle, 10.0):
            log.error("outcomes left unsettled at exit; their leases will run out")
        await _finish(ownership, REFRESH_GRACE_S)
        await _finish(wake, MAX_WAIT_S + 2.0)
        await self.ownership.leave()
        await self.blocking.aclose()
        await self.blocking.connection_pool.disconnect()

    # -- taking ----------------------------------------------------------------------------

    async def _owned_shards(self) -> list[int]:
        """The shards this worker drains; with none, wait (up to a second) for some."""
        owned = sorted(self.ownership.owned)
        if not owned:
            self.ownership.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ownership.changed.wait(), MAX_WAIT_S)
        return owned

    async def _take_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due_at: dict[int, float] = {}
        last_sweep = loop.time()
        while not self.stopping.is_set():
            owned = await self._owned_shards()
            if not owned:
                continue
            now = loop.time()
            if now - last_sweep >= SWEEP_EVERY_S:
                # A safety net for a lost wake token (e.g. Redis restarted without its data).
                last_sweep = now
                due_at.clear()
            for shard in self.woken:
                due_at[shard] = 0.0
            self.woken.clear()
            due = [s for s in owned if due_at.get(s, 0.0) <= now]
            if not due:
                soonest = min(due_at[s] for s in owned)
                await self._wait_for_wake(min(max(soonest - now, 0.0005), MAX_WAIT_S))
                continue
            random.shuffle(due)
            for shard in due:
                if self.stopping.is_set():
                    return
                free = self.concurrency - self.held
                if free < self.refill_at and self.held:
                    # Take in batches: one take for a few freed slots costs as much as for many.
                    self.slot_freed.clear()
                    await self.slot_freed.wait()
                    break
                due_at[shard] = await self._take(shard, free)

    async def _take(self, shard: int, budget: int) -> float:
        """Take and dispatch from one shard; the loop time at which it is next due."""
        loop = asyncio.get_running_loop()
        args = list(self._take_args)
        args[0] = budget
        started = loop.time()
        try:
            reply = await self.store.script("take", shard, args)
        except StoreUnavailable as exc:
            self._redis_unavailable(exc)
            await asyncio.sleep(0.2)  # outage backoff, not a polling sleep on the normal path
            return loop.time()
        self._redis_back()
        taken = parse_take(shard, reply, started)
        if taken.expired:
            metrics.local_failed.inc("expired", amount=taken.expired)
        if taken.deleted:
            metrics.local_failed.inc("phone_number_deleted", amount=taken.deleted)
        for tier in taken.rate_limited_tiers:
            metrics.RATE_LIMITED.labels(tier).inc()
        self.held += len(taken.items)
        for item in taken.items:
            self.outbox.put_nowait(item)
        if taken.next_due_ms < 0:
            return float("inf")
        return started + max(taken.next_due_ms - taken.now_ms, 0.0) / 1000.0

    async def _sender(self) -> None:
        while True:
            item = await self.outbox.get()
            try:
                await self._deliver(item)
            finally:
                self.held -= 1
                self.slot_freed.set()

    async def _wake_loop(self) -> None:
        """Listen for wake tokens of the owned shards and hand them to the take loop.

        BLPOP runs here, on its own connection, with a long timeout: the server checks blocking
        timeouts only about every 1/hz seconds (100 ms by default), far too coarse for due
        times, so the take loop waits on a local timer and this task only cuts it short.
        """
        while not self.stopping.is_set():
            owned = await self._owned_shards()
            if not owned:
                continue
            names = [keys.wake(s) for s in owned]
            try:
                with unavailable_on_redis_errors():
                    reply = await self.blocking.blpop(names, timeout=MAX_WAIT_S)
            except StoreUnavailable as exc:
                self._redis_unavailable(exc)
                await asyncio.sleep(0.2)  # outage backoff
                continue
            if reply is not None:
                key = as_text(reply[0])
                self.woken.add(owned[names.index(key)])
                self.wake.set()

    async def _wait_for_wake(self, wait_s: float) -> None:
        """Sleep until `wait_s` passes or a wake token arrives (see `_wake_loop`)."""
        if self.woken:
            return
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), wait_s)

    # -- sending ---------------------------------------------------------------------------

    async def _deliver(self, item: Taken) -> None:
        released = False
        try:
            if self.api.limiter is not None:
                await self.api.limiter.acquire()
            if item.limit and self.loop.time() - item.taken_at > self.drop_back_s:
                # Too late to keep the window exact: give the grant back and requeue.
                released = True
                self._settle(Op("Q", item.id, item.fence, "", item.stamp))
                return
            answer = await self.api.send(
                item.phone_number_id, item.token, upstream_body(item.payload)
            )
        except asyncio.CancelledError:
            if not released:
                self._settle(Op("Q", item.id, item.fence))
            raise
        self._record(item, answer)

    def _record(self, item: Taken, answer: Answer) -> None:
        outcome = answer.outcome
        pn = item.phone_number_id
        if outcome is Outcome.OK:
            self._settle(
                Op("S", item.id, item.fence, answer.upstream_message_id or "", tier=item.tier)
            )
            delay_ms = time.time() * 1000.0 - item.created_ms
            metrics.local_send_delay.observe(max(delay_ms, 0.0) / 1000.0)
        elif outcome is Outcome.THROUGHPUT:
            metrics.NUMBER_PAUSED.labels("throughput").inc()
            self._settle(Op("Q", item.id, item.fence, "throttle"))
        elif outcome is Outcome.UPGRADE:
            metrics.NUMBER_PAUSED.labels("upgrade").inc()
            self._settle(Op("Q", item.id, item.fence, str(UPGRADE_HOLD_MS)))
        elif outcome in (Outcome.AUTH, Outcome.BLOCKED):
            metrics.NUMBER_PAUSED.labels(outcome.value).inc()
            log.warning(
                "upstream refused number %s (%s, code %s): number disconnected, messages held",
                pn,
                outcome.value,
                answer.code,
                extra={"phone_number_id": pn},
            )
            self._settle(Op("H", item.id, item.fence, "disconnected"))
        elif outcome is Outcome.NUMBER_GONE:
            self._fail(item, answer, "permanent")
            self._delete_number(pn)
        elif outcome in (Outcome.TRANSIENT, Outcome.PAIR_RATE):
            if item.attempts >= self.settings.max_attempts:
                self._fail(item, answer, "retries_exhausted")
            else:
                if outcome is Outcome.PAIR_RATE:
                    delay = pair_rate_delay_ms(item.attempts)
                else:
                    delay = retry_delay_ms(item.attempts, self.settings.retry_base)
                error = _error_json(answer.code, answer.message)
                self._settle(Op("R", item.id, item.fence, str(delay), error))
        else:
            self._fail(item, answer, "permanent")

    def _fail(self, item: Taken, answer: Answer, reason: str) -> None:
        error = _error_json(answer.code, answer.message)
        self._settle(Op("F", item.id, item.fence, error, reason=reason))

    def _delete_number(self, pn: str) -> None:
        if pn in self.deleting:
            return
        self.deleting.add(pn)
        log.warning(
            "upstream says number %s is gone: deleting it", pn, extra={"phone_number_id": pn}
        )

        async def delete() -> None:
            try:
                await self.registry.change(pn, {"status": "deleted"})
            except Exception:
                log.exception("could not delete number %s", pn)
            finally:
                self.deleting.discard(pn)

        task = asyncio.create_task(delete(), name=f"delete-{pn}")
        self.chores.add(task)
        task.add_done_callback(self.chores.discard)

    # -- settling --------------------------------------------------------------------------

    def _settle(self, op: Op) -> None:
        self.settle_queue.put_nowait(op)

    async def _settle_loop(self) -> None:
        """Settle in batches until the `None` that `stop()` queues last."""
        while True:
            first = await self.settle_queue.get()
            batch: list[Op] = []
            ending = first is None
            if first is not None:
                batch.append(first)
            while len(batch) < SETTLE_BATCH and not self.settle_queue.empty():
                op = self.settle_queue.get_nowait()
                if op is None:
                    ending = True
                else:
                    batch.append(op)
            if batch:
                await self._settle_batch(batch)
            if ending and self.settle_queue.empty():
                return

    async def _settle_batch(self, batch: list[Op]) -> None:
        """Settle until Redis takes it: an outcome is never dropped."""
        by_shard: dict[int, list[Op]] = defaultdict(list)
        for op in batch:
            shard = int(op.id.split("-", 1)[0])
            by_shard[shard].append(op)
        pending = dict(by_shard)
        delay = 0.1
        while pending:
            shards = list(pending)
            results = await asyncio.gather(
                *(self._settle_shard(s, pending[s]) for s in shards), return_exceptions=True
            )
            for shard, result in zip(shards, results, strict=True):
                if isinstance(result, StoreUnavailable):
                    self._redis_unavailable(result)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    del pending[shard]
            if pending:
                await asyncio.sleep(delay)  # outage backoff
                delay = min(delay * 2, 2.0)
        self._redis_back()

    async def _settle_shard(self, shard: int, ops: list[Op]) -> None:
        args: list[Any] = [int(self.settings.status_retention)]
        for op in ops:
            args += [op.kind, op.id, op.fence, op.a, op.b]
        codes = await self.store.script("settle", shard, args)
        for op, code in zip(ops, codes, strict=True):
            if int(code) == 0:
                continue  # stale: the lease ran out and another attempt owns the message
            if op.kind == "S":
                metrics.local_sent.inc(op.tier)
            elif int(code) == 2:
                metrics.local_failed.inc("expired")
            elif int(code) == 3:
                metrics.local_failed.inc("phone_number_deleted")
            elif op.reason is not None:
                metrics.local_failed.inc(op.reason)

    # -- redis outage ----------------------------------------------------------------------

    def _redis_unavailable(self, exc: Exception) -> None:
        metrics.REDIS_ERRORS.inc()
        if not self.redis_down:
            self.redis_down = True
            log.error("redis unavailable, drain paused: %s", exc)

    def _redis_back(self) -> None:
        if self.redis_down:
            self.redis_down = False
            log.info("redis is back: drain resumed")
