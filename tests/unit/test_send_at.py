"""`send_at` as RFC 3339 writes it: the moment it names, to the millisecond, never earlier."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from gateway.accept.validation import parse_message
from gateway.clock import parse_rfc3339_ms, rfc3339
from gateway.errors import ApiError

BASE = int(datetime(2030, 1, 1, 9, 0, tzinfo=UTC).timestamp()) * 1000


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2030-01-01T09:00:00Z", BASE),
        ("2030-01-01t09:00:00z", BASE),
        ("2030-01-01 09:00:00Z", BASE),
        ("2030-01-01T06:00:00-03:00", BASE),
        ("2030-01-01T14:30:00+05:30", BASE),
        ("2030-01-01T09:00:00.5Z", BASE + 500),
        ("2030-01-01T09:00:00.123Z", BASE + 123),
        ("2030-01-01T09:00:00.123000001Z", BASE + 124),  # rounded up, never earlier
        ("2030-01-01T08:59:60Z", BASE),  # a leap second
    ],
)
def test_an_rfc3339_time_is_read_to_the_millisecond(text: str, ms: int) -> None:
    assert parse_rfc3339_ms(text) == ms


@pytest.mark.parametrize(
    "text",
    [
        "2030-01-01T09:00:00",
        "2030-01-01T09:00Z",
        "2030-01-01",
        "2030-02-30T09:00:00Z",
        "2030-01-01T24:00:00Z",
        "2030-01-01T09:00:00+24:00",
        "2030-01-01T09:00:00+0300",
        "2030-01-01T09:00:00.1234567890Z",
        "2030-01-01T09:00:00Z\n",
        " 2030-01-01T09:00:00Z",
        "2030-01-01T09:00:00\u0661Z",
    ],
)
def test_anything_else_is_not_read(text: str) -> None:
    assert parse_rfc3339_ms(text) is None


def _message(send_at: object) -> dict[str, object]:
    return {
        "phone_number_id": "555123456789",
        "to": "5491140123456",
        "type": "text",
        "text": {"body": "hi"},
        "send_at": send_at,
    }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def test_a_send_at_ahead_within_30_days_is_kept_in_milliseconds() -> None:
    ahead = time.time_ns() // 1_000_000 + 29 * 86_400_000
    assert parse_message(_message(_iso(ahead))).send_at_ms == str(ahead)
    assert parse_message(_message(None)).send_at_ms == ""


@pytest.mark.parametrize("days", [-1 / 86_400, 30.01])
def test_a_send_at_in_the_past_or_beyond_30_days_is_refused(days: float) -> None:
    at = time.time_ns() // 1_000_000 + int(days * 86_400_000)
    with pytest.raises(ApiError) as caught:
        parse_message(_message(_iso(at)))
    assert [d.field for d in caught.value.details] == ["send_at"]


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (BASE + 7, "2030-01-01T09:00:00.007Z"),
        (BASE + 999, "2030-01-01T09:00:00.999Z"),
        (BASE + 1000, "2030-01-01T09:00:01.000Z"),
        ("1764457200123", "2025-11-29T23:00:00.123Z"),
        (253402300799999, "9999-12-31T23:59:59.999Z"),
    ],
)
def test_milliseconds_are_shown_as_rfc3339_exactly(ms: int | str, text: str) -> None:
    assert rfc3339(ms) == text
    assert parse_rfc3339_ms(text) == int(ms)
