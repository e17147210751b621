"""One line in the log when Redis goes away and one when it is back, however many callers see it."""

from __future__ import annotations

import logging

from gateway import metrics

log = logging.getLogger("gateway.drain")


class RedisOutage:
    def __init__(self) -> None:
        self.down = False

    def failed(self, exc: Exception) -> None:
        metrics.REDIS_ERRORS.inc()
        if not self.down:
            self.down = True
            log.error("redis unavailable, drain paused: %s", exc)

    def answered(self) -> None:
        if self.down:
            self.down = False
            log.info("redis is back: drain resumed")
