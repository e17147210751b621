"""Timestamps as API.md shows them: RFC 3339 UTC strings, from the Redis server's milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(ms: int | str | bytes | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.fromtimestamp(int(ms) / 1000.0, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
