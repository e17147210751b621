"""Meta's pair rate as deployed: a `gateway worker` and a `gateway sandbox` that enforces it.

One recipient's 100 messages among 10,000 to others on one 1,000 msg/s number: the others
drain at the number's rate, the one recipient's arrive in accept order and none is refused with
131056. The interval is shortened (50 ms, bursts of 45) so the test takes seconds; the rule is
the one Meta applies at 6 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.accept.service import Acceptor
from gateway.registry import Registry
from gateway.store import Store
from tests.acceptance.commands import Command, clean_env
from tests.acceptance.test_drain_processes import (  # noqa: F401 (fixtures)
    Upstream,
    drained,
    redis_server,
    start_workers,
    store,
)
from tests.integration.drain_support import sustained_rate
from tests.servers import RedisServer, free_port

PN = "555000001001"
ONE = "5491140000001"
PAIR = {"GATEWAY_PAIR_INTERVAL": "50ms", "GATEWAY_PAIR_BURST": "45"}


class PairUpstream(Upstream):
    """The sandbox process, enforcing the pair rate."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        env = clean_env(GATEWAY_PORT=str(self.port), GATEWAY_LOG_LEVEL="WARNING", **PAIR)
        self.command = Command(["sandbox"], env, tmp_path / "sandbox").start()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v21.0"
        self.command.wait_http(f"{self.root}/_sandbox/stats")


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    box = PairUpstream(tmp_path)
    yield box
    box.command.stop()


async def test_one_recipient_in_order_among_many_at_the_full_rate(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
    store: Store,  # noqa: F811
    upstream: Upstream,
) -> None:
    registry = Registry(store)
    await registry.put(PN, {"throughput_tier": "high", "status": "pending"})
    acceptor = Acceptor(store, store.settings)
    mine = 0
    for start in range(0, 10_100, 1000):
        batch = []
        for i in range(start, min(start + 1000, 10_100)):
            if i % 101 == 0 and mine < 100:
                batch.append({"to": ONE, "text": {"body": f"one {mine}"}})
                mine += 1
            else:
                batch.append({"to": f"549{i:010d}", "text": {"body": f"other {i}"}})
        for message in batch:
            message.update(phone_number_id=PN, type="text")
        result = await acceptor.send_batch({"messages": batch})
        assert result["accepted"] == len(batch)
    assert mine == 100
    workers = start_workers(tmp_path, redis_server.url, upstream, 1, **PAIR)
    try:
        await registry.patch(PN, {"status": "active"})
        await drained(store, [PN], 60.0)
    finally:
        workers.stop()
    requests = (await upstream.get(f"requests?phone_number_id={PN}&limit=1000000"))["requests"]
    assert not [r for r in requests if r["outcome"] == "error:131056"]
    ok = sorted((r["time"], r["body"]) for r in requests if r["outcome"] == "ok")
    assert len(ok) == 10_100
    assert [b["text"]["body"] for _, b in ok if b["to"] == ONE] == [f"one {i}" for i in range(100)]
    others = [t for t, b in ok if b["to"] != ONE]
    # the same bound as the drain's own process test: the rate is `bench`'s to measure
    assert sustained_rate(others) >= 0.75 * 1000
