"""The send schedule's rate: a drop is a step, and the rate grows back quickly after it.

Periods are driven with made-up times one `ADJUST_S` apart, so the process's real CPU use over
each (a few microseconds) makes it look idle: only the starts and put-backs decide.
"""

from __future__ import annotations

from gateway.drain.schedule import ADJUST_S, GROW, SHRINK, SendSchedule


def period(schedule: SendSchedule, now: float, started: int, late: int, returned: int) -> float:
    """One period of `started` rate-limited sends, cut short by the rate; the next time."""
    budget = schedule.budget(free_slots=10_000)
    schedule.scheduled(slots_end=now, count=budget, budget=budget, free_slots=10_000)
    for index in range(started):
        schedule.started(0.01 if index < late else 0.0, limited=True)
    for _ in range(returned):
        schedule.returned()
    now += ADJUST_S
    schedule.adjust(now)
    return now


def test_a_stalled_period_drops_the_rate_one_step_not_to_what_it_started() -> None:
    schedule = SendSchedule(tolerance_s=0.0075)
    now = period(schedule, 1000.0, started=0, late=0, returned=0)
    before = schedule.rate
    # the CPU went elsewhere: few starts, most of them late, some put back
    period(schedule, now, started=20, late=15, returned=5)
    assert schedule.rate == before * SHRINK


def test_after_a_drop_the_rate_comes_back_faster_than_it_grows() -> None:
    schedule = SendSchedule(tolerance_s=0.0075)
    now = period(schedule, 1000.0, started=0, late=0, returned=0)
    before = schedule.rate
    for _ in range(3):  # three drops in a row (each judged once the old sends have gone)
        now = period(schedule, now, started=20, late=15, returned=5)
    dropped = schedule.rate
    assert dropped < before * 0.7
    periods = 0
    while schedule.rate < before and periods < 50:
        now = period(schedule, now, started=int(schedule.rate * ADJUST_S), late=0, returned=0)
        periods += 1
    assert schedule.rate == before  # back where it was, not beyond, in one go
    slow, rate = 0, dropped
    while rate < before:
        rate, slow = rate * GROW, slow + 1
    assert periods < slow, (periods, slow)
    # past the old rate it grows by a tenth again
    now = period(schedule, now, started=int(schedule.rate * ADJUST_S), late=0, returned=0)
    assert schedule.rate == before * GROW
