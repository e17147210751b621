"""The drain worker: take due messages, start each at its stamp, settle what became of it.

One `Drain` runs in each worker process, as supervised tasks:
- ownership: renews this worker's shard leases (`gateway.drain.shards`);
- take loop (here): for each owned shard that is due, one `take` call hands over what this
  process can start on time; with nothing due it sleeps until the next due time or a wake
  token (`gateway.drain.wake`), never a polling sleep;
- senders: a dispatcher and a fixed pool of sender coroutines (`gateway.drain.senders`);
- settle loop: outcomes batched per shard into `settle` calls (`gateway.drain.settle`);
- status callbacks: the owned shards' outboxes, sent on their own (`gateway.callbacks.sender`).

Rate exactness: `take` stamps each grant with a send time on the Redis server's clock and keeps
every window of 1 s + `GATEWAY_RATE_SLACK` at or under the number's rate. The worker starts
each send at its stamp (mapped to its own clock by `gateway.drain.clock`), so the gap between
stamp and request varies only by the timer and by how busy the process is; a send that would
leave more than half the slack after its stamp is put back with its grant (it never leaves
before its stamp). The other half absorbs what happens after the write: the network and
the upstream's own receive scheduling. With the default 15 ms: the gateway's part is at most
7.5 ms, the upstream side's may reach 7.5 ms, and no second holds more than the rate.

What a take asks for is sized by `gateway.drain.schedule`: the sends this process has shown it
can start on time over the next step, from where the previous take's end. That is what keeps
put-backs rare with thousands of rate-limited numbers due at once: a take never grants more
than can start before its grants go stale.

With `GATEWAY_UPSTREAM_MAX_MPS` set, each take first reserves its slots in the fleet's log
(`gateway.drain.fleet`) and every send, of unlimited numbers too, starts at its stamp.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from typing import Any

from gateway import metrics
from gateway.callbacks.sender import CallbackSender
from gateway.drain.clock import ServerClock
from gateway.drain.fleet import BOUND_MS, FleetCap, Reservation
from gateway.drain.outage import RedisOutage
from gateway.drain.schedule import SendSchedule
from gateway.drain.senders import Senders
from gateway.drain.settle import Settler
from gateway.drain.shards import ShardOwnership
from gateway.drain.take import (
    LOOKAHEAD_MS,
    MAX_LEAD_MS,
    NodeShares,
    TakeReply,
    merge_takes,
    parse_take,
    take_args,
)
from gateway.drain.upstream import CloudApi
from gateway.drain.wake import MAX_WAIT_S, WakeListener
from gateway.errors import StoreUnavailable
from gateway.settings import Settings
from gateway.store import Store

log = logging.getLogger("gateway.drain")

SWEEP_EVERY_S = 5.0
# The share of the rate slack a send may start late by; the rest covers what happens after the
# request is written (the network, the upstream's own receive scheduling). Measured on a shared
# 2-core host, a third (5 ms) put back several percent of the sends: a process waits that long
# for a CPU there.
TOLERANCE_SHARE = 1 / 2
REFRESH_GRACE_S = 2.0
# Samples of the server's clock a worker takes at most, before a take, to narrow its bracket.
NARROW_SAMPLES = 100


async def _finish(task: asyncio.Task[None], within_s: float) -> bool:
    """Wait for a task to end by itself; cancel it after `within_s`. True if it ended."""
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    return True


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
        self.worker_id = (
            worker_id or f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(24):06x}"
        )
        self.ownership = ShardOwnership(store, self.worker_id, on_gain=self._gained)
        assert settings.redis_url is not None
        self.window_ms = 1000.0 + settings.rate_slack * 1000.0
        # After a failure, a shard waits until no grant its server may have lost can still be
        # in a window: one window, plus how far ahead of the server's clock a take stamps.
        self.outage = RedisOutage(hold_s=(self.window_ms + MAX_LEAD_MS + LOOKAHEAD_MS) / 1000)
        self.wake = WakeListener(settings.redis_url, self.outage, settings.shards)
        self.clock = ServerClock()
        tolerance = settings.rate_slack * TOLERANCE_SHARE
        self.narrow_width = tolerance / 2
        self._clock_warned = False
        self.schedule = SendSchedule(tolerance, settings.upstream_max_mps)
        self.settler = Settler(settings, store, self.outage)
        self.fleet: FleetCap | None = None
        if settings.upstream_max_mps is not None:
            self.fleet = FleetCap(
                store, self.clock, self.worker_id, settings.upstream_max_mps, self.window_ms
            )
        self._fleet_free_at = 0.0  # a refused reserve: when one would be granted (monotonic)
        self._fleet_failed_at: float | None = None  # the first failure of the fleet's node
        self.senders = Senders(
            api,
            self.settler,
            self.schedule,
            concurrency=settings.worker_concurrency,
            tolerance_s=tolerance,
            all_timed=self.fleet is not None,
        )
        self.refill_at = max(1, min(64, settings.worker_concurrency // 8))
        self.node_shares = NodeShares()
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        # Without a signing secret no callback can be sent (`gateway run` always has one).
        self.callbacks: CallbackSender | None = None
        if settings.callback_secret:
            self.callbacks = CallbackSender(
                settings, store, self.ownership, settings.callback_secret, self.load
            )
        else:
            log.warning("GATEWAY_CALLBACK_SECRET is unset: this process sends no status callbacks")
        self._stopped = False
        self._load, self._load_at, self._load_sent = 0.0, time.monotonic(), 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, on_fatal: Any = None) -> None:
        self._on_fatal = on_fatal
        for name, coro in (
            ("drain-ownership", self.ownership.run(self.stopping)),
            ("drain-take", self._take_loop()),
            ("drain-settle", self.settler.run()),
            ("drain-wake", self.wake.run(self.stopping, self._owned_shards)),
        ):
            self.tasks.append(asyncio.create_task(coro, name=name))
        self.tasks += self.senders.start()
        for task in self.tasks:
            task.add_done_callback(self._supervise)
        if self.callbacks is not None:
            self.callbacks.start(self._supervise)
        metrics.DRAIN_START_RATE.set(self.schedule.rate)
        # Connections opened before the first sends need them (a chore: it ends by itself).
        self._warming = asyncio.create_task(self.api.warm(), name="drain-warm")

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
        """Stop taking, let started sends finish within the grace period, put back the rest.

        Safe to call twice.
        """
        if self._stopped:
            return
        self._stopped = True
        ownership, take, settle, wake = self.tasks[:4]
        if not ownership.done() and not take.done():
            # Drain on while the other workers take the shards over: their numbers see no
            # pause (`ShardOwnership.hand_over`).
            await self.ownership.hand_over()
        self.stopping.set()
        self._warming.cancel()
        grace = self.settings.shutdown_grace if grace_s is None else grace_s
        # The take loop notices `stopping` within one wait; a take in progress completes, so
        # nothing it was handed is left leased without a sender.
        await _finish(take, MAX_WAIT_S + 2.0)
        await self.senders.stop(grace)
        if self.settler.chores:
            await asyncio.wait(set(self.settler.chores), timeout=5.0)
        self.settler.finish()  # the settle loop ends after what is queued before
        if not await _finish(settle, 10.0):
            log.error("outcomes left unsettled at exit; their leases will run out")
        if self.callbacks is not None:
            await self.callbacks.stop(grace)
        await _finish(ownership, REFRESH_GRACE_S)
        await _finish(wake, MAX_WAIT_S + 2.0)
        await self.ownership.leave()
        await self.wake.close()

    def load(self) -> float | None:
        """Sends per second this process made over the last second while it has sends in hand
        (taken and not settled); None when it has none: the status callbacks yield to it."""
        if not self.senders.held:
            return None
        now = time.monotonic()
        if now - self._load_at >= 1.0:
            self._load = (self.senders.sent - self._load_sent) / (now - self._load_at)
            self._load_at, self._load_sent = now, self.senders.sent
        return self._load

    # -- taking ----------------------------------------------------------------------------

    def _gained(self, shards: frozenset[int]) -> None:
        """Shards handed to this worker are taken from at once, not at the end of a wait on
        the shards it had."""
        self.wake.woken |= shards
        self.wake.event.set()

    async def _owned_shards(self) -> list[int]:
        """The shards this worker drains; with none, wait (up to a second) for some."""
        return await self.ownership.current(MAX_WAIT_S)

    async def _take_loop(self) -> None:
        due_at: dict[int, float] = {}  # monotonic time each shard is next due
        last_sweep = time.monotonic()
        while not self.stopping.is_set():
            owned = await self._owned_shards()
            if not owned:
                continue
            await self._narrow_clock()
            now = time.monotonic()
            self._learn(now)
            if now - last_sweep >= SWEEP_EVERY_S:
                # A safety net for a lost wake token (e.g. Redis restarted without its data).
                last_sweep = now
                due_at.clear()
            for shard in self.wake.take_woken():
                due_at[shard] = 0.0
            start = self.schedule.next_start(now, self.clock.lead)
            if self.outage.holding:  # shards held after a failure (`RedisOutage`)
                for shard in owned:
                    due_at[shard] = max(due_at.get(shard, 0.0), self.outage.held_until(shard))
            due = [s for s in owned if due_at.get(s, 0.0) <= start]
            if not due:
                soonest = min(due_at[s] for s in owned)
                await self.wake.wait(min(max(soonest - start, 0.0005), MAX_WAIT_S))
                continue
            # One take serves every due shard; in a new order each time, as the budget may run
            # out before the last.
            random.shuffle(due)
            await self._make_room()
            if self.stopping.is_set():
                return
            due_at.update(await self._take(due))

    async def _narrow_clock(self) -> None:
        """Before a take: the clock's bracket at most half the tolerance wide, so a timed send
        has at least the other half to be written in (`ServerClock`). Samples are taken only
        while it is wider: at start, and after a clock step restarted it."""
        if self.clock.width <= self.narrow_width:
            return
        try:
            narrow = await self.clock.narrow(
                self.store.server_time_ms, self.narrow_width, NARROW_SAMPLES
            )
        except StoreUnavailable:
            return  # the take finds Redis down too, and waits
        if narrow:
            self._clock_warned = False
        elif not self._clock_warned:
            self._clock_warned = True
            log.warning(
                "the Redis server's clock is known to this process only within %.1f ms (its "
                "calls are that slow): timed sends may be put back until it narrows",
                self.clock.width * 1000,
            )

    def _learn(self, now: float) -> None:
        before = self.schedule.rate
        self.schedule.adjust(now)
        if self.schedule.rate != before:
            metrics.DRAIN_START_RATE.set(self.schedule.rate)

    async def _make_room(self) -> None:
        """Wait until a take is worth making: room in the schedule, free sender slots and, under
        the upstream cap, slots the fleet can reserve."""
        senders = self.senders
        while not self.stopping.is_set():
            now = time.monotonic()
            self._learn(now)
            wait = max(self.schedule.wait_for_room(now, self.clock.lead), self._fleet_free_at - now)
            if wait > 0:
                await asyncio.sleep(wait)
            elif senders.free < self.refill_at:
                # One take for a few freed slots costs as much as one for many.
                senders.slot_freed.clear()
                await senders.slot_freed.wait()
            else:
                return

    async def _take(self, shards: list[int]) -> dict[int, float]:
        """Take from these shards and hand the messages to the senders; when each is next due."""
        free = self.senders.free
        budget = self.schedule.budget(free)
        lead = self.clock.lead + (self.fleet.lag if self.fleet is not None else 0.0)
        start = self.schedule.next_start(time.monotonic(), lead)
        start_us = self.clock.to_server_us(start)
        spacing = self.schedule.spacing_us()
        granted, reservation = budget, None
        if self.fleet is not None:
            try:
                reservation = await self.fleet.reserve(start_us, spacing, budget)
            except StoreUnavailable as exc:  # the fleet's node: nothing is sent without it
                self.outage.failed(exc)
                # and its log may come back without its latest members, as a window log may
                # (`RedisOutage`): the next reserve waits out the same hold
                now = time.monotonic()
                if self._fleet_failed_at is None:
                    self._fleet_failed_at = now
                self._fleet_free_at = max(self._fleet_failed_at + self.outage.hold_s, now + 0.2)
                return {}
            self._fleet_failed_at = None
            if not reservation.granted:
                # The shards stay due; the take loop waits until the fleet has room within
                # the lead a reserve may be granted at.
                self._fleet_free_at = self.fleet.retry_at(reservation)
                return {}
            granted, start_us = reservation.granted, reservation.start_us
        # On a Redis Cluster one take per node, each with its share of the budget and slots
        # (`NodeShares`); on one node the plain take.
        plan = self.node_shares.plan(self.store.node_parts(shards), granted)

        def args(part: list[int]) -> list[Any]:
            share, offset = plan.get(part[0], (1, 0))
            if reservation is not None:
                # only the slots reserved: the shares may add up to more than the budget
                share = max(0, min(share, granted - offset))
            return take_args(
                self.window_ms,
                budget=share,
                lease_ms=int(self.settings.lease_seconds * 1000),
                headroom=self.settings.rate_headroom,
                retention_s=int(self.settings.status_retention),
                start_us=start_us + offset * spacing,
                spacing_us=spacing,
                pair_interval_ms=self.settings.pair_interval * 1000.0,
                pair_burst=self.settings.pair_burst,
                recipient_order=self.settings.recipient_order,
                fleet_bound_ms=BOUND_MS if reservation is not None else 0.0,
            )

        sent = time.monotonic()
        try:
            replies = await self.store.script_per_node("take", shards, args)
        except StoreUnavailable as exc:
            replies = [(shards, exc)]
        received = time.monotonic()
        parts: list[TakeReply] = []
        failed: list[int] = []
        for part, reply in replies:
            if isinstance(reply, Exception):
                if not isinstance(reply, StoreUnavailable):
                    raise reply  # a bug, not an outage: it must not be retried forever
                self.outage.shards_failed(part, reply)
                failed += part
                continue
            self.outage.shards_answered(part)
            self.clock.observe(sent, float(reply[0]), received)
            parts.append(parse_take(part, reply, self.clock))
        if not parts:
            if reservation is not None:
                await self._settle_fleet(reservation, [])
            await asyncio.sleep(0.2)  # outage backoff, not a polling sleep on the normal path
            return dict.fromkeys(shards, time.monotonic())
        if not failed:
            self.outage.answered()
        taken = merge_takes(parts, spacing)
        if self.store.cluster is not None:
            self.node_shares.learn(shards, taken.items)
        if taken.expired:
            metrics.local_failed.inc("expired", amount=taken.expired)
        if taken.deleted:
            metrics.local_failed.inc("phone_number_deleted", amount=taken.deleted)
        for tier in taken.rate_limited_tiers:
            metrics.RATE_LIMITED.labels(tier).inc()
        due = {
            shard: float("inf") if due_ms < 0 else self.clock.local_earliest(int(due_ms * 1000))
            for shard, due_ms in taken.next_due_ms.items()
        }
        if taken.slots:
            slots_end = self.clock.local_latest(taken.base_us + taken.slots * spacing)
            # A take that gave a number less than it had (an unlimited number gets at most a
            # chunk per take) leaves its shard due at once: the rate may grow then too, or one
            # unlimited number's drain stopped growing at a chunk per step (6,400 msg/s).
            more = min(due.values(), default=float("inf")) <= received
            self.schedule.scheduled(slots_end, taken.slots, budget, free, more)
        if taken.items:
            self.senders.add(taken.items)
        if reservation is not None:
            await self._settle_fleet(reservation, [item.stamp for item in taken.items])
        if failed:  # a cluster node that failed: its shards are tried again after a backoff
            due.update(dict.fromkeys(failed, time.monotonic() + 0.2))
        return due

    async def _settle_fleet(self, reservation: Reservation, stamps: list[str]) -> None:
        """Tell the fleet's log what a take made of its reservation (`FleetCap.settle`)."""
        assert self.fleet is not None
        try:
            await self.fleet.settle(reservation, stamps)
        except StoreUnavailable as exc:
            # its members keep their bound: some of the cap held a little longer, no more
            self.outage.failed(exc)
