"""The Redis server's clock as this process sees it.

Grants are stamped on the server's clock (TIME inside `take`); a worker starts each send at its
stamp on its own monotonic clock. `ServerClock` keeps the offset between the two from every take
call: the server read its clock somewhere between our request and its reply, so
`server - sent` is the offset plus the request's one-way latency, never less. The smallest such
sample over the last few busy half-seconds is the estimate: it sits within the fastest request's
latency of the truth (tens of microseconds on one host) and moves only when a faster request
arrives or old samples age out, so sends of one number keep a steady relation to their stamps.
Time with no takes does not age the samples (an idle worker keeps its estimate), so the first
take after a pause is mapped like the last one before it.

It also tracks how late replies are handled (`lead`): a take asks for stamps at least that far
ahead, so its messages are in hand before they are due even when the host is busy.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable

BUCKET_S = 0.5
BUCKETS = 4
# Stamps are asked this much later than the slowest recent reply, and never more than this ahead.
LEAD_MARGIN_S = 0.0005
MAX_LEAD_S = 0.05


class ServerClock:
    def __init__(self) -> None:
        self._offsets: deque[tuple[int, float]] = deque(maxlen=BUCKETS)
        self._lags: deque[tuple[int, float]] = deque(maxlen=BUCKETS)
        self.offset: float | None = None  # server seconds minus local monotonic seconds
        self.lead = LEAD_MARGIN_S

    def observe(self, sent: float, server_ms: float, received: float) -> None:
        """One call's timing: local send and receive times, and the server's time in between."""
        server_s = server_ms / 1000.0
        bucket = int(received / BUCKET_S)
        _keep(self._offsets, bucket, server_s - sent, min)
        self.offset = min(value for _, value in self._offsets)
        lag = received - (server_s - self.offset)
        _keep(self._lags, bucket, lag, max)
        self.lead = min(MAX_LEAD_S, max(value for _, value in self._lags) + LEAD_MARGIN_S)

    async def calibrate(
        self, read_server_ms: Callable[[], Awaitable[float]], rounds: int = 5
    ) -> None:
        """Take a few samples before the first take needs them."""
        for _ in range(rounds):
            sent = time.monotonic()
            server_ms = await read_server_ms()
            self.observe(sent, server_ms, time.monotonic())

    def to_local(self, server_us: int) -> float:
        assert self.offset is not None, "no take has been timed yet"
        return server_us / 1e6 - self.offset

    def to_server_us(self, local: float) -> int:
        """A local monotonic time on the server's clock (0 before the first sample: "now")."""
        if self.offset is None:
            return 0
        return int((local + self.offset) * 1e6)


def _keep(
    buckets: deque[tuple[int, float]],
    bucket: int,
    value: float,
    pick: Callable[[float, float], float],
) -> None:
    """Fold `value` into the newest bucket, or start a bucket (the oldest falls off)."""
    if buckets and buckets[-1][0] == bucket:
        buckets[-1] = (bucket, pick(buckets[-1][1], value))
    else:
        buckets.append((bucket, value))
