"""The fleet's upstream cap in Redis: `fleet.lua` on its own, and take.lua's bound under it.

The drain with the cap, in worker processes, is tests/acceptance/test_fleet_cap.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway import keys
from gateway.accept.service import Acceptor
from gateway.drain.take import parse_take, take_args
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store

WINDOW_MS = 1015.0
# A reserve's start may be this far ahead (the drain's is 200 ms): a test places starts where
# it needs them.
MAX_LEAD_MS = 10_000


async def reserve(
    store: Store,
    *,
    cap: int,
    want: int,
    start_us: int = 0,
    spacing_us: int = 1000,
    least: int = 1,
    bound_ms: float = 0.0,
    burst_ms: float = 10_000.0,
    max_lead_ms: int = MAX_LEAD_MS,
    serial: int = 0,
    prefix: str = "w1:",
) -> tuple[int, int, float]:
    """(granted, first slot in µs, free_at in ms or -1)."""
    reply = await store.script_at(
        "fleet",
        keys.fleet_prefix(),
        [
            "reserve",
            cap,
            WINDOW_MS,
            start_us,
            spacing_us,
            want,
            least,
            bound_ms,
            max_lead_ms,
            burst_ms,
            prefix,
            serial,
        ],
    )
    return int(reply[0]), int(reply[1]), float(reply[2])


async def settle(
    store: Store, cap: int, serial: int, granted: int, stamps: list[str], prefix: str = "w1:"
) -> int:
    args: list[Any] = ["settle", cap, prefix, serial, granted, *stamps]
    return int(await store.script_at("fleet", keys.fleet_prefix(), args))


async def scores(store: Store) -> dict[str, float]:
    entries = await store.redis.zrange(keys.upstream_sends(), 0, -1, withscores=True)
    return {member.decode(): score for member, score in entries}


async def _ahead_us(store: Store, ms: float = 100.0) -> int:
    """A start this far ahead of the server's now (a reserve moves a start in the past to now)."""
    return int((await store.server_time_ms() + ms) * 1000)


async def test_a_reserve_grants_up_to_the_cap_then_the_first_start_with_room(
    store: Store,
) -> None:
    start = await _ahead_us(store)
    granted, first, free_at = await reserve(store, cap=10, want=6, start_us=start, bound_ms=50.0)
    assert (granted, first, free_at) == (6, start, -1)
    # the slots are on the grid from the start, each held at its slot plus the bound for now
    held = await scores(store)
    assert held == {f"w1:{i}": pytest.approx(start / 1000 + i + 50.0) for i in range(6)}
    granted, first, _ = await reserve(
        store, cap=10, want=6, start_us=start, serial=6, bound_ms=50.0
    )
    assert (granted, first) == (4, start)
    # full: the room is a window after the oldest member, beyond the lead: refused, told when
    room_at = start / 1000 + 50.0 + WINDOW_MS
    granted, _, free_at = await reserve(
        store, cap=10, want=1, start_us=start, serial=10, max_lead_ms=200
    )
    assert granted == 0 and free_at == pytest.approx(room_at)
    # within the lead: granted at once, from that later start (first come, first served)
    granted, first, _ = await reserve(store, cap=10, want=1, start_us=start, serial=11)
    assert granted == 1 and first / 1000 == pytest.approx(room_at, abs=0.001)


async def test_members_a_window_before_the_start_are_not_counted(store: Store) -> None:
    start = await _ahead_us(store)
    granted, _, _ = await reserve(store, cap=5, want=5, start_us=start, spacing_us=1000)
    assert granted == 5  # held at start + 0, 1, 2, 3, 4 ms
    # a window later (windows are half-open) the first no longer shares a second with it:
    # exactly one slot there
    at = start + int(WINDOW_MS * 1000)
    granted, first, _ = await reserve(store, cap=5, want=5, start_us=at, serial=5)
    assert (granted, first) == (1, at)
    # a microsecond short of that, the second is still counted: the next start with room is
    # a window after it
    granted, first, _ = await reserve(store, cap=5, want=5, start_us=at - 1, serial=10)
    assert (granted, first) == (1, at + 1000)


async def test_a_reserve_waits_for_room_for_its_least_grant(store: Store) -> None:
    start = await _ahead_us(store)
    granted, _, _ = await reserve(store, cap=100, want=95, start_us=start, spacing_us=1000)
    assert granted == 95
    # 5 are free: wanting fewer than its least, it gets them where it asked
    granted, first, _ = await reserve(store, cap=100, want=3, start_us=start, least=10, serial=95)
    assert (granted, first) == (3, start)
    # 2 are free, fewer than the 10 it may not take less than: it starts once the 8th oldest
    # (one at start + 4 ms) has left the window
    room_at = start + 4000 + int(WINDOW_MS * 1000)
    granted, first, _ = await reserve(store, cap=100, want=20, start_us=start, least=10, serial=98)
    assert (granted, first) == (10, room_at)


async def test_a_settle_scores_the_sends_at_their_stamps_and_gives_the_rest_back(
    store: Store,
) -> None:
    start = await _ahead_us(store)
    granted, _, _ = await reserve(store, cap=10, want=8, start_us=start, bound_ms=50.0)
    assert granted == 8
    start_ms = start / 1000
    stamps = [f"{start_ms + 3:.3f}", f"{start_ms + 10:.3f}", f"{start_ms + 20:.3f}"]
    assert await settle(store, 10, 0, 8, stamps) == 5
    held = await scores(store)
    assert held == {
        "w1:0": pytest.approx(start_ms + 3),
        "w1:1": pytest.approx(start_ms + 10),
        "w1:2": pytest.approx(start_ms + 20),
    }
    # what was given back is the fleet's again at once
    granted, _, _ = await reserve(store, cap=10, want=10, start_us=start, serial=8)
    assert granted == 7


async def test_reserves_are_paced_at_the_caps_rate(store: Store) -> None:
    """Not all of a second's cap at its start: one slot every 1000 / cap ms, with a burst."""
    start = await _ahead_us(store)
    # 100/s: a slot every 10 ms; a burst of 50 ms lets 6 go at once after an idle spell
    paced = {"cap": 100, "start_us": start, "burst_ms": 50.0}
    granted, _, _ = await reserve(store, want=20, **paced)
    assert granted == 6
    # the next has its room 10 ms later: refused beyond the lead, granted within it
    granted, _, free_at = await reserve(store, want=20, serial=20, max_lead_ms=0, **paced)
    assert granted == 0 and free_at == pytest.approx(start / 1000 + 10)
    granted, first, _ = await reserve(store, want=20, serial=40, **paced)
    assert (granted, first) == (1, start + 10_000)
    # slots given back give their pace back: the 5 of the first 6 that went unused
    assert await settle(store, 100, 0, 6, [f"{start / 1000:.3f}"]) == 5
    granted, first, _ = await reserve(store, want=20, serial=60, **paced | {"start_us": first})
    assert granted == 5


async def test_members_past_the_window_are_trimmed_and_the_key_expires(store: Store) -> None:
    granted, start, _ = await reserve(store, cap=10, want=4)
    assert granted == 4
    # two sends stamped long ago (as a settle that came late would leave them)
    old = f"{start / 1000 - 5000:.3f}"
    await settle(store, 10, 0, 4, [old, old, f"{start / 1000:.3f}"])
    assert len(await scores(store)) == 3
    await reserve(store, cap=10, want=1, serial=4)
    assert sorted(await scores(store)) == ["w1:2", "w1:4"]
    ttl = await store.redis.pttl(keys.upstream_sends())
    assert 0 < ttl <= WINDOW_MS + 1000 + MAX_LEAD_MS


# -- take.lua under the cap ------------------------------------------------------------------

PN = "555000000777"
SPACING_US = 100


async def _queue(store: Store, settings: Settings, count: int) -> None:
    messages = [
        {"phone_number_id": PN, "to": "5491140123456", "type": "text", "text": {"body": str(i)}}
        for i in range(count)
    ]
    result = await Acceptor(store, settings).send_batch({"messages": messages})
    assert result["accepted"] == count


async def _take(store: Store, start_us: int, bound_ms: float, budget: int = 100) -> Any:
    shard = keys.shard_of(PN, store.shards)
    args = take_args(
        WINDOW_MS,
        budget=budget,
        lease_ms=30_000,
        headroom=0.0,
        retention_s=3600,
        start_us=start_us,
        spacing_us=SPACING_US,
        fleet_bound_ms=bound_ms,
    )
    return parse_take([shard], await store.script("take", shard, args))


async def _server_us(store: Store) -> int:
    return int(await store.server_time_ms() * 1000)


async def test_a_capped_take_stamps_no_grant_past_its_bound(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "standard"})  # 80/s
    await _queue(store, settings, 40)
    # A number at its rate: its window full, one grant every 12.5 ms, the oldest freeing its
    # slot 27.5 ms from now, the next ones 12.5 ms apart after it.
    now_ms = await _server_us(store) / 1000
    oldest = now_ms + 27.5 - WINDOW_MS
    log = [f"{oldest + i * 12.5:.3f}" for i in range(80)]
    await store.redis.lpush(keys.window(keys.shard_of(PN, store.shards), PN), *log)
    start = int(now_ms * 1000) + 20_000
    taken = await _take(store, start, bound_ms=50.0)
    stamps = [float(item.stamp) for item in taken.items]
    assert taken.base_us == start
    # the slots that free within the bound of their own: 4 of the 16 its pace would grant
    assert len(stamps) == 4
    for k, stamp in enumerate(stamps):
        slot = (start + k * SPACING_US) / 1000
        assert slot <= stamp <= slot + 50.0


async def test_a_capped_take_keeps_the_fleets_slots_or_grants_nothing(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    await _queue(store, settings, 10)
    # slots that have just passed: laid from the server's now, within the bound
    start = await _server_us(store) - 20_000
    taken = await _take(store, start, bound_ms=50.0, budget=5)
    assert len(taken.items) == 5
    shift = (taken.base_us - start) / 1000
    assert 0 < shift <= 50.0
    for k, item in enumerate(taken.items):
        assert float(item.stamp) == pytest.approx((taken.base_us + k * SPACING_US) / 1000)
    # slots further back than the bound: nothing is granted at all
    taken = await _take(store, await _server_us(store) - 80_000, bound_ms=50.0)
    assert taken.items == [] and taken.slots == 0
    # and slots ahead of the server's lead stay where the fleet put them
    start = await _server_us(store) + 500_000
    taken = await _take(store, start, bound_ms=50.0, budget=1)
    assert taken.base_us == start
