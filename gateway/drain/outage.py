"""One line in the log when Redis goes away and one when it is back, however many callers see it;
and which shards wait out a window before they are taken from again.

A restart of Redis leaves every pooled connection broken, so the first calls after it comes back
can still fail once each: failures within `QUIET_S` of the last line are the same outage and
are not logged again.

A server that failed may have lost its last writes: a replica promoted in a failover lacks what
had not reached it yet (replication is asynchronous), a restart loses up to a second with
`appendfsync everysec`. Among them may be the latest grants of a number's window log, and a log
missing them would grant those slots again: one sliding second over the rate. So a shard whose
calls failed is not taken from until `hold_s` after its first failure: by then every grant the
lost writes could hold has left the window. (Only the shards of the failed node wait: on a
Redis Cluster the others go on.)
"""

from __future__ import annotations

import logging
import time

from gateway import metrics

log = logging.getLogger("gateway.drain")

QUIET_S = 10.0


class RedisOutage:
    def __init__(self, hold_s: float = 0.0) -> None:
        self.down = False
        self.hold_s = hold_s
        self._logged_at = -QUIET_S
        self._announced = False  # this outage's line was logged: its end is logged too
        self._failed_since: dict[int, float] = {}  # shard -> first failure of its outage

    def shards_failed(self, shards: list[int], exc: Exception) -> None:
        """Calls for these shards failed: they wait out the hold (`held_until`)."""
        now = time.monotonic()
        for shard in shards:
            self._failed_since.setdefault(shard, now)
        self.failed(exc)

    @property
    def holding(self) -> bool:
        """Whether some shard failed and has not been taken from since (the usual: no)."""
        return bool(self._failed_since)

    def held_until(self, shard: int) -> float:
        """When the shard may be taken from again (monotonic; 0: now)."""
        since = self._failed_since.get(shard)
        return 0.0 if since is None else since + self.hold_s

    def shards_answered(self, shards: list[int]) -> None:
        """A take for these shards (made after their hold) succeeded: the outage is over."""
        for shard in shards:
            self._failed_since.pop(shard, None)

    def failed(self, exc: Exception) -> None:
        metrics.REDIS_ERRORS.inc()
        if self.down:
            return
        self.down = True
        now = time.monotonic()
        if now - self._logged_at >= QUIET_S:
            self._logged_at = now
            self._announced = True
            log.error("redis unavailable, drain paused: %s", exc)

    def answered(self) -> None:
        """A call succeeded. (On a Redis Cluster with a node down, calls to the others succeed
        between the failed ones: only the end of an outage whose start was logged is logged.)"""
        if self.down:
            self.down = False
            if self._announced:
                self._announced = False
                log.info("redis is back: drain resumed")
