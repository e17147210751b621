"""The gauges one process publishes from Redis: depth, numbers, capacity, ETA, per-number."""

from __future__ import annotations

import dataclasses

from prometheus_client import REGISTRY

from gateway import keys
from gateway.accept.service import Acceptor
from gateway.gauges import GaugePublisher
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def _fill(store: Store, settings: Settings) -> None:
    registry = Registry(store)
    await registry.put("555200000001", {"throughput_tier": "standard"})
    await registry.put("555200000002", {"throughput_tier": "standard", "status": "pending"})
    await registry.put("555200000003", {"throughput_tier": "high", "max_mps": 100})
    messages = [
        {
            "phone_number_id": pn,
            "to": "5491140123456",
            "type": "text",
            "text": {"body": "x"},
            "priority": priority,
        }
        for pn, priority, count in [
            ("555200000001", "normal", 160),
            ("555200000002", "low", 5),
            ("555200000003", "high", 50),
        ]
        for _ in range(count)
    ]
    assert (await Acceptor(store, settings).send_batch({"messages": messages}))["accepted"] == 215


async def test_the_leader_publishes_what_redis_holds(store: Store, settings: Settings) -> None:
    await _fill(store, settings)
    publisher = GaugePublisher(store, "test-worker")
    assert await publisher._lead()
    await publisher.refresh()
    assert sample("gateway_queue_depth", tier="standard", lane="normal") == 160
    assert sample("gateway_queue_depth", tier="standard", lane="low") == 5
    assert sample("gateway_queue_depth", tier="high", lane="high") == 50
    assert sample("gateway_numbers", status="active", tier="standard") == 1
    assert sample("gateway_numbers", status="pending", tier="standard") == 1
    assert sample("gateway_tier_capacity_messages_per_second", tier="standard") == 80
    assert sample("gateway_tier_capacity_messages_per_second", tier="high") == 100
    assert sample("gateway_backlog_eta_seconds", tier="standard") == 2.0
    assert sample("gateway_backlog_eta_seconds", tier="high") == 0.5


async def test_only_one_process_leads(store: Store, settings: Settings) -> None:
    first, second = GaugePublisher(store, "a"), GaugePublisher(store, "b")
    assert await first._lead()
    assert not await second._lead()
    assert await first._lead()  # renewing


async def test_per_number_series_only_behind_the_setting(store: Store, settings: Settings) -> None:
    await _fill(store, settings)
    await GaugePublisher(store, "off").refresh()
    assert sample("gateway_number_queue_depth", phone_number_id="555200000001") in (None, 0.0)
    store.settings = dataclasses.replace(settings, metrics_per_number=True)
    await GaugePublisher(store, "on").refresh()
    assert sample("gateway_number_queue_depth", phone_number_id="555200000001") == 160
    assert (
        sample("gateway_number_rate_limit_messages_per_second", phone_number_id="555200000003")
        == 100
    )


async def test_a_number_queued_to_by_a_version_before_is_counted_on_every_list(
    store: Store, settings: Settings
) -> None:
    # gauges.lua reads the lists in the number's cfg `ls` only; one without `ls` (queued to by a
    # version before 0.3.0) has all six read
    await _fill(store, settings)
    shard = keys.shard_of("555200000001", store.shards)
    await store.redis.hdel(keys.cfg(shard, "555200000001"), "ls")
    await store.redis.rpush(keys.lane(shard, "555200000001", "nm"), "old-1", "old-2")
    publisher = GaugePublisher(store, "test-worker")
    assert await publisher._lead()
    await publisher.refresh()
    assert sample("gateway_queue_depth", tier="standard", lane="normal") == 162
    assert sample("gateway_queue_depth", tier="high", lane="high") == 50
