"""Shard ownership over a real Redis: every shard held by exactly one worker, in fair shares."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import keys
from gateway.drain import shards as shards_module
from gateway.drain.outage import RedisOutage
from gateway.drain.shards import ShardOwnership
from gateway.drain.wake import WakeListener
from gateway.errors import StoreUnavailable
from gateway.store import Store
from tests.integration.drain_support import eventually


async def test_two_workers_share_every_shard_once(store: Store) -> None:
    first, second = ShardOwnership(store, "w1"), ShardOwnership(store, "w2")
    await first.refresh()
    assert len(first.owned) == store.shards  # alone, it takes them all
    for _ in range(2):
        await second.refresh()  # joins: takes what is free, up to half
        await first.refresh()  # sees two members: gives back its extra half
    await second.refresh()
    assert first.owned.isdisjoint(second.owned)
    assert first.owned | second.owned == frozenset(range(store.shards))
    assert len(first.owned) == len(second.owned) == store.shards // 2


async def test_a_leaving_worker_gives_its_shards_back(store: Store) -> None:
    first, second = ShardOwnership(store, "w1"), ShardOwnership(store, "w2")
    await first.refresh()
    await second.refresh()
    await first.leave()
    assert first.owned == frozenset()
    await second.refresh()
    assert second.owned == frozenset(range(store.shards))


async def owners(store: Store) -> list[bytes | None]:
    names = [keys.owner(shard) for shard in range(store.shards)]
    return list(await store.redis.mget(names))


async def test_a_joining_worker_is_handed_shards_and_none_is_ever_unowned(store: Store) -> None:
    first, second = ShardOwnership(store, "w1"), ShardOwnership(store, "w2")
    await first.refresh()
    await second.refresh()  # joins: nothing is free, so it asks for half of the first's
    assert second.owned == frozenset()
    assert len(second.wanted) == store.shards // 2
    assert await owners(store) == [b"w1"] * store.shards  # the first drains them meanwhile
    await first.refresh()  # hands the asked-for half over
    assert first.owned == frozenset(range(store.shards)) - second.wanted
    assert set(await owners(store)) == {b"w1", b"w2"}
    await second.refresh()
    assert second.owned | first.owned == frozenset(range(store.shards))
    assert len(second.owned) == len(first.owned) == store.shards // 2
    assert second.wanted == frozenset()


async def test_a_stopping_worker_hands_every_shard_over(store: Store) -> None:
    stopping = asyncio.Event()
    first, second = ShardOwnership(store, "w1"), ShardOwnership(store, "w2")
    loops = [asyncio.create_task(w.run(stopping)) for w in (first, second)]
    unowned: list[int] = []

    async def watch() -> None:
        while True:
            unowned.extend(s for s, owner in enumerate(await owners(store)) if owner is None)
            await asyncio.sleep(0.002)

    try:

        async def shared() -> bool:
            return len(first.owned) == len(second.owned) == store.shards // 2

        await eventually(shared, 10.0, "two workers sharing the shards")
        watcher = asyncio.create_task(watch())
        await first.hand_over()
        watcher.cancel()
        assert first.owned == frozenset()
        assert await owners(store) == [b"w2"] * store.shards
        await eventually(lambda: _holds_all(second, store), 5.0, "the other worker draining all")
        assert unowned == [], "a shard was left without an owner during the handover"
    finally:
        stopping.set()
        await asyncio.gather(*loops)


async def test_a_last_worker_stopping_does_not_wait_for_a_successor(store: Store) -> None:
    stopping = asyncio.Event()
    alone = ShardOwnership(store, "w1")
    loop = asyncio.create_task(alone.run(stopping))
    try:
        await eventually(lambda: _holds_all(alone, store), 10.0, "the worker holding every shard")
        # returns as soon as its first renewal as a leaving worker finds nobody else
        await asyncio.wait_for(alone.hand_over(within_s=60.0), 5.0)
        await alone.leave()
        assert await owners(store) == [None] * store.shards
    finally:
        stopping.set()
        await loop


async def _holds_all(ownership: ShardOwnership, store: Store) -> bool:
    return ownership.owned == frozenset(range(store.shards))


async def test_a_worker_that_no_longer_needs_shards_withdraws_its_ask(store: Store) -> None:
    first, second = ShardOwnership(store, "w1"), ShardOwnership(store, "w2")
    await first.refresh()
    await second.refresh()  # asks for half of the first's shards
    assert second.wanted
    await second.hand_over()  # stopping before it got them: it takes its asks back
    await first.refresh()
    assert first.owned == frozenset(range(store.shards))
    assert await owners(store) == [b"w1"] * store.shards


async def test_shards_still_in_a_workers_name_are_taken_back_at_once(store: Store) -> None:
    worker = ShardOwnership(store, "w1")
    await worker.refresh()
    worker._set(frozenset())  # as when a failed cluster node dropped them from what it holds
    await worker.refresh()  # their leases still name it: no waiting for them to run out
    assert worker.owned == frozenset(range(store.shards))


async def test_a_wake_token_taken_for_a_shard_handed_over_meanwhile_goes_back(
    store: Store,
) -> None:
    """A wait begun before a handover (it lasts up to a second) may take the token of a shard
    that is another worker's by then: it goes back for the new owner, who would otherwise learn
    of the shard's work only at its next sweep, 5 s later."""
    assert store.settings.redis_url is not None
    owned = [3]

    async def owned_shards() -> list[int]:
        return list(owned)

    listener = WakeListener(store.settings.redis_url, RedisOutage(), store.shards)
    stopping = asyncio.Event()
    task = asyncio.create_task(listener.run(stopping, owned_shards))

    async def blocked() -> bool:
        return "cmd=blpop" in str(await store.redis.execute_command("CLIENT", "LIST"))

    async def token_back() -> bool:
        return await store.redis.llen(keys.wake(3)) == 1

    try:
        await eventually(blocked, 5.0, "the listener waiting on shard 3")
        owned[:] = [4]  # handed over while the listener waits
        await store.redis.lpush(keys.wake(3), "1")
        await eventually(token_back, 5.0, "the token put back")
        assert listener.take_woken() == set()
    finally:
        stopping.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await listener.close()


async def test_a_shard_whose_node_does_not_answer_stays_held_while_its_lease_runs(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster, a claim's part on a node failing over (or on a slot being moved) fails
    alone: its shards stay held while the lease last renewed still runs by a wide margin, so
    their numbers go on as soon as the node answers again; past that they are let go."""
    worker = ShardOwnership(store, "w1")
    await worker.refresh()
    every = frozenset(range(store.shards))
    assert worker.owned == every
    silent = {0, 1}
    real = store.script_per_node

    async def node_down(name: str, shards: list[int], build: Any, **options: Any) -> Any:
        if name != "claim":
            return await real(name, shards, build, **options)
        answering = [shard for shard in shards if shard not in silent]
        replies = await real(name, answering, build, **options) if answering else []
        down = [shard for shard in shards if shard in silent]
        return replies + ([(down, StoreUnavailable("node down"))] if down else [])

    monkeypatch.setattr(store, "script_per_node", node_down)
    await worker.refresh()
    assert worker.owned == every
    monkeypatch.setattr(shards_module, "KEEP_S", 0.0)  # as if the last renewal were long ago
    await worker.refresh()
    assert worker.owned == every - silent
