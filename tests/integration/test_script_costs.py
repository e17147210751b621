"""What the cheaper `push`, `take` and `settle` must still get right (issue 9: fewer Redis calls
per message).

`push` reads the backlog of only the lane lists its number has queued to (cfg `ls`), which must
then hold every list with a message on it, also for numbers queued to by the versions before.

`take` reads a number's lanes a run at a time and removes what it took at the end of the
number's turn; `settle` adds up what its ops owe each number (in flight, sent per second) and
writes it once per call. These drive the scripts as a worker does, on a real Redis, in the cases
where that could go wrong: many outcomes of one number in one call, a throttle beside a success,
a long run of one recipient's messages parked in one take, and a message expiring mid-take that
lets its recipient's next message go.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from datetime import UTC, datetime
from typing import Any

from gateway import keys
from gateway.accept.service import Acceptor
from gateway.drain.take import TakeReply, parse_take, take_args
from gateway.messages import Messages
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store
from tests.integration.test_take_settle import sent, settle

PN = "555123456789"
ANA = "5491140000001"
BEA = "5491140000002"


async def take(
    store: Store, budget: int = 100, in_order: bool = False, pair_interval_ms: float = 0.0
) -> TakeReply:
    shard = keys.shard_of(PN, store.shards)
    args = take_args(
        1010.0,
        budget=budget,
        lease_ms=30_000,
        headroom=0.0,
        retention_s=3600,
        start_us=0,
        spacing_us=100,
        pair_interval_ms=pair_interval_ms,
        pair_burst=45,
        recipient_order=in_order,
    )
    return parse_take([shard], await store.script("take", shard, args))


async def queue(store: Store, settings: Settings, *users: str, **fields: Any) -> list[str]:
    messages = [
        {"phone_number_id": PN, "to": user, "type": "text", "text": {"body": f"m{i}"}} | fields
        for i, user in enumerate(users)
    ]
    result = await Acceptor(store, settings).send_batch({"messages": messages})
    assert result["accepted"] == len(users), result
    return [r["id"] for r in result["results"]]


async def status(store: Store, message_id: str) -> str:
    return str((await Messages(store).get(message_id))["status"])


async def number(store: Store) -> dict[str, Any]:
    view = await Registry(store).get(PN)
    assert view is not None
    return view


async def test_one_call_settling_many_messages_of_a_number_counts_each(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    ids = await queue(store, settings, *[f"54911400{i:05d}" for i in range(30)])
    items = (await take(store)).items
    assert [i.id for i in items] == ids
    assert (await number(store))["inflight"] == 30
    # one late answer of an attempt that no longer owns its message changes nothing
    stale = ("S", items[0].id, str(int(items[0].fence) + 1), "wamid.late")
    ops = [stale] + [("S", i.id, i.fence, f"wamid.{n}") for n, i in enumerate(items[:25])]
    ops += [("F", i.id, i.fence, '{"code":1}') for i in items[25:]]
    assert await settle(store, *ops) == [0] + [1] * 30
    view = await number(store)
    assert view["inflight"] == 0
    assert view["sent_last_minute"] == 25
    assert [await status(store, i) for i in ids] == ["sent"] * 25 + ["failed"] * 5
    # a second call in the same minute adds to the count
    more = await queue(store, settings, ANA, BEA)
    again = (await take(store)).items
    assert [i.id for i in again] == more
    assert await settle(store, *[("S", i.id, i.fence, "") for i in again]) == [1, 1]
    view = await number(store)
    assert view["sent_last_minute"] == 27
    assert view["inflight"] == 0


async def test_a_throttle_beside_a_success_in_one_call_still_pauses_the_number(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    ids = await queue(store, settings, ANA, BEA, ANA)
    first, second, third = (await take(store)).items
    codes = await settle(
        store,
        ("S", first.id, first.fence, "wamid.1"),
        ("Q", third.id, third.fence, "throttle"),
        ("Q", second.id, second.fence, "throttle"),
    )
    assert codes == [1, 1, 1]
    assert await status(store, ids[0]) == "sent"
    # paused about a second (the second throttle of the same burst does not double it)
    assert (await take(store)).items == []
    await asyncio.sleep(1.1)
    back = (await take(store)).items
    assert [i.id for i in back] == ids[1:]
    assert (await number(store))["inflight"] == 2
    # a success after a throttle resets the backoff: the next throttle pauses 1 s again, not 2
    codes = await settle(
        store, ("S", back[0].id, back[0].fence, ""), ("Q", back[1].id, back[1].fence, "throttle")
    )
    assert codes == [1, 1]
    assert (await take(store)).items == []
    await asyncio.sleep(1.1)
    assert [i.id for i in (await take(store)).items] == ids[2:]


async def test_a_take_goes_past_a_long_run_of_one_recipients_parked_messages(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    ana = await queue(store, settings, *[ANA] * 20)
    [bea] = await queue(store, settings, BEA)
    taken = await take(store, budget=2, in_order=True)
    # Ana's first goes; her 19 others park behind it; Bea's, after them in the lane, goes too
    assert [i.id for i in taken.items] == [ana[0], bea]
    view = await number(store)
    assert sum(view["queue_depth"].values()) == 19
    assert (await take(store, in_order=True)).items == []
    # each of Ana's comes back in order as the one before it ends
    sent = []
    item = taken.items[0]
    for _ in range(20):
        assert await settle(store, ("S", item.id, item.fence, "")) == [1]
        sent.append(item.id)
        following = (await take(store, in_order=True)).items
        if not following:
            break
        [item] = following
    assert sent == ana
    assert sum((await number(store))["queue_depth"].values()) == 0


async def test_a_message_that_expires_mid_take_lets_the_next_one_go_in_the_same_take(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [first] = await queue(store, settings, ANA, ttl_seconds=1)
    [later] = await queue(store, settings, ANA)
    # the first holds its recipient; the later one parks behind it
    [held] = (await take(store, budget=2, in_order=True)).items
    assert held.id == first
    # put back (say, sent too late): it keeps holding its recipient
    assert await settle(store, ("Q", held.id, held.fence)) == [1]
    [other] = await queue(store, settings, BEA)
    await asyncio.sleep(1.1)
    # the first has expired: it ends, and Ana's next goes back to the head of the lane and is
    # taken in this same take, before Bea's
    taken = await take(store, in_order=True)
    assert taken.expired == 1
    assert [i.id for i in taken.items] == [later, other]
    assert await status(store, first) == "expired"
    assert sum((await number(store))["queue_depth"].values()) == 0


async def test_a_pair_held_from_before_the_rules_were_turned_off_is_let_go_of(
    store: Store, settings: Settings
) -> None:
    """Without the recipient rules a settle does not read a sent message's pair (one EXISTS
    for the whole call finds none there); one held from while the rules were on is still let
    go of, and the message parked behind it comes back."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [first, second] = await queue(store, settings, ANA, ANA)
    [bea] = await queue(store, settings, BEA)
    [held, other] = (await take(store, budget=3, in_order=True)).items
    assert (held.id, other.id) == (first, bea)  # Ana's second parked behind her first
    assert await settle(store, ("Q", held.id, held.fence)) == [1]  # it keeps holding her
    [again] = (await take(store, in_order=False)).items  # the rules are off now
    assert again.id == first
    await store.redis.config_resetstat()
    assert await settle(store, sent(again, "wamid.A1"), sent(other, "wamid.B1")) == [1, 1]
    stats = await store.redis.info("commandstats")
    assert stats["cmdstat_exists"]["calls"] == 2  # (the other: statuses held for the wamids)
    # it came back holding her pair in turn, which its own settle lets go of
    [after] = (await take(store, in_order=False)).items
    assert after.id == second
    assert await settle(store, sent(after, "wamid.A2")) == [1]
    assert await store.redis.get(await pair_key(store, first)) is None


async def pair_key(store: Store, message_id: str) -> str:
    shard = keys.shard_of(PN, store.shards)
    user = await store.redis.hget(keys.msg(shard, message_id), "t")
    assert user is not None
    return keys.pair(shard, PN, user.decode() if isinstance(user, bytes) else user)


async def test_a_recipients_lone_message_claims_and_frees_its_pair_in_one_call_each(
    store: Store, settings: Settings
) -> None:
    """The common case, a recipient with no state: the take claims the pair with one SET, the
    settle writes it idle with one SET; what they write is what the full reads and writes did."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings, ANA)
    [item] = (await take(store, in_order=True, pair_interval_ms=6000.0)).items
    key = await pair_key(store, message_id)
    holder, tat, parked = (await store.redis.get(key)).decode().split(" ")
    assert (holder, parked) == (message_id, "0")
    assert tat == str(math.ceil(float(item.stamp) + 6000.0))  # whole ms: never early
    assert await store.redis.pttl(key) == -1  # held: it must not expire
    assert await settle(store, sent(item, "wamid.1")) == [1]
    assert (await store.redis.get(key)).decode() == f" {tat} 0"
    # idle until its allowance is whole: tat less the settle's time (whole ms), rounded up
    assert 0 < await store.redis.pttl(key) <= 6002


async def test_a_pair_whose_allowance_is_whole_again_is_deleted_by_its_release(
    store: Store, settings: Settings
) -> None:
    """The one-call release writes the idle pair to expire at its tat: one already past deletes
    it (as the full release did)."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings, ANA)
    [item] = (await take(store, in_order=True, pair_interval_ms=5.0)).items
    key = await pair_key(store, message_id)
    assert await store.redis.exists(key)
    await asyncio.sleep(0.05)
    assert await settle(store, sent(item, "wamid.1")) == [1]
    assert not await store.redis.exists(key)
    assert await status(store, message_id) == "sent"


async def test_a_settle_leaves_a_pair_it_does_not_hold_as_it_was(
    store: Store, settings: Settings
) -> None:
    """The one-call release writes first and reads what it replaced: when that was not what the
    message's take wrote, what was there is put back (or the full release goes on)."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [ana, bea] = await queue(store, settings, ANA, BEA)
    first, second = (await take(store, in_order=True, pair_interval_ms=6000.0)).items
    held_by_another = "someone-else 123.000 2"
    await store.redis.set(await pair_key(store, ana), held_by_another)
    await store.redis.delete(await pair_key(store, bea))
    codes = await settle(store, sent(first, "wamid.1"), ("F", second.id, second.fence, "{}"))
    assert codes == [1, 1]
    assert (await store.redis.get(await pair_key(store, ana))).decode() == held_by_another
    assert await store.redis.pttl(await pair_key(store, ana)) == -1
    assert not await store.redis.exists(await pair_key(store, bea))
    assert [await status(store, m) for m in (ana, bea)] == ["sent", "failed"]


async def calls_of(store: Store, command: str) -> int:
    """How many times the server ran `command` since its stats were reset (scripts' calls too)."""
    stats = await store.redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_first_attempt_sent_is_recorded_without_reading_the_message(
    store: Store, settings: Settings
) -> None:
    """A worker settles a send with its take's context: its lease in the lease set proves the
    attempt current, so the settle writes without reading the message, and still records all a
    read-back settle did (status, wamid index, the pair let go of, the number's counts)."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id, *others] = await queue(store, settings, ANA, BEA, "5491140000003")
    [item, *rest] = (await take(store, in_order=True, pair_interval_ms=6000.0)).items
    assert item.context != ""
    await store.redis.config_resetstat()
    ops = [sent(item, "wamid.Q1"), *[sent(r, f"wamid.{r.id}") for r in rest]]
    assert await settle(store, *ops) == [1, 1, 1]
    # the number's cfg is read once; no message is read, each is written once
    assert await calls_of(store, "hmget") == 1
    assert await calls_of(store, "hset") == 3
    shard = keys.shard_of(PN, store.shards)
    assert await store.redis.get(keys.wamid(shard, "wamid.Q1")) == message_id.encode()
    assert await store.redis.ttl(keys.wamid(shard, "wamid.Q1")) > 3000
    assert await store.redis.zcount(keys.lease(shard), "-inf", "(inf") == 0
    view = await Messages(store).get(message_id)
    assert (view["status"], view["upstream_message_id"]) == ("sent", "wamid.Q1")
    assert 0 < await store.redis.ttl(keys.msg(shard, message_id)) <= 3600
    pair = await store.redis.get(await pair_key(store, message_id))
    assert pair.decode().startswith(" ") and pair.decode().endswith(" 0")  # idle: no holder
    assert ((await number(store))["inflight"], (await number(store))["sent_last_minute"]) == (0, 3)
    assert [await status(store, m) for m in others] == ["sent", "sent"]


async def test_a_quick_settle_emits_the_sent_event_of_a_message_with_a_callback(
    store: Store, settings: Settings
) -> None:
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings, ANA)
    shard = keys.shard_of(PN, store.shards)
    # (as the accept writes it for a message with a callback URL)
    await store.redis.hset(keys.msg(shard, message_id), "cb", "http://127.0.0.1:9/cb")
    [item] = (await take(store)).items
    assert await settle(store, sent(item, "wamid.CB")) == [1]
    event = await store.redis.hgetall(keys.cbevent(shard, f"{message_id}.1"))
    assert (event[b"s"], event[b"w"]) == (b"sent", b"wamid.CB")
    assert await store.redis.zscore(keys.outbox(shard), f"{message_id}.1") is not None


async def test_a_later_attempt_is_settled_by_reading_it_and_clears_its_error(
    store: Store, settings: Settings
) -> None:
    """A later attempt may carry an earlier one's error: its take gives no context, and its
    settle reads the message and clears the error."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [message_id] = await queue(store, settings, ANA)
    [first] = (await take(store)).items
    assert await settle(store, ("R", first.id, first.fence, "1", '{"code": 2}')) == [1]
    await asyncio.sleep(0.05)
    [second] = (await take(store)).items
    assert (second.attempts, second.context) == (2, "")
    assert await settle(store, sent(second, "wamid.R2")) == [1]
    view = await Messages(store).get(message_id)
    assert (view["status"], view["error"], view["attempts"]) == ("sent", None, 2)


async def test_a_lease_written_by_the_versions_before_is_taken_back_and_settled(
    store: Store, settings: Settings
) -> None:
    """The versions before wrote a message being sent as `sending`, with the fence and attempts
    of the attempt under way, and its lease as the message id alone (two versions back) or as
    "<id>#<fence>" (the last): a settle still finds such an attempt current (by reading the
    message) and removes its lease, and a lapsed one is taken back, its attempt counted once."""
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    [one, two, three] = await queue(store, settings, ANA, BEA, "5491140000003")
    shard = keys.shard_of(PN, store.shards)
    lease = keys.lease(shard)
    first, second, third = (await take(store)).items
    for item, member, deadline in (
        (first, first.id, 10**13),
        (second, second.id, 1),
        (third, f"{third.id}#{third.fence}", 1),
    ):
        # as those versions' take wrote it
        await store.redis.zrem(lease, f"{item.id}#{item.fence}")
        await store.redis.zadd(lease, {member: deadline})
        fields = {"s": "sending", "f": item.fence, "a": item.attempts, "ua": 1}
        await store.redis.hset(keys.msg(shard, item.id), mapping=fields)
    assert await settle(store, sent(first, "wamid.OLD")) == [1]
    assert await store.redis.zscore(lease, one) is None
    # the others lapsed long ago: the next take hands them out again, with new fences
    again = {item.id: item for item in (await take(store)).items}
    assert set(again) == {two, three}
    for before in (second, third):
        now = again[before.id]
        assert (int(now.fence), now.attempts) == (int(before.fence) + 1, 2)
        assert await settle(store, sent(before, "wamid.LATE")) == [0]
        assert await settle(store, sent(now, f"wamid.{now.id}")) == [1]
    views = [await Messages(store).get(m) for m in (one, two, three)]
    assert [(v["status"], v["attempts"]) for v in views] == [("sent", 1), ("sent", 2), ("sent", 2)]
    assert await store.redis.zcount(lease, "-inf", "(inf") == 0


async def accepted(store: Store, settings: Settings, **fields: Any) -> int:
    message = {"phone_number_id": PN, "to": ANA, "type": "text", "text": {"body": "x"}} | fields
    result = await Acceptor(store, settings).send_batch({"messages": [message]})
    return int(result["accepted"])


async def lists_in_use(store: Store) -> str | None:
    value = await store.redis.hget(keys.cfg(keys.shard_of(PN, store.shards), PN), "ls")
    return None if value is None else value.decode()


async def test_a_push_counts_the_backlog_of_every_list_its_number_has_queued_to(
    store: Store, settings: Settings
) -> None:
    # push reads the lengths of the lists in cfg `ls` only: each list a message went to must be
    # in it, or the backlog limit would not count that list's messages
    await Registry(store).put(PN, {"throughput_tier": "unlimited", "status": "pending"})
    small = dataclasses.replace(settings, max_backlog=5)
    assert await accepted(store, small) == 1
    assert await lists_in_use(store) == "n"
    assert await accepted(store, small, priority="high") == 1
    assert await accepted(store, small, category="marketing") == 1
    assert await accepted(store, small, priority="low") == 1
    send_at = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
    assert await accepted(store, small, send_at=send_at, priority="high") == 1
    assert sorted(await lists_in_use(store) or "") == sorted("nhLlS")
    # five queued on four lists and the scheduled set: the sixth is refused
    assert await accepted(store, small) == 0
    assert await accepted(store, small, category="marketing", priority="high") == 0


async def test_a_number_queued_to_by_a_version_before_is_counted_on_every_list(
    store: Store, settings: Settings
) -> None:
    # versions before 0.3.0 wrote no `ls`: while anything of the number may come back to a list
    # that is empty now (here a retry), every list is counted and no `ls` is written
    await Registry(store).put(PN, {"throughput_tier": "unlimited", "status": "pending"})
    shard = keys.shard_of(PN, store.shards)
    small = dataclasses.replace(settings, max_backlog=2)
    (first,) = await queue(store, settings, ANA)
    await store.redis.hdel(keys.cfg(shard, PN), "ls")
    await store.redis.lrem(keys.lane(shard, PN, "n"), 0, first)
    await store.redis.zadd(keys.retry(shard, PN), {first: 1})
    await store.redis.rpush(keys.lane(shard, PN, "hm"), "old-1", "old-2")
    assert await accepted(store, small) == 0  # "hm" holds two, the retry is not queued
    await store.redis.delete(keys.lane(shard, PN, "hm"))
    assert await accepted(store, small) == 1
    assert await lists_in_use(store) is None
    # once nothing is out of its lists, what is in them is what it uses
    await store.redis.delete(keys.retry(shard, PN))
    assert await accepted(store, small, priority="low") == 1
    assert sorted(await lists_in_use(store) or "") == sorted("nl")
    assert await accepted(store, small, priority="low") == 0


async def test_a_list_queued_to_by_a_version_before_is_added_when_a_take_meets_it(
    store: Store, settings: Settings
) -> None:
    # going back to a version before 0.3.0 and forward again leaves `ls` without the lists the
    # older one queued to: the first take from such a list adds it, so push counts it again
    await Registry(store).put(PN, {"throughput_tier": "unlimited"})
    shard = keys.shard_of(PN, store.shards)
    (normal,) = await queue(store, settings, ANA)
    assert await lists_in_use(store) == "n"
    (urgent,) = await queue(store, settings, BEA, priority="high")
    await store.redis.hset(keys.cfg(shard, PN), "ls", "n")  # as if an older push queued it
    assert [item.id for item in (await take(store)).items] == [urgent, normal]
    assert sorted(await lists_in_use(store) or "") == sorted("nh")
