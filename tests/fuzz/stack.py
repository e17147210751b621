"""The real `gateway run` that the fuzzer attacks: its own Redis, known keys, numbers registered.

Started as a user would (the installed command, in a session of its own, see
tests/acceptance/commands.py) with the built-in sandbox as its upstream, so accepted sends are
drained and sent as in production. Nothing of the caller's GATEWAY_* environment leaks in.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.acceptance.commands import Command, clean_env
from tests.servers import RedisServer, free_port

SEND_KEY = "fuzz-send-key"
ADMIN_KEY = "fuzz-admin-key"
WEBHOOK_SECRET = "fuzz-webhook-secret"
META_APP_SECRET = "fuzz-meta-app-secret"
# hooks.py points valid callback URLs here (nothing listens: callbacks are retried, harmlessly).
CALLBACK_ALLOW = "http://127.0.0.1:9/fuzz/"
# Registered before the run, so sends and number routes reach their real paths (the queue, the
# drain, the registry) and not only "unknown number" answers. The first is the one in the
# document's examples.
NUMBERS = ("555123456789", "15550001111", "15550002222")


@dataclass(frozen=True)
class Target:
    """A running gateway: where it is and how to authenticate."""

    base_url: str
    send_key: str
    admin_key: str
    webhook_secret: str
    workdir: Path

    @property
    def schema_url(self) -> str:
        return f"{self.base_url}/openapi.json"


def _put(base_url: str, path: str, key: str, body: object) -> int:
    request = urllib.request.Request(
        f"{base_url}{path}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@contextmanager
def running_gateway(workdir: Path) -> Iterator[Target]:
    """`gateway run` (1 process) on a free port with a private Redis; stopped on exit."""
    redis = RedisServer(workdir / "redis")
    redis.start()
    port = free_port()
    env = clean_env(
        GATEWAY_PORT=str(port),
        GATEWAY_WORKERS="1",
        GATEWAY_REDIS_URL=redis.url,
        GATEWAY_DATA_DIR=str(workdir / "data"),
        GATEWAY_API_KEYS=SEND_KEY,
        GATEWAY_ADMIN_KEYS=ADMIN_KEY,
        GATEWAY_WEBHOOK_SECRET=WEBHOOK_SECRET,
        GATEWAY_META_APP_SECRET=META_APP_SECRET,
        GATEWAY_CALLBACK_ALLOW=CALLBACK_ALLOW,
        # Fuzzed sends fail upstream quickly instead of being retried for minutes.
        GATEWAY_MAX_ATTEMPTS="2",
        GATEWAY_RETRY_BASE="50ms",
        GATEWAY_LOG_LEVEL="WARNING",
    )
    command = Command(["run"], env, workdir)
    base_url = f"http://127.0.0.1:{port}"
    try:
        command.start()
        command.wait_http(f"{base_url}/readyz", within_s=30)
        for pn in NUMBERS:
            status = _put(base_url, f"/v1/phone-numbers/{pn}", ADMIN_KEY, {})
            assert status in (200, 201), f"registering {pn} answered {status}"
        yield Target(base_url, SEND_KEY, ADMIN_KEY, WEBHOOK_SECRET, workdir)
    finally:
        command.stop()
        redis.stop()
