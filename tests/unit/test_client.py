"""The client's own logic: callbacks verified as Standard Webhooks sign them, retry waits,
batches split in order, and a package that stands alone."""

from __future__ import annotations

import ast
import base64
import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

import gateway.client
from gateway.client import CallbackVerificationError, verify_callback
from gateway.client.callbacks import sign
from gateway.client.wire import BATCH_LIMIT, batch_calls, parse_retry_after, retry_delay

SECRET = "whsec_" + base64.b64encode(b"a secret of the gateway, 32 byte").decode()
EVENT = {
    "type": "message.status",
    "message_id": "3-abc",
    "status": "delivered",
    "timestamp": "2026-01-01T00:00:00Z",
    "phone_number_id": "555123456789",
    "to": "5491140123456",
    "client_reference": "otp-1",
    "upstream_message_id": "wamid.x",
    "error": None,
}


def signed(
    body: bytes, secret: str = SECRET, at: float | None = None, webhook_id: str = "evt_1"
) -> dict[str, str]:
    """Headers as a Standard Webhooks sender makes them (the reference package signs)."""
    when = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, when, body.decode()),
    }


BODY = json.dumps(EVENT).encode()


def test_a_callback_signed_by_standard_webhooks_is_verified() -> None:
    assert verify_callback(signed(BODY), BODY, SECRET) == EVENT


def test_header_names_of_any_case_and_a_str_body_are_accepted() -> None:
    headers = {name.upper(): value for name, value in signed(BODY).items()}
    assert verify_callback(headers, BODY.decode(), SECRET) == EVENT


def test_one_matching_signature_among_several_is_enough() -> None:
    headers = signed(BODY)
    other = signed(BODY, secret="whsec_" + base64.b64encode(b"another secret").decode())
    headers["webhook-signature"] = (
        f"v1,bm9wZQ== {other['webhook-signature']} v2,x " + (headers["webhook-signature"])
    )
    assert verify_callback(headers, BODY, SECRET) == EVENT


@pytest.mark.parametrize(
    "tamper",
    [
        "body",
        "id",
        "secret",
        "timestamp_old",
        "timestamp_ahead",
        "missing_signature",
        "missing_id",
        "not_v1",
    ],
)
def test_anything_tampered_is_refused(tamper: str) -> None:
    body, headers, secret = BODY, signed(BODY), SECRET
    if tamper == "body":
        body = BODY.replace(b"delivered", b"read")
    elif tamper == "id":
        headers["webhook-id"] = "evt_2"
    elif tamper == "secret":
        secret = "whsec_" + base64.b64encode(b"not the gateway's").decode()
    elif tamper == "timestamp_old":
        headers = signed(BODY, at=time.time() - 301)
    elif tamper == "timestamp_ahead":
        headers = signed(BODY, at=time.time() + 301)
    elif tamper == "missing_signature":
        del headers["webhook-signature"]
    elif tamper == "missing_id":
        del headers["webhook-id"]
    elif tamper == "not_v1":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    with pytest.raises(CallbackVerificationError):
        verify_callback(headers, body, secret)


def test_a_signed_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(CallbackVerificationError, match="not a JSON object"):
        verify_callback(signed(b"[1]"), b"[1]", SECRET)


def test_a_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(CallbackVerificationError, match="whsec_"):
        verify_callback(signed(BODY), BODY, "whsec_not base64!")


def test_retry_after_is_waited_at_least_with_a_little_jitter() -> None:
    rng = random.Random(1)
    waits = [retry_delay(0, 2.0, rng) for _ in range(100)]
    assert all(2.0 <= w <= 2.4 for w in waits) and len(set(waits)) > 1
    backoffs = [retry_delay(attempt, None, rng) for attempt in range(20)]
    assert all(0.0 <= w <= 10.0 for w in backoffs)
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None
    assert parse_retry_after("86400") == 60.0  # capped: a day-long sleep is the caller's call


def test_a_batch_is_split_in_order_and_every_message_gets_a_key() -> None:
    messages = [{"to": str(i)} for i in range(2 * BATCH_LIMIT + 1)]
    messages[5]["idempotency_key"] = "mine"
    chunks = [chunk for _, chunk in batch_calls(messages)]
    assert [len(c) for c in chunks] == [BATCH_LIMIT, BATCH_LIMIT, 1]
    flat = [m for chunk in chunks for m in chunk]
    assert [m["to"] for m in flat] == [str(i) for i in range(len(messages))]
    assert flat[5]["idempotency_key"] == "mine"
    keys = {m["idempotency_key"] for m in flat}
    assert len(keys) == len(messages)
    assert "idempotency_key" not in messages[0]  # the caller's dicts are left alone


def test_the_client_imports_nothing_else_of_the_gateway() -> None:
    package = Path(gateway.client.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "gateway" or name.startswith("gateway."):
                    assert name.startswith("gateway.client"), f"{path.name} imports {name}"


def test_what_the_client_signs_the_reference_package_verifies() -> None:
    stamp = int(time.time())
    headers = {
        "webhook-id": "evt_9",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(SECRET, "evt_9", stamp, BODY),
    }
    assert Webhook(SECRET).verify(BODY, headers) == EVENT
