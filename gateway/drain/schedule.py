"""This worker's send schedule: how many messages a take asks for, and for when.

A grant is only exact if its send starts within the tolerance of its stamp. So a take is sized
by what this process can start on time, not by its free sender slots or by how many numbers are
due: the schedule keeps `rate`, the sends per second this process starts on time, and lays
each take's messages out one after another at that rate from `cursor` (where the previous
take's end). It asks for about `STEP_S` of work per take and keeps about one step in hand, so a
take's reply is back before its first message is due.

`rate` is learned every `ADJUST_S` from how busy the process was (the share of the period its
event loop ran or waited for a CPU: `busy_seconds`) and how late its sends started:
- An event loop that is always busy runs long turns, and a send due during a long turn starts
  late. So while rate-limited sends are scheduled, the rate is kept where the process is busy
  80-90% of the time (`BUSY_LIMITED`): above that the rate eases below what was started.
  Unlimited sends have no time to keep: with only those, the rate grows whenever a take was cut
  short, and free sender slots are what bounds them.
- Many late starts (over a tenth of them later than a third of the tolerance) while busy mean
  the process is not keeping up: the rate drops well below what it did start. After such a
  drop, the sends already scheduled at the old rate still start late for a while: the schedule
  waits until they have gone (`_settled_at`) before it judges again, or one overload would
  shrink it to the floor.
- Late starts in a mostly idle process are someone else's doing (a slow Redis reply, a stalled
  host): sending less would not help, so the rate holds. Unless they are so late that some are
  put back (over 1% of a period's starts, 3 at least: the target for put-backs): each put-back
  is work of its own (a settle, a take again), and left alone they feed on themselves, so the
  rate drops then too. (At 5%, `bench drain` put back 1.4-5.3% of its grants on 2026-11-29.)
  A single late start (a new connection, a collection pause) is not a trend and changes
  nothing.
- When a take was cut short by the rate (it used its whole budget, or a number it served is due
  again at once: an unlimited number gets at most a chunk per take) and the process has room,
  the rate grows by a tenth. (Doubling it, as TCP's slow start does, overshot: by the time the
  first late starts showed, half of a fresh worker's first thousands of grants were already too
  late.) With only unlimited sends it doubles: none of them can be late.
Starts later than the tolerance are put back, counted, and should stay rare.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

log = logging.getLogger("gateway.drain")

INITIAL_RATE = 2000.0
MIN_RATE = 200.0
MAX_RATE = 100_000.0
STEP_S = 0.02
ADJUST_S = 0.1
GROW = 1.1
# With only unlimited sends nothing can start late, and free sender slots bound the takes: the
# rate may double (at a tenth, one unlimited number took 2 s to reach 13,000 msg/s).
GROW_UNLIMITED = 2.0
EASE = 0.95
SHRINK = 0.85
LATE_SHARE = 0.1
LATE_MIN = 3
RETURNED_SHARE = 0.01  # put-backs beyond this share shrink the rate, busy or not
# Shares of a period the process ran or waited for a CPU: with rate-limited sends it grows below
# the first and eases off above the second. Unlimited sends alone may use all of it, and more
# of them than it can start at once only wait for a sender (their free slots bound them).
BUSY_LIMITED = (0.8, 0.9)
BUSY_UNLIMITED = (math.inf, math.inf)


class SendSchedule:
    def __init__(self, tolerance_s: float, max_rate: float | None = None) -> None:
        self.tolerance = tolerance_s
        self.late_after = tolerance_s / 3
        self.cap = min(MAX_RATE, max_rate) if max_rate else MAX_RATE
        self.rate = min(INITIAL_RATE, self.cap)
        self.cursor = 0.0  # when the last message already scheduled starts (monotonic s)
        self._started = 0
        self._late = 0
        self._returned = 0
        self._limited = False  # a rate-limited send started this period
        self._cut_short = False
        self._period_start = 0.0
        self._settled_at = 0.0  # before this, starts were scheduled at an older rate
        self._period_busy = busy_seconds()

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

    def scheduled(
        self, slots_end: float, count: int, budget: int, free_slots: int, more: bool = False
    ) -> None:
        """A take used `count` slots, up to `slots_end`; `more`: a shard it served is due again
        at once (a number had more to send than the take gave it)."""
        self.cursor = max(self.cursor, slots_end)
        if (count >= budget or more) and budget < free_slots:
            self._cut_short = True  # there may be more to send than the rate allowed

    def returned(self) -> None:
        """A rate-limited send came too late and was put back (also counted by `started`)."""
        self._returned += 1

    def started(self, lateness: float, limited: bool) -> None:
        """A send started `lateness` seconds after its stamp (`limited`: one with a time to keep,
        rate-limited or under the fleet's upstream cap).

        Only those have a time to keep: an unlimited one may start whenever.
        """
        self._started += 1
        if limited:
            self._limited = True
            if lateness > self.late_after:
                self._late += 1

    def adjust(self, now: float) -> None:
        """Learn from the last period's starts (call often; acts every ADJUST_S)."""
        elapsed = now - self._period_start
        if elapsed < ADJUST_S:
            return
        busy_total = busy_seconds()
        busy = (busy_total - self._period_busy) / elapsed
        late = self._late >= max(LATE_MIN, LATE_SHARE * self._started)
        log.debug(
            "send schedule: %d started, %d late, busy %.2f, cut short: %s, rate %.0f/s",
            self._started,
            self._late,
            busy,
            self._cut_short,
            self.rate,
        )
        achieved = self._started / elapsed
        room, ceiling = BUSY_LIMITED if self._limited else BUSY_UNLIMITED
        storm = self._returned >= max(LATE_MIN, RETURNED_SHARE * self._started)
        if now < self._settled_at:
            pass  # the sends of the previous rate are still starting: too soon to judge
        elif storm or (late and busy >= room):
            # below what it managed to start: the overload has to drain
            self.rate = max(MIN_RATE, min(self.rate, achieved) * SHRINK)
            self._settled_at = self.cursor
        elif busy > ceiling:
            self.rate = max(MIN_RATE, min(self.rate, achieved) * EASE)
        elif self._cut_short and not late and busy < room:
            grow = GROW if self._limited else GROW_UNLIMITED
            self.rate = min(self.cap, max(self.rate, achieved) * grow)
        self._period_start = now
        self._period_busy = busy_total
        self._started = self._late = self._returned = 0
        self._limited = self._cut_short = False


_SCHEDSTAT = Path("/proc/self/schedstat")


def busy_seconds() -> float:
    """Seconds this process's main thread has run or waited in a run queue (Linux), else CPU time.

    Waiting counts: on a crowded host a process that wants the CPU all the time but gets half of
    it is as saturated as one that runs all the time.
    """
    try:
        on_cpu, waiting = _SCHEDSTAT.read_text().split()[:2]
    except (OSError, ValueError):
        return time.process_time()
    return (int(on_cpu) + int(waiting)) / 1e9
