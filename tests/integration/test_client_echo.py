"""`python -m gateway.client.echo`: a real receiver process that prints verified events."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from gateway.client.callbacks import sign
from tests.servers import free_port

SECRET = "whsec_" + base64.b64encode(b"the echo receiver's test secret!").decode()
EVENT = {"type": "message.status", "message_id": "3-abc", "status": "read"}


class Echo:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/callbacks"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.client.echo", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stderr is not None
        self.ready = self.process.stderr.readline().decode()  # "listening on ..." once it serves
        assert "listening on" in self.ready, self.ready

    def post(self, body: bytes, headers: dict[str, str]) -> int:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def lines(self) -> tuple[list[str], str]:
        """Stop it; its stdout lines and its stderr."""
        self.process.terminate()
        out, err = self.process.communicate(timeout=10)
        return out.decode().splitlines(), err.decode()


def signed_headers(body: bytes, webhook_id: str = "evt_1") -> dict[str, str]:
    stamp = int(time.time())
    return {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(SECRET, webhook_id, stamp, body),
    }


@pytest.fixture
def echo() -> Iterator[Echo]:
    running = Echo("--secret", SECRET)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(10)


def test_a_signed_event_is_printed_as_one_json_line(echo: Echo) -> None:
    body = json.dumps(EVENT).encode()
    assert echo.post(body, signed_headers(body)) == 204
    second = json.dumps({**EVENT, "status": "delivered"}).encode()
    assert echo.post(second, signed_headers(second, "evt_2")) == 204
    lines, _ = echo.lines()
    assert [json.loads(line) for line in lines] == [EVENT, {**EVENT, "status": "delivered"}]


def test_a_forged_event_is_refused_and_not_printed(echo: Echo) -> None:
    body = json.dumps(EVENT).encode()
    headers = signed_headers(body)
    forged = body.replace(b"read", b"failed")
    assert echo.post(forged, headers) == 401
    assert echo.post(body, {"Content-Type": "application/json"}) == 401
    lines, err = echo.lines()
    assert lines == []
    assert err.count("refused a callback") == 2


def test_without_a_secret_it_prints_whatever_json_comes() -> None:
    echo = Echo()
    body = json.dumps(EVENT).encode()
    assert echo.post(body, {"Content-Type": "application/json"}) == 204
    assert echo.post(b"not json", {"Content-Type": "application/json"}) == 400
    lines, _ = echo.lines()
    assert [json.loads(line) for line in lines] == [EVENT]
    assert "NOT verifying" in echo.ready


def test_a_secret_that_is_not_whsec_base64_is_refused_at_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.client.echo", "--secret", "whsec_%%%"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and b"--secret" in result.stderr
