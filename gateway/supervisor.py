"""`gateway run|api|worker`: the parent process that owns Redis and the worker processes.

The parent starts the embedded Redis when no URL is set, makes sure credentials exist, prepares
the shared metrics directory, and starts `workers` child processes (each runs
`gateway.process.serve`). It forwards SIGTERM/SIGINT to them and waits; a second signal kills
them. A child that dies on its own is a failure: the rest are stopped and the exit code is 1.
Redis is stopped last, after every child has released what it held.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from gateway import credentials
from gateway.embedded_redis import EmbeddedRedis
from gateway.process import Role, child_main
from gateway.settings import Settings

log = logging.getLogger("gateway.supervisor")


def prepare_metrics_dir(data_dir: Path) -> Path:
    """The shared prometheus_client directory, without files of processes that are gone."""
    directory = (data_dir / "metrics").resolve()
    directory.mkdir(parents=True, exist_ok=True)
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


class Supervisor:
    def __init__(self, settings: Settings, role: Role) -> None:
        self.settings = settings
        self.role = role
        self.children: list[BaseProcess] = []
        self.stopping = False
        self.signals = 0

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
        embedded: EmbeddedRedis | None = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            if settings.redis_url is None:
                embedded = EmbeddedRedis(settings.data_dir, settings.redis_server)
                settings = dataclasses.replace(settings, redis_url=embedded.start())
            if self.role is not Role.WORKER:
                settings = credentials.ensure(settings)
            if self.role is not Role.API and settings.upstream_url is None:
                log.warning(
                    "GATEWAY_UPSTREAM_URL is unset: sends go to the built-in sandbox, "
                    "nothing leaves this machine"
                )
            return self._run_children(settings)
        finally:
            if embedded is not None:
                embedded.stop()

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
        failed = False
        running = list(self.children)
        while running:
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
                    failed = True
                    self._stop_children()
                break
        failed = failed or any(child.exitcode != 0 for child in self.children)
        return 1 if failed else 0
