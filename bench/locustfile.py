"""Locust users for the gateway: single sends and batches over many numbers, Zipf-like skew.

Run headless against any gateway:

    .venv/bin/locust -f bench/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --host http://127.0.0.1:8080

Settings (environment): GATEWAY_API_KEY (a send key; default the first of GATEWAY_API_KEYS),
GATEWAY_ADMIN_KEY (an admin key, or the first of GATEWAY_ADMIN_KEYS, used when BENCH_REGISTER=1 to
register the numbers first). Without them, the keys `gateway run` generated are read from
`$GATEWAY_DATA_DIR/credentials.json` (default `.gateway/credentials.json` in the directory locust
is started from); with neither, locust stops at once saying so (bench/locust_keys.py).
BENCH_NUMBERS (how many numbers, default 1000), BENCH_BATCH_SIZE (default 100),
BENCH_BATCH_WEIGHT / BENCH_SINGLE_WEIGHT (how often each task runs, default 1 and 10).
"""

from __future__ import annotations

import itertools
import os
import random
import sys

from locust import FastHttpUser, between, events, task

try:
    from bench.locust_keys import MissingKeysError, load_keys
except ImportError:  # locust puts this file's directory on sys.path; compose mounts bench/ alone
    from locust_keys import MissingKeysError, load_keys  # type: ignore[no-redef]

NUMBERS = [f"5557{i:08d}" for i in range(int(os.environ.get("BENCH_NUMBERS", "1000")))]
WEIGHTS = list(itertools.accumulate(1 / (i + 1) for i in range(len(NUMBERS))))
BATCH_SIZE = int(os.environ.get("BENCH_BATCH_SIZE", "100"))


try:
    KEYS = load_keys(require_admin=os.environ.get("BENCH_REGISTER") == "1")
except MissingKeysError as exc:
    sys.exit(f"bench/locustfile.py: {exc}")
SEND_KEY = KEYS.send
ADMIN_KEY = KEYS.admin


def pick_number() -> str:
    """A number with probability ∝ 1/rank: a few busy lines and a long tail."""
    return random.choices(NUMBERS, cum_weights=WEIGHTS, k=1)[0]


def message() -> dict[str, object]:
    return {
        "phone_number_id": pick_number(),
        "to": f"549114{random.randrange(10**7):07d}",
        "type": "text",
        "text": {"body": f"Your code is {random.randrange(10**6):06d}"},
        "category": random.choice(["authentication", "utility", "marketing"]),
    }


@events.test_start.add_listener
def register_numbers(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    if os.environ.get("BENCH_REGISTER") != "1" or environment.host is None:
        return
    import urllib.request

    for pn in NUMBERS:
        request = urllib.request.Request(
            f"{environment.host}/v1/phone-numbers/{pn}",
            data=b'{"throughput_tier": "high"}',
            method="PUT",
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).close()


class Sender(FastHttpUser):
    wait_time = between(0, 0.01)
    headers = {"Authorization": f"Bearer {SEND_KEY}", "Content-Type": "application/json"}

    @task(int(os.environ.get("BENCH_SINGLE_WEIGHT", "10")))
    def single(self) -> None:
        self.client.post(
            "/v1/messages", json=message(), headers=self.headers, name="POST /v1/messages"
        )

    @task(int(os.environ.get("BENCH_BATCH_WEIGHT", "1")))
    def batch(self) -> None:
        body = {"messages": [message() for _ in range(BATCH_SIZE)]}
        self.client.post(
            "/v1/messages/batch", json=body, headers=self.headers, name="POST /v1/messages/batch"
        )
