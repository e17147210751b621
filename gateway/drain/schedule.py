"""This worker's send schedule: how many messages a take asks for, and for when.

A grant is only exact if its send starts within the tolerance (half the rate slack) of its
stamp. So a take is sized by what this process can start on time, not by its free sender slots
or by how many numbers are due: the schedule keeps `rate`, the sends per second this process
starts on time, and lays each take's messages out one after another at that rate from `cursor`
(where the previous take's end). It asks for about `STEP_S` of work per take and keeps about
one step in hand, so a take's reply is back before its first message is due.

`rate` is learned from how late sends start, the way TCP learns a path: when more than a tenth
of the last period's sends started later than a third of the tolerance, the process is not
keeping up (short of CPU, its own or the host's) and the rate shrinks by a fifth; when a take
was cut short by the rate and the sends started on time, it grows by a quarter (it doubles
until the first time it has to shrink: a fresh process finds its speed within a second). A
single late start (a new connection, a collection pause) is not a trend and changes nothing.
Starts later than the tolerance are put back, counted, and should stay rare.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("gateway.drain")

INITIAL_RATE = 2000.0
MIN_RATE = 200.0
MAX_RATE = 100_000.0
STEP_S = 0.02
ADJUST_S = 0.1
GROW = 1.05
SHRINK = 0.8
LATE_SHARE = 0.1
LATE_MIN = 3


class SendSchedule:
    def __init__(self, tolerance_s: float, max_rate: float | None = None) -> None:
        self.tolerance = tolerance_s
        self.late_after = tolerance_s / 3
        self.cap = min(MAX_RATE, max_rate) if max_rate else MAX_RATE
        self.rate = min(INITIAL_RATE, self.cap)
        self.cursor = 0.0  # when the last message already scheduled starts (monotonic s)
        self._started = 0
        self._late = 0
        self._cut_short = False
        self._period_start = 0.0
        self._slow_start = True

    def spacing_us(self) -> int:
        """Microseconds between two scheduled sends."""
        return max(1, int(1e6 / self.rate))

    def next_start(self, now: float, lead: float) -> float:
        """When the next take's first message would start."""
        return max(self.cursor, now + lead)

    def wait_for_room(self, now: float, lead: float) -> float:
        """Seconds until a take is worth making (0: now), keeping about a step in hand."""
        return max(0.0, self.cursor - (now + lead + STEP_S))

    def budget(self, free_slots: int) -> int:
        """How many messages the next take may grant."""
        return max(0, min(free_slots, math.ceil(self.rate * STEP_S)))

    def scheduled(self, slots_end: float, count: int, budget: int, free_slots: int) -> None:
        """A take used `count` slots, up to `slots_end`."""
        self.cursor = max(self.cursor, slots_end)
        if count >= budget and budget < free_slots:
            self._cut_short = True  # there may be more to send than the rate allowed

    def started(self, lateness: float) -> None:
        """A send started `lateness` seconds after its stamp."""
        self._started += 1
        if lateness > self.late_after:
            self._late += 1

    def adjust(self, now: float) -> None:
        """Learn from the last period's starts (call often; acts every ADJUST_S)."""
        if now - self._period_start < ADJUST_S:
            return
        log.debug(
            "send schedule: %d started, %d late, cut short: %s, rate %.0f/s",
            self._started,
            self._late,
            self._cut_short,
            self.rate,
        )
        if self._late >= max(LATE_MIN, LATE_SHARE * self._started):
            self.rate = max(MIN_RATE, self.rate * SHRINK)
            self._slow_start = False
        elif self._cut_short:
            self.rate = min(self.cap, self.rate * (2.0 if self._slow_start else GROW))
        self._period_start = now
        self._started = self._late = 0
        self._cut_short = False
