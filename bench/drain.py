"""`python -m bench drain`: one worker process draining backlogs of the shapes users have.

In one run, on the same machine and cores:
1. `bench.raw_client` posts to the sandbox as fast as aiohttp can (the reference for the drain's
   own speed);
2. one `gateway worker` process drains the same count of messages queued on one `unlimited`
   number (target ≥ 0.8 of the raw client);
3. then the same count spread over many rate-limited numbers: 1,000 and 10,000 numbers, all
   `high` and mixed like a real fleet (10% high, 30% medium, 60% standard). Each is reported as
   a ratio to the unlimited runs just before and after it (target ≥ 0.8: the drain's speed must
   not depend on how many numbers share it), with the grants put back (target under 1% of
   sends) and whether any number went over its rate in any sliding second (target: none).

The unlimited run is repeated between shapes because this machine's speed drifts by up to 2x
within a minute (a shared VM): a ratio to a run made a minute earlier would measure the drift.
Rates are measured by the sandbox's own arrival times; put-backs from the worker's metrics.
Each run also reports its steady rate (from its 40th to its 95th percent of arrivals, after a
fresh worker's schedule has learned its rate) and the ratio of those: the whole-run ratio
counts the worker's start, which is quicker with unlimited sends only.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench import stack

TARGET_RAW = 0.8
TARGET_SHAPE = 0.8
TARGET_RETURNED = 0.01
RATES = {"standard": 80, "medium": 200, "high": 1000}
SHAPES = ("high-1000", "mixed-1000", "high-10000", "mixed-10000")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help="rate-limited shapes to run after unlimited"
    )


def numbers_of(shape: str) -> dict[str, str]:
    """phone_number_id -> tier for a shape such as `high-1000` or `mixed-10000`."""
    kind, count = shape.split("-")
    pns = [f"5558{i:08d}" for i in range(int(count))]
    if kind == "high":
        return dict.fromkeys(pns, "high")
    if kind == "unlimited":
        return dict.fromkeys(pns, "unlimited")
    tiers = {}
    for i, pn in enumerate(pns):
        tiers[pn] = "high" if i % 10 == 0 else "medium" if i % 10 < 4 else "standard"
    return tiers


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def _rate(times: list[float]) -> float:
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def _steady_rate(times: list[float]) -> float:
    """The rate between the arrivals of the run's 40th and 95th percent of messages: after a
    fresh worker's send schedule has learned its rate (it starts at 2,000 msg/s and grows by a
    tenth every 100 ms while rate-limited sends are scheduled, doubling with unlimited ones
    only), before the last stragglers."""
    times = sorted(times)
    first, last = int(len(times) * 0.4), int(len(times) * 0.95) - 1
    if last <= first:
        return _rate(times)
    return (last - first) / (times[last] - times[first])


def _scrape(port: int) -> dict[str, float]:
    """The worker's put-back and sent counters (summed over labels, and put-backs by stage)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals = {"gateway_grants_returned_total": 0.0, "gateway_messages_sent_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            value = float(line.rsplit(" ", 1)[1])
            totals[name] += value
            if name == "gateway_grants_returned_total":
                stage = line.split('stage="', 1)[1].split('"', 1)[0]
                totals[f"returned_{stage}"] = totals.get(f"returned_{stage}", 0.0) + value
        elif name == "gateway_drain_start_rate":
            totals["start_rate"] = float(line.rsplit(" ", 1)[1])
    return totals


async def _arrivals(root: str) -> dict[str, list[float]]:
    records = (await stack.sandbox_get(root, "requests?limit=10000000"))["requests"]
    by_number: dict[str, list[float]] = {}
    for record in records:
        if record["outcome"] == "ok":
            by_number.setdefault(record["phone_number_id"], []).append(record["time"])
    return by_number


async def _drain(
    redis_url: str, root: str, shape: str, messages: int, concurrency: int, cpus: set[int]
) -> dict[str, Any]:
    tiers = numbers_of(shape)
    store = stack.store_for(redis_url)
    await store.redis.flushdb()
    await stack.sandbox_clear(root)
    await stack.register(store, {pn: {"throughput_tier": t} for pn, t in tiers.items()})
    per_number = max(1, messages // len(tiers))
    total = await stack.queue(store, dict.fromkeys(tiers, per_number))
    await store.close()
    started = time.monotonic()
    with stack.gateway(
        "worker",
        redis_url,
        root,
        cpus,
        GATEWAY_WORKERS="1",
        GATEWAY_WORKER_CONCURRENCY=str(concurrency),
    ) as worker:
        cpu_before, wall_before = stack.cpu_seconds(worker.pid), time.monotonic()
        await stack.wait_sent(root, total, 600)
        cpu = stack.cpu_seconds(worker.pid) - cpu_before
        wall = time.monotonic() - wall_before
        await asyncio.sleep(1.5)  # the worker flushes its metrics every second
        counters = _scrape(worker.port)  # type: ignore[attr-defined]
    arrivals = await _arrivals(root)
    over = [
        pn
        for pn, times in arrivals.items()
        if tiers[pn] in RATES and max_in_window(sorted(times)) > RATES[tiers[pn]]
    ]
    returned = counters["gateway_grants_returned_total"]
    sent = counters["gateway_messages_sent_total"]
    return {
        "shape": shape,
        "numbers": len(tiers),
        "messages": total,
        "drain_per_s": round(_rate([t for times in arrivals.values() for t in times])),
        "steady_per_s": round(_steady_rate([t for times in arrivals.values() for t in times])),
        # the worker's CPU (what it costs per message, and the share of its core it used:
        # under 1 means something other than its CPU set the pace)
        "worker_cpu_us_per_message": round(cpu / max(total, 1) * 1e6, 1),
        "worker_cpu_share": round(cpu / max(wall, 1e-9), 2),
        "grants_returned": int(returned),
        "returned_by_stage": {
            k.removeprefix("returned_"): int(v)
            for k, v in counters.items()
            if k.startswith("returned_")
        },
        "learned_start_rate": round(counters.get("start_rate", 0.0)),
        "returned_share": round(returned / max(sent + returned, 1), 4),
        "numbers_over_rate": len(over),
        "seconds": round(time.monotonic() - started, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    worker_cpu, other_cpu = {0}, {1}
    shapes = [s for s in args.shapes.split(",") if s]
    # This process polls the sandbox and parses its answers (a tenth of a core): on the
    # worker's CPU it kept the worker off it for milliseconds at a time, making sends late.
    stack.pin(0, other_cpu)
    with stack.redis_server(other_cpu) as redis_url, stack.sandbox(other_cpu) as root:
        raw = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.raw_client",
                f"{root}/v21.0",
                str(args.messages),
                str(args.concurrency),
            ],
            capture_output=True,
            check=True,
            preexec_fn=lambda: stack.pin(0, worker_cpu),
        )
        raw_rate = asyncio.run(_arrivals_rate(root))

        def drain(shape: str) -> dict[str, Any]:
            return asyncio.run(
                _drain(redis_url, root, shape, args.messages, args.concurrency, worker_cpu)
            )

        references = [drain("unlimited-1")]
        runs = []
        for shape in shapes:
            result = drain(shape)
            references.append(drain("unlimited-1"))
            reference = (references[-2]["drain_per_s"] + references[-1]["drain_per_s"]) / 2
            result["unlimited_per_s"] = round(reference)
            result["ratio_to_unlimited"] = round(result["drain_per_s"] / max(reference, 1), 3)
            steady = (references[-2]["steady_per_s"] + references[-1]["steady_per_s"]) / 2
            result["steady_ratio_to_unlimited"] = round(result["steady_per_s"] / max(steady, 1), 3)
            runs.append(result)
    unlimited = references[0]["drain_per_s"]
    ratio = unlimited / raw_rate if raw_rate else 0.0
    met = ratio >= TARGET_RAW and all(
        r["ratio_to_unlimited"] >= TARGET_SHAPE
        and r["returned_share"] < TARGET_RETURNED
        and r["numbers_over_rate"] == 0
        for r in runs
    )
    return {
        "raw_client_per_s": round(raw_rate),
        "raw_client_reported": raw.stdout.decode().strip(),
        "unlimited_ratio_to_raw": round(ratio, 3),
        "unlimited_runs_per_s": [r["drain_per_s"] for r in references],
        "unlimited_runs_steady_per_s": [r["steady_per_s"] for r in references],
        "unlimited_runs_worker_cpu": [
            (r["worker_cpu_us_per_message"], r["worker_cpu_share"]) for r in references
        ],
        "runs": runs,
        "targets": {
            "unlimited_ratio_to_raw": TARGET_RAW,
            "ratio_to_unlimited": TARGET_SHAPE,
            "returned_share": TARGET_RETURNED,
            "numbers_over_rate": 0,
        },
        "met": met,
        "concurrency": args.concurrency,
    }


async def _arrivals_rate(root: str) -> float:
    return _rate([t for times in (await _arrivals(root)).values() for t in times])
