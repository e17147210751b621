"""Connecting with every URL form API.md names: redis://, unix://, and a password."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from gateway.embedded_redis import find_server
from gateway.store import connect
from tests.servers import free_port


@pytest.fixture
def guarded_server(tmp_path: Path) -> tuple[int, Path]:
    port = free_port()
    sock = tmp_path / "r.sock"
    process = subprocess.Popen(
        [
            find_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--unixsocket",
            str(sock),
            "--requirepass",
            "s3cret",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port, sock
    process.terminate()
    process.wait(10)


@pytest.mark.parametrize("form", ["tcp", "unix"])
async def test_a_password_in_the_url_is_used(guarded_server: tuple[int, Path], form: str) -> None:
    port, sock = guarded_server
    url = f"redis://:s3cret@127.0.0.1:{port}/0" if form == "tcp" else f"unix://:s3cret@{sock}?db=0"
    client = connect(url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
        await client.connection_pool.disconnect()
