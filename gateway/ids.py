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
from collections.abc import Sequence

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_CHARS = 12  # 9 random bytes in URL-safe base64
# Matched in full with ASCII classes: `\d` takes any script's digits and `$` a final newline.
_ID = re.compile(r"([0-9]{1,5})-[0-9A-Z]{10}[A-Za-z0-9_-]{12}")


def _time_part(ms: int) -> str:
    chars = []
    for _ in range(10):
        chars.append(_CROCKFORD[ms & 31])
        ms >>= 5
    return "".join(reversed(chars))


_last_ms = -1
_last_time_part = ""


def _now_part() -> str:
    global _last_ms, _last_time_part
    ms = time.time_ns() // 1_000_000
    if ms != _last_ms:
        _last_ms, _last_time_part = ms, _time_part(ms)
    return _last_time_part


def ids_for(shards: Sequence[int]) -> list[str]:
    """A fresh id for each of `shards` (one id per entry, in order)."""
    now = _now_part()
    randoms = base64.urlsafe_b64encode(os.urandom(9 * len(shards))).decode()
    return [
        f"{shard}-{now}{randoms[i * _RANDOM_CHARS : (i + 1) * _RANDOM_CHARS]}"
        for i, shard in enumerate(shards)
    ]


def new_ids(shard: int, count: int) -> list[str]:
    """`count` fresh ids in `shard`."""
    return ids_for([shard] * count)


def new_id(shard: int) -> str:
    return ids_for([shard])[0]


def shard_of_id(message_id: str) -> int | None:
    """The shard an id lives in, or None when it is not one of ours."""
    match = _ID.fullmatch(message_id)
    return int(match.group(1)) if match else None
