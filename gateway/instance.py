"""One gateway instance: its private data directory and its exclusive claims on a port and data.

The processes of one `gateway` command share their port (SO_REUSEPORT), and the kernel would
let any other process of the same user join them, taking a share of the connections. So the
supervisor claims the port with an exclusive `flock` on a lock file in a per-user runtime
directory, held for its life, and a second gateway on that port stops at start naming the
first. The claim is per port, not per (host, port): the kernel joins a socket bound to
127.0.0.1 with one bound to 0.0.0.0 on the same port.

With the embedded Redis, one command per role may use a data directory (`run` holds both
roles): a second `gateway run` on it would share the first one's Redis and outlive it. A
`gateway api` and a `gateway worker` may share one data directory, and its Redis.

The data directory holds access tokens and message bodies (the AOF) and the generated keys:
directories are 0700 and files 0600 whatever the umask, including those an older version left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import ConfigError

log = logging.getLogger("gateway.instance")

PRIVATE_UMASK = 0o077
_ROLE_LOCKS = {"run": ("api", "drain"), "api": ("api",), "worker": ("drain",)}


class AlreadyRunning(ConfigError):
    """Another gateway holds the port or the data directory."""


def secure_data_dir(data_dir: Path) -> None:
    """Create `data_dir` 0700 and make every directory under it 0700 and every file 0600."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _chmod(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):  # symlinks are neither followed nor changed
        for name in dirs:
            _chmod(Path(root) / name, 0o700)
        for name in files:
            _chmod(Path(root) / name, 0o600)


def _chmod(path: Path, mode: int) -> None:
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            return
        if stat.S_IMODE(info.st_mode) != mode:
            path.chmod(mode)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not make %s private (mode %o): %s", path, mode, exc)


@dataclass
class Lock:
    """An exclusive `flock` held until `release()` or the process ends."""

    path: Path
    fd: int

    def release(self) -> None:
        """Remove the file and let go (a process that opened it meanwhile sees it replaced)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)  # closing the only descriptor releases the lock


def try_lock(path: Path, owner: dict[str, Any]) -> Lock | None:
    """Take the lock at `path` and write `owner` in it, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            opened = os.fstat(fd)
            current = os.stat(path)
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # its holder removed it as it let go: open the new one
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
            os.close(fd)
            continue
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps(owner), 0)
        return Lock(path, fd)


def holder(path: Path) -> str:
    """Who holds the lock at `path`, as written by `try_lock` (for error messages)."""
    try:
        owner = orjson.loads(path.read_bytes())
        return (
            f"pid {owner['pid']}, `gateway {owner['command']}` on port {owner['port']}, "
            f"data dir {owner['data_dir']}"
        )
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return "another process"  # it is still writing its name, or wrote none


def runtime_dir() -> Path:
    """A directory of this user's alone for the port locks (SO_REUSEPORT is per user too)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        directory = Path(base) / "whatsapp-gateway"
    else:
        directory = Path(tempfile.gettempdir()) / f"whatsapp-gateway-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(f"{directory} is not a directory of this user: remove it")
    _chmod(directory, 0o700)
    return directory


class Claims:
    """The locks one gateway command holds for its life."""

    def __init__(self, command: str, host: str, port: int, data_dir: Path) -> None:
        self.command = command
        self.host = host
        self.port = port
        self.data_dir = data_dir.resolve()
        self.locks: list[Lock] = []

    def owner(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "command": self.command,
            "port": self.port,
            "data_dir": str(self.data_dir),
        }

    def claim_port(self) -> None:
        """Hold the port, or fail saying who has it."""
        path = runtime_dir() / f"port-{self.port}.lock"
        lock = try_lock(path, self.owner())
        if lock is None:
            raise AlreadyRunning(
                f"port {self.port} is already served by another gateway ({holder(path)}); "
                "stop it, or give this one another GATEWAY_PORT"
            )
        self.locks.append(lock)
        _probe(self.host, self.port)

    def claim_data_dir(self) -> None:
        """Hold this command's roles of the data directory, or fail saying who has them."""
        for role in _ROLE_LOCKS[self.command]:
            path = self.data_dir / f"{role}.lock"
            lock = try_lock(path, self.owner())
            if lock is None:
                raise AlreadyRunning(
                    f"the data dir {self.data_dir} is already used by another gateway "
                    f"({holder(path)}); one `gateway run` (or one `gateway api` and one "
                    "`gateway worker`) per data dir: stop it, or give this one another "
                    "GATEWAY_DATA_DIR"
                )
            self.locks.append(lock)

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


def _probe(host: str, port: int) -> None:
    """Fail clearly when something already listens on the port (a program that is no gateway).

    Bound without SO_REUSEPORT but with SO_REUSEADDR (as the server binds), the probe fails only
    on a listening socket, not on connections left in TIME_WAIT.
    """
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AlreadyRunning(
                        f"port {port} on {host} is in use by another program; stop it, or "
                        "give the gateway another GATEWAY_PORT"
                    ) from exc
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
