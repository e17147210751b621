"""`gateway run|api|worker`: the parent process that owns Redis and the worker processes.

The parent claims its port (and, with the embedded Redis, its roles of the data directory: see
`gateway.instance`), starts the embedded Redis when no URL is set, makes sure credentials exist,
prepares the shared metrics directory, and starts `workers` child processes (each runs
`gateway.process.serve`). It forwards SIGTERM/SIGINT to them and waits; a second signal kills
them. A child that dies on its own is a failure: the rest are stopped and the exit code is 1.
Redis is stopped last, after every child has released what it held.

The embedded Redis is tended while the children run: one that dies is reaped and started again
on the same socket and files (the children reconnect by themselves); one that dies too often,
or cannot start again, stops the gateway with exit code 1 for the service manager to restart.
A `gateway api` and a `gateway worker` on one data directory share its Redis: the first to
start runs it, and the other takes it over when the first stops.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from gateway import credentials, instance
from gateway.embedded_redis import EmbeddedRedis
from gateway.errors import ConfigError, GatewayError, StoreUnavailable
from gateway.process import Role, child_main
from gateway.settings import Settings
from gateway.store import Store, unavailable_on_redis_errors

log = logging.getLogger("gateway.supervisor")


def check_durability(settings: Settings) -> None:
    """Refuse to start when the Redis server cannot keep `GATEWAY_ACK_DURABILITY`'s promise."""
    if settings.ack_durability == "primary":
        return
    assert settings.redis_url is not None

    async def check() -> None:
        store = Store.from_settings(settings, str(settings.redis_url))
        try:
            with unavailable_on_redis_errors():
                await store.durability.check_server(store.redis)
        except StoreUnavailable as exc:  # the processes wait for Redis as usual
            log.warning("could not check Redis for GATEWAY_ACK_DURABILITY: %s", exc)
        finally:
            await store.close()

    asyncio.run(check())


def prepare_metrics_dir(data_dir: Path) -> Path:
    """The shared prometheus_client directory, without files of processes that are gone."""
    directory = (data_dir / "metrics").resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    for path in directory.glob("*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RedisKeeper:
    """Runs the data directory's embedded Redis, or shares the one another command runs.

    Whoever holds `redis/owner.lock` runs the server. A sharer tries for the lock on every
    `tend()` and runs the server once the owner is gone; the owner restarts a server that died.
    """

    RESTARTS = 3  # at most this many restarts...
    WINDOW_S = 60.0  # ...within this many seconds, else the gateway stops
    RETRY_S = 1.0  # after a start that failed

    def __init__(self, embedded: EmbeddedRedis, owner: dict[str, object]) -> None:
        self.embedded = embedded
        self.owner = owner
        self.lock_path = embedded.directory / "owner.lock"
        self.lock: instance.Lock | None = None
        self.restarts: collections.deque[float] = collections.deque()
        self.down = False  # no server runs and one must be started
        self.why = ""
        self.retry_at = 0.0

    def start(self) -> str:
        self.embedded.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.lock = instance.try_lock(self.lock_path, self.owner)
        if self.lock is None:
            log.info(
                "sharing the embedded Redis of %s at %s",
                instance.holder(self.lock_path),
                self.embedded.socket,
            )
            return self.embedded.url
        return self.embedded.start()

    def tend(self) -> str | None:
        """Keep the server running; a reason to stop the gateway when that cannot be done."""
        if self.lock is None:
            self.lock = instance.try_lock(self.lock_path, self.owner)
            if self.lock is None:
                return None
            log.warning("the gateway that ran the embedded Redis has stopped; taking it over")
            self.down, self.why = True, "its owner stopped"
            self.retry_at = 0.0
        if not self.down:
            code = self.embedded.exit_code()
            if code is None:
                return None
            self.why = f"it died ({f'signal {-code}' if code < 0 else f'exit code {code}'})"
            log.error("the embedded Redis stopped: %s; restarting it", self.why)
            self.down, self.retry_at = True, 0.0
        now = time.monotonic()
        if now < self.retry_at:
            return None
        while self.restarts and now - self.restarts[0] > self.WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= self.RESTARTS:
            return (
                f"the embedded Redis could not be restarted ({self.why}; {len(self.restarts)} "
                f"restarts within {self.WINDOW_S:.0f}s): giving up (see {self.embedded.log_path})"
            )
        self.restarts.append(now)
        try:
            self.embedded.start()
        except ConfigError as exc:  # no retry can mend a setting
            return f"the embedded Redis could not be restarted: {exc}; giving up"
        except GatewayError as exc:
            self.why, self.retry_at = str(exc), time.monotonic() + self.RETRY_S
            log.error("the embedded Redis did not start: %s; trying again", exc)
            return None
        self.down = False
        log.warning("the embedded Redis is running again")
        return None

    def stop(self) -> None:
        if self.lock is not None:
            self.embedded.stop()
            self.lock.release()
            self.lock = None


class Supervisor:
    def __init__(self, settings: Settings, role: Role) -> None:
        self.settings = settings
        self.role = role
        self.children: list[BaseProcess] = []
        self.stopping = False
        self.signals = 0
        self.keeper: RedisKeeper | None = None
        self.failed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("received %s: stopping", signal.Signals(signum).name)
            self._stop_children()
        else:
            log.warning("second signal: killing the worker processes")
            for child in self.children:
                if child.is_alive():
                    child.kill()

    def _stop_children(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for child in self.children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    def run(self) -> int:
        settings = self.settings
        claims = instance.Claims(self.role.value, settings.host, settings.port, settings.data_dir)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            claims.claim_port()
            if settings.redis_url is None:
                claims.claim_data_dir()
                embedded = EmbeddedRedis(
                    settings.data_dir,
                    settings.redis_server,
                    fsync_always=settings.ack_durability == "fsync",
                )
                self.keeper = RedisKeeper(embedded, claims.owner())
                settings = dataclasses.replace(settings, redis_url=self.keeper.start())
            # A worker needs no keys, but signs callbacks (and its sandbox, Meta's webhooks).
            settings = credentials.ensure(settings, api=self.role is not Role.WORKER)
            if self.role is not Role.WORKER:
                check_durability(settings)
            if self.role is not Role.API and settings.upstream_url is None:
                log.warning(
                    "GATEWAY_UPSTREAM_URL is unset: sends go to the built-in sandbox, "
                    "nothing leaves this machine"
                )
            return self._run_children(settings)
        finally:
            if self.keeper is not None:
                self.keeper.stop()
            claims.release()

    def _run_children(self, settings: Settings) -> int:
        context = multiprocessing.get_context("spawn")
        for index in range(settings.workers):
            child: BaseProcess = context.Process(
                target=child_main,
                args=(settings, self.role, index),
                name=f"gateway-{self.role.value}-{index}",
            )
            child.start()
            self.children.append(child)
        log.info(
            "gateway %s: %d process(es), http://%s:%d",
            self.role.value,
            settings.workers,
            settings.host,
            settings.port,
        )
        running = list(self.children)
        while running:
            self._tend_redis()
            for child in running:
                child.join(0.1)
                if child.is_alive():
                    continue
                running.remove(child)
                if child.pid is not None:
                    multiprocess.mark_process_dead(child.pid)  # type: ignore[no-untyped-call]
                if not self.stopping:
                    log.error(
                        "process %s exited with %s; stopping the gateway",
                        child.name,
                        child.exitcode,
                    )
                    self.failed = True
                    self._stop_children()
                break
        failed = self.failed or any(child.exitcode != 0 for child in self.children)
        return 1 if failed else 0

    def _tend_redis(self) -> None:
        if self.keeper is None or self.stopping:
            return
        problem = self.keeper.tend()
        if problem is not None:
            log.critical("%s; stopping the gateway", problem)
            self.failed = True
            self._stop_children()
