"""When the send schedule lets its rate grow (`gateway.drain.schedule`).

Periods are driven with made-up times a second apart, so the process's own busy share (real CPU
over a made-up second) stays near zero: only the rule under test decides.
"""

from __future__ import annotations

import pytest

from gateway.drain.schedule import GROW, GROW_UNLIMITED, INITIAL_RATE, SendSchedule

FREE = 256


def one_period(
    schedule: SendSchedule, at: float, count: int, *, limited: bool, more: bool = False
) -> None:
    """A period in which one take used `count` slots and they all started on time."""
    budget = schedule.budget(FREE)
    schedule.scheduled(0.0, count, budget, FREE, more)
    for _ in range(count):
        schedule.started(0.0, limited)
    schedule.adjust(at)


def fresh() -> SendSchedule:
    schedule = SendSchedule(tolerance_s=0.0075)
    schedule.adjust(100.0)  # opens the first period
    return schedule


def test_a_take_that_used_its_whole_budget_grows_the_rate_by_a_tenth() -> None:
    schedule = fresh()
    one_period(schedule, 101.0, schedule.budget(FREE), limited=True)
    assert schedule.rate == pytest.approx(INITIAL_RATE * GROW)


def test_with_only_unlimited_sends_the_rate_doubles() -> None:
    schedule = fresh()
    one_period(schedule, 101.0, schedule.budget(FREE), limited=False)
    assert schedule.rate == pytest.approx(INITIAL_RATE * GROW_UNLIMITED)


def test_a_number_due_again_at_once_counts_as_cut_short() -> None:
    """An unlimited number gets at most a chunk per take: a take under its budget that leaves
    a shard due at once had more to send (without this, one unlimited number's drain stopped
    growing at a chunk per step)."""
    schedule = fresh()
    one_period(schedule, 101.0, 10, limited=False, more=True)
    assert schedule.rate == pytest.approx(INITIAL_RATE * GROW_UNLIMITED)


def test_a_take_under_its_budget_with_nothing_due_keeps_the_rate() -> None:
    schedule = fresh()
    one_period(schedule, 101.0, 10, limited=False)
    assert schedule.rate == INITIAL_RATE


def test_free_slots_not_the_rate_bound_a_take_then_the_rate_holds() -> None:
    schedule = fresh()
    few = 10  # fewer free slots than a step of the rate
    budget = schedule.budget(few)
    assert budget == few
    schedule.scheduled(0.0, budget, budget, few, True)
    schedule.started(0.0, False)
    schedule.adjust(101.0)
    assert schedule.rate == INITIAL_RATE
