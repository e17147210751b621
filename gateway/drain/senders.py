"""Starting each taken message at its stamp, with a fixed pool of sender coroutines.

Rate-limited messages wait in stamp order (`waiting`, a heap); the dispatcher releases each when
its stamp comes to the senders, `worker_concurrency` coroutines that each send one message at a
time. Unlimited messages have no time to keep and go to the senders at once, unless the fleet's
upstream cap is set (`all_timed`): its exactness rests on every send starting at its stamp
(`gateway.drain.fleet`). A timed send that would be written more than the tolerance after its
stamp is not sent: it is put back and its grant returned (`gateway_grants_returned_total`).
It is checked when a sender picks the message up and when the connection is in hand (against
the tolerance less `WRITE_MARGIN_S`), and when aiohttp writes the request (against the
tolerance itself; see `gateway.drain.upstream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time

from gateway import metrics
from gateway.accept.validation import upstream_body
from gateway.drain.classify import Answer, Outcome
from gateway.drain.schedule import SendSchedule
from gateway.drain.settle import Settler
from gateway.drain.take import Taken
from gateway.drain.upstream import CloudApi, TimedBody

log = logging.getLogger("gateway.drain")

# The dispatcher may hand a rate-limited message to a sender this long before its stamp, so
# the sender has its connection and request ready when the stamp comes; the body itself is
# written at the stamp (`TimedBody.not_before`), never before it. 6 ms once halved the
# put-backs in `bench drain`; on 2026-11-29, after the clock fix that explained the one-too-many
# sends it seemed to cause (`gateway.drain.clock`), it made no difference beyond the machine's
# noise (0.2-2.5% put-backs either way), so it stays off: a lead holds a sender idle.
LEAD_S = 0.0
# A send must be under way this much before its deadline: what is left covers the loop turn
# before aiohttp writes the request (p99 about 1.5 ms on a busy worker).
WRITE_MARGIN_S = 0.0015
RETURNS_WINDOW_S = 10.0
RETURNS_WARN_SHARE = 0.1
RETURNS_WARN_MIN = 20


class Senders:
    def __init__(
        self,
        api: CloudApi,
        settler: Settler,
        schedule: SendSchedule,
        *,
        concurrency: int,
        tolerance_s: float,
        all_timed: bool = False,
    ) -> None:
        self.api = api
        self.all_timed = all_timed
        self.settler = settler
        self.schedule = schedule
        self.concurrency = concurrency
        self.tolerance = tolerance_s
        self.held = 0  # taken and not yet settled or put back
        self.sent = 0  # sends answered, since start
        self.waiting: list[tuple[float, int, Taken]] = []  # a heap by start time
        self._order = itertools.count()
        self.ready: asyncio.Queue[Taken] = asyncio.Queue()
        self.added = asyncio.Event()
        self.slot_freed = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self._returns = _ReturnsWatch()

    @property
    def free(self) -> int:
        """Slots for more messages: `worker_concurrency` bounds the sends under way (handed to a
        sender or ready for one), not those waiting for their stamps.

        The send schedule already bounds those: a take asks for about a step of work past the
        previous one's end, so what waits is about two steps' worth. Counting it too made the
        slots, not the CPU, set a rate-limited drain's pace (stamps a few tens of ms ahead at
        thousands a second fill 256 slots): 0.57-0.77 of one unlimited number's rate, against
        0.68-1.01 without, in the same `bench drain` runs on 2026-11-29. (That was not so when
        a number's grants were spread at its own rate, up to 200 ms ahead of the schedule's
        cursor: then counting them was what kept sends on time.)
        """
        return self.concurrency - self.held + len(self.waiting)

    def start(self) -> list[asyncio.Task[None]]:
        self.tasks.append(asyncio.create_task(self._dispatch(), name="drain-dispatch"))
        # A fixed pool of senders rather than a task per message: cheaper, and it bounds the
        # sends in flight to `worker_concurrency` by construction.
        for index in range(self.concurrency):
            self.tasks.append(asyncio.create_task(self._sender(), name=f"drain-sender-{index}"))
        return self.tasks

    def timed(self, item: Taken) -> bool:
        """Whether a send must start at its stamp: a rate-limited one, or any under the cap."""
        return self.all_timed or bool(item.limit)

    def add(self, items: list[Taken]) -> None:
        """Messages a take handed over: timed ones wait for their stamps, the rest go."""
        self.held += len(items)
        for item in items:
            if self.timed(item):
                heapq.heappush(self.waiting, (item.not_before, next(self._order), item))
            else:
                # no time to keep: started at once, in bulk, which is cheapest per send
                self.ready.put_nowait(item)
        self.added.set()

    async def stop(self, grace_s: float) -> None:
        """Within `grace_s`: send what was taken (timed sends at their stamps) and let started
        sends finish; put back what cannot start in that time.

        Sending what is stamped rather than putting it back is what keeps a stopping worker's
        numbers going while their shards change hands (`gateway.drain.shards`): its stamps are
        a few tens of ms ahead, and the successor's come after them in the number's window.
        Put back, they left a gap that long in the number's sends (up to 120 ms in
        `bench handover`).
        """
        dispatch, senders = self.tasks[0], self.tasks[1:]
        deadline = time.monotonic() + grace_s
        # what could not start before the grace period ends goes back now, its grant returned
        keep = [entry for entry in self.waiting if entry[0] + self.tolerance <= deadline]
        self._put_back([item for at, _, item in self.waiting if at + self.tolerance > deadline])
        heapq.heapify(keep)
        self.waiting[:] = keep
        while self.held and (now := time.monotonic()) < deadline:
            self.slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.slot_freed.wait(), deadline - now)
        dispatch.cancel()
        await asyncio.gather(dispatch, return_exceptions=True)
        unstarted = [item for _, _, item in self.waiting]
        self.waiting.clear()
        while not self.ready.empty():
            unstarted.append(self.ready.get_nowait())
        self._put_back(unstarted)
        for sender in senders:
            sender.cancel()  # one still sending releases its message (settle op Q)
        await asyncio.gather(*senders, return_exceptions=True)

    def _put_back(self, items: list[Taken]) -> None:
        """Never started: back to their lanes, their grants returned."""
        for item in items:
            self.settler.put_back(item)
            self._done()

    def _done(self) -> None:
        self.held -= 1
        self.slot_freed.set()

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        waiting = self.waiting
        while True:
            self.added.clear()
            if not waiting:
                await self.added.wait()
                continue
            now = time.monotonic()
            ahead = waiting[0][0] - now - LEAD_S
            if ahead > 0:
                # Sleep until the first is due, or until a take adds an earlier one. (Not
                # `wait_for`: on Python 3.11 it can swallow the cancellation that stops us.)
                timer = loop.call_later(ahead, self.added.set)
                try:
                    await self.added.wait()
                finally:
                    timer.cancel()
                continue
            while waiting and waiting[0][0] <= now + LEAD_S:
                self.ready.put_nowait(heapq.heappop(waiting)[2])

    async def _sender(self) -> None:
        while True:
            item = await self.ready.get()
            try:
                await self._deliver(item)
            except Exception:
                # A bug in our own code must not stop the sender (a dead sender task stops the
                # process): a message not settled yet is taken again when its lease runs out,
                # its attempt spent.
                log.exception(
                    "could not send or settle message %s of number %s; it is taken again "
                    "when its lease runs out",
                    item.id,
                    item.phone_number_id,
                    extra={"phone_number_id": item.phone_number_id},
                )
                metrics.SEND_ERRORS.inc()
            finally:
                self._done()

    async def _deliver(self, item: Taken) -> None:
        timed = self.timed(item)
        if timed:
            # From the earliest its stamp can be: the worker keeps the clock's bracket narrow
            # enough to leave most of the tolerance to write in (`ServerClock.narrow`).
            deadline = item.start + self.tolerance
            start_by = deadline - WRITE_MARGIN_S
            not_before = item.not_before
        else:
            deadline = start_by = float("inf")
            not_before = 0.0
        body = TimedBody(upstream_body(item.payload), start_by, deadline, not_before)
        try:
            now = time.monotonic()
            lateness = now - item.not_before
            if now > start_by:
                self._returned(item, lateness, "queued")
                return
            answer = await self.api.send(item.phone_number_id, item.token, body)
        except asyncio.CancelledError:
            # stopping: a request never written goes back with its grant; one written may
            # have reached the upstream, so it is queued again (at least once) and its grant
            # stays spent
            if body.written_at is None:
                self.settler.put_back(item)
            else:
                self.settler.release(item)
            raise
        except Exception as exc:
            # Not an upstream answer: an error of this process (a bug, or a case aiohttp refuses
            # that we did not foresee). Retried as a transient failure, whether or not the
            # request was written (as for a timeout): its attempts bound the retries, so one
            # message that always breaks fails in the end and never stops the other sends.
            log.exception(
                "unexpected error sending message %s of number %s",
                item.id,
                item.phone_number_id,
                extra={"phone_number_id": item.phone_number_id},
            )
            metrics.SEND_ERRORS.inc()
            answer = Answer(
                Outcome.TRANSIENT,
                code="gateway_send_error",
                message=f"the gateway could not send this message ({type(exc).__name__})",
            )
        if answer.outcome is Outcome.LATE:
            self._returned(item, time.monotonic() - item.not_before, answer.message)
            return
        if answer.started_at is not None:
            lateness = answer.started_at - item.not_before
            self.schedule.started(lateness, timed)
            metrics.local_start_lateness.observe(max(lateness, 0.0))
        self._returns.sent()
        self.sent += 1
        self.settler.record(item, answer)

    def _returned(self, item: Taken, lateness: float, stage: str) -> None:
        """A send too late to start: `stage` is where it was caught (queued, connect, write)."""
        self.schedule.started(lateness, self.timed(item))
        metrics.local_grants_returned.inc(item.tier, stage)
        self.settler.put_back(item)
        if self._returns.returned():
            log.warning(
                "more than %d%% of grants in the last %.0fs were put back because their sends "
                "could not start within %.1f ms of their stamps: this process is short of CPU "
                "(see gateway_send_start_lateness_seconds); run more worker processes or raise "
                "GATEWAY_RATE_SLACK",
                int(RETURNS_WARN_SHARE * 100),
                RETURNS_WINDOW_S,
                self.tolerance * 1000,
            )


class _ReturnsWatch:
    """Whether put-backs dominate: True at most once per window, when they pass the share."""

    def __init__(self) -> None:
        self._since = time.monotonic()
        self._sent = 0
        self._returned = 0
        self._warned = False

    def sent(self) -> None:
        self._roll()
        self._sent += 1

    def returned(self) -> bool:
        self._roll()
        self._returned += 1
        total = self._sent + self._returned
        if (
            not self._warned
            and self._returned >= RETURNS_WARN_MIN
            and self._returned > RETURNS_WARN_SHARE * total
        ):
            self._warned = True
            return True
        return False

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._since >= RETURNS_WINDOW_S:
            self._since = now
            self._sent = self._returned = 0
            self._warned = False
