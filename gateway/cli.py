"""The `gateway` command: run, api, worker, sandbox.

Every setting of `gateway.settings.Settings` is a flag of every subcommand (and of `gateway`
itself, which means `gateway run`); `--help` shows each with its environment variable and
default. Heavy modules are imported only after the metrics directory is chosen, because
prometheus_client picks its storage when it is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from gateway import __version__, logs
from gateway.callbacks.urls import CallbackPolicy
from gateway.errors import GatewayError
from gateway.settings import FIELDS, Settings, env_name, flag_name, load, parse_bool

log = logging.getLogger("gateway.cli")

COMMANDS = {
    "run": "Serve the API and drain the queues, in GATEWAY_WORKERS processes (the default).",
    "api": "Serve the API only.",
    "worker": "Drain the queues only (serves /healthz, /readyz and /metrics on the port).",
    "sandbox": "Serve the simulated WhatsApp Cloud API on the port (for tests and benchmarks).",
}


def _default_text(field: dataclasses.Field[Any]) -> str:
    if field.metadata["secret"]:
        return "unset"
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        value = field.default
    if value is None or value == ():
        return "unset"
    if isinstance(value, tuple):  # shown as it is written: `0.2,1.0`
        return ",".join(str(v) for v in value)
    return str(value)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (flag > environment > default)")
    for field in FIELDS:
        group.add_argument(
            flag_name(field.name),
            dest=field.name,
            metavar="BOOL"
            if field.metadata["parse"] is parse_bool
            else field.name.split("_")[-1].upper(),
            default=argparse.SUPPRESS,
            # (argparse formats help with %: a setting's text may say "95%")
            help=(
                f"{field.metadata['help']} "
                f"[{env_name(field.name)}; default: {_default_text(field)}]"
            ).replace("%", "%%"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="WhatsApp Business send gateway. Without a command: `gateway run`.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    _add_setting_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_setting_flags(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command", None) or "run"
    try:
        settings = load(overrides={k: v for k, v in args.items() if v is not None})
        CallbackPolicy.from_settings(settings)  # a bad allow list stops the start here
    except GatewayError as exc:
        parser.error(str(exc))
    logs.configure(settings.log_format, settings.log_level)
    try:
        if command == "sandbox":
            return _sandbox(settings)
        return _serve(settings, command)
    except GatewayError as exc:
        log.error("%s", exc)
        return 2


def _serve(settings: Settings, command: str) -> int:
    from gateway import instance
    from gateway.supervisor import prepare_metrics_dir

    # The data directory holds keys, access tokens and message bodies: whatever this process
    # and its children (the embedded Redis, the metrics files) create is theirs alone.
    os.umask(instance.PRIVATE_UMASK)
    instance.secure_data_dir(settings.data_dir)
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prepare_metrics_dir(settings.data_dir))
    from gateway.process import Role
    from gateway.supervisor import Supervisor

    return Supervisor(settings, Role(command)).run()


def _sandbox(settings: Settings) -> int:
    """Serve the sandbox. With GATEWAY_REDIS_URL it enforces the registry's rates."""
    import uvloop

    from gateway.drain.rates import RegistryRates
    from gateway.process import freeze_startup_objects
    from gateway.sandbox import StaticRates, start_sandbox
    from gateway.sandbox.statuses import status_config
    from gateway.store import Store

    async def serve() -> None:
        store = None
        rates: RegistryRates | StaticRates = StaticRates()
        if settings.redis_url is not None:
            store = Store.from_settings(settings, settings.redis_url)
            rates = RegistryRates(store)
        statuses = status_config(settings)  # only with GATEWAY_SANDBOX_WEBHOOK_URL
        runner, url = await start_sandbox(
            settings.host,
            settings.port,
            rates,
            statuses,
            pair_interval_s=settings.pair_interval,
            pair_burst=settings.pair_burst,
        )
        freeze_startup_objects()
        log.info("sandbox Cloud API at %s (use it as GATEWAY_UPSTREAM_URL)", url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            if store is not None:
                await store.close()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
