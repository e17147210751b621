"""Timestamps as API.md shows them (RFC 3339 UTC strings, from the Redis server's milliseconds)
and as clients write them (`send_at`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import lru_cache


def rfc3339(ms: int | str | bytes | None) -> str | None:
    """`2026-11-29T23:00:00.123Z` for epoch milliseconds.

    The date and time of day are made once per second (a status callback carries one per
    event: made in full each time, they were 4% of a worker delivering callbacks).
    """
    if ms is None:
        return None
    second, milli = divmod(int(ms), 1000)
    return f"{_second_text(second)}.{milli:03d}Z"


@lru_cache(maxsize=64)
def _second_text(second: int) -> str:
    return datetime.fromtimestamp(second, tz=UTC).replace(tzinfo=None).isoformat()


# RFC 3339's date-time (section 5.6): a full date, "T" (any case; RFC 3339 also lets a space
# stand for it), a time with optional fractional seconds, and a required offset. ASCII digits
# only: `\d` would take any script's.
_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_rfc3339_ms(text: str) -> int | None:
    """Epoch milliseconds of an RFC 3339 date-time with an offset, or None when it is not one.

    Fractions finer than a millisecond round up, so the moment is never before the one written.
    A leap second (`:60`) is taken as the first instant of the next minute.
    """
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction, zulu, sign, off_h, off_m = match.group(7, 8, 9, 10, 11)
    leap = second == 60
    if leap:
        second = 59
    offset_min = 0
    if not zulu:
        if int(off_h) > 23 or int(off_m) > 59:
            return None
        offset_min = (int(off_h) * 60 + int(off_m)) * (-1 if sign == "-" else 1)
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        return None
    ms = int(moment.timestamp()) * 1000 - offset_min * 60_000 + (1000 if leap else 0)
    if fraction:
        ns = int(fraction.ljust(9, "0"))
        ms += -(-ns // 1_000_000)
    return ms
