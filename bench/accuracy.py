"""`python -m bench accuracy`: does every number get exactly its rate, with 1 and 4 workers?

For numbers of every tier (and a coexistence number, capped at 20/s) with several seconds of
backlog, drained by `gateway worker` with 1 and then 4 processes into the sandbox, it reports per
number the most arrivals in any sliding second (target: never above the rate), how many such
windows went over (target 0) and the sustained rate as a fraction of the rate (target ≥ 0.99),
and draws sends per 100 ms against each number's rate line (accuracy-*.png beside the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench import stack
from gateway.registry import Registry

NUMBERS: dict[str, tuple[dict[str, Any], int]] = {
    "555300000020": ({"throughput_tier": "standard", "connection_type": "coexistence"}, 20),
    "555300000080": ({"throughput_tier": "standard"}, 80),
    "555300000200": ({"throughput_tier": "medium"}, 200),
    "555300001000": ({"throughput_tier": "high"}, 1000),
}
TARGET_SUSTAINED = 0.99


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=6.0, help="backlog per number")
    parser.add_argument("--workers", default="1,4", help="worker process counts to run")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--slack", default="15ms", help="GATEWAY_RATE_SLACK of the workers (default: its default)"
    )


def windows_over(times: list[float], rate: int) -> tuple[int, int]:
    """(most arrivals in any sliding second, how many sliding seconds held more than `rate`)."""
    best = over = 0
    end = 0
    for start, t in enumerate(times):
        while end < len(times) and times[end] - t < 1.0:
            end += 1
        count = end - start
        best = max(best, count)
        over += count > rate
    return best, over


def sustained(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


async def _drain_once(
    redis_url: str, root: str, workers: int, seconds: float, slack: str
) -> dict[str, Any]:
    store = stack.store_for(redis_url)
    await store.redis.flushdb()
    await stack.sandbox_put(root, "faults", {})
    await stack.sandbox_clear(root)
    await stack.register(
        store, {pn: {**fields, "status": "pending"} for pn, (fields, _) in NUMBERS.items()}
    )
    total = await stack.queue(store, {pn: int(rate * seconds) for pn, (_, rate) in NUMBERS.items()})
    with stack.gateway(
        "worker", redis_url, root, None, GATEWAY_WORKERS=str(workers), GATEWAY_RATE_SLACK=slack
    ):
        await asyncio.sleep(2.5)  # the processes share out the shards first
        registry = Registry(store)
        for pn in NUMBERS:
            await registry.patch(pn, {"status": "active"})
        await stack.wait_sent(root, total, seconds * 3 + 30)
    arrivals = {
        pn: sorted((await stack.sandbox_get(root, f"arrivals?phone_number_id={pn}"))["times"])
        for pn in NUMBERS
    }
    await store.close()
    return arrivals


def _plot(arrivals: dict[str, list[float]], workers: int, slack: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(NUMBERS), 1, figsize=(10, 2.2 * len(NUMBERS)), sharex=True)
    start = min(times[0] for times in arrivals.values() if times)
    for axis, (pn, (_, rate)) in zip(axes, NUMBERS.items(), strict=True):
        times = arrivals[pn]
        bins: dict[int, int] = {}
        for t in times:
            slot = int((t - start) * 10)
            bins[slot] = bins.get(slot, 0) + 1
        xs = [slot / 10 for slot in range(max(bins) + 1)] if bins else []
        axis.step(
            xs,
            [bins.get(slot, 0) for slot in range(len(xs))],
            where="post",
            label="sends per 100 ms",
        )
        axis.axhline(rate / 10, color="red", linestyle="--", label=f"rate {rate}/s ÷ 10")
        axis.set_ylabel(f"…{pn[-4:]}")
        axis.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("seconds")
    figure.suptitle(
        f"Sends per 100 ms against each number's rate — {workers} worker process(es), slack {slack}"
    )
    figure.tight_layout()
    path = stack.RESULTS / f"accuracy-{workers}-workers-{slack}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return str(path.relative_to(stack.RESULTS.parent.parent))


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    with stack.redis_server() as redis_url, stack.sandbox() as root:
        for workers in [int(w) for w in args.workers.split(",")]:
            started = time.monotonic()
            arrivals = asyncio.run(_drain_once(redis_url, root, workers, args.seconds, args.slack))
            per_number = {}
            for pn, (_, rate) in NUMBERS.items():
                times = arrivals[pn]
                best, over = windows_over(times, rate)
                per_number[pn] = {
                    "rate": rate,
                    "sent": len(times),
                    "max_in_any_second": best,
                    "windows_over": over,
                    "sustained_fraction": round(sustained(times) / rate, 4),
                }
            runs[f"{workers}_workers"] = {
                "numbers": per_number,
                "windows_over": sum(n["windows_over"] for n in per_number.values()),
                "min_sustained_fraction": min(n["sustained_fraction"] for n in per_number.values()),
                "plot": None if args.no_plot else _plot(arrivals, workers, args.slack),
                "seconds": round(time.monotonic() - started, 1),
            }
    met = all(
        r["windows_over"] == 0 and r["min_sustained_fraction"] >= TARGET_SUSTAINED
        for r in runs.values()
    )
    return {
        "slack": args.slack,
        "runs": runs,
        "targets": {"windows_over": 0, "sustained": TARGET_SUSTAINED},
        "met": met,
    }
