"""Schemathesis hooks for the gateway: events are signed, so the fuzzer reaches the event logic.

`POST /v1/events` is authenticated by `X-Signature-256: sha256=<HMAC-SHA256 of the raw body>`,
which no generator can guess: unsigned, every event case stops at the 401. So a case whose
headers were generated valid gets the real signature of the bytes it sends (serialized here as
`requests` will serialize them; the body itself is left alone, so checks see the case as
generated). Cases that mutate the headers, or that drop the signature, are sent as generated:
they fuzz the signature check itself.

A valid event's `created_at` is set to now before it is signed (see below).

Loaded by file path (SCHEMATHESIS_HOOKS), so it imports nothing from the project. The secret is
GATEWAY_WEBHOOK_SECRET of the environment `st` runs in; unset, nothing is signed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import UTC, datetime
from typing import Any

import schemathesis
from requests import compat
from schemathesis.core import NotSet
from schemathesis.core.parameters import ParameterLocation
from schemathesis.transport.prepare import prepare_body

SIGNATURE = "X-Signature-256"


def _wire_bytes(case: schemathesis.Case[Any]) -> bytes | None:
    """The body exactly as `requests` will send it, or None when that is not plain JSON."""
    body = prepare_body(case)
    if isinstance(body, bytes):
        return body
    try:
        # What requests does with `json=`: its json module, no NaN, UTF-8.
        text: str = compat.json.dumps(body, allow_nan=False)  # type: ignore[attr-defined]
        return text.encode("utf-8")
    except (TypeError, ValueError):
        return None


def meta_negative_body(case: schemathesis.Case[Any]) -> bool:
    meta = case.meta
    return meta is not None and meta.is_negative_at(ParameterLocation.BODY)


@schemathesis.hook
def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case[Any], kwargs: dict[str, Any]
) -> None:
    secret = os.environ.get("GATEWAY_WEBHOOK_SECRET")
    if not secret or case.method.upper() != "POST" or case.path != "/v1/events":
        return
    headers = case.headers
    if not headers or SIGNATURE not in headers or "data" in kwargs or "json" in kwargs:
        return
    meta = case.meta
    if meta is not None and meta.is_negative_at(ParameterLocation.HEADER):
        return
    if isinstance(case.body, NotSet) or (case.media_type or "").split(";")[0] != "application/json":
        return
    body = case.body
    if isinstance(body, dict) and "created_at" in body and not meta_negative_body(case):
        # Events older than 7 days or ahead of the clock are refused as replays (API.md), a
        # rule of time that no schema can state: a valid event is one created now.
        body["created_at"] = datetime.now(tz=UTC).isoformat(timespec="milliseconds")
    raw = _wire_bytes(case)
    if raw is not None:
        digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        headers[SIGNATURE] = f"sha256={digest}"
