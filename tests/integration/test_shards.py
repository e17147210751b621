"""Shard ownership over a real Redis: every shard held by exactly one worker, in fair shares."""

from __future__ import annotations

from gateway.drain.shards import ShardOwnership
from gateway.store import Store


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
