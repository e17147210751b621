"""The worker's map of the Redis server's clock: a stamp is never written before it happens.

Each simulated call reaches the server after a random delay and its reply comes back after
another, as on a busy host; the server's clock runs at a fixed offset from ours. Whatever the
delays, the true local time of a server instant must lie inside the mapped bracket.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from gateway.drain.clock import ServerClock

TRUE_OFFSET = 1_000_000.25  # server seconds minus local seconds


def _call(clock: ServerClock, rng: random.Random, sent: float) -> float:
    there = rng.expovariate(1 / 0.002)  # the request's way, queueing included
    back = rng.expovariate(1 / 0.002)
    server_ms = (sent + there + TRUE_OFFSET) * 1000
    clock.observe(sent, server_ms, sent + there + back)
    return sent + there + back


@pytest.mark.parametrize("seed", range(20))
def test_the_true_time_of_a_stamp_is_always_inside_the_bracket(seed: int) -> None:
    rng = random.Random(seed)
    clock = ServerClock()
    now = 50.0
    for _ in range(200):
        now = _call(clock, rng, now) + rng.random() * 0.01
        stamp_us = int((now + rng.random() * 0.05 + TRUE_OFFSET) * 1e6)
        true_local = stamp_us / 1e6 - TRUE_OFFSET
        assert clock.local_earliest(stamp_us) <= true_local + 1e-6
        assert clock.local_latest(stamp_us) >= true_local - 1e-6


def test_the_bracket_narrows_to_the_fastest_calls() -> None:
    clock = ServerClock()
    clock.observe(10.0, (10.004 + TRUE_OFFSET) * 1000, 10.009)  # 9 ms round trip
    assert clock.width == pytest.approx(0.009, abs=1e-6)
    clock.observe(10.1, (10.1002 + TRUE_OFFSET) * 1000, 10.1004)  # a fast one
    assert clock.width == pytest.approx(0.0004, abs=1e-6)


def test_a_clock_step_restarts_the_bracket() -> None:
    clock = ServerClock()
    for i in range(10):
        sent = 10.0 + i * 0.1
        clock.observe(sent, (sent + 0.0001 + TRUE_OFFSET) * 1000, sent + 0.0002)
    step = 0.5  # the server's clock jumps half a second ahead
    clock.observe(12.0, (12.0001 + TRUE_OFFSET + step) * 1000, 12.0002)
    assert clock.low is not None and clock.high is not None
    assert clock.low <= TRUE_OFFSET + step <= clock.high
    assert clock.width < 0.001


class _SlowAtFirst:
    """The server's clock, read with `slow` calls first that queue 10 ms each way."""

    def __init__(self, slow: int) -> None:
        self.slow = slow
        self.calls = 0

    async def __call__(self) -> float:
        self.calls += 1
        queued = self.calls <= self.slow
        if queued:
            await asyncio.sleep(0.01)
        server_ms = (time.monotonic() + TRUE_OFFSET) * 1000
        if queued:
            await asyncio.sleep(0.01)
        return server_ms


async def test_narrowing_samples_until_the_bracket_is_narrow_enough() -> None:
    clock = ServerClock()
    read = _SlowAtFirst(slow=25)
    assert await clock.narrow(read, 0.00375, most=100)
    assert clock.width <= 0.00375
    assert 25 < read.calls <= 40  # past the slow calls, and no round after it was narrow
    calls = read.calls
    assert await clock.narrow(read, 0.00375, most=100)
    assert read.calls == calls  # narrow already: no call


async def test_narrowing_gives_up_after_the_most_samples() -> None:
    clock = ServerClock()
    read = _SlowAtFirst(slow=1000)
    assert not await clock.narrow(read, 0.00375, most=30)
    assert read.calls == 30
    assert clock.width > 0.00375
