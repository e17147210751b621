"""A backlog over a thousand rate-limited numbers, drained by a `gateway worker` process.

The shape the drain exists for, and the one that once collapsed (to a few sends a second): many
numbers due at once, each held to its tier's rate. Every message must arrive exactly once, no
number above its rate in any sliding second, and the grants put back (sends that could not
start on time) must stay a small minority.

How small depends on the CPU the worker gets. `bench drain` gives the worker a CPU of its own;
here it shares this machine's two with the sandbox, Redis and pytest, and a stretch spent off
the CPU puts back what fell due meanwhile. Measured over five runs of each case on 2026-11-29:
0.005-1.6% (median 0.4%); 1-11% before the sandbox ran at real-time priority. The bound
catches the collapse and the self-feeding put-back storms (20-70% before the send schedule
learned to back off from them) that this test was written against; the 1% target is `bench
drain`'s.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.accept.service import Acceptor
from gateway.registry import Registry
from gateway.store import Store
from tests.acceptance.test_drain_processes import Upstream, start_workers
from tests.conftest import make_settings
from tests.integration.drain_support import eventually, max_in_window
from tests.servers import RedisServer

RATES = {"standard": 80, "medium": 200, "high": 1000}
RETURNED_BOUND = 0.05  # put-backs allowed, as a share of sends
NUMBERS = 1000
PER_NUMBER = 20


@pytest.fixture
async def store(private_redis: RedisServer, tmp_path: Path) -> AsyncIterator[Store]:
    settings = make_settings(private_redis.url, tmp_path / "data", max_backlog=1_000_000)
    store = Store.from_settings(settings, private_redis.url)
    yield store
    await store.close()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    box = Upstream(tmp_path)
    yield box
    box.command.stop()


def all_high(i: int) -> str:
    return "high"


def mixed(i: int) -> str:
    """Like a real fleet: 10% high, 30% medium, 60% standard."""
    return "high" if i % 10 == 0 else "medium" if i % 10 < 4 else "standard"


async def _backlog(store: Store, tier_of: Any) -> dict[str, str]:
    tiers = {f"5552{i:08d}": tier_of(i) for i in range(NUMBERS)}
    registry = Registry(store)
    items = list(tiers.items())
    for start in range(0, len(items), 100):
        await asyncio.gather(
            *(registry.put(pn, {"throughput_tier": t}) for pn, t in items[start : start + 100])
        )
    acceptor = Acceptor(store, store.settings)
    batch: list[dict[str, Any]] = []
    for pn in tiers:
        for n in range(PER_NUMBER):
            batch.append(
                {
                    "phone_number_id": pn,
                    "to": "5491140123456",
                    "type": "text",
                    "text": {"body": f"{pn}-{n}"},
                }
            )
            if len(batch) == 1000:
                assert (await acceptor.send_batch({"messages": batch}))["accepted"] == 1000
                batch = []
    return tiers


def _counter(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.split("{", 1)[0].split(" ", 1)[0] == name
    )


@pytest.mark.parametrize("tier_of", [all_high, mixed], ids=["all-high", "mixed"])
async def test_a_backlog_over_a_thousand_rate_limited_numbers_drains_exactly(
    tmp_path: Path, private_redis: RedisServer, store: Store, upstream: Upstream, tier_of: Any
) -> None:
    tiers = await _backlog(store, tier_of)
    total = NUMBERS * PER_NUMBER
    worker = start_workers(tmp_path, private_redis.url, upstream, 1)
    port = int(worker.env["GATEWAY_PORT"])
    try:

        async def all_arrived() -> bool:
            counts = (await upstream.get("arrivals"))["numbers"]
            return sum(counts.values()) >= total

        # a bound, not a measurement: the drain runs at thousands a second. Polled rarely: the
        # two CPUs of this machine are the drain's too.
        await eventually(all_arrived, 90.0, "the whole backlog arriving", every_s=0.25)
        await asyncio.sleep(1.5)  # the worker adds its counters to /metrics every second
        sent = _counter(port, "gateway_messages_sent_total")
        returned = _counter(port, "gateway_grants_returned_total")
    finally:
        worker.stop()
    records = (await upstream.get("requests?limit=1000000"))["requests"]
    ok = [r for r in records if r["outcome"] == "ok"]
    bodies = Counter(r["body"]["text"]["body"] for r in ok)
    assert len(bodies) == total, "a message was lost"
    assert max(bodies.values()) == 1, "a message was sent twice"
    by_number: dict[str, list[float]] = {}
    for r in ok:
        by_number.setdefault(r["phone_number_id"], []).append(r["time"])
    over = {
        pn: max_in_window(sorted(times))
        for pn, times in by_number.items()
        if max_in_window(sorted(times)) > RATES[tiers[pn]]
    }
    assert not over, f"numbers over their rate in a sliding second: {over}"
    assert sent == total
    assert returned < RETURNED_BOUND * sent, f"{returned:.0f} grants put back for {sent:.0f} sends"
