"""The installed `gateway` command, run as a user would, with its embedded Redis."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import FIELDS, env_name
from tests.acceptance.commands import Command, call, clean_env, gateway_bin
from tests.servers import free_port

PN = "555123456789"
MESSAGE = {"phone_number_id": PN, "to": "5491140123456", "type": "text", "text": {"body": "hi"}}


class Gateway:
    """`gateway <command>` in a working directory of its own, with nothing configured."""

    def __init__(self, workdir: Path, command: str = "run", **settings: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.command = Command(
            [command],
            clean_env(**{"GATEWAY_PORT": str(self.port), "GATEWAY_WORKERS": "1", **settings}),
            workdir,
        )

    def start(self) -> Gateway:
        self.command.start()
        self.command.wait_http(f"{self.base}/readyz", within_s=30)
        return self

    def keys(self) -> dict[str, str]:
        path = self.command.cwd / ".gateway" / "credentials.json"
        data: dict[str, str] = json.loads(path.read_text())
        return data

    def register_and_send(self, **number: Any) -> dict[str, Any]:
        """Register PN (with `number`'s fields) and send it one message; the 202 body."""
        keys = self.keys()
        status, _ = call(self.base, "PUT", f"/v1/phone-numbers/{PN}", keys["admin_key"], number)
        assert status in (200, 201)
        status, accepted = call(self.base, "POST", "/v1/messages", keys["send_key"], MESSAGE)
        assert status == 202, accepted
        return accepted

    def terminate(self) -> int:
        """SIGTERM and the exit code; a gateway that does not stop is killed, then fails."""
        self.command.signal(signal.SIGTERM)
        try:
            return self.command.wait(30)
        except subprocess.TimeoutExpired:
            self.command.kill_tree()
            raise


def embedded_redis_answers(directory: Path) -> bool:
    """Whether the embedded Redis of a gateway run in `directory` is up."""
    sock = directory / ".gateway" / "redis" / "redis.sock"
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(1)
            client.connect(str(sock))
            client.sendall(b"PING\r\n")
            return client.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "service"


def test_a_queued_message_survives_a_restart(workdir: Path) -> None:
    first = Gateway(workdir).start()
    try:
        output = first.command.output()
        keys = first.keys()
        assert keys["admin_key"] in output and keys["send_key"] in output
        assert "nothing leaves this machine" in output
        admin, send = keys["admin_key"], keys["send_key"]
        accepted = first.register_and_send(status="pending")
        assert embedded_redis_answers(workdir)
    finally:
        code = first.terminate()
    assert code == 0, first.command.output()
    assert not embedded_redis_answers(workdir), "the embedded Redis outlived the gateway"
    assert (workdir / ".gateway" / "credentials.json").stat().st_mode & 0o777 == 0o600

    second = Gateway(workdir).start()
    try:
        assert keys["admin_key"] not in second.command.output()  # printed once only
        status, message = call(second.base, "GET", f"/v1/messages/{accepted['id']}", send)
        assert (status, message["status"]) == (200, "queued")
        status, number = call(second.base, "GET", f"/v1/phone-numbers/{PN}", admin)
        assert number["queue_depth"]["normal"] == 1
    finally:
        assert second.terminate() == 0


def test_with_nothing_configured_a_message_is_sent_to_the_sandbox(workdir: Path) -> None:
    gateway = Gateway(workdir).start()
    try:
        keys = gateway.keys()
        accepted = gateway.register_and_send()
        for _ in range(200):
            _, status = call(
                gateway.base, "GET", f"/v1/messages/{accepted['id']}", keys["send_key"]
            )
            if status["status"] == "sent":
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert status["status"] == "sent"
        assert status["upstream_message_id"].startswith("wamid.")
    finally:
        assert gateway.terminate() == 0


def test_sigint_stops_cleanly_too(workdir: Path) -> None:
    gateway = Gateway(workdir).start()
    gateway.command.signal(signal.SIGINT)
    assert gateway.command.wait(30) == 0
    assert not embedded_redis_answers(workdir)


def test_the_api_role_serves_without_draining(workdir: Path) -> None:
    gateway = Gateway(workdir, "api").start()
    try:
        keys = gateway.keys()
        accepted = gateway.register_and_send()
        subprocess.run(["sleep", "0.5"], check=True)
        _, status = call(gateway.base, "GET", f"/v1/messages/{accepted['id']}", keys["send_key"])
        assert status["status"] == "queued"
        assert "sandbox" not in gateway.command.output()
    finally:
        assert gateway.terminate() == 0


def test_two_processes_serve_one_port(workdir: Path) -> None:
    gateway = Gateway(workdir, GATEWAY_WORKERS="2").start()
    try:
        listing = ""
        for _ in range(100):
            listing = subprocess.run(
                ["ss", "-ltnpH", f"sport = :{gateway.port}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if len(set(re.findall(r"pid=(\d+)", listing))) == 2:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert len(set(re.findall(r"pid=(\d+)", listing))) == 2, listing
    finally:
        assert gateway.terminate() == 0


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["worker", "--help"]])
def test_help_lists_every_setting_with_its_default(args: list[str]) -> None:
    shown = subprocess.run([gateway_bin(), *args], capture_output=True, text=True, check=True)
    text = re.sub(r"\s+", " ", shown.stdout)
    for field in FIELDS:
        assert env_name(field.name) in text, field.name
    assert "GATEWAY_PORT; default: 8080" in text
    assert "GATEWAY_MAX_BACKLOG; default: 1000000" in text


def test_a_bad_setting_is_refused_clearly() -> None:
    shown = subprocess.run(
        [gateway_bin(), "run"],
        capture_output=True,
        text=True,
        check=False,
        env=clean_env(GATEWAY_PORT="eighty"),
    )
    assert shown.returncode != 0
    assert "GATEWAY_PORT" in shown.stderr


def test_the_console_script_is_installed() -> None:
    assert shutil.which("gateway", path=str(Path(gateway_bin()).parent))
