"""The fleet's upstream cap, `GATEWAY_UPSTREAM_MAX_MPS`: send slots reserved in Redis per take.

API.md makes the cap the whole fleet's, held in Redis and exact like the number rates. So it is
a sliding-window log like theirs, one for the fleet (`{gw:fleet}:up`, `fleet.lua`), asked
before every take of every worker: the worker reserves the slots its take may use (`reserve`),
the take grants at most that many and stamps none later than `BOUND_MS` after its slot
(take.lua), and the worker then tells the log what the take made of them (`settle`): the
members of the sends it made are scored at their stamps, the others removed, so a take that
found little to send keeps none of the fleet's capacity. A process's own limiter would only
make sends late (each starts at its stamp), so there is none.

Why it is exact. W is the window, 1 s + the rate slack δ, as for the numbers.
1. Every send's stamp is at or after the start of the reserve that granted its slot: take.lua
   lays a capped take's slots from that start, never earlier.
2. From its reserve until its stamp is a window old, every send has a member of its own in the
   log scored at or after its stamp: its slot plus `BOUND_MS` until the settle (take.lua's
   bound), its stamp after it. A reserve trims only members a window older than its own now,
   and starts no earlier than that now.
3. A reserve that starts at s grants g slots only if the members scored after s - W, plus g,
   are at most the cap.
4. A send arrives upstream within δ after its stamp: the worker starts it within δ/2 or puts
   it back, the network has the other half (the number rates rest on the same).
Take any second [t, t + 1 s) at the upstream, and R, of the reserves that granted a send
arriving in it, the last to run. One of R's sends has its stamp before t + 1 s, so by (1) R
started at s_R < t + 1 s. Every other send arriving in that second was granted by an earlier
reserve and has its stamp after t - δ > s_R - W, so by (2) its member was counted by R. By (3)
the second holds at most the cap.

What it sustains. A reserve counts every member scored after its start less W, those ahead of
its start included (the other workers' next takes), so a member counts from its reserve until a
window after its stamp: W plus how far ahead of its reserve the stamp lies (the clock's lead and
up to a take step, 20 ms, for an unlimited number; up to `BOUND_MS` more for a rate-limited
one). Under a backlog the fleet sends about cap / (1 s + δ + 20-40 ms): measured with the
default slack, 97% of the cap on unlimited numbers and 95-96% on a mix with rate-limited ones.
(Scoring members at their slots plus the bound until they expire, without the settle, would
cost the bound as well: 5 points.) Under a cap a number at its rate takes only the slots its
window frees within `BOUND_MS` of theirs; the others wait for its next take.

The log alone would let a backlog go out in a burst of the whole cap at the start of each
window and nothing for the rest of it. So reserves are paced too, as the numbers' grants are:
a GCRA at the cap's rate with a burst of `BURST_MS`, so sends flow evenly over the second.
The pace only smooths (only the log limits), and unused slots give their pace back as well.

Who gets the room: first come, first served. A reserve is granted at once from the first start
with room for at least `LEAST_S` of the cap (or all it wants, if less): the start it asked for,
or a later one up to `MAX_LEAD_MS` ahead; only past that is it refused, and the take loop waits
until that start is within the lead (`Drain._make_room`: a computed wait, no polling).
Granting only at the start asked for gave all the room to the worker whose takes looked
furthest ahead (a longer clock lead, a schedule further on): its start always saw the room
first, and another worker went seconds without a send. Room for more than one slot keeps a
saturated fleet from paying a reserve and a take per message.

On a Redis Cluster the log lives on the node serving `{gw:fleet}`: one more call per take, to
that node. If it is down the capped fleet sends nothing (fail closed, like any outage of the
drain) and resumes by itself when it, or its replica, answers. The stamps are the clocks of the
nodes serving the shards and the reserve's start is the fleet node's: exact as far as the nodes'
clocks agree, which the drain's clock bracket (`gateway.drain.clock`) already assumes; the trim
keeps a second of margin.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from gateway import keys
from gateway.drain.clock import MAX_LEAD_S, ServerClock
from gateway.drain.take import LOOKAHEAD_MS, MAX_LEAD_MS
from gateway.store import Store

# How much later than its slot a capped take may stamp a grant: a rate-limited number's
# lookahead, so a number at its rate still takes what its window frees soon after its slot.
BOUND_MS = LOOKAHEAD_MS
# A reserve is granted from where this share of a second of the cap is free (at least 1 slot).
LEAST_S = 0.01
# The pace's burst: about 50 ms of the cap's rate per take (what the fleet's figures in the
# README were measured with; a number's own pace is 25 ms since 2026-11-30, `PACE_MS`).
BURST_MS = 50.0
LAG_SAMPLES = 8


@dataclass(slots=True)
class Reservation:
    granted: int  # slots reserved: the take may grant at most this many
    start_us: int  # the first slot (server clock); the k-th is start_us + k * spacing
    serial: int  # the first member's serial
    free_at_us: int  # when none were: the first start with room (server clock); else 0


class FleetCap:
    def __init__(
        self, store: Store, clock: ServerClock, worker_id: str, max_mps: float, window_ms: float
    ) -> None:
        self.store = store
        self.clock = clock  # each reserve is a sample of the server's clock, as a take is
        # whole sends in any sliding second (a fractional cap rounds down, to 1 at least)
        self.cap = max(1, math.floor(max_mps + 1e-9))
        self.least = max(1, min(self.cap, math.ceil(self.cap * LEAST_S)))
        self.window_ms = window_ms
        self.member_prefix = f"{worker_id}:"
        self._serial = 0
        # How long recent reserves took, the longest of the last few (seconds; at most the
        # clock's own longest lead): the take that follows needs its slots that much further
        # ahead to have its reply in time.
        self.lag = 0.0
        self._lags: deque[float] = deque(maxlen=LAG_SAMPLES)

    async def reserve(self, start_us: int, spacing_us: int, want: int) -> Reservation:
        """Up to `want` slots from `start_us`, `spacing_us` apart; raises `StoreUnavailable`."""
        serial = self._serial
        # advanced before the call: a reserve that timed out may still have run, and its
        # members must never be reused
        self._serial += want
        sent = time.monotonic()
        reply = await self.store.script_at(
            "fleet",
            keys.fleet_prefix(),
            [
                "reserve",
                self.cap,
                self.window_ms,
                start_us,
                spacing_us,
                want,
                self.least,
                BOUND_MS,
                MAX_LEAD_MS,
                BURST_MS,
                self.member_prefix,
                serial,
            ],
        )
        received = time.monotonic()
        self.clock.observe(sent, float(reply[3]), received)
        self._lags.append(received - sent)
        self.lag = min(max(self._lags), MAX_LEAD_S)
        free_at_ms = float(reply[2])
        return Reservation(
            granted=int(reply[0]),
            start_us=int(reply[1]),
            serial=serial,
            # a microsecond later than said, so that rounding never makes it a moment too soon
            free_at_us=math.ceil(free_at_ms * 1000) + 1 if free_at_ms >= 0 else 0,
        )

    def retry_at(self, refused: Reservation) -> float:
        """When a reserve would get the room a refused one was told of (monotonic): its start
        may be up to `MAX_LEAD_MS` ahead."""
        return self.clock.local_earliest(refused.free_at_us) - MAX_LEAD_MS / 1000

    async def settle(self, reservation: Reservation, stamps: list[str]) -> None:
        """The take made these sends (their stamps, ms) of `reservation`; the rest go back.

        Raises `StoreUnavailable`: the members then keep their bound, which only holds some of
        the cap a little longer than needed.
        """
        await self.store.script_at(
            "fleet",
            keys.fleet_prefix(),
            [
                "settle",
                self.cap,
                self.member_prefix,
                reservation.serial,
                reservation.granted,
                *stamps,
            ],
        )
