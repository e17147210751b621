"""`verify_callback`: check a status callback's Standard Webhooks signature and read its event.

The gateway signs each attempt as the Standard Webhooks specification says: the headers
`webhook-id`, `webhook-timestamp` (unix seconds of this attempt) and `webhook-signature` (a
space-separated list of `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`), keyed with the
base64 bytes after `whsec_`. A timestamp more than 5 minutes from now is refused, so a captured
callback cannot be replayed later; the `webhook-id` stays the same on retries (deduplicate on it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from gateway.client.errors import CallbackVerificationError

TOLERANCE_S = 300
SECRET_PREFIX = "whsec_"


def secret_bytes(secret: str | bytes) -> bytes:
    """The HMAC key of a `whsec_…` secret (raw bytes are taken as they are)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        text = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise CallbackVerificationError("the secret is not whsec_<base64>") from None
    if not key:
        raise CallbackVerificationError("the secret is empty")
    return key


def sign(secret: str | bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one attempt (what the gateway sends)."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_callback(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | bytes,
    *,
    tolerance_s: int = TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """The event of a genuine callback; raises `CallbackVerificationError` on anything else.

    `headers` may be any mapping (aiohttp's, a WSGI or ASGI framework's, a plain dict): names
    are compared without regard to case. `body` must be the raw bytes as received.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    webhook_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    signatures = lowered.get("webhook-signature", "")
    if not (webhook_id and stamp and signatures):
        raise CallbackVerificationError("webhook-id, webhook-timestamp and webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise CallbackVerificationError("webhook-timestamp is not unix seconds") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise CallbackVerificationError("webhook-timestamp is too old or too far ahead")
    raw = body.encode() if isinstance(body, str) else body
    expected = sign(secret, webhook_id, timestamp, raw).encode()
    # Every v1 entry is compared, each in constant time: one of them must match.
    matched = False
    for entry in signatures.split():
        if entry.startswith("v1,"):
            matched |= hmac.compare_digest(entry.encode(), expected)
    if not matched:
        raise CallbackVerificationError("no webhook-signature matches")
    try:
        event = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CallbackVerificationError("the body is not JSON") from None
    if not isinstance(event, dict):
        raise CallbackVerificationError("the body is not a JSON object")
    return event
