"""`python -m bench accept`: single sends against a bare endpoint, and batch throughput.

In one run: wrk (or locust when wrk is missing) drives (a) `bench.bare_server`, an aiohttp +
orjson endpoint that only parses the JSON, and (b) `gateway api` with one process, with the same
connections, duration and CPU pinning (server on CPU 0; load generator and Redis on CPU 1).
The figure is the gateway's req/s as a fraction of the bare endpoint's (target ≥ 0.75). Then
wrk posts 1,000-message batches over many numbers: messages/s (target ≥ 100,000), counted
from what Redis holds afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import redis

from bench import stack

TARGET_RATIO = 0.75
TARGET_BATCH = 100_000
HERE = Path(__file__).resolve().parent
SERVER_CPU, LOAD_CPU = {0}, {1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--numbers", type=int, default=1000)
    parser.add_argument("--batch-seconds", type=int, default=8)
    parser.add_argument("--batch-connections", type=int, default=8)


def _run_pinned(command: list[str], env: dict[str, str]) -> str:
    """Run the load generator on the load CPU; its output."""
    return subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: stack.pin(0, LOAD_CPU),
    ).stdout


def _wrk(url: str, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "BENCH_NUMBERS": str(args.numbers), "BENCH_KEY": "bench-send"}
    command = [
        "wrk",
        "-t2",
        f"-c{args.connections}",
        f"-d{args.seconds}s",
        "--latency",
        "-s",
        str(HERE / "wrk_send.lua"),
        url,
    ]
    _run_pinned([*command[:3], "-d2s", *command[4:]], env)  # warm-up
    out = _run_pinned(command, env)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    latency = {}
    for pct in ("50", "99"):
        found = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if found:
            value = float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
            latency[f"p{pct}_ms"] = round(value, 3)
    return {"rate": rate, "non_2xx": int(non_2xx.group(1)) if non_2xx else 0, **latency}


def _locust(url: str, args: argparse.Namespace) -> dict[str, float]:
    env = {
        **os.environ,
        "GATEWAY_API_KEY": "bench-send",
        "BENCH_NUMBERS": str(args.numbers),
        "BENCH_BATCH_WEIGHT": "0",
    }
    csv = Path(stack.RESULTS / "locust-accept")
    csv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(HERE / "locustfile.py"),
            "--headless",
            "-u",
            str(args.connections),
            "-r",
            str(args.connections),
            "-t",
            f"{args.seconds}s",
            "--host",
            url,
            "--csv",
            str(csv),
            "--only-summary",
        ],
        env=env,
        capture_output=True,
        check=True,
        preexec_fn=lambda: stack.pin(0, LOAD_CPU),
    )
    rows = (csv.parent / f"{csv.name}_stats.csv").read_text().splitlines()
    total = next(r for r in rows if ",Aggregated," in r).split(",")
    for suffix in ("_stats.csv", "_stats_history.csv", "_failures.csv", "_exceptions.csv"):
        (csv.parent / f"{csv.name}{suffix}").unlink(missing_ok=True)
    return {"rate": float(total[9]), "non_2xx": int(total[3])}


def _load(url: str, args: argparse.Namespace) -> dict[str, float]:
    return _wrk(url, args) if shutil.which("wrk") else _locust(url, args)


def _batches(base: str, redis_url: str, args: argparse.Namespace) -> dict[str, float | int]:
    """wrk posting one prepared 1,000-message batch over and over; messages/s from Redis."""
    numbers = [f"5557{i:08d}" for i in range(args.numbers)]
    # The same Zipf-like skew as the single sends: a few busy numbers, a long tail.
    rng = random.Random(7)
    chosen = rng.choices(numbers, weights=[1 / (i + 1) for i in range(len(numbers))], k=1000)
    messages = [
        {
            "phone_number_id": pn,
            "to": "5491140123456",
            "type": "text",
            "text": {"body": f"batch message {i}"},
        }
        for i, pn in enumerate(chosen)
    ]
    body_file = Path(tempfile.mkstemp(prefix="bench-batch-", suffix=".json")[1])
    body_file.write_bytes(orjson.dumps({"messages": messages}))
    client = redis.Redis.from_url(redis_url)
    before = int(client.dbsize())
    env = {**os.environ, "BENCH_BATCH_FILE": str(body_file), "BENCH_KEY": "bench-send"}
    try:
        command = [
            "wrk",
            "-t1",
            f"-c{args.batch_connections}",
            f"-d{args.batch_seconds}s",
            "-s",
            str(HERE / "wrk_batch.lua"),
            base,
        ]
        out = _run_pinned(command, env)
    finally:
        body_file.unlink()
    queued = int(client.dbsize()) - before  # one key per message (and a few lane lists)
    client.close()
    seconds = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {
        "messages_per_s": queued / seconds,
        "requests": requests,
        "queued": queued,
        "numbers_per_batch": len(set(chosen)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    numbers = {f"5557{i:08d}": {"throughput_tier": "standard"} for i in range(args.numbers)}
    port = stack.free_port()
    bare = stack.Process([sys.executable, "-m", "bench.bare_server", str(port)])
    stack.pin(bare.pid, SERVER_CPU)
    try:
        stack.wait_http(f"http://127.0.0.1:{port}/healthz")
        bare_result = _load(f"http://127.0.0.1:{port}", args)
    finally:
        bare.stop()
    with stack.redis_server(LOAD_CPU) as redis_url:

        async def prepare() -> None:
            store = stack.store_for(redis_url)
            await stack.register(store, numbers)
            await store.close()

        asyncio.run(prepare())
        with stack.gateway(
            "api", redis_url, "http://127.0.0.1:9", SERVER_CPU, GATEWAY_WORKERS="1"
        ) as gateway:
            base = f"http://127.0.0.1:{gateway.port}"  # type: ignore[attr-defined]
            single = _load(base, args)
            batch = (
                # the batch part needs wrk; without it the figure reads 0 and the target unmet
                _batches(base, redis_url, args) if shutil.which("wrk") else {"messages_per_s": 0.0}
            )
    ratio = single["rate"] / bare_result["rate"]
    return {
        "load_generator": "wrk" if shutil.which("wrk") else "locust",
        "bare_req_per_s": round(bare_result["rate"]),
        "gateway_req_per_s": round(single["rate"]),
        "single_ratio": round(ratio, 3),
        "gateway_non_2xx": single["non_2xx"],
        "bare_latency": {k: v for k, v in bare_result.items() if k.startswith("p")},
        "gateway_latency": {k: v for k, v in single.items() if k.startswith("p")},
        "batch_messages_per_s": round(batch["messages_per_s"]),
        "batch_numbers_per_batch": batch.get("numbers_per_batch"),
        "targets": {"single_ratio": TARGET_RATIO, "batch_messages_per_s": TARGET_BATCH},
        "met": ratio >= TARGET_RATIO and batch["messages_per_s"] >= TARGET_BATCH,
    }
