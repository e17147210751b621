"""The drain's Redis scripts on a real Redis: what `take` hands out and what `settle` records.

These drive the scripts the way a worker does, without HTTP, so each rule is checked on its own:
lanes, holds, expiry, leases and fences, and the sliding-window rate in the server's time.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from gateway import keys
from gateway.accept.service import Acceptor
from gateway.drain.take import PACE_MS, Taken, TakeReply, parse_take, take_args
from gateway.errors import ApiError
from gateway.messages import Messages
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store

PN = "555123456789"


SPACING_US = 100


async def take(
    store: Store, settings: Settings, budget: int = 100, lease_ms: int = 30_000
) -> TakeReply:
    """A take stamped from the server's now, SPACING_US apart."""
    shard = keys.shard_of(PN, store.shards)
    args = take_args(
        1000.0 + settings.rate_slack * 1000,
        budget=budget,
        lease_ms=lease_ms,
        headroom=0.0,
        retention_s=3600,
        start_us=0,
        spacing_us=SPACING_US,
    )
    return parse_take([shard], await store.script("take", shard, args))


async def settle(store: Store, *ops: tuple[str, ...]) -> list[int]:
    args: list[Any] = [3600, 1, len(ops)]
    for op in ops:
        args += list(op) + [""] * (5 - len(op))
    shard = keys.shard_of(PN, store.shards)
    return [int(code) for code in await store.script("settle", shard, args)]


def sent(item: Taken, wamid: str) -> tuple[str, ...]:
    """The op a worker settles a sent item with: with its take's context, which spares the
    settle a read of the message."""
    return ("S", item.id, item.fence, wamid, item.context)


async def queue(store: Store, settings: Settings, count: int = 1, **fields: Any) -> list[str]:
    messages = [
        {"phone_number_id": PN, "to": "5491140123456", "type": "text", "text": {"body": f"m{i}"}}
        | fields
        for i in range(count)
    ]
    result = await Acceptor(store, settings).send_batch({"messages": messages})
    assert result["accepted"] == count, result
    return [r["id"] for r in result["results"]]


async def status(store: Store, message_id: str) -> dict[str, Any]:
    return await Messages(store).get(message_id)


async def test_take_leases_in_lane_order(store: Store, settings: Settings) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    low = await queue(store, settings, 2, priority="low")
    normal = await queue(store, settings, 2)
    high = await queue(store, settings, 2, category="authentication")
    taken = await take(store, settings)
    assert [item.id for item in taken.items] == high + normal + low
    assert all(item.attempts == 1 for item in taken.items)
    assert (await status(store, high[0]))["status"] == "sending"


async def test_a_message_out_under_its_lease_reads_sending_and_stays_so(
    store: Store, settings: Settings
) -> None:
    """The take writes nothing to a message it hands out (its lease alone marks it out): read,
    it is `sending`, its attempt counted, updated when it was taken; it cannot be canceled,
    and its ttl running out meanwhile does not end it while it is out."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings, ttl_seconds=1)
    shard = keys.shard_of(PN, store.shards)
    before = await store.redis.hgetall(keys.msg(shard, message_id))
    await asyncio.sleep(0.05)
    await store.redis.config_resetstat()
    [item] = (await take(store, settings)).items
    stats = await store.redis.info("commandstats")
    assert "cmdstat_hset" not in stats and "cmdstat_hdel" not in stats
    assert await store.redis.hgetall(keys.msg(shard, message_id)) == before
    view = await status(store, message_id)
    assert (view["status"], view["attempts"]) == ("sending", 1)
    assert view["updated_at"] > view["created_at"]  # (when it was taken)
    with pytest.raises(ApiError) as refused:
        await Messages(store).cancel(message_id)
    assert (refused.value.status, refused.value.code) == (409, "not_cancelable")
    assert "sending" in refused.value.message
    await asyncio.sleep(1.1)  # past its ttl while it is out
    assert (await status(store, message_id))["status"] == "sending"
    # put back, it is queued again, its attempt not spent: past its ttl, the read ends it
    assert await settle(store, ("Q", item.id, item.fence, "", "")) == [1]
    view = await status(store, message_id)
    assert (view["status"], view["attempts"]) == ("expired", 0)
    # a stale op of the attempt put back changes nothing
    assert await settle(store, sent(item, "wamid.STALE")) == [0]


async def test_marketing_is_held_while_quality_is_red(store: Store, settings: Settings) -> None:
    registry = Registry(store)
    await registry.put(PN, {"throughput_tier": "unlimited", "quality_rating": "red"})
    marketing = await queue(store, settings, 2, category="marketing", priority="normal")
    utility = await queue(store, settings, 1)
    assert [item.id for item in (await take(store, settings)).items] == utility
    assert (await take(store, settings)).items == []
    await registry.patch(PN, {"quality_rating": "yellow"})
    assert [item.id for item in (await take(store, settings)).items] == marketing


async def test_pending_and_disconnected_numbers_hold_their_queue(
    store: Store, settings: Settings
) -> None:
    registry = Registry(store)
    await registry.put(PN, {"status": "pending", "throughput_tier": "unlimited"})
    ids = await queue(store, settings, 3)
    assert (await take(store, settings)).items == []
    await registry.patch(PN, {"status": "disconnected"})
    assert (await take(store, settings)).items == []
    assert (await status(store, ids[0]))["status"] == "queued"
    await registry.patch(PN, {"status": "active"})
    assert [item.id for item in (await take(store, settings)).items] == ids


async def test_an_expired_message_is_never_handed_out(store: Store, settings: Settings) -> None:
    await Registry(store).put(PN, {"status": "pending", "throughput_tier": "unlimited"})
    expiring = await queue(store, settings, 1, ttl_seconds=1)
    lasting = await queue(store, settings, 1)
    await asyncio.sleep(1.1)
    await Registry(store).patch(PN, {"status": "active"})
    taken = await take(store, settings)
    assert [item.id for item in taken.items] == lasting
    assert taken.expired == 1
    assert (await status(store, expiring[0]))["status"] == "expired"


async def test_settle_records_sent_with_the_upstream_id(store: Store, settings: Settings) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings)
    [item] = (await take(store, settings)).items
    assert await settle(store, sent(item, "wamid.ABC")) == [1]
    seen = await status(store, message_id)
    assert seen["status"] == "sent"
    assert seen["upstream_message_id"] == "wamid.ABC"
    assert seen["sent_at"] is not None
    number = await Registry(store).get(PN)
    assert number is not None
    assert number["sent_last_minute"] == 1
    assert number["inflight"] == 0


async def test_a_lapsed_lease_comes_back_and_fences_out_the_late_worker(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings)
    [first] = (await take(store, settings, lease_ms=50)).items
    await asyncio.sleep(0.1)
    [second] = (await take(store, settings)).items
    assert second.id == message_id
    assert second.fence != first.fence
    # the first worker answers late: ignored; the new attempt's answer counts
    assert await settle(store, sent(first, "wamid.LATE")) == [0]
    assert await settle(store, ("S", first.id, first.fence, "wamid.LATE")) == [0]
    assert await settle(store, sent(second, "wamid.NEW")) == [1]
    # and only once
    assert await settle(store, sent(second, "wamid.AGAIN")) == [0]
    assert (await status(store, message_id))["upstream_message_id"] == "wamid.NEW"


async def test_the_lease_sets_sentinel_is_never_a_lease(store: Store, settings: Settings) -> None:
    """A shard's lease set keeps a member scored +inf so that it stays a skiplist (cheap inserts
    and removals); no read of the leases may take it for one."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    shard = keys.shard_of(PN, store.shards)
    await queue(store, settings, 3)
    items = (await take(store, settings)).items
    assert await store.redis.object("encoding", keys.lease(shard)) in (b"skiplist", "skiplist")
    await settle(store, *[sent(i, "w") for i in items])
    # nothing in flight, nothing queued: the shard has nothing due (not a lease due at +inf)
    after = await take(store, settings)
    assert after.items == []
    assert after.next_due_ms[shard] == -1


async def test_requeue_returns_to_the_head_without_spending_an_attempt(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    ids = await queue(store, settings, 2)
    items = (await take(store, settings, budget=1)).items
    assert [i.id for i in items] == ids[:1]
    assert await settle(store, ("Q", items[0].id, items[0].fence)) == [1]
    again = (await take(store, settings)).items
    assert [i.id for i in again] == ids
    assert again[0].attempts == 1


async def test_throttle_pauses_the_number(store: Store, settings: Settings) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    await queue(store, settings, 2)
    items = (await take(store, settings)).items
    codes = await settle(store, *[("Q", i.id, i.fence, "throttle") for i in items])
    assert codes == [1, 1]
    assert (await take(store, settings)).items == []  # paused ~1 s
    await asyncio.sleep(1.1)
    assert len((await take(store, settings)).items) == 2


async def test_retry_waits_then_comes_back_and_can_be_canceled(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    retried, canceled = await queue(store, settings, 2)
    items = {i.id: i for i in (await take(store, settings)).items}
    ops = [("R", m, items[m].fence, "200", '{"code": 2}') for m in (retried, canceled)]
    assert await settle(store, *ops) == [1, 1]
    assert (await status(store, retried))["status"] == "queued"
    assert (await Messages(store).cancel(canceled))["status"] == "canceled"
    assert (await take(store, settings)).items == []
    await asyncio.sleep(0.25)
    again = (await take(store, settings)).items
    assert [i.id for i in again] == [retried]
    assert again[0].attempts == 2


async def test_a_retry_past_the_ttl_ends_expired(store: Store, settings: Settings) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings, 1, ttl_seconds=1)
    [item] = (await take(store, settings)).items
    assert await settle(store, ("R", item.id, item.fence, "5000", '{"code": 2}')) == [2]
    assert (await status(store, message_id))["status"] == "expired"


async def test_hold_disconnects_the_number_and_keeps_the_message(
    store: Store, settings: Settings
) -> None:
    registry = Registry(store)
    await registry.put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings)
    [item] = (await take(store, settings)).items
    assert await settle(store, ("H", item.id, item.fence, "disconnected")) == [1]
    number = await registry.get(PN)
    assert number is not None
    assert number["status"] == "disconnected"
    assert number["queue_depth"]["normal"] == 1
    assert (await status(store, message_id))["status"] == "queued"
    assert (await take(store, settings)).items == []


async def test_the_window_never_grants_more_than_the_rate(store: Store, settings: Settings) -> None:
    await Registry(store).put(PN, {"throughput_tier": "standard", "max_mps": 10})
    await queue(store, settings, 40)
    grants: list[float] = []
    deadline = asyncio.get_running_loop().time() + 2.5
    while asyncio.get_running_loop().time() < deadline:
        taken = await take(store, settings)
        grants += [float(item.stamp) for item in taken.items]
        await settle(store, *[("S", i.id, i.fence, "w") for i in taken.items])
        await asyncio.sleep(0.002)
    window = 1000.0 + settings.rate_slack * 1000
    assert grants, "nothing was granted"
    for start in grants:
        assert sum(1 for g in grants if start <= g < start + window) <= 10
    # at the rate: about 10 per second for the 2.5 s (the first second may start full)
    assert len(grants) >= 20


async def test_a_number_is_granted_a_chunk_per_take_and_what_it_fell_behind(
    store: Store, settings: Settings
) -> None:
    """Pacing: a take grants a number `PACE_MS` of its rate, plus what it fell behind since it
    was due (a take serves many numbers one after another), up to twice that in all."""
    await Registry(store).put(PN, {"throughput_tier": "high"})  # 1,000 msg/s
    await queue(store, settings, 200)
    chunk = math.ceil(1000 * PACE_MS / 1000)
    first = await take(store, settings)
    assert len(first.items) == 2 * chunk  # never taken: behind since forever
    cfg = keys.cfg(keys.shard_of(PN, store.shards), PN)
    due_ms = float(await store.redis.hget(cfg, "nx"))
    assert due_ms == pytest.approx(first.base_us / 1000 + 2 * PACE_MS, abs=0.01)
    again = await take(store, settings)
    # before it is due: nothing (this host may have stalled past it: then that is the next take)
    assert again.items == [] or again.now_ms >= due_ms
    if not again.items:
        await asyncio.sleep((due_ms - again.now_ms) / 1000 + 0.002)  # (timers may fire early)
        again = await take(store, settings)
    behind = math.floor(again.base_us / 1000 - due_ms)
    assert len(again.items) == min(chunk + behind, 2 * chunk)


async def test_a_rate_window_outlives_its_newest_stamp_by_a_window(
    store: Store, settings: Settings
) -> None:
    """The log's expiry is renewed only when its room runs low (cfg `lx`) and it is trimmed only
    now and then: after every take it still lives a window past its newest stamp, and it never
    holds more than a few chunks past the rate."""
    await Registry(store).put(PN, {"throughput_tier": "standard", "max_mps": 20})
    await queue(store, settings, 120)
    shard = keys.shard_of(PN, store.shards)
    log = keys.window(shard, PN)
    window = 1000.0 + settings.rate_slack * 1000
    grants = 0
    deadline = asyncio.get_running_loop().time() + 2.5
    while asyncio.get_running_loop().time() < deadline:
        taken = await take(store, settings)
        if taken.items:
            grants += len(taken.items)
            newest = max(float(item.stamp) for item in taken.items)
            pttl = await store.redis.pttl(log)
            assert pttl > 0, "the log has an expiry"
            assert taken.now_ms + pttl >= newest + window
            assert await store.redis.llen(log) <= 20 + 4 * 20
            await settle(store, *[("S", i.id, i.fence, "w") for i in taken.items])
        await asyncio.sleep(0.01)
    assert grants >= 40
    # renewed with room to spare, so not at every take
    assert float(await store.redis.hget(keys.cfg(shard, PN), "lx")) > newest + window


async def test_a_message_in_flight_when_its_number_is_deleted_fails(
    store: Store, settings: Settings
) -> None:
    registry = Registry(store)
    await registry.put(PN, {"throughput_tier": "unlimited"})
    retried, lapsing, sent = await queue(store, settings, 3)
    items = {i.id: i for i in (await take(store, settings, lease_ms=100)).items}
    await registry.delete(PN)
    # a retry, a requeue or a hold would park it in a queue nothing drains any more
    r = items[retried]
    assert await settle(store, ("R", r.id, r.fence, "10", '{"code": 2}')) == [3]
    s = items[sent]
    assert await settle(store, ("S", s.id, s.fence, "wamid.X")) == [1]
    await asyncio.sleep(0.15)
    assert (await take(store, settings)).deleted == 1  # the lapsed lease
    for message_id, wanted in ((retried, "failed"), (lapsing, "failed"), (sent, "sent")):
        status = await Messages(store).get(message_id)
        assert status["status"] == wanted
        if wanted == "failed":
            assert status["error"]["code"] == "phone_number_deleted"
