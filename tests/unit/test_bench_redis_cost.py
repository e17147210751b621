"""`bench redis-cost` turns what a real Redis reports (commandstats, the slow log) into figures:
the command deltas, each script's time and the commands it called, the node's ceiling."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from bench.redis_cost import (
    ceiling_per_s,
    command_delta,
    merged,
    per_message,
    script_shas,
    script_split,
    slowlog_split,
)
from gateway.store.scripts import NAMES, source
from tests.servers import RedisServer

PROBE = "redis.call('set', KEYS[1], ARGV[1]); return redis.call('get', KEYS[1])"


@pytest.fixture
def client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    # a server of this test alone: the slow log is set to log every command
    client = redis.Redis.from_url(private_redis.url)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    yield client
    client.close()


def test_command_delta_keeps_what_ran_between_two_snapshots(client: redis.Redis) -> None:
    client.set("a", "1")
    before = client.info("commandstats")
    client.set("a", "2")
    client.set("b", "3")
    client.lpush("l", "x")
    after = client.info("commandstats")

    delta = command_delta(before, after)

    assert delta["set"]["calls"] == 2
    assert delta["lpush"]["calls"] == 1
    assert "get" not in delta
    assert all(d["usec"] >= 0 for d in delta.values())


def test_slowlog_split_names_scripts_and_counts_the_commands_each_called(
    client: redis.Redis,
) -> None:
    sha = client.script_load(PROBE)
    client.evalsha(sha, 1, "k", "v1")
    client.evalsha(sha, 1, "k", "v2")
    client.get("k")  # top level: not the script's
    unknown = client.script_load("return redis.call('incr', KEYS[1])")
    client.evalsha(unknown, 1, "n")

    split = slowlog_split(client.slowlog_get(-1), {sha: "probe"})

    assert split["script:probe"]["calls"] == 2
    assert split["script:probe"]["inner"] == {"set": 2, "get": 2}
    assert split["script:probe"]["inner_calls"] == 4
    assert split["get"]["calls"] == 1
    assert split["get"]["inner_calls"] == 0
    assert split[f"script:{unknown}"]["inner"] == {"incr": 1}


def test_script_shas_are_those_the_server_gives_the_gateways_scripts(
    client: redis.Redis,
) -> None:
    shas = script_shas()
    loaded = {client.script_load(source(name)): name for name in NAMES}
    assert shas == loaded


def test_script_split_gives_shares_and_commands_per_message() -> None:
    split = {
        "script:take": {"calls": 10, "usec": 3000, "inner_calls": 400, "inner": {"lindex": 400}},
        "script:settle": {"calls": 20, "usec": 1000, "inner_calls": 200, "inner": {"hdel": 200}},
        "blpop": {"calls": 5, "usec": 50, "inner_calls": 0, "inner": {}},
    }

    rows = script_split(split, messages=100)

    assert [r["script"] for r in rows] == ["take", "settle"]
    assert [r["share"] for r in rows] == [0.75, 0.25]
    assert rows[0]["us_per_message"] == 30.0
    assert rows[0]["us_per_call"] == 300.0
    assert rows[0]["commands_per_message"] == 4.0
    assert rows[1]["top_commands_per_message"] == {"hdel": 2.0}


def test_per_message_ranks_by_time_and_merged_sums_phases() -> None:
    accept = {"evalsha": {"calls": 2, "usec": 400}, "hset": {"calls": 100, "usec": 100}}
    drain = {"evalsha": {"calls": 8, "usec": 1600}, "blpop": {"calls": 1, "usec": 10}}

    total = merged(accept, drain)
    top = per_message(total, messages=100, top=2)

    assert total["evalsha"] == {"calls": 10, "usec": 2000}
    assert [t["command"] for t in top] == ["evalsha", "hset"]
    assert top[0]["us_per_message"] == 20.0
    assert top[0]["us_per_call"] == 200.0


def test_ceiling_is_what_one_core_carries() -> None:
    assert ceiling_per_s(12.0) == 83_333
    assert ceiling_per_s(100.0) == 10_000
    assert ceiling_per_s(0.0) == 0
