"""Metrics as an operator meets them: a real Prometheus scraping a real gateway under load.

Every panel query of every Grafana dashboard must be valid PromQL and return data, with Grafana's
variables substituted as Grafana would; `promtool check metrics` must find nothing to say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.acceptance.commands import Command, clean_env
from tests.dashboards import ALL, grafana_substitute, panel_queries
from tests.servers import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
SCRAPE_S = 1
ADMIN = {"Authorization": "Bearer obs-admin"}
SEND = {"Authorization": "Bearer obs-send"}
APP_SECRET = "obs-app-secret"
TIERS = {
    "555100000001": "standard",
    "555100000002": "medium",
    "555100000003": "high",
    "555100000004": "unlimited",
}


def _binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not installed (.ci/run installs Debian's prometheus package)"
    return found


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Redis, a faulty sandbox, `gateway run` (2 processes) and Prometheus scraping it.

    Everything started is stopped again whatever fails on the way (a missing binary included).
    """
    prometheus_bin = _binary("prometheus")
    with contextlib.ExitStack() as started:
        redis = RedisServer(tmp_path / "redis")
        redis.start()
        started.callback(redis.stop)
        sandbox_port, gateway_port, prom_port = free_port(), free_port(), free_port()
        receiver_port = free_port()
        # Status callbacks go to the tiny receiver users are shown (prints each event).
        receiver = subprocess.Popen(
            [sys.executable, "-m", "gateway.client.echo", "--port", str(receiver_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.callback(receiver.wait, 10)
        started.callback(receiver.terminate)
        # The sandbox plays Meta: signed status webhooks back to the gateway.
        sandbox = Command(
            ["sandbox"],
            clean_env(
                GATEWAY_PORT=str(sandbox_port),
                GATEWAY_SANDBOX_WEBHOOK_URL=f"http://127.0.0.1:{gateway_port}/v1/webhooks/meta",
                GATEWAY_META_APP_SECRET=APP_SECRET,
                GATEWAY_SANDBOX_STATUS_DELAYS="200ms,500ms",
                GATEWAY_SANDBOX_FAIL_SHARE="0.05",
            ),
            tmp_path / "sandbox",
        ).start()
        started.callback(sandbox.stop)
        sandbox.wait_http(f"http://127.0.0.1:{sandbox_port}/_sandbox/stats")
        gateway = Command(
            ["run"],
            clean_env(
                GATEWAY_REDIS_URL=redis.url,
                GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{sandbox_port}/v21.0",
                GATEWAY_UPSTREAM_TOKEN="token",
                GATEWAY_PORT=str(gateway_port),
                GATEWAY_WORKERS="2",
                GATEWAY_API_KEYS="obs-send",
                GATEWAY_ADMIN_KEYS="obs-admin",
                GATEWAY_WEBHOOK_SECRET="obs-secret",
                GATEWAY_RETRY_BASE="0.2",
                GATEWAY_LOG_FORMAT="json",
                GATEWAY_META_APP_SECRET=APP_SECRET,
                GATEWAY_CALLBACK_URL=f"http://127.0.0.1:{receiver_port}/callbacks",
                GATEWAY_CALLBACK_ALLOW=f"http://127.0.0.1:{receiver_port}/",
            ),
            tmp_path / "gateway",
        ).start()
        started.callback(gateway.stop)
        gateway.wait_http(f"http://127.0.0.1:{gateway_port}/readyz")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_S}s\n"
            f"  evaluation_interval: {SCRAPE_S}s\n"
            "scrape_configs:\n"
            "  - job_name: gateway\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{gateway_port}']}}]\n"
        )
        with (tmp_path / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                [
                    prometheus_bin,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        started.callback(prometheus.wait, 10)
        started.callback(prometheus.terminate)
        yield {
            "sandbox": f"http://127.0.0.1:{sandbox_port}",
            "gateway": f"http://127.0.0.1:{gateway_port}",
            "prometheus": f"http://127.0.0.1:{prom_port}",
            "gateway_command": gateway,
        }


async def _load(urls: dict[str, Any], seconds: float) -> None:
    """Sends of every kind for a while: batches, singles, failures, throttling, bad requests."""
    async with aiohttp.ClientSession() as http:
        faults = {
            "error_rate": 0.05,
            "throttle_rate": 0.02,
            "seed": 7,
            "numbers": {"555100000005": {"status": 400, "code": 131026}},
        }
        async with http.put(f"{urls['sandbox']}/_sandbox/faults", json=faults) as r:
            assert r.status == 200
        for pn, tier in [*TIERS.items(), ("555100000005", "standard")]:
            async with http.put(
                f"{urls['gateway']}/v1/phone-numbers/{pn}",
                json={"throughput_tier": tier},
                headers=ADMIN,
            ) as r:
                assert r.status in (200, 201)
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline:
            batch = [
                {
                    "phone_number_id": pn,
                    "to": "5491140123456",
                    "type": "text",
                    "text": {"body": f"load {sent + i}"},
                    "category": ("marketing", "utility", "authentication", "service")[i % 4],
                    "ttl_seconds": 2,
                }
                for i, pn in enumerate([*TIERS, "555100000005"] * 20)
            ]
            async with http.post(
                f"{urls['gateway']}/v1/messages/batch", json={"messages": batch}, headers=SEND
            ) as r:
                assert r.status == 200
            async with http.post(
                f"{urls['gateway']}/v1/messages", json=batch[0], headers=SEND
            ) as r:
                assert r.status == 202
                message_id = (await r.json())["id"]
            async with http.delete(f"{urls['gateway']}/v1/messages/{message_id}", headers=SEND):
                pass
            async with http.post(f"{urls['gateway']}/v1/messages", data=b"{", headers=SEND):
                pass
            sent += len(batch)
            await asyncio.sleep(0.2)


def _query(prometheus: str, expr: str) -> dict[str, Any]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as exc:
        return dict(json.load(exc))


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


async def test_every_dashboard_query_returns_data(stack: dict[str, Any]) -> None:
    await _load(stack, seconds=12.0)
    await asyncio.sleep(3 * SCRAPE_S)
    dashboards = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    empty, invalid = [], []
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        for title, expr in panel_queries(dashboard):
            for selection in (ALL, "standard"):
                promql = grafana_substitute(
                    expr,
                    interval_s=SCRAPE_S,
                    scrape_interval_s=SCRAPE_S,
                    range_s=60,
                    variables={"tier": selection},
                )
                answer = await asyncio.to_thread(_query, stack["prometheus"], promql)
                if answer.get("status") != "success":
                    invalid.append((path.name, title, promql, answer.get("error")))
                elif not answer["data"]["result"]:
                    empty.append((path.name, title, promql))
    assert not invalid, f"invalid PromQL: {invalid}"
    assert not empty, f"queries without data: {empty}"


async def test_metrics_pass_promtool_and_carry_no_per_message_labels(
    stack: dict[str, Any],
) -> None:
    await _load(stack, seconds=3.0)
    exposition = await asyncio.to_thread(_fetch, f"{stack['gateway']}/metrics")
    check = await asyncio.to_thread(
        subprocess.run,
        [_binary("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert check.stdout.decode().strip() == "" and check.stderr.decode().strip() == ""
    text = exposition.decode()
    for name in (
        "gateway_messages_accepted_total",
        "gateway_messages_sent_total",
        "gateway_upstream_requests_total",
        "gateway_send_delay_seconds_bucket",
        "gateway_http_requests_total",
        "gateway_queue_depth",
        "process_cpu_seconds_total",
    ):
        assert name in text, name
    per_message = re.search(r'[{,](phone_number_id|to|id|message_id|recipient)="', text)
    assert per_message is None, per_message


async def test_json_logs_carry_no_secret(stack: dict[str, Any]) -> None:
    await _load(stack, seconds=2.0)
    command: Command = stack["gateway_command"]
    lines = [line for line in command.output().splitlines() if line.startswith("{")]
    assert lines, "no JSON log line"
    for line in lines:
        record = json.loads(line)
        assert {"ts", "level", "msg"} <= set(record)
    output = command.output()
    for secret in ("obs-send", "obs-admin", "obs-secret", "Bearer token"):
        assert secret not in output
