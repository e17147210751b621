"""The Redis server's clock as this process sees it: a bracket, not a guess.

Grants are stamped on the server's clock (TIME inside `take`); a worker starts each send at its
stamp on its own monotonic clock. Every call that reads the server's time bounds the offset
between the two clocks (server minus local): the server read its clock somewhere between our
request and its reply, so the offset lies between `server - received` and `server - sent`.
`ServerClock` keeps the tightest bracket of all samples: `high`, the smallest `server - sent`
seen, and `low`, the largest `server - received`. Both may drift apart by `CREEP` (20 µs a
second, more than two NTP-disciplined clocks drift) when no sample renews them.

So a server time maps to a local interval, `[local_earliest, local_latest]`, that surely holds
it. A send is written no earlier than `local_latest` of its stamp (never before the stamp,
whatever the reply latencies were) and put back if it could not start by `local_earliest` plus
the tolerance (never later than the tolerance after it; `gateway.drain.senders`). That leaves
the tolerance less the bracket's width to write in, so a worker `narrow`s the bracket to half
the tolerance before it takes: at start, on a busy process, the first samples may carry
milliseconds of queueing. (Mapping with `high` alone, as this module once did, sent up to the
bracket's width early: a worker started on a loaded host put one send too many into a sliding
second now and then. Writing up to half the tolerance after `local_latest` while the bracket
was wide, as it later did, could be that much more than the tolerance late.)

A sample outside the bracket means a clock stepped (or drifted faster than the creep): the
bracket restarts from that sample, with a warning.

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
LAG_BUCKET_S = 0.5
LAG_BUCKETS = 4
# Stamps are asked this much later than the slowest recent reply, and never more than this ahead.
LEAD_MARGIN_S = 0.0005
MAX_LEAD_S = 0.05
CALIBRATION_ROUNDS = 20


class ServerClock:
    def __init__(self) -> None:
        # server seconds minus local monotonic seconds lies in [low, high]
        self.high: float | None = None
        self.low: float | None = None
        self.lead = LEAD_MARGIN_S
        self._last = 0.0
        self._lags: deque[tuple[int, float]] = deque(maxlen=LAG_BUCKETS)

    @property
    def width(self) -> float:
        """How uncertain the offset is, in seconds (inf before the first sample)."""
        if self.high is None or self.low is None:
            return float("inf")
        return self.high - self.low

    def observe(self, sent: float, server_ms: float, received: float) -> None:
        """One call's timing: local send and receive times, and the server's time in between."""
        server_s = server_ms / 1000.0
        up, down = server_s - sent, server_s - received
        if self.high is None or self.low is None:
            self.high, self.low = up, down
        else:
            creep = CREEP * max(sent - self._last, 0.0)
            high = min(up, self.high + creep)
            low = max(down, self.low - creep)
            if low > high:
                log.warning(
                    "the Redis server's clock moved %.1f ms against this host's: following it",
                    max(down - self.high, self.low - up) * 1000,
                )
                high, low = up, down
            self.high, self.low = high, low
        self._last = sent
        lag = received - (server_s - self.high)
        bucket = int(received / LAG_BUCKET_S)
        if self._lags and self._lags[-1][0] == bucket:
            self._lags[-1] = (bucket, max(self._lags[-1][1], lag))
        else:
            self._lags.append((bucket, lag))
        self.lead = min(MAX_LEAD_S, max(value for _, value in self._lags) + LEAD_MARGIN_S)

    async def calibrate(
        self, read_server_ms: Callable[[], Awaitable[float]], rounds: int = CALIBRATION_ROUNDS
    ) -> None:
        """Take samples before the first take needs them: each may narrow the bracket."""
        for _ in range(rounds):
            sent = time.monotonic()
            server_ms = await read_server_ms()
            self.observe(sent, server_ms, time.monotonic())

    async def narrow(
        self, read_server_ms: Callable[[], Awaitable[float]], width_s: float, most: int
    ) -> bool:
        """Take samples until the bracket is at most `width_s` wide, or `most` have been taken;
        whether it is."""
        taken = 0
        while self.width > width_s and taken < most:
            await self.calibrate(read_server_ms, min(CALIBRATION_ROUNDS, most - taken))
            taken += CALIBRATION_ROUNDS
        return self.width <= width_s

    def local_earliest(self, server_us: int) -> float:
        """The earliest local monotonic time that server time can be."""
        assert self.high is not None, "no call has been timed yet"
        return server_us / 1e6 - self.high

    def local_latest(self, server_us: int) -> float:
        """The latest local monotonic time that server time can be."""
        assert self.low is not None, "no call has been timed yet"
        return server_us / 1e6 - self.low

    def to_server_us(self, local: float) -> int:
        """A server time no earlier than this local time (0 before the first sample: "now")."""
        if self.high is None:
            return 0
        return int((local + self.high) * 1e6)
