"""Running the installed `gateway` command as a user would, in its own process group."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def gateway_bin() -> str:
    """The console script installed next to this interpreter."""
    path = Path(sys.executable).parent / "gateway"
    assert path.exists(), f"the gateway command is not installed at {path}"
    return str(path)


def run_as_upstream(pid: int) -> None:
    """Let a process that plays Meta's servers have a CPU whenever it wants one, where the
    tests may (as root, which CI is): real-time scheduling, else a raised priority.

    Meta's servers do not share a CPU with the gateway. On this 2-core machine several workers,
    Redis and pytest do, and a sandbox kept off the CPU stamps the requests that queued
    meanwhile as one bunch: it measures its own scheduling, not the gateway. On 2026-11-29, in
    `test_handover`, the workers' writes never went over 1,000 in any 1 s + 7.5 ms, but the
    sandbox at nice -10 saw arrivals up to 36 ms after their writes (p99 7 ms) and once 1,014
    in one second; at SCHED_FIFO, at most 6 ms after (p99 1.5 ms). The kernel keeps real-time
    tasks to 95% of a CPU, and the sandbox needs far less.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(10))
    except OSError:  # not allowed (not root, or no real-time budget in this cgroup)
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, pid, -10)


def clean_env(**settings: str) -> dict[str, str]:
    """The environment without any GATEWAY_* of the caller, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS_"))}
    # Meta's pair rate paces one recipient at 1 per 6 s, and order sends it one message at a
    # time: both off unless a test asks for them
    env.setdefault("GATEWAY_PAIR_INTERVAL", "0")
    env.setdefault("GATEWAY_RECIPIENT_ORDER", "false")
    env.update(settings)
    return env


class Command:
    """`gateway <args>` in a new session (so the whole tree can be signalled or killed)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        cwd.mkdir(parents=True, exist_ok=True)
        self.log_path = cwd / f"gateway-{args[0] if args else 'run'}-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Command:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [gateway_bin(), *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill_tree(self) -> None:
        """SIGKILL the supervisor and every process it started."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def wait(self, within_s: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(within_s)

    def stop(self) -> None:
        """Stop it whatever state it is in (test teardown)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def wait_http(self, url: str, within_s: float = 20.0) -> None:
        """Wait until `url` answers 200; fail with the command's output if it never does."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.output()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{url} did not answer within {within_s}s:\n{self.output()}")


def call(
    base: str, method: str, path: str, key: str = "", body: Any = None
) -> tuple[int, dict[str, Any]]:
    """One JSON request to a running gateway: its status and JSON body (errors included)."""
    request = urllib.request.Request(
        f"{base}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
