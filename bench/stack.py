"""The pieces a drain benchmark runs: Redis, the sandbox upstream and gateway processes.

Every process is the real one (`redis-server`, `gateway sandbox`, `gateway worker|run`), started
on free loopback ports and stopped at the end, optionally pinned to a CPU so the measured
process and the reference do not fight over one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from gateway.accept.service import Acceptor
from gateway.embedded_redis import find_server
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.connection import LISTPACK_VALUE
from tests.acceptance.commands import run_as_upstream

SHARDS = 64
# What the embedded Redis runs with, and what README recommends for an external one.
RECOMMENDED_REDIS_ARGS = ["--hash-max-listpack-value", str(LISTPACK_VALUE)]
# Every run writes here; git ignores it, so benchmarking leaves the work tree clean.
RESULTS = Path(__file__).resolve().parent / "results"
# Figures meant to be committed: written only by `python -m bench --record ...`.
RECORDED = Path(__file__).resolve().parent / "recorded"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_bin() -> str:
    return str(Path(sys.executable).parent / "gateway")


# The CPUs this benchmark may use, read before it pins itself anywhere.
ALL_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def pin(pid: int, cpus: set[int] | None) -> None:
    """Keep a process on these CPUs (when the machine has them)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        chosen = cpus & ALL_CPUS
        if chosen:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, chosen)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (from /proc)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    for each in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def wait_http(url: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {within_s}s")


class Process:
    """A child process in its own session, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)  # noqa: SIM115
        self.popen = subprocess.Popen(
            args,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS_"))}
    env.update(settings)
    return env


@contextlib.contextmanager
def redis_server(
    cpus: set[int] | None = None, binary: str | None = None, extra: tuple[str, ...] = ()
) -> Iterator[str]:
    """A private server (no persistence unless `extra` asks: later options win)."""
    port = free_port()
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    process = Process(
        [
            binary or find_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
            *RECOMMENDED_REDIS_ARGS,
            *extra,
        ]
    )
    pin(process.pid, cpus)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.stop()


@contextlib.contextmanager
def sandbox(cpus: set[int] | None = None) -> Iterator[str]:
    """A `gateway sandbox` without rate enforcement (it records arrivals); yields its root.

    Meta's pair rule is off in it too: the gateway's own pacing is what a benchmark measures.
    """
    port = free_port()
    env = clean_env(GATEWAY_PORT=str(port), GATEWAY_LOG_LEVEL="WARNING", GATEWAY_PAIR_INTERVAL="0")
    process = Process([gateway_bin(), "sandbox"], env)
    pin(process.pid, cpus)
    # It plays Meta's servers, which do not share a CPU with the gateway: kept off the CPU for
    # 10-25 ms by the worker processes here, it stamps the requests that queued meanwhile as one
    # bunch and measures its own scheduling (seen in `accuracy`, 4 workers on 2 cores: arrivals
    # up to 25 ms after the write). So it runs as the tests run it.
    run_as_upstream(process.pid)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{root}/_sandbox/stats")
        yield root
    finally:
        process.stop()


@contextlib.contextmanager
def gateway(
    command: str, redis_url: str, upstream_root: str, cpus: set[int] | None = None, **settings: str
) -> Iterator[Process]:
    port = free_port()
    defaults = {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_UPSTREAM_URL": f"{upstream_root}/v21.0",
        "GATEWAY_UPSTREAM_TOKEN": "bench",
        "GATEWAY_PORT": str(port),
        "GATEWAY_SHARDS": str(SHARDS),
        "GATEWAY_API_KEYS": "bench-send",
        "GATEWAY_ADMIN_KEYS": "bench-admin",
        "GATEWAY_LOG_LEVEL": "WARNING",
        "GATEWAY_MAX_BACKLOG": "10000000",
    }
    env = clean_env(**(defaults | settings))
    process = Process([gateway_bin(), command], env)
    pin(process.pid, cpus)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        process.port = port  # type: ignore[attr-defined]
        yield process
    finally:
        process.stop()


def store_for(redis_url: str) -> Store:
    settings = Settings(redis_url=redis_url, shards=SHARDS, max_backlog=10_000_000)
    return Store.from_settings(settings, redis_url)


async def register(store: Store, numbers: dict[str, dict[str, Any]]) -> None:
    registry = Registry(store)
    items = list(numbers.items())
    for start in range(0, len(items), 100):  # within the client's connection pool
        await asyncio.gather(*(registry.put(pn, f) for pn, f in items[start : start + 100]))


async def queue(
    store: Store, per_number: dict[str, int], body: str = "bench", recipients: int = 0
) -> int:
    """Queue messages through the gateway's own accept code; bodies are `<pn>-<n>`.

    Each message goes to a recipient of its own, or to one of `recipients` in turn.
    """
    return len(await queue_ids(store, per_number, body, recipients))


async def queue_ids(
    store: Store, per_number: dict[str, int], body: str = "bench", recipients: int = 0
) -> list[str]:
    """As `queue`; the ids of the messages accepted."""
    acceptor = Acceptor(store, store.settings)
    batch: list[dict[str, Any]] = []
    accepted: list[str] = []

    async def flush() -> None:
        results = (await acceptor.send_batch({"messages": batch}))["results"]
        accepted.extend(r["id"] for r in results if "id" in r)
        batch.clear()

    # every message to a recipient of its own, as a campaign sends: Meta's pair rate (one
    # message every 6 s to one user, after a burst of 45) is then never what sets the pace
    recipient = 0
    for pn, count in per_number.items():
        for i in range(count):
            recipient += 1
            batch.append(
                {
                    "phone_number_id": pn,
                    "to": f"549{recipient % recipients if recipients else recipient:010d}",
                    "type": "text",
                    "text": {"body": f"{pn}-{i}-{body}"},
                }
            )
            if len(batch) == 1000:
                await flush()
    if batch:
        await flush()
    return accepted


async def sandbox_get(root: str, path: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"{root}/_sandbox/{path}") as response:
        return await response.json()


async def sandbox_put(root: str, path: str, body: Any) -> None:
    async with aiohttp.ClientSession() as http, http.put(f"{root}/_sandbox/{path}", json=body):
        pass


async def sandbox_clear(root: str) -> None:
    """Forget every recorded request (and rate window) of the sandbox."""
    async with aiohttp.ClientSession() as http, http.delete(f"{root}/_sandbox/records"):
        pass


async def wait_sent(root: str, expected: int, within_s: float) -> float:
    """Wait until the sandbox has `expected` ok arrivals; the time it took."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        counts = (await sandbox_get(root, "arrivals"))["numbers"]
        if sum(counts.values()) >= expected:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise RuntimeError(f"only part of {expected} messages arrived within {within_s}s")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "redis_server": find_server(), "python": sys.version.split()[0]}
