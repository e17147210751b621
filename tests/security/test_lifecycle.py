"""The gateway's process lifecycle under abuse: a Redis that dies, private data, one instance.

Every test runs the installed `gateway` command as a user would (its embedded Redis included)
and kills whatever it started, however the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.embedded_redis import find_server
from tests.acceptance.commands import Command, call, clean_env
from tests.servers import free_port

PN = "555123456789"
MESSAGE = {"phone_number_id": PN, "to": "5491140123456", "type": "text", "text": {"body": "hi"}}


def eventually(check: Callable[[], bool], within_s: float, what: str) -> None:
    """Poll `check` until it holds; fail saying `what` did not happen."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {within_s:.0f}s")


def ready(base: str) -> bool:
    try:
        return call(base, "GET", "/readyz")[0] == 200
    except OSError:
        return False


def child_servers(pid: int) -> list[int]:
    """The pids of the redis/valkey servers whose parent is `pid` (zombies included)."""
    found = []
    for child in children_of(pid):
        try:
            comm = (Path("/proc") / str(child) / "comm").read_text().strip()
        except OSError:
            continue
        if comm.endswith("-server"):
            found.append(child)
    return found


def is_zombie_or_gone(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def gone(pid: int) -> bool:
    return not (Path("/proc") / str(pid)).exists()


class Gateway:
    """`gateway <command>` in `workdir` (data dir `workdir/.gateway`) on a port of its own."""

    def __init__(
        self, workdir: Path, command: str = "run", port: int | None = None, **settings: str
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {"GATEWAY_PORT": str(self.port), "GATEWAY_WORKERS": "1", **settings}
        self.command = Command([command], clean_env(**env), workdir)

    @property
    def pid(self) -> int:
        assert self.command.process is not None
        return self.command.process.pid

    def start(self, within_s: float = 60.0) -> Gateway:
        self.command.start()
        self.command.wait_http(f"{self.base}/readyz", within_s=within_s)
        return self

    def keys(self) -> dict[str, str]:
        data: dict[str, str] = json.loads(
            (self.workdir / ".gateway" / "credentials.json").read_text()
        )
        return data

    def register(self, **number: Any) -> None:
        status, body = call(
            self.base, "PUT", f"/v1/phone-numbers/{PN}", self.keys()["admin_key"], number
        )
        assert status in (200, 201), body

    def send(self) -> str:
        status, body = call(self.base, "POST", "/v1/messages", self.keys()["send_key"], MESSAGE)
        assert status == 202, body
        return str(body["id"])

    def status_of(self, message_id: str) -> str:
        status, body = call(self.base, "GET", f"/v1/messages/{message_id}", self.keys()["send_key"])
        return str(body["status"]) if status == 200 else f"http {status}"

    def exit_code(self, within_s: float = 60.0) -> int:
        return self.command.wait(within_s)

    def kill(self) -> None:
        """SIGKILL everything this command started (the embedded Redis is in its own session)."""
        process = self.command.process
        if process is None:
            return
        servers = child_servers(process.pid)
        if process.poll() is None:
            self.command.stop()
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    """Gateways a test starts; every one is stopped (and its Redis killed) at the end."""
    started: list[Gateway] = []
    yield started
    for gateway in started:
        gateway.kill()


def live_servers(gateway: Gateway) -> list[int]:
    return [pid for pid in child_servers(gateway.pid) if not is_zombie_or_gone(pid)]


def wait_for_one_server(gateway: Gateway, other_than: int = 0) -> int:
    servers: list[int] = []

    def found() -> bool:
        servers[:] = [p for p in live_servers(gateway) if p != other_than]
        return bool(servers)

    eventually(found, 60, "no embedded Redis under the gateway")
    return servers[0]


# 1. The embedded Redis dies


def test_a_killed_embedded_redis_is_restarted_and_the_gateway_recovers(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    gateway = Gateway(tmp_path / "service")
    gateways.append(gateway)
    gateway.start()
    gateway.register(status="pending")  # its queue is held: the message stays queued
    queued = gateway.send()
    first = wait_for_one_server(gateway)

    os.kill(first, signal.SIGKILL)
    eventually(lambda: gone(first), 30, "the killed Redis was not reaped (a zombie)")
    eventually(lambda: ready(gateway.base), 60, "/readyz did not answer 200 again")
    second = wait_for_one_server(gateway)
    assert second != first
    assert gateway.status_of(queued) == "queued"  # the AOF was replayed

    gateway.register(status="active")  # the drain recovered too: the message goes out
    eventually(lambda: gateway.status_of(queued) == "sent", 60, "the queued message was not sent")
    fresh = gateway.send()
    eventually(lambda: gateway.status_of(fresh) == "sent", 60, "a new send did not go out")
    assert "restart" in gateway.command.output()
    gateway.command.signal(signal.SIGTERM)
    assert gateway.exit_code() == 0, gateway.command.output()
    assert gone(second)


def test_a_redis_that_cannot_come_back_stops_the_gateway_with_an_error(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    wrapper = tmp_path / "bin" / "redis-server"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {find_server()} "$@"\n')
    wrapper.chmod(0o755)
    gateway = Gateway(tmp_path / "service", GATEWAY_REDIS_SERVER=str(wrapper))
    gateways.append(gateway)
    gateway.start()
    server = wait_for_one_server(gateway)

    wrapper.write_text("#!/bin/sh\necho 'broken on purpose' >&2\nexit 3\n")
    os.kill(server, signal.SIGKILL)
    code = gateway.exit_code(90)
    output = gateway.command.output()
    assert code != 0, output
    assert "embedded Redis could not be restarted" in output and "giving up" in output, output
    assert gone(server)


def test_a_redis_that_keeps_dying_stops_the_gateway(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    gateway = Gateway(tmp_path / "service")
    gateways.append(gateway)
    gateway.start()
    killed: list[int] = []
    deadline = time.monotonic() + 120
    process = gateway.command.process
    assert process is not None
    while process.poll() is None:  # kill each server once it serves, until the gateway gives up
        assert time.monotonic() < deadline, gateway.command.output()
        servers = [p for p in live_servers(gateway) if p not in killed]
        if servers and ready(gateway.base):
            os.kill(servers[0], signal.SIGKILL)
            killed.append(servers[0])
        time.sleep(0.05)
    output = gateway.command.output()
    assert gateway.exit_code() != 0, output
    assert "could not be restarted" in output and "giving up" in output, output
    assert len(killed) == 4, output  # the first server and three restarts


# 5. Private data


def modes(directory: Path) -> dict[str, int]:
    """Permission bits of every directory and regular file under (and of) `directory`."""
    found = {".": stat.S_IMODE(directory.stat().st_mode)}
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = Path(root) / name
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                found[str(path.relative_to(directory))] = stat.S_IMODE(info.st_mode)
    return found


def test_the_data_dir_is_private_whatever_the_umask(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    workdir = tmp_path / "service"
    data = workdir / ".gateway"
    # What an older version left: world-readable directories and files.
    (data / "redis").mkdir(parents=True)
    (data / "metrics").mkdir()
    data.chmod(0o755)
    (data / "redis").chmod(0o755)
    (data / "metrics").chmod(0o755)
    old_log = data / "redis" / "redis.log"
    old_log.write_text("older log\n")
    old_log.chmod(0o644)
    previous = os.umask(0o022)
    try:
        gateway = Gateway(workdir)
        gateways.append(gateway)
        gateway.start()
    finally:
        os.umask(previous)
    gateway.register(status="pending")
    gateway.send()
    eventually(lambda: any((data / "metrics").glob("*.db")), 30, "no metrics files were written")

    def private() -> bool:
        found = modes(data)
        return all(
            mode == (0o700 if (data / name).is_dir() else 0o600) for name, mode in found.items()
        )

    found = modes(data)
    assert any(name.endswith(".aof") for name in found), found
    assert any(name.startswith("metrics/") and name.endswith(".db") for name in found), found
    assert "credentials.json" in found
    assert private(), {name: oct(mode) for name, mode in found.items()}


# 6. One gateway per port and per data dir


def test_a_second_gateway_on_the_same_port_refuses_to_start(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    first = Gateway(tmp_path / "first")
    gateways.append(first)
    first.start()
    second = Gateway(tmp_path / "second", port=first.port)
    gateways.append(second)
    second.command.start()
    code = second.exit_code(60)
    output = second.command.output()
    assert code != 0, output
    assert f"port {first.port}" in output and "already served by another gateway" in output, output
    assert (
        f"pid {first.pid}" in output and str((tmp_path / "first" / ".gateway").resolve()) in output
    )
    assert not child_servers(second.pid)
    # The first one serves every request with its own keys.
    key = first.keys()["admin_key"]
    answers = [call(first.base, "GET", "/v1/phone-numbers", key)[0] for _ in range(40)]
    assert answers == [200] * 40


def test_a_port_held_by_another_program_is_refused_clearly(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        gateway = Gateway(tmp_path / "service", port=port)
        gateways.append(gateway)
        gateway.command.start()
        code = gateway.exit_code(60)
    output = gateway.command.output()
    assert code != 0, output
    assert f"port {port}" in output and "in use" in output, output
    assert "Traceback" not in output


def test_a_second_gateway_on_the_same_data_dir_refuses_to_start(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    workdir = tmp_path / "service"
    first = Gateway(workdir)
    gateways.append(first)
    first.start()
    second = Gateway(workdir)
    gateways.append(second)
    second.command.start()
    code = second.exit_code(60)
    output = second.command.output()
    assert code != 0, output
    assert "data dir" in output and f"pid {first.pid}" in output, output
    assert not child_servers(second.pid)
    assert ready(first.base)
    first.command.signal(signal.SIGTERM)
    assert first.exit_code() == 0, first.command.output()


def test_api_and_worker_share_one_data_dir_and_survive_each_other(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    workdir = tmp_path / "service"
    api = Gateway(workdir, "api")
    gateways.append(api)
    api.start()
    worker = Gateway(workdir, "worker")
    gateways.append(worker)
    worker.start()
    api.register()
    sent = api.send()
    eventually(lambda: api.status_of(sent) == "sent", 60, "the worker did not send")

    # The API owned the Redis; when it stops, the worker takes the Redis over...
    api.command.signal(signal.SIGTERM)
    assert api.exit_code() == 0, api.command.output()
    eventually(lambda: ready(worker.base), 60, "the worker did not get its Redis back")
    assert child_servers(worker.pid)
    # ...and a new API shares it.
    again = Gateway(workdir, "api")
    gateways.append(again)
    again.start()
    sent = again.send()
    eventually(lambda: again.status_of(sent) == "sent", 60, "no send after the takeover")

    # A second worker on the same data dir is refused.
    extra = Gateway(workdir, "worker")
    gateways.append(extra)
    extra.command.start()
    assert extra.exit_code(60) != 0
    assert f"pid {worker.pid}" in extra.command.output(), extra.command.output()


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def test_a_killed_supervisor_leaves_nothing_serving(
    tmp_path: Path, gateways: list[Gateway]
) -> None:
    first = Gateway(tmp_path / "service", GATEWAY_WORKERS="2")
    gateways.append(first)
    first.start()
    started = children_of(first.pid)
    assert len(started) >= 3, started  # two workers and the embedded Redis
    os.kill(first.pid, signal.SIGKILL)
    first.command.wait(10)
    eventually(lambda: all(is_zombie_or_gone(pid) for pid in started), 30, "orphans still run")
    again = Gateway(tmp_path / "service", port=first.port)
    gateways.append(again)
    again.start()
    assert ready(again.base)
