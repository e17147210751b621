"""Send through the gateway with `gateway.client`, and follow a message to `read`.

With `make run` going (nothing configured) and a number registered as in the README's quick
start, run:

    .venv/bin/python examples/client_example.py

It reads the send key from `.gateway/credentials.json` unless GATEWAY_SEND_KEY is set, and the
gateway's address from GATEWAY_URL (default http://127.0.0.1:8080).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from gateway.client import (
    Accepted,
    AsyncGatewayClient,
    GatewayAPIError,
    GatewayClient,
    Rejected,
)

URL = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080")
PN = os.environ.get("PHONE_NUMBER_ID", "555123456789")
FINAL = {"read", "played", "failed", "expired", "canceled"}


def send_key() -> str:
    key = os.environ.get("GATEWAY_SEND_KEY")
    if key:
        return key
    credentials = json.loads(Path(".gateway/credentials.json").read_text())
    return str(credentials["send_key"])


def text(to: str, body: str, **fields: object) -> dict[str, object]:
    return {"phone_number_id": PN, "to": to, "type": "text", "text": {"body": body}, **fields}


def blocking(key: str) -> str:
    with GatewayClient(URL, key, timeout=10, max_retries=3) as client:
        # One message. The client makes an idempotency key: a retry after a 503 is safe.
        message = text("5491140123456", "Your code is 123456", category="authentication")
        accepted = client.send(message)
        print("accepted", accepted.id, accepted.status)

        # Follow it: queued -> sent -> delivered -> read (the sandbox reports them like Meta).
        last = accepted.status
        deadline = time.monotonic() + 15
        while last not in FINAL and time.monotonic() < deadline:
            status = client.status(accepted.id)
            if status["status"] != last:
                last = status["status"]
                print("  ", last, status.get("upstream_message_id") or "")
            time.sleep(0.1)

        # Errors are typed, with API.md's code: a sent message can no longer be canceled.
        try:
            client.cancel(accepted.id)
        except GatewayAPIError as error:
            print("cancel:", error.status, error.code)
        return accepted.id


async def concurrent(key: str) -> None:
    async with AsyncGatewayClient(URL, key) as client:
        # Any number of messages: 1,000 a request, results in the order given.
        messages = [
            text(f"54911401{i:05}", f"Hello {i}", client_reference=f"n-{i}") for i in range(1200)
        ]
        messages[7] = text("not a number", "refused alone; the others go")
        results = await client.send_batch(messages)
        accepted = [r for r in results if isinstance(r, Accepted)]
        rejected = [r for r in results if isinstance(r, Rejected)]
        print(f"batch: {len(accepted)} accepted, {len(rejected)} rejected ({rejected[0].code})")
        first = await client.status(accepted[0].id)
        print("first of the batch:", first["status"], first["client_reference"])


if __name__ == "__main__":
    key = send_key()
    blocking(key)
    asyncio.run(concurrent(key))
