"""`bench cluster` turns its runs into each side's mean per shape and the cluster's ratio."""

from __future__ import annotations

from typing import Any

from bench.cluster import drain_rate, summary


def _run(shape: str, side: str, redis_us: float, worker_us: float, rate: int) -> dict[str, Any]:
    return {
        "shape": shape,
        "side": side,
        "redis_us_per_message": redis_us,
        "worker_us_per_message": worker_us,
        "us_per_message": redis_us + worker_us,
        "drain_per_s": rate,
    }


def test_each_side_is_the_mean_of_its_runs_and_the_ratio_compares_the_totals() -> None:
    runs = [
        _run("high-1000", "one-node", 80, 170, 3000),
        _run("high-1000", "cluster", 120, 220, 2600),
        _run("high-1000", "cluster", 130, 230, 2700),
        _run("high-1000", "one-node", 90, 180, 3100),
    ]
    figures = summary(runs)["high-1000"]
    assert figures["one-node"] == {
        "redis_us_per_message": 85.0,
        "worker_us_per_message": 175.0,
        "us_per_message": 260.0,
        "drain_per_s": 3050.0,
    }
    assert figures["cluster"]["us_per_message"] == 350.0
    assert figures["ratio"] == round(350 / 260, 3)


def test_shapes_are_summarised_apart() -> None:
    runs = [_run(s, side, 10, 10, 1) for s in ("a-1", "b-2") for side in ("one-node", "cluster")]
    assert set(summary(runs)) == {"a-1", "b-2"}
    assert summary(runs)["a-1"]["ratio"] == 1.0


def test_the_drain_rate_runs_from_the_first_arrival_to_the_last() -> None:
    assert drain_rate([2.0, 0.0, 1.0]) == 1.0
    assert drain_rate([5.0]) == 0.0
