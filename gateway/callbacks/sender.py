"""The status callback sender: the outboxes of this worker's shards out to their receivers.

One `CallbackSender` runs in each worker process, beside the drain and sharing only its shard
ownership: it has its own HTTP session and its own tasks, so a slow or dead receiver never
holds a send back.

- claim loop: one `callback_claim` call leases the due events of every owned shard, up to what
  this process may hold (`MAX_HELD`). Waiting between claims is a BLPOP on the shards'
  `cbwake` tokens (left by every status change that puts an event on an outbox), cut at the
  soonest retry's due time and at a second: a callback goes out as soon as its change is
  written, and an idle gateway costs one blocked connection and one claim a second, not a poll
  every 100 ms per process. The second-long cap also covers a token lost with a Redis restart.
- sends first: while the drain has sends in hand, callbacks are paced to a tenth of its send
  rate (`_yield_to_sends`); when it is idle they go as fast as the receivers answer.
- per receiver origin: a queue of the events held for it and up to
  `GATEWAY_CALLBACK_CONCURRENCY` sender coroutines that post them one after another; a sender
  stops when its queue is empty. An origin already holding `PER_ORIGIN_SHARE` times that many
  events gets no more: they go back to the outbox for a second (`defer`, no attempt counted,
  one call for all of a claim's), so one origin's backlog never fills what this process holds
  and the events of other origins, due before them, keep flowing.
- outcomes: written in batches, one `callback_done` call for all that came while the last was
  being written (2xx: done, and the message's next event goes on the outbox; 410 or too old:
  dropped; anything else: retried with backoff).

A claim leases events for two callback timeouts and 5 s (an event waits at most one timeout for
a sender of its origin, then at most one in flight); a worker that dies leaves them to be claimed
again when that runs out. So delivery is at least once: only events in flight at a crash or a
Redis failover can arrive twice, with the same `webhook-id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from gateway import keys, metrics
from gateway.callbacks import signing, urls
from gateway.clock import rfc3339
from gateway.drain.shards import ShardOwnership
from gateway.drain.wake import WakeTokens
from gateway.errors import StoreUnavailable
from gateway.settings import Settings
from gateway.store import Store, as_text, unavailable_on_redis_errors

log = logging.getLogger("gateway.callbacks")

MAX_HELD = 1000  # events one process holds at once (waiting for a slot or in flight)
MAX_WAIT_S = 1.0  # longest wait between claims
RETRY_CAP_S = 3600.0
JITTER = 0.2  # each retry delay is spread by +-20%
STOP_WAIT_S = 2.0
DEFER_MS = 1000  # how long an event of an origin with no room goes back to the outbox
# Events held per receiver origin (waiting for a slot or in flight), in units of
# GATEWAY_CALLBACK_CONCURRENCY; claims wait until at least REFILL_AT of that room is free.
PER_ORIGIN_SHARE = 4
REFILL_AT = 8
STALLED_S = 1.0
# While the drain has sends in hand, callbacks go at most at this share of its send rate.
YIELD_SHARE = 0.1
YIELD_MIN_RATE = 50.0
YIELD_BURST_S = 0.1
ORIGINS_CACHED = 1024  # callback URLs whose origin is remembered
# BLPOP timeouts are checked by the server about every 100 ms: shorter waits are local sleeps.
BLOCK_MIN_S = 0.1


@dataclass(slots=True)
class Event:
    shard: int
    id: str
    status: str
    t: int  # ms of the status change
    url: str
    phone_number_id: str
    to: str
    reference: str
    upstream_id: str
    error: str
    attempts: int
    claimed_ms: int  # the server's clock at the claim
    claimed_at: float  # this process's monotonic clock at the claim

    def body(self) -> bytes:
        """The JSON posted: the same bytes on every attempt (fields in a fixed order)."""
        error: object = None
        if self.error:
            try:
                error = orjson.loads(self.error)
            except orjson.JSONDecodeError:
                error = self.error
        return orjson.dumps(
            {
                "type": "message.status",
                "message_id": self.id.rsplit(".", 1)[0],
                "status": self.status,
                "timestamp": rfc3339(self.t),
                "phone_number_id": self.phone_number_id,
                "to": self.to,
                "client_reference": self.reference or None,
                "upstream_message_id": self.upstream_id or None,
                "error": error,
            }
        )

    def age_s(self) -> float:
        """Seconds since the status change, on the server's clock."""
        return (self.claimed_ms - self.t) / 1000.0 + time.monotonic() - self.claimed_at


def parse_claim(shards: list[int], reply: list[object]) -> tuple[int, int, list[Event]]:
    """Server now, soonest due time left (-1: none) and the leased events of a claim."""
    now, soonest = int(reply[0]), int(reply[1])  # type: ignore[call-overload]
    at = time.monotonic()
    events = []
    for b in range(2, len(reply), 11):
        f = [as_text(v) if isinstance(v, bytes) else str(v) for v in reply[b : b + 11]]
        events.append(
            Event(
                shards[int(f[0]) - 1],
                f[1],
                f[2],
                int(f[3] or 0),
                f[4],
                f[5],
                f[6],
                f[7],
                f[8],
                f[9],
                int(f[10] or 0),
                now,
                at,
            )
        )
    return now, soonest, events


def retry_delay(attempts: int, base_s: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones (1 = the first)."""
    delay = base_s * 2.0 ** min(attempts - 1, 30)
    return min(delay * random.uniform(1.0 - JITTER, 1.0 + JITTER), RETRY_CAP_S)


@dataclass
class _Origin:
    """A receiver origin's share of this process: its queue and its sender coroutines."""

    waiting: deque[Event] = field(default_factory=deque)
    senders: int = 0  # sender coroutines running for it
    held: int = 0  # its events held: waiting or in flight
    # when it last finished an event (or was first seen): an origin that finishes nothing for
    # a while is stalled, and no longer sizes the claims
    progressed: float = field(default_factory=time.monotonic)


class CallbackSender:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        ownership: ShardOwnership,
        secret: str,
        drain_load: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.ownership = ownership
        self.key = signing.secret_key(secret)
        assert settings.redis_url is not None
        self.wake_tokens = WakeTokens(
            settings.redis_url, keys.cbwake, self._redis_down, settings.shards
        )
        self.lease_ms = int((2 * settings.callback_timeout + 5.0) * 1000)
        self.concurrency = settings.callback_concurrency
        self.per_origin = PER_ORIGIN_SHARE * self.concurrency
        self.origins: dict[urls.Origin, _Origin] = {}
        self.held: set[str] = set()  # ids of the events held: waiting for a sender or in flight
        self.senders: set[asyncio.Task[None]] = set()
        self.room = asyncio.Event()
        self.stopping = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None
        self._down = False
        self._stopped = False
        self._outcomes: list[tuple[str, Event, int]] = []
        self._outcome_added = asyncio.Event()
        self._finishing = False
        self._inflight = 0  # requests in flight (the gauge is set from it per batch written)
        self.report_task: asyncio.Task[None] | None = None
        self.drain_load = drain_load
        self._origins_seen: dict[str, urls.Origin | None] = {}
        self._allowance = 0.0
        self._paced_at = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, on_done: Callable[[asyncio.Task[None]], None]) -> asyncio.Task[None]:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.settings.callback_timeout),
            trust_env=False,
            auto_decompress=False,
            # no receiver needs cookies, and a jar costs every request (5% of callbacks/s)
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.task = asyncio.create_task(self._claim_loop(), name="callbacks-claim")
        self.task.add_done_callback(on_done)
        self.report_task = asyncio.create_task(self._report_loop(), name="callbacks-report")
        self.report_task.add_done_callback(on_done)
        return self.task

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; requests in flight get `grace_s`; the rest go back to the outbox.

        Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        self.stopping.set()
        if self.task is not None:
            done, _ = await asyncio.wait({self.task}, timeout=MAX_WAIT_S + STOP_WAIT_S)
            if not done:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
        # Events still waiting for a sender go back at once, for whichever worker is next.
        waiting = [event for state in self.origins.values() for event in state.waiting]
        for state in self.origins.values():
            state.waiting.clear()
        with contextlib.suppress(StoreUnavailable):
            await self._report_many([("defer", event, 0) for event in waiting])
        running = [task for task in self.senders if not task.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=grace_s)
            for task in late:
                task.cancel()  # its lease runs out and another worker sends it again
            await asyncio.gather(*running, return_exceptions=True)
        # what is recorded is written before the process goes (its leases would bring it back)
        self._finishing = True
        self._outcome_added.set()
        if self.report_task is not None:
            done, _ = await asyncio.wait({self.report_task}, timeout=STOP_WAIT_S + 3.0)
            if not done:
                self.report_task.cancel()
                await asyncio.gather(self.report_task, return_exceptions=True)
        metrics.CALLBACKS_INFLIGHT.set(0)
        if self.session is not None:
            await self.session.close()
        await self.wake_tokens.close()

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self.stopping.is_set():
            owned = await self.ownership.current(MAX_WAIT_S)
            if not owned:
                continue
            budget = self._budget()
            if budget < min(REFILL_AT, self.concurrency) and self.held:
                await self._wait_for_room()
                continue
            random.shuffle(owned)  # the budget may run out before the last shard
            # One claim per Redis node (on a cluster; one in all on one node), each with its
            # share of the budget; a node that failed leaves its events for later.
            share: list[object] = [-(-budget // len(self.store.node_parts(owned))), self.lease_ms]

            def claim_args(_: list[int], share: list[object] = share) -> list[object]:
                return share

            try:
                with unavailable_on_redis_errors():
                    parts = await self.store.script_per_node(
                        "callback_claim", owned, claim_args, patient=False
                    )
                failed = [reply for _, reply in parts if isinstance(reply, Exception)]
                if len(failed) == len(parts):
                    raise failed[0]
            except StoreUnavailable as exc:
                self._redis_down(exc)
                await asyncio.sleep(0.5)  # outage backoff
                continue
            if failed:
                self._redis_down(failed[0])
            else:
                self._redis_up()
            claims = [parse_claim(p, r) for p, r in parts if not isinstance(r, Exception)]
            now = max(claim[0] for claim in claims)
            soonest = min((claim[1] for claim in claims if claim[1] >= 0), default=-1)
            events = [event for claim in claims for event in claim[2]]
            self.room.clear()
            deferred = [("defer", e, DEFER_MS) for e in events if not self._take(e)]
            if deferred:
                try:
                    await self._report_many(deferred)
                except StoreUnavailable as exc:  # their leases bring them back
                    self._redis_down(exc)
                # an origin is full: claim again once something finished, not at once
                await self._wait_for_room()
                continue
            if len(events) >= budget:
                continue  # more may be due
            wait_s = MAX_WAIT_S if soonest < 0 else min(max(soonest - now, 0) / 1000, MAX_WAIT_S)
            await self._wait(owned, wait_s)

    def _budget(self) -> int:
        """How many events the next claim may bring.

        What the busiest receiver that is making progress still has room for: with one
        receiver (the usual case), a claim of everything due put all but that receiver's share
        back for a second, and the outbox drained at ~80 callbacks/s (`bench receipts`). A
        stalled receiver does not size the claims: its events are put back when they come,
        and the other receivers' are started.
        """
        now = time.monotonic()
        room = self.per_origin
        for state in self.origins.values():
            if state.held and now - state.progressed < STALLED_S:
                room = min(room, self.per_origin - state.held)
        return max(0, min(MAX_HELD - len(self.held), room))

    async def _wait_for_room(self) -> None:
        """Until a held event is done (or `MAX_WAIT_S` passed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MAX_WAIT_S):
                await self.room.wait()
        self.room.clear()

    async def _wait(self, owned: list[int], wait_s: float) -> None:
        """Until `wait_s` passes or a shard's `cbwake` token arrives."""
        if wait_s < BLOCK_MIN_S:
            await asyncio.sleep(wait_s)
            return
        try:
            woken = await self.wake_tokens.wait_any(owned, wait_s)
            # handed over during the wait: the token is the new owner's
            gone = woken - self.ownership.owned
            if gone:
                await self.wake_tokens.give_back(gone)
        except StoreUnavailable as exc:
            self._redis_down(exc)
            await asyncio.sleep(0.5)

    def _redis_down(self, exc: Exception) -> None:
        metrics.REDIS_ERRORS.inc()
        if not self._down:
            self._down = True
            log.error("redis unavailable, status callbacks paused: %s", exc)

    def _redis_up(self) -> None:
        if self._down:
            self._down = False
            log.info("redis is back: status callbacks resumed")

    def _take(self, event: Event) -> bool:
        """Start handling a claimed event; False when its origin has no room for it."""
        if event.id in self.held:
            return True  # still ours from an earlier claim (its lease ran out while it waited)
        origin = self._origin_of(event.url) if event.status else None
        if origin is None:
            # The event outlived the status retention (or a URL from an older version):
            # nothing can be sent; the message's next event may.
            self._record("drop", event)
            return True
        state = self.origins.get(origin)
        if state is None:
            state = self.origins[origin] = _Origin()
        if state.held >= self.per_origin:
            return False
        state.held += 1
        self.held.add(event.id)
        state.waiting.append(event)
        if state.senders < self.concurrency:
            state.senders += 1
            task = asyncio.create_task(self._serve(origin, state), name=f"callbacks-{origin}")
            self.senders.add(task)
            task.add_done_callback(self.senders.discard)
        return True

    def _origin_of(self, url: str) -> urls.Origin | None:
        """The receiver origin of a callback URL (None: not one), parsed once per URL: most
        events of a gateway go to a handful of URLs."""
        if url not in self._origins_seen:
            if len(self._origins_seen) >= ORIGINS_CACHED:
                self._origins_seen.clear()
            parsed = urls.parse(url)
            self._origins_seen[url] = None if isinstance(parsed, str) else parsed.origin
        return self._origins_seen[url]

    # -- one receiver origin ---------------------------------------------------------------

    async def _serve(self, origin: urls.Origin, state: _Origin) -> None:
        """One of an origin's senders: post its waiting events one by one until none is left.

        A coroutine per origin slot rather than a task per event: at thousands of callbacks a
        second, creating and scheduling a task for each cost as much as posting it.
        """
        try:
            while state.waiting and not self.stopping.is_set():
                event = state.waiting.popleft()
                try:
                    await self._handle(event)
                except asyncio.CancelledError:
                    raise
                except StoreUnavailable as exc:  # the outcome is lost; the lease brings it back
                    self._redis_down(exc)
                except Exception:  # a loop boundary: one event's bug must not end the sender
                    log.exception("status callback %s failed unexpectedly", event.id)
                finally:
                    self.held.discard(event.id)
                    state.held -= 1
                    state.progressed = time.monotonic()
                    self.room.set()
        finally:
            state.senders -= 1
            if state.senders == 0 and state.held == 0 and self.origins.get(origin) is state:
                del self.origins[origin]

    async def _handle(self, event: Event) -> None:
        if event.age_s() > self.settings.callback_max_age:
            metrics.local_callbacks_dropped.inc("max_age")
            self._record("drop", event)
            return
        await self._yield_to_sends()
        status = await self._post(event)
        age_s = event.age_s()
        if status is not None and 200 <= status < 300:
            metrics.local_callbacks_delivered.inc()
            metrics.local_callback_lag.observe(age_s)
            self._record("ok", event)
        elif status == 410:
            metrics.local_callbacks_dropped.inc("gone")
            self._record("drop", event)
        else:
            delay = retry_delay(event.attempts + 1, self.settings.callback_retry_base)
            if age_s + delay > self.settings.callback_max_age:
                metrics.local_callbacks_dropped.inc("max_age")
                self._record("drop", event)
            else:
                metrics.local_callbacks_retried.inc()
                self._record("retry", event, int(delay * 1000))

    async def _yield_to_sends(self) -> None:
        """While the drain has sends in hand, pace callbacks to a share of its send rate.

        Sends are the gateway's job and callbacks can wait: measured in one worker process, a
        callback costs about half a send's CPU, and unpaced they took a third of the drain's
        rate (`bench receipts`). Paced to a tenth of the sends (at least `YIELD_MIN_RATE`/s),
        they take a twentieth; the outbox holds the rest, which goes at full speed once the
        drain is idle.
        """
        while (load := self.drain_load()) is not None:
            rate = max(YIELD_MIN_RATE, YIELD_SHARE * load)
            now = time.monotonic()
            self._allowance = min(
                self._allowance + (now - self._paced_at) * rate, max(1.0, rate * YIELD_BURST_S)
            )
            self._paced_at = now
            if self._allowance >= 1.0:
                self._allowance -= 1.0
                return
            await asyncio.sleep((1.0 - self._allowance) / rate)

    async def _post(self, event: Event) -> int | None:
        """The receiver's HTTP status, or None when it did not answer in time (or at all)."""
        assert self.session is not None
        body = event.body()
        headers = signing.headers(self.key, event.id, int(time.time()), body)
        self._inflight += 1
        try:
            # Redirects are not followed: they could lead outside the allow list.
            async with self.session.post(
                event.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                return response.status
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            log.debug("status callback %s to %s: %r", event.id, event.url, exc)
            return None
        finally:
            self._inflight -= 1

    def _record(self, kind: str, event: Event, delay_ms: int = 0) -> None:
        """An event's outcome, written with the others that come meanwhile (`_report_loop`)."""
        self._outcomes.append((kind, event, delay_ms))
        self._outcome_added.set()

    async def _report_loop(self) -> None:
        """Write the outcomes in batches: one `callback_done` call for all that came meanwhile.

        An outcome not written (Redis down, or the process killed) is not lost: its event's
        lease runs out and the event is claimed again (at least once).
        """
        while True:
            if not self._outcomes:
                if self._finishing:
                    return
                self._outcome_added.clear()
                await self._outcome_added.wait()
                continue
            batch, self._outcomes = self._outcomes, []
            metrics.CALLBACKS_INFLIGHT.set(self._inflight)
            try:
                await self._report_many(batch)
            except StoreUnavailable as exc:
                self._redis_down(exc)
                await asyncio.sleep(0.5)  # outage backoff

    async def _report_many(self, outcomes: list[tuple[str, Event, int]]) -> None:
        by_shard: dict[int, list[object]] = {}
        for kind, event, delay_ms in outcomes:
            by_shard.setdefault(event.shard, []).extend((kind, event.id, delay_ms))

        def args_for(part: list[int]) -> list[object]:
            args: list[object] = []
            for index, shard in enumerate(part, start=1):
                args += [index, len(by_shard[shard]) // 3, *by_shard[shard]]
            return args

        # one call per Redis node; a node that failed fails the report (leases bring it back)
        for _, reply in await self.store.script_per_node("callback_done", list(by_shard), args_for):
            if isinstance(reply, Exception):
                raise reply
