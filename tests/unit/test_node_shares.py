"""How a take split over Redis Cluster nodes shares its budget and its slots (`NodeShares`)."""

from __future__ import annotations

import pytest

from gateway.drain.take import NodeShares


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 10, 40, 41, 100, 257])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_the_shares_use_the_whole_budget_on_consecutive_slots(budget: int, parts: int) -> None:
    plan = NodeShares().plan([[index] for index in range(parts)], budget)
    shares = [plan[index] for index in range(parts)]
    assert all(share >= 1 for share, _ in shares)
    # the whole budget, no more (at least a slot each when there are more nodes than slots)
    assert sum(share for share, _ in shares) == max(budget, parts)
    offsets = [offset for _, offset in shares]
    assert offsets == [sum(share for share, _ in shares[:i]) for i in range(parts)]


def test_a_node_with_a_backlog_gets_nearly_all_the_slots() -> None:
    shares = NodeShares()
    parts = [[0, 3], [1], [2]]
    for _ in range(10):
        shares.learn([0, 1, 2, 3], [])  # nothing granted anywhere: equal shares
    assert [s for s, _ in shares.plan(parts, 30).values()] == [10, 10, 10]
    shares.recent = {0: 50.0, 3: 40.0}  # the first node granted ~90 per take lately
    busy, quiet, idle = shares.plan(parts, 30).values()
    assert (busy, quiet, idle) == ((28, 0), (1, 28), (1, 29))
