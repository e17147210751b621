"""The floor of `bench redis-cost` and `bench redis-instructions` does the work it stands for:
every message gets a record at accept, a lease while taken, its `sent` record and its wamid
index with the status retention, and nothing is left on the list or the lease set."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from bench.floor import PREFIX, RETENTION_S, Floor
from tests.servers import RedisServer

MESSAGES = 300  # (more than a take: several takes and settles)


@pytest.fixture
def client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    # (bytes, as the benchmarks' clients)
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


def test_accepted_messages_are_queued_records_on_one_list(client: redis.Redis) -> None:
    floor = Floor(client)
    floor.accept(MESSAGES)
    assert client.llen(PREFIX + "lane") == MESSAGES
    first = client.get(PREFIX + "m:000000000000")
    assert first is not None and first.startswith(b"queued ")


def test_every_message_drained_is_sent_with_its_wamid_and_leaves_no_lease(
    client: redis.Redis,
) -> None:
    floor = Floor(client)
    floor.accept(MESSAGES)
    assert floor.drain() == MESSAGES
    for i in (0, MESSAGES // 2, MESSAGES - 1):
        id_ = f"{i:012d}"
        record = client.get(PREFIX + "m:" + id_)
        assert record is not None and record.startswith(b"sent ")
        assert record.endswith(b"wamid." + id_.encode())
        assert 0 < client.ttl(PREFIX + "m:" + id_) <= RETENTION_S
        assert client.get(PREFIX + "w:wamid." + id_) == id_.encode()
        assert 0 < client.ttl(PREFIX + "w:wamid." + id_) <= RETENTION_S
    assert client.llen(PREFIX + "lane") == 0
    # only the member that keeps the set a skiplist is left
    assert client.zrange(PREFIX + "lease", 0, -1) == [b"~" * 80]
    floor.clear()
    assert list(client.scan_iter(match=PREFIX + "*")) == []
