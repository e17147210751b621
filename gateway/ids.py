"""Message ids: `<shard>-<time><random>`, URL-safe, 24-28 characters.

The shard prefix makes `GET /v1/messages/{id}` one lookup. The time part (milliseconds, 10
Crockford base32 characters) makes ids of one process sort by creation, which the drain uses to
interleave a number's marketing and other messages in arrival order. The random part is 72 bits.
"""

from __future__ import annotations

import base64
import os
import re
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_CHARS = 12  # 9 random bytes in URL-safe base64
_ID = re.compile(r"^(\d{1,5})-[0-9A-Z]{10}[A-Za-z0-9_-]{12}$")


def _time_part(ms: int) -> str:
    chars = []
    for _ in range(10):
        chars.append(_CROCKFORD[ms & 31])
        ms >>= 5
    return "".join(reversed(chars))


def new_ids(shard: int, count: int) -> list[str]:
    """`count` fresh ids in `shard`."""
    head = f"{shard}-{_time_part(time.time_ns() // 1_000_000)}"
    randoms = base64.urlsafe_b64encode(os.urandom(9 * count)).decode()
    return [head + randoms[i : i + _RANDOM_CHARS] for i in range(0, 12 * count, _RANDOM_CHARS)]


def new_id(shard: int) -> str:
    return new_ids(shard, 1)[0]


def shard_of_id(message_id: str) -> int | None:
    """The shard an id lives in, or None when it is not one of ours."""
    match = _ID.match(message_id)
    return int(match.group(1)) if match else None
