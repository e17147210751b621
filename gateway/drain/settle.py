"""Recording what became of each message: outcomes batched per shard into `settle` calls.

Senders hand in what happened (an upstream answer, a put-back); the settle loop sends them to
Redis in batches, one `settle` call per shard, and retries a batch until Redis takes it: an
outcome is never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import metrics
from gateway.drain.classify import Answer, Outcome
from gateway.drain.outage import RedisOutage
from gateway.drain.take import Taken
from gateway.errors import StoreUnavailable
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store

log = logging.getLogger("gateway.drain")

UPGRADE_HOLD_MS = 60_000
PAIR_RATE_FIRST_MS = 6_000
MAX_RETRY_MS = 300_000
SETTLE_BATCH = 200
# A batch of plain "sent" outcomes waits this long for company: sends finish one by one, and one
# settle call for many outcomes costs about what one for a single outcome does. Anything else
# (a pause, a hold, a retry) is settled at once: it changes what the next take may do.
SETTLE_LINGER_S = 0.005
# Outcomes a Redis node did not take are tried again after this, doubling up to the most.
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0


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


class _RetryDue:
    """What `Settler._next_op` returns when outcomes set aside are due to be tried again."""


def retry_delay_ms(attempts: int, base_s: float) -> int:
    """Exponential backoff with jitter: ~base, doubling per attempt, capped at 5 minutes."""
    raw = base_s * 1000.0 * (2 ** max(attempts - 1, 0))
    return int(min(raw, MAX_RETRY_MS) * random.uniform(0.8, 1.2))


def pair_rate_delay_ms(attempts: int) -> int:
    raw = PAIR_RATE_FIRST_MS * (2 ** max(attempts - 1, 0))
    return int(min(raw, MAX_RETRY_MS) * random.uniform(0.9, 1.1))


def _error_json(code: object, message: str) -> str:
    return orjson.dumps({"code": code, "message": message, "retryable": False}).decode()


class Settler:
    def __init__(self, settings: Settings, store: Store, outage: RedisOutage) -> None:
        self.settings = settings
        self.store = store
        self.outage = outage
        self.registry = Registry(store)
        self.queue: asyncio.Queue[Op | None] = asyncio.Queue()
        self.chores: set[asyncio.Task[None]] = set()
        self.deleting: set[str] = set()
        self._failed: list[Op] = []  # outcomes of a failed node, to be tried again
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF_S

    # -- what senders hand in ------------------------------------------------------------

    def put_back(self, item: Taken) -> None:
        """A message that was never sent: back to the head of its lane, its grant returned."""
        self.queue.put_nowait(Op("Q", item.id, item.fence, "", item.stamp if item.limit else ""))

    def release(self, item: Taken) -> None:
        """A message whose send was cut short: queued again, its grant kept spent."""
        self.queue.put_nowait(Op("Q", item.id, item.fence))

    def record(self, item: Taken, answer: Answer) -> None:
        outcome = answer.outcome
        pn = item.phone_number_id
        if outcome is Outcome.OK:
            wamid = answer.upstream_message_id or ""
            self._op(Op("S", item.id, item.fence, wamid, item.context, tier=item.tier))
            delay_ms = time.time() * 1000.0 - item.created_ms
            metrics.local_send_delay.observe(max(delay_ms, 0.0) / 1000.0)
        elif outcome is Outcome.THROUGHPUT:
            metrics.NUMBER_PAUSED.labels("throughput").inc()
            self._op(Op("Q", item.id, item.fence, "throttle"))
        elif outcome is Outcome.UPGRADE:
            metrics.NUMBER_PAUSED.labels("upgrade").inc()
            self._op(Op("Q", item.id, item.fence, str(UPGRADE_HOLD_MS)))
        elif outcome in (Outcome.AUTH, Outcome.BLOCKED):
            metrics.NUMBER_PAUSED.labels(outcome.value).inc()
            log.warning(
                "upstream refused number %s (%s, code %s): number disconnected, messages held",
                pn,
                outcome.value,
                answer.code,
                extra={"phone_number_id": pn},
            )
            self._op(Op("H", item.id, item.fence, "disconnected"))
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
                self._op(Op("R", item.id, item.fence, str(delay), error))
        else:
            self._fail(item, answer, "permanent")

    def _op(self, op: Op) -> None:
        self.queue.put_nowait(op)

    def _fail(self, item: Taken, answer: Answer, reason: str) -> None:
        error = _error_json(answer.code, answer.message)
        self._op(Op("F", item.id, item.fence, error, reason=reason))

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

    # -- the loop ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Let the loop end after what is queued now (see `run`)."""
        self.queue.put_nowait(None)

    async def run(self) -> None:
        """Settle in batches until the `None` that `finish()` queues last.

        The outcomes of a Redis node that failed are set aside (`_failed`) and tried again,
        with a growing backoff, beside the later batches: the other nodes' outcomes go on being
        written. (Waiting for the failed node wrote nothing at all until it came back: on a
        cluster, messages on healthy nodes stayed `sending` and were sent twice when their
        leases ran out.) At the end the loop goes on until they are taken too; the caller
        bounds that wait.
        """
        ending = False
        while True:
            batch: list[Op] = []
            if not ending:
                first = await self._next_op()
                if first is None:
                    ending = True
                elif isinstance(first, Op):
                    batch.append(first)
                    if first.kind == "S" and self.queue.qsize() < SETTLE_BATCH // 10:
                        await asyncio.sleep(SETTLE_LINGER_S)
            elif self._failed:
                await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
            while len(batch) < SETTLE_BATCH and not self.queue.empty():
                op = self.queue.get_nowait()
                if op is None:
                    ending = True
                else:
                    batch.append(op)
            if self._failed and time.monotonic() >= self._retry_at:
                batch += self._failed
                self._failed = []
            if batch:
                await self._settle_batch(batch)
            if ending and self.queue.empty() and not self._failed:
                return

    async def _next_op(self) -> Op | _RetryDue | None:
        """The next queued op (None: `finish()`), or `_RetryDue` when outcomes set aside are
        due to be tried again first."""
        if not self._failed:
            return await self.queue.get()
        try:
            async with asyncio.timeout(max(0.0, self._retry_at - time.monotonic())):
                return await self.queue.get()
        except TimeoutError:
            return _RetryDue()

    async def _settle_batch(self, batch: list[Op]) -> None:
        """Settle in one call per Redis node; what a failed node did not take is set aside.

        One `settle` call covers every shard of a node the batch touches (see settle.lua).
        Trying a call again that may have been applied is harmless: every op is fenced by its
        attempt.
        """
        by_shard: dict[int, list[Op]] = defaultdict(list)
        for op in batch:
            by_shard[int(op.id.split("-", 1)[0])].append(op)
        for shard, ops in by_shard.items():
            # Messages put back go to the head of their lane one LPUSH at a time: the last one
            # pushed ends up first, so push them in the reverse of the order they were taken.
            back = [op for op in ops if op.kind in ("Q", "H")]
            by_shard[shard] = [op for op in ops if op.kind not in ("Q", "H")] + back[::-1]

        def args_for(part: list[int]) -> list[Any]:
            args: list[Any] = [int(self.settings.status_retention)]
            for index, shard in enumerate(part, start=1):
                args += [index, len(by_shard[shard])]
                for op in by_shard[shard]:
                    args += [op.kind, op.id, op.fence, op.a, op.b]
            return args

        try:
            replies = await self.store.script_per_node("settle", list(by_shard), args_for)
        except StoreUnavailable as exc:
            replies = [(list(by_shard), exc)]
        ordered: list[Op] = []
        codes: list[Any] = []
        failed = False
        for part, reply in replies:
            if isinstance(reply, Exception):
                if not isinstance(reply, StoreUnavailable):
                    raise reply  # a bug, not an outage: it must not be retried forever
                self.outage.shards_failed(part, reply)
                self._failed += [op for shard in part for op in by_shard[shard]]
                failed = True
                continue
            ordered += [op for shard in part for op in by_shard[shard]]
            codes += reply
        if failed:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        else:
            self._backoff = FIRST_BACKOFF_S
            self.outage.answered()
        for op, code in zip(ordered, codes, strict=True):
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
