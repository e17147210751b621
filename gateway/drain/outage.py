"""One line in the log when Redis goes away and one when it is back, however many callers see it.

A restart of Redis leaves every pooled connection broken, so the first calls after it comes back
can still fail once each: failures within `QUIET_S` of the last line are the same outage and
are not logged again.
"""

from __future__ import annotations

import logging
import time

from gateway import metrics

log = logging.getLogger("gateway.drain")

QUIET_S = 10.0


class RedisOutage:
    def __init__(self) -> None:
        self.down = False
        self._logged_at = -QUIET_S

    def failed(self, exc: Exception) -> None:
        metrics.REDIS_ERRORS.inc()
        if self.down:
            return
        self.down = True
        now = time.monotonic()
        if now - self._logged_at >= QUIET_S:
            self._logged_at = now
            log.error("redis unavailable, drain paused: %s", exc)

    def answered(self) -> None:
        if self.down:
            self.down = False
            log.info("redis is back: drain resumed")
