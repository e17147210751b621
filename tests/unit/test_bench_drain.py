"""The drain benchmark's steady rate leaves out a fresh worker's start."""

from __future__ import annotations

import pytest

from bench.drain import _steady_rate


def test_the_steady_rate_leaves_out_the_start_and_the_stragglers() -> None:
    start = [float(i) for i in range(40)]  # 1 msg/s while the schedule learns
    steady = [40.0 + i * 0.1 for i in range(55)]  # then 10 msg/s
    stragglers = [100.0 + i for i in range(5)]
    assert _steady_rate(start + steady + stragglers) == pytest.approx(10.0)


def test_too_few_arrivals_give_the_whole_run_rate() -> None:
    assert _steady_rate([0.0, 1.0]) == 1.0
