"""The Redis server's clock as this process sees it.

Grants are stamped on the server's clock (TIME inside `take`); a worker starts each send at its
stamp on its own monotonic clock. `ServerClock` keeps the offset between the two from every take
call: the server read its clock somewhere between our request and its reply, so
`server - sent` is the offset plus the request's one-way latency, never less.

The estimate is the smallest such sample, allowed to creep up by at most `CREEP` (20 µs a
second, more than two NTP-disciplined clocks drift apart) when no sample is that small. Which
way it moves matters: a smaller offset maps stamps to later local times, so sends move later
and spread out (safe); a larger one moves them earlier and bunches them against the sends
before (what could put more than the rate into a second). So it falls at once and rises only by
the creep, a few microseconds within any one second; on a busy host, where most samples carry
milliseconds of queueing, it stays with the fastest sample seen. A real step of the server's
clock (all samples far above the estimate for a second) resets it, with a warning.

It also tracks how late replies are handled (`lead`): a take asks for stamps at least that far
ahead, so its messages are in hand before they are due even when the host is busy.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger("gateway.drain")

CREEP = 20e-6  # seconds per second
STEP_S = 0.05  # samples this far above the estimate for a whole period: the clock stepped
STEP_PERIOD_S = 1.0
LAG_BUCKET_S = 0.5
LAG_BUCKETS = 4
# Stamps are asked this much later than the slowest recent reply, and never more than this ahead.
LEAD_MARGIN_S = 0.0005
MAX_LEAD_S = 0.05


class ServerClock:
    def __init__(self) -> None:
        self.offset: float | None = None  # server seconds minus local monotonic seconds
        self.lead = LEAD_MARGIN_S
        self._last = 0.0
        self._period_start = 0.0
        self._period_min = float("inf")
        self._lags: deque[tuple[int, float]] = deque(maxlen=LAG_BUCKETS)

    def observe(self, sent: float, server_ms: float, received: float) -> None:
        """One call's timing: local send and receive times, and the server's time in between."""
        server_s = server_ms / 1000.0
        sample = server_s - sent
        if self.offset is None:
            self.offset = sample
            self._period_start = sent
        else:
            self.offset = min(sample, self.offset + CREEP * max(sent - self._last, 0.0))
        self._last = sent
        self._watch_for_steps(sent, sample)
        lag = received - (server_s - self.offset)
        bucket = int(received / LAG_BUCKET_S)
        if self._lags and self._lags[-1][0] == bucket:
            self._lags[-1] = (bucket, max(self._lags[-1][1], lag))
        else:
            self._lags.append((bucket, lag))
        self.lead = min(MAX_LEAD_S, max(value for _, value in self._lags) + LEAD_MARGIN_S)

    def _watch_for_steps(self, sent: float, sample: float) -> None:
        assert self.offset is not None
        self._period_min = min(self._period_min, sample)
        if sent - self._period_start < STEP_PERIOD_S:
            return
        if self._period_min > self.offset + STEP_S:
            log.warning(
                "the Redis server's clock moved %.0f ms against this host's: following it",
                (self._period_min - self.offset) * 1000,
            )
            self.offset = self._period_min
        self._period_start = sent
        self._period_min = float("inf")

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
