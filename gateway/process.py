"""One gateway process: the HTTP API and/or the drain, until SIGTERM.

Shutdown runs in a fixed order with a deadline: stop accepting connections, stop the drain
(in-flight sends get `shutdown_grace` seconds; what is left is released), finish open HTTP
requests, close Redis. A second SIGTERM or SIGINT to the supervisor kills the processes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import signal
import socket
from enum import Enum

import uvloop
from aiohttp import web

from gateway import lifeline, logs, metrics
from gateway.api import wire
from gateway.api.app import create_app
from gateway.drain.rates import RegistryRates
from gateway.drain.upstream import CloudApi
from gateway.drain.worker import Drain
from gateway.gauges import GaugePublisher
from gateway.sandbox import start_sandbox
from gateway.sandbox.statuses import status_config
from gateway.settings import Settings
from gateway.store import Store

log = logging.getLogger("gateway.process")


# The sandbox wants a bearer token like Meta does; any will do.
SANDBOX_TOKEN = "sandbox-token"


class Role(Enum):
    ALL = "run"
    API = "api"
    WORKER = "worker"


def child_main(settings: Settings, role: Role, index: int) -> None:
    logs.configure(settings.log_format, settings.log_level)
    # A worker left behind by a killed supervisor would keep serving the port on its own.
    lifeline.die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None and lifeline.orphaned(parent.pid):
        return
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(settings, role, index))


async def _start_http(
    settings: Settings, store: Store, role: Role, index: int
) -> web.AppRunner | None:

    if role is Role.WORKER and index > 0:
        return None  # one process per host serves a worker's operations routes
    app = create_app(settings, store, api=role is not Role.WORKER)
    # The wire runner answers malformed HTTP in API.md's shape, logging nothing of it.
    runner = wire.runner(app)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.host, settings.port, reuse_port=role is not Role.WORKER, backlog=1024
    )
    await site.start()
    return runner


def _own_webhook_url(settings: Settings, role: Role) -> str | None:
    """This gateway's `/v1/webhooks/meta`, when this process's role serves the API."""
    if role is not Role.ALL:
        return None  # a `worker` serves no API; `sandbox_webhook_url` names the gateway's
    host = settings.host if settings.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}/v1/webhooks/meta"


def freeze_startup_objects() -> None:
    """Hide everything alive after startup from the garbage collector (`gc.freeze`).

    A full collection otherwise walks every module, class and function of the process and
    pauses the event loop for 10-25 ms: long enough to push a send past the rate slack.
    Frozen, a full collection scans only what was allocated since, in a few milliseconds.
    """
    gc.collect()
    gc.freeze()


async def _flush_metrics(stop: asyncio.Event) -> None:
    """Add locally gathered metrics to the shared files every second, and once at the end."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        metrics.flush_local()


def _supervise(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    if task.cancelled() or stop.is_set():
        return
    log.critical("background task %s died: %r; stopping", task.get_name(), task.exception())
    stop.set()


async def serve(settings: Settings, role: Role, index: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Every signal only asks for a graceful stop: a terminal's Ctrl-C or a service manager may
    # signal this process and the supervisor at once, and the supervisor forwards SIGTERM too;
    # escalating on a second signal is the supervisor's call (it kills the children).
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    assert settings.redis_url is not None
    store = Store.from_settings(settings, settings.redis_url)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    gauges = asyncio.create_task(GaugePublisher(store, worker_id).run(stop), name="gauge-publisher")
    gauges.add_done_callback(functools.partial(_supervise, stop))
    flusher = asyncio.create_task(_flush_metrics(stop), name="metrics-flusher")
    flusher.add_done_callback(functools.partial(_supervise, stop))
    if index == 0:
        await store.check_server_settings()
    runner: web.AppRunner | None = None
    sandbox: web.AppRunner | None = None
    api: CloudApi | None = None
    drain: Drain | None = None
    try:
        if role is not Role.API:
            upstream_url = settings.upstream_url
            token = settings.upstream_token
            if upstream_url is None:
                # Its status webhooks come back to this gateway's own intake (`run` serves it).
                statuses = status_config(settings, _own_webhook_url(settings, role))
                sandbox, upstream_url = await start_sandbox(
                    "127.0.0.1",
                    0,
                    RegistryRates(store),
                    statuses,
                    pair_interval_s=settings.pair_interval,
                    pair_burst=settings.pair_burst,
                )
                token = token or SANDBOX_TOKEN
            api = CloudApi(
                upstream_url,
                token,
                timeout_s=settings.upstream_timeout,
                pool_size=settings.worker_concurrency,
            )
            await api.start()
            drain = Drain(settings, store, api, worker_id=worker_id)
            await drain.start(on_fatal=stop.set)
        runner = await _start_http(settings, store, role, index)
        freeze_startup_objects()
        await stop.wait()
    finally:
        # Fixed order: stop accepting, stop draining, finish requests, close clients.
        if runner is not None:
            for site in list(runner.sites):
                await site.stop()
        if drain is not None:
            await drain.stop()
        if runner is not None:
            await runner.cleanup()
        if api is not None:
            await api.close()
        if sandbox is not None:
            await sandbox.cleanup()
        stop.set()
        await gauges
        await flusher
        await store.close()
