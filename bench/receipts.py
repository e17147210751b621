"""`python -m bench receipts`: delivery receipts in, status callbacks out, and what they cost.

In one run, on the same machine and cores (the measured gateway process on CPU 0, Redis, the
sandbox, the receiver and the load on CPU 1):
1. one `gateway worker` drains N messages on one `unlimited` number with no callbacks, and N
   whose messages have a callback URL, in the order off, on, on, off: the mean drain rate with
   callbacks on ÷ off (target ≥ 0.9);
2. one `gateway api` process takes Meta's status webhooks for those N sent messages (`delivered`,
   100 statuses per signed request, as Meta batches them): statuses applied per second ÷ the
   drain rate of one process from step 1 (target ≥ 3, Meta's sizing guidance for status
   traffic: several statuses per message);
3. N `canceled` events wait in the outbox; one `gateway worker` delivers them to a bare
   receiver (`bench.receiver`): callbacks per second ÷ what `bench.raw_client` posts to the
   same receiver, same concurrency (target ≥ 0.7); the raw client runs before and after, and
   the mean of the two is the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson

from bench import stack
from gateway.messages import Messages
from gateway.settings import Settings
from gateway.store import Store

TARGET_DRAIN_WITH_CALLBACKS = 0.9
TARGET_INTAKE = 3.0
TARGET_CALLBACKS = 0.7
APP_SECRET = "bench-app-secret"
CALLBACK_SECRET = "whsec_" + base64.b64encode(b"bench-callback-secret-32-bytes!!").decode()
STATUSES_PER_REQUEST = 100
INTAKE_CONCURRENCY = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)


@contextlib.contextmanager
def receiver(cpus: set[int]) -> Iterator[str]:
    port = stack.free_port()
    process = stack.Process([sys.executable, "-m", "bench.receiver", str(port)])
    stack.pin(process.pid, cpus)
    try:
        stack.wait_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def _store(redis_url: str, callback_url: str | None) -> Store:
    settings = Settings(
        redis_url=redis_url,
        shards=stack.SHARDS,
        max_backlog=10_000_000,
        callback_url=callback_url,
        callback_allow=(callback_url,) if callback_url else (),
    )
    return Store.from_settings(settings, redis_url)


async def _received(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/count") as response:
        return dict(await response.json())


async def _reset(url: str) -> None:
    async with aiohttp.ClientSession() as http, http.delete(f"{url}/count"):
        pass


async def _wait_received(url: str, expected: int, within_s: float) -> dict[str, float]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        counts = await _received(url)
        if counts["received"] >= expected:
            return counts
        await asyncio.sleep(0.2)
    raise RuntimeError(f"only {counts['received']} of {expected} callbacks arrived")


def _callback_env(url: str) -> dict[str, str]:
    return {"GATEWAY_CALLBACK_ALLOW": url, "GATEWAY_CALLBACK_SECRET": CALLBACK_SECRET}


async def _drain(
    redis_url: str, root: str, rx: str | None, count: int, concurrency: int, cpus: set[int]
) -> float:
    """Drain `count` messages on one unlimited number; msg/s as the sandbox saw them arrive."""
    pn = "555900000001"
    store = _store(redis_url, rx)
    await store.redis.flushdb()
    await stack.sandbox_clear(root)
    await stack.register(store, {pn: {"throughput_tier": "unlimited"}})
    total = await stack.queue(store, {pn: count})
    await store.close()
    env = {"GATEWAY_WORKERS": "1", "GATEWAY_WORKER_CONCURRENCY": str(concurrency)}
    if rx:
        await _reset(rx)
        env |= _callback_env(rx)
    with stack.gateway("worker", redis_url, root, cpus, **env):
        seconds = await stack.wait_sent(root, total, 600)
        if rx:
            await _wait_received(rx, total, 600)
    records = (await stack.sandbox_get(root, "requests?limit=10000000"))["requests"]
    times = sorted(r["time"] for r in records if r["outcome"] == "ok")
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else total / seconds


async def _wamids(store: Store) -> dict[str, list[str]]:
    """The wamids of sent messages in Redis, by phone number (all on one number here)."""
    found: list[str] = []
    async for key in store.redis.scan_iter(match="{gw:s*}:w:*", count=1000):
        found.append(key.decode().split(":w:", 1)[1])
    return {"555900000001": found}


def _envelope(pn: str, wamids: list[str]) -> bytes:
    now = str(int(time.time()))
    statuses = [
        {
            "id": wamid,
            "status": "delivered",
            "timestamp": now,
            "recipient_id": "5491140123456",
            "conversation": {"id": "bench", "origin": {"type": "utility"}},
            "pricing": {"billable": True, "pricing_model": "CBP", "category": "utility"},
        }
        for wamid in wamids
    ]
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000001", "phone_number_id": pn},
        "statuses": statuses,
    }
    change = {"field": "messages", "value": value}
    entry = {"id": "102290129340398", "changes": [change]}
    return orjson.dumps({"object": "whatsapp_business_account", "entry": [entry]})


async def _intake(redis_url: str, root: str, cpus: set[int], other: set[int]) -> float:
    """Statuses applied per second by one `gateway api` process."""
    store = _store(redis_url, None)
    by_number = await _wamids(store)
    await store.close()
    bodies = [
        _envelope(pn, wamids[i : i + STATUSES_PER_REQUEST])
        for pn, wamids in by_number.items()
        for i in range(0, len(wamids), STATUSES_PER_REQUEST)
    ]
    statuses = sum(len(w) for w in by_number.values())
    env = {"GATEWAY_WORKERS": "1", "GATEWAY_META_APP_SECRET": APP_SECRET}
    with stack.gateway("api", redis_url, root, cpus, **env) as api:
        url = f"http://127.0.0.1:{api.port}/v1/webhooks/meta"  # type: ignore[attr-defined]
        signed = [
            (body, "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest())
            for body in bodies
        ]
        # the load runs beside Redis and the sandbox, not on the measured process's CPU; the
        # bench goes back to every CPU after it (a process it starts inherits its CPUs)
        everywhere = os.sched_getaffinity(0)
        os.sched_setaffinity(0, other)
        try:
            return statuses / await _post_all(url, signed)
        finally:
            os.sched_setaffinity(0, everywhere)


async def _post_all(url: str, signed: list[tuple[bytes, str]]) -> float:
    """Post the signed webhooks, `INTAKE_CONCURRENCY` at a time; the seconds it took."""
    queue = list(reversed(signed))
    async with aiohttp.ClientSession() as http:

        async def post_some() -> None:
            while queue:
                body, signature = queue.pop()
                headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signature}
                async with http.post(url, data=body, headers=headers) as response:
                    if response.status != 200:
                        raise RuntimeError(f"intake answered {response.status}")

        started = time.perf_counter()
        await asyncio.gather(*(post_some() for _ in range(INTAKE_CONCURRENCY)))
        return time.perf_counter() - started


async def _callbacks(
    redis_url: str, root: str, rx: str, count: int, concurrency: int, cpus: set[int]
) -> float:
    """Callbacks per second one worker delivers from a full outbox."""
    pn = "555900000002"
    store = _store(redis_url, rx)
    await store.redis.flushdb()
    await stack.register(store, {pn: {"throughput_tier": "unlimited", "status": "pending"}})
    ids = await stack.queue_ids(store, {pn: count})
    messages = Messages(store)
    for start in range(0, len(ids), 200):
        await asyncio.gather(*(messages.cancel(i) for i in ids[start : start + 200]))
    await store.close()
    await _reset(rx)
    # the same count of requests in flight as the raw client it is compared with
    env = {"GATEWAY_WORKERS": "1", "GATEWAY_CALLBACK_CONCURRENCY": str(concurrency)}
    with stack.gateway("worker", redis_url, root, cpus, **(env | _callback_env(rx))):
        counts = await _wait_received(rx, len(ids), 600)
    return counts["received"] / max(counts["seconds"], 1e-9)


def _raw(rx: str, count: int, concurrency: int, cpus: set[int]) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "bench.raw_client", rx, str(count), str(concurrency)],
        capture_output=True,
        check=True,
        preexec_fn=lambda: stack.pin(0, cpus),
    )
    return float(orjson.loads(out.stdout)["rate"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    worker_cpu, other_cpu = {0}, {1}
    n, concurrency = args.messages, args.concurrency
    with (
        stack.redis_server(other_cpu) as redis_url,
        stack.sandbox(other_cpu) as root,
        receiver(other_cpu) as rx,
    ):
        # off, on, on, off: a machine that gets busier or quieter during the run weighs on
        # both alike (one run of each gave 0.41-0.99 for the same code under load)
        drains = [
            asyncio.run(_drain(redis_url, root, url, n, concurrency, worker_cpu))
            for url in (None, rx, rx, None)
        ]
        off, on = (drains[0] + drains[3]) / 2, (drains[1] + drains[2]) / 2
        intake = asyncio.run(_intake(redis_url, root, worker_cpu, other_cpu))
        # the reference is measured before and after, so a machine that gets busier or quieter
        # during the run moves both sides of the ratio alike
        raw_before = _raw(rx, n, concurrency, worker_cpu)
        delivered = asyncio.run(_callbacks(redis_url, root, rx, n, concurrency, worker_cpu))
        raw = (raw_before + _raw(rx, n, concurrency, worker_cpu)) / 2
    figures: dict[str, Any] = {
        "drain_off_per_s": round(off),
        "drain_on_per_s": round(on),
        "drains_off_on_on_off_per_s": [round(d) for d in drains],
        "drain_with_callbacks_ratio": round(on / off, 3),
        "intake_statuses_per_s": round(intake),
        "intake_ratio_to_drain": round(intake / off, 2),
        "callbacks_per_s": round(delivered),
        "raw_client_per_s": round(raw),
        "callbacks_ratio_to_raw": round(delivered / raw, 3),
    }
    figures["targets"] = {
        "drain_with_callbacks_ratio": TARGET_DRAIN_WITH_CALLBACKS,
        "intake_ratio_to_drain": TARGET_INTAKE,
        "callbacks_ratio_to_raw": TARGET_CALLBACKS,
    }
    figures["met"] = (
        figures["drain_with_callbacks_ratio"] >= TARGET_DRAIN_WITH_CALLBACKS
        and figures["intake_ratio_to_drain"] >= TARGET_INTAKE
        and figures["callbacks_ratio_to_raw"] >= TARGET_CALLBACKS
    )
    figures["messages"] = n
    figures["concurrency"] = concurrency
    return figures
