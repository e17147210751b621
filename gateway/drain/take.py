"""What a `take` script call hands a worker, and the arguments it is called with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.drain.clock import ServerClock

# Grants per take for a rate-limited number: about `rate * PACE_MS / 1000`, at least MIN_CHUNK
# (small tiers would otherwise pay a take per message), up to twice that to catch up. A number's
# sends go out in such bursts: at 50 ms (and the second chunk granted every time), a 1,000 msg/s
# number's arrivals had gaps of 30-45 ms, at 25 ms 12-22 ms (`bench handover`, 2026-11-29), for
# no measurable drain cost over 1,000 or 10,000 numbers (`bench drain`).
PACE_MS = 25.0
MIN_CHUNK = 8
MAX_NUMBERS_PER_TAKE = 64
UNLIMITED_CHUNK = 128
# How far ahead of the server's clock a take may start its slots.
MAX_LEAD_MS = 200
# A take may grant a rate-limited number the window slots that free this long after its first
# slot, each stamped the moment it frees (see take.lua).
LOOKAHEAD_MS = 50.0
# Rate-limited stamps fall on a grid of this many ms, so sends start a handful at a time: a
# loop turn per few sends costs the event loop more than the sends (2 ms: 25-35% more worker
# CPU per message over 1,000 and 10,000 `high` numbers than 4 ms, and more put-backs).
QUANTUM_MS = 4.0


@dataclass(slots=True)
class Taken:
    """A message handed to this worker by `take`, due upstream at `start` (monotonic s)."""

    shard: int
    phone_number_id: str
    limit: int  # the number's rate in force; 0 = unlimited
    tier: str
    token: str | None
    id: str
    fence: str
    attempts: int
    payload: bytes
    created_ms: int
    expires_ms: int | None
    stamp: str  # its send time on the server's clock (ms), as in the number's window
    # The same on this process's monotonic clock, as a bracket (`ServerClock`): the earliest it
    # can be (the deadline counts from it) and the latest (it is never written before).
    start: float
    not_before: float
    # What a settle of this attempt as sent needs to record it without reading the message
    # back (take.lua); opaque here, '' when there is none.
    context: str = ""


@dataclass(slots=True)
class TakeReply:
    now_ms: float
    next_due_ms: dict[int, float]  # per shard taken from; -1: nothing scheduled in it
    items: list[Taken]
    expired: int
    rate_limited_tiers: list[str]
    deleted: int  # leased messages failed because their number was deleted
    base_us: int  # the take's first slot, on the server's clock
    slots: int  # how many slots it used


def take_args(
    settings_window_ms: float,
    *,
    budget: int,
    lease_ms: int,
    headroom: float,
    retention_s: int,
    start_us: int,
    spacing_us: int,
    pair_interval_ms: float = 0.0,
    pair_burst: int = 1,
    recipient_order: bool = False,
    fleet_bound_ms: float = 0.0,
) -> list[Any]:
    """The ARGV of take.lua, in its order (a pair interval of 0: no pacing per recipient;
    pacing keeps per-recipient order whatever `recipient_order` says; a fleet bound of 0: no
    upstream cap, else `start_us` is the first slot the fleet reserved, `gateway.drain.fleet`)."""
    return [
        budget,
        MAX_NUMBERS_PER_TAKE,
        lease_ms,
        settings_window_ms,
        PACE_MS,
        MIN_CHUNK,
        headroom,
        UNLIMITED_CHUNK,
        retention_s,
        start_us,
        spacing_us,
        MAX_LEAD_MS,
        LOOKAHEAD_MS,
        QUANTUM_MS,
        pair_interval_ms,
        pair_burst,
        1 if recipient_order else 0,
        fleet_bound_ms,
    ]


def _stamp(raw: bytes | int) -> tuple[str, int]:
    """An item's stamp as text (ms, three decimals) and in µs, from either form take.lua gives:
    the text a rate-limited number's window holds, or an unlimited number's µs."""
    if isinstance(raw, int):
        return f"{raw // 1000}.{raw % 1000:03d}", raw
    text = raw.decode()
    return text, int(float(text) * 1000)


def parse_take(shards: list[int], reply: list[Any], clock: ServerClock | None = None) -> TakeReply:
    """Read the reply of a take from `shards`; `clock` maps stamps to this process's clock."""
    now_ms = float(reply[0])
    expired, n_groups = int(reply[1]), int(reply[3])
    rate_limited = [tier for tier in reply[2].decode().split(",") if tier]
    deleted = int(reply[4])
    next_due = {shard: float(reply[7 + i]) for i, shard in enumerate(shards)}
    items: list[Taken] = []
    pos = 7 + len(shards)
    for _ in range(n_groups):
        pn = reply[pos].decode()
        limit = int(reply[pos + 1])
        tier = reply[pos + 2].decode()
        token = reply[pos + 3].decode() or None
        count = int(reply[pos + 4])
        pos += 5
        for _ in range(count):
            message_id = reply[pos].decode()
            expires = reply[pos + 5]
            stamp, stamp_us = _stamp(reply[pos + 6])
            items.append(
                Taken(
                    shard=int(message_id.split("-", 1)[0]),
                    phone_number_id=pn,
                    limit=limit,
                    tier=tier,
                    token=token,
                    id=message_id,
                    fence=str(int(reply[pos + 1])),
                    attempts=int(reply[pos + 2]),
                    payload=reply[pos + 3],
                    created_ms=int(reply[pos + 4]),
                    expires_ms=int(expires) if expires else None,
                    stamp=stamp,
                    start=clock.local_earliest(stamp_us) if clock is not None else 0.0,
                    not_before=clock.local_latest(stamp_us) if clock is not None else 0.0,
                    context=reply[pos + 7].decode(),
                )
            )
            pos += 8
    return TakeReply(
        now_ms, next_due, items, expired, rate_limited, deleted, int(reply[5]), int(reply[6])
    )


class NodeShares:
    """How a take split over Redis Cluster nodes shares its budget and its slots.

    One take per node (each script runs on one node), at once. Each node gets a contiguous run
    of the take's slots, sized by what its shards were granted lately (plus one), so a node
    with a backlog gets nearly all of the worker's starts and an idle one costs a slot. (Equal
    shares capped a 1,000/s number at a third of the worker's start rate when two other nodes
    had a little due.) On one node it is the plain take: the whole budget from the start.
    """

    def __init__(self) -> None:
        self.recent: dict[int, float] = {}  # shard -> grants per take, smoothed

    def plan(self, parts: list[list[int]], budget: int) -> dict[int, tuple[int, int]]:
        """First shard of each part -> (its budget, its first slot after the take's start)."""
        if len(parts) == 1:
            return {parts[0][0]: (budget, 0)}
        weights = [1.0 + sum(self.recent.get(s, 0.0) for s in part) for part in parts]
        total = sum(weights)
        plan: dict[int, tuple[int, int]] = {}
        offset, cumulative = 0, 0.0
        for index, (part, weight) in enumerate(zip(parts, weights, strict=True)):
            # Each part's end rounded, not its share: the shares add up to the budget (at
            # least one each, the parts after this one too). Rounded one by one, 40 over three
            # nodes made 13 + 13 + 13: a take never used its whole budget, so the send schedule
            # never learned it could send more, and a cluster drained at its first 2,000 msg/s.
            cumulative += weight
            after = len(parts) - index - 1
            end = max(offset + 1, min(round(budget * cumulative / total), budget - after))
            plan[part[0]] = (end - offset, offset)
            offset = end
        return plan

    def learn(self, shards: list[int], items: list[Taken]) -> None:
        granted = dict.fromkeys(shards, 0)
        for item in items:
            granted[item.shard] = granted.get(item.shard, 0) + 1
        for shard, count in granted.items():
            self.recent[shard] = 0.5 * self.recent.get(shard, 0.0) + 0.5 * count


def merge_takes(parts: list[TakeReply], spacing_us: int) -> TakeReply:
    """One reply from the takes of several cluster nodes (see `NodeShares`): their items and
    due times together, and the slots from the first one used to the last one used by any."""
    if len(parts) == 1:
        return parts[0]
    used = [p for p in parts if p.slots] or parts[:1]
    base_us = min(p.base_us for p in used)
    end_us = max(p.base_us + p.slots * spacing_us for p in used)
    return TakeReply(
        now_ms=max(p.now_ms for p in parts),
        next_due_ms={s: d for p in parts for s, d in p.next_due_ms.items()},
        items=[item for p in parts for item in p.items],
        expired=sum(p.expired for p in parts),
        rate_limited_tiers=[t for p in parts for t in p.rate_limited_tiers],
        deleted=sum(p.deleted for p in parts),
        base_us=base_us,
        slots=-(-(end_us - base_us) // spacing_us) if spacing_us else sum(p.slots for p in used),
    )
