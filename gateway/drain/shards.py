"""Which shards this worker drains: short shard leases shared by every worker on every host.

Each worker beats a heartbeat (`members`), aims to hold ceil(shards / live workers) shards and
renews them every second (`claim`, a lease of a few seconds). A worker that stops beating (it
was killed) loses its shards when their leases run out, and the others claim them.

Shards move between live workers by handover, never by release and claim, so that the numbers
on them see no pause (a release left a shard undrained until some worker's next refresh, up to
a second: a second `gateway worker` started during a backlog stalled a 1,000 msg/s number for
0.85-0.9 s):
- a worker below its share asks for shards of the workers above theirs (and of workers no
  longer alive, that are leaving) by naming itself their successor (`claim` 'want');
- the owner keeps draining them until its next renewal, which hands each asked-for shard to its
  successor in one step (the owner key changes from one worker to the other);
- the successor checks every `POLL_S` while it waits for shards, so it starts taking for a
  shard within that of the handover. The old owner's sends already scheduled go out as
  scheduled, and cover that moment: the number's sends go on.
- A worker that stops (SIGTERM) first leaves the member list and keeps draining, renewing every
  `POLL_S`, until the others have asked for and received all its shards (or `HANDOVER_S`
  passed, or no other worker is alive); only then does it stop taking.
So one shard never has two owners taking for it, nor a moment with none while its owner lives.
A take already in flight at the handover still completes for the old owner; rates and leases
are enforced in Redis, so that take's sends are exact like every other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable

from gateway.errors import StoreUnavailable
from gateway.store import Store, as_text

log = logging.getLogger("gateway.drain")

LEASE_MS = 5000
REFRESH_S = 1.0
POLL_S = 0.02  # renewal period while this worker waits for shards or hands its own over
HANDOVER_S = 3.0  # longest a stopping worker waits for the others to take its shards
# An ask lasts this long unless asked again (each refresh does): an asker that died is not
# handed shards for longer than that.
SUCCESSOR_MS = 2500
# How long after its last renewal a shard stays held while its node does not answer: half the
# lease, so that a renewal a promoted replica missed (replication is asynchronous), or a clock
# running fast, still leaves it this worker's alone until then.
KEEP_S = LEASE_MS / 1000 / 2


class ShardOwnership:
    def __init__(
        self,
        store: Store,
        worker_id: str,
        on_gain: Callable[[frozenset[int]], None] | None = None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        # told of the shards this worker gains, so that its take loop looks at them at once
        # (it may be waiting up to a second on the shards it had)
        self.on_gain = on_gain
        self.owned: frozenset[int] = frozenset()
        self._renewed_at: dict[int, float] = {}  # when each held shard's lease was last renewed
        self.wanted: frozenset[int] = frozenset()  # shards asked of their owners
        self.leaving = False
        self.others_alive = 0  # other live workers, as of the last refresh
        self.changed = asyncio.Event()
        self._poke = asyncio.Event()  # wakes the run loop early (a handover begins)
        self._renewed = asyncio.Event()  # a renewal as a leaving worker was made
        # one change of ownership at a time: a refresh in flight when `hand_over` begins must
        # not leave asks standing for a worker that is leaving
        self._lock = asyncio.Lock()

    async def _claim(self, shards: list[int], mode: str) -> list[object]:
        """Per shard of `shards` (in order) the `claim` script's reply: held (1 or 0), or the
        owner for 'peek'. A cluster node that failed answers None for its shards."""
        if not shards:
            return []
        args = [self.worker_id, LEASE_MS, mode, SUCCESSOR_MS]
        found: dict[int, object] = {}
        claims = await self.store.script_per_node("claim", shards, lambda _: args, patient=False)
        for part, replies in claims:
            if isinstance(replies, BaseException):
                continue  # a cluster node that failed: None for its shards (see `_held`)
            found.update(zip(part, replies, strict=True))
        return [found.get(shard) for shard in shards]

    async def _held(self, shards: list[int], mode: str) -> set[int]:
        """The shards of `shards` held after a `claim` call in `mode`.

        A shard whose node did not answer (a cluster node failing over, or the shard's slot
        being moved: a script over keys half moved is refused) stays held while the lease this
        worker last renewed still runs by a wide margin (`KEEP_S`): no other worker can have
        it before then. Dropped, it waited for this worker's next renewal, up to a second
        (pauses of 0.77-0.91 s in a number's sends in 5 of 23 runs of a reshard mid-drain).
        """
        asked = time.monotonic()
        replies = await self._claim(shards, mode)
        held = set()
        for shard, got in zip(shards, replies, strict=True):
            if got == 1:
                held.add(shard)
                self._renewed_at[shard] = asked
            elif got is None and shard in self.owned and self._lease_runs(shard, asked):
                held.add(shard)
        return held

    def _lease_runs(self, shard: int, at: float) -> bool:
        """Whether the lease this worker last renewed on `shard` surely runs at `at`."""
        renewed = self._renewed_at.get(shard)
        return renewed is not None and at < renewed + KEEP_S

    async def _members(self, mode: str) -> list[str]:
        alive = await self.store.script("members", 0, [self.worker_id, LEASE_MS, mode])
        return [as_text(member) for member in alive]

    async def refresh(self) -> None:
        async with self._lock:
            await self._refresh()

    async def _refresh(self) -> None:
        """Beat, renew what is held (handing over what others asked for), and when below the
        fair share take free shards and ask for more of the workers above theirs."""
        if self.leaving:
            alive = await self._members("leave")
            self.others_alive = len(alive)
            self._set(frozenset(await self._held(sorted(self.owned), "claim")))
            self._renewed.set()
            return
        try:
            alive = await self._members("beat")
        except StoreUnavailable:
            # The member list's node is down (on a cluster: shard 0's, until its replica takes
            # over): the shards held on the other nodes are renewed all the same.
            self._set(frozenset(await self._held(sorted(self.owned), "claim")))
            raise
        self.others_alive = len(alive) - 1
        target = math.ceil(self.store.shards / max(len(alive), 1))
        held = await self._held(sorted(self.owned | self.wanted), "claim")
        wanted: list[int] = []
        if len(held) < target:
            others = [s for s in range(self.store.shards) if s not in held]
            owners = {
                shard: as_text(owner) if isinstance(owner, bytes) else owner
                for shard, owner in zip(others, await self._claim(others, "peek"), strict=True)
            }
            # free, or still this worker's though not held: a cluster node that failed made
            # its shards look lost, and its promoted replica has them under this worker's name
            free = [shard for shard, owner in owners.items() if owner in ("", self.worker_id)]
            random.shuffle(free)
            held |= await self._held(free[: target - len(held)], "claim")
            others_owned = {s: o for s, o in owners.items() if o != self.worker_id}
            wanted = self._to_ask(
                others_owned, set(alive), target, target - len(held), prefer=self.wanted
            )
            held |= await self._held(wanted, "want")
        await self._withdraw(self.wanted - set(wanted) - held)
        self.wanted = frozenset(wanted) - held
        self._set(frozenset(held))

    async def _withdraw(self, shards: frozenset[int] | set[int]) -> None:
        """Stop asking for `shards`: left standing, an old ask would have their owner hand them
        over later to a worker that no longer needs them (and then ask back)."""
        if shards:
            await self._claim(sorted(shards), "unwant")

    @staticmethod
    def _to_ask(
        owners: dict[int, object],
        alive: set[str],
        target: int,
        need: int,
        prefer: frozenset[int] = frozenset(),
    ) -> list[int]:
        """Up to `need` shards to ask for: of each live owner, what it holds above `target`;
        of an owner no longer alive (it is leaving), all. The shards in `prefer` (asked for
        before) come first, so an ask stands until its owner's renewal serves it, but only
        while that owner still has them to spare."""
        by_owner: dict[str, list[int]] = {}
        for shard, owner in owners.items():
            if isinstance(owner, str) and owner:
                by_owner.setdefault(owner, []).append(shard)
        kept: list[int] = []
        fresh: list[int] = []
        for owner, shards in by_owner.items():
            spare = len(shards) - (target if owner in alive else 0)
            if spare > 0:
                random.shuffle(shards)
                shards.sort(key=lambda shard: shard not in prefer)
                kept += [s for s in shards[:spare] if s in prefer]
                fresh += [s for s in shards[:spare] if s not in prefer]
        random.shuffle(fresh)
        return (kept + fresh)[: max(need, 0)]

    async def _poll(self) -> None:
        """Between refreshes: take the asked-for shards that were handed over; while leaving,
        renew (hand over) what is still held."""
        async with self._lock:
            if self.leaving:
                await self._refresh()
                return
            if self.wanted:
                # 'claim', not 'want': polls do not ask again (an ask that lost to another
                # asker would name this worker successor of the shard's next owner)
                got = await self._held(sorted(self.wanted), "claim")
                if got:
                    self.wanted -= got
                    self._set(self.owned | got)

    def _set(self, held: frozenset[int]) -> None:
        if held != self.owned:
            log.info("draining %d of %d shards", len(held), self.store.shards)
            gained = held - self.owned
            self.owned = held
            self.changed.set()
            if gained and self.on_gain is not None:
                self.on_gain(gained)

    async def current(self, within_s: float) -> list[int]:
        """The shards owned now, in order; with none, first wait up to `within_s` for some."""
        owned = sorted(self.owned)
        if not owned:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    await self.changed.wait()
        return owned

    async def run(self, stopping: asyncio.Event) -> None:
        """Refresh every second (and poll every `POLL_S` while shards are asked for or being
        handed over) until `stopping` is set."""
        down = False
        next_refresh = 0.0
        while not stopping.is_set():
            try:
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + REFRESH_S
                    await self.refresh()
                else:
                    await self._poll()
                if down:
                    log.info("redis is back: shard leases renewed")
                down = False
            except StoreUnavailable as exc:
                if not down:
                    log.warning("redis unavailable, cannot renew shard leases: %s", exc)
                down = True
            fast = self.leaving or bool(self.wanted)
            await self._sleep(stopping, POLL_S if fast else next_refresh - time.monotonic())

    async def _sleep(self, stopping: asyncio.Event, wait_s: float) -> None:
        """Until `wait_s` passed, `stopping` is set or `hand_over` began."""
        self._poke.clear()
        waits = {
            asyncio.create_task(stopping.wait(), name="drain-ownership-stop"),
            asyncio.create_task(self._poke.wait(), name="drain-ownership-poke"),
        }
        try:
            await asyncio.wait(waits, timeout=max(wait_s, 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def hand_over(self, within_s: float = HANDOVER_S) -> None:
        """Leave the member list and keep draining until the other workers have taken every
        shard, or `within_s` passed, or no other worker is alive (then `leave` frees them).
        The run loop does the renewals that hand the shards over."""
        async with self._lock:
            with contextlib.suppress(StoreUnavailable):
                await self._withdraw(self.wanted)
            self.wanted = frozenset()
            if not self.owned:
                return
            self.leaving = True
        self.others_alive = -1  # not known until the first renewal as a leaving worker
        self._poke.set()
        deadline = time.monotonic() + within_s
        while self.owned and self.others_alive != 0:
            self._renewed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._renewed.wait()
            except TimeoutError:
                break

    async def leave(self) -> None:
        """Give every shard back and leave the member list (on shutdown)."""
        try:
            await self._claim(sorted(self.owned), "release")
            # and no ask of this worker outlives it
            await self._claim(list(range(self.store.shards)), "unwant")
            await self.store.script("members", 0, [self.worker_id, LEASE_MS, "leave"])
        except StoreUnavailable:
            pass
        self._set(frozenset())
