"""The drain's outage lines: one when Redis goes away, one when it is back, however many calls
fail and succeed in between (on a Redis Cluster with a node down, calls to the other nodes go
on succeeding between the failed ones)."""

from __future__ import annotations

import pytest

from gateway.drain.outage import RedisOutage


def test_one_line_for_the_start_and_one_for_the_end_of_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="gateway.drain")
    outage = RedisOutage()
    for _ in range(50):  # a node down: its calls fail, the others' succeed
        outage.shards_failed([3], ConnectionError("node down"))
        outage.answered()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["redis unavailable, drain paused: node down", "redis is back: drain resumed"]


def test_a_new_outage_after_the_quiet_time_is_logged_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level("INFO", logger="gateway.drain")
    monkeypatch.setattr("gateway.drain.outage.QUIET_S", 0.0)
    outage = RedisOutage()
    outage.failed(ConnectionError("first"))
    outage.answered()
    outage.failed(ConnectionError("second"))
    outage.answered()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "redis unavailable, drain paused: first",
        "redis is back: drain resumed",
        "redis unavailable, drain paused: second",
        "redis is back: drain resumed",
    ]
