"""Schemathesis hooks for the gateway: webhooks are signed, so the fuzzer reaches their logic.

`POST /v1/events` is authenticated by `X-Signature-256: sha256=<HMAC-SHA256 of the raw body>`,
which no generator can guess: unsigned, every event case stops at the 401. So a case whose
headers were generated valid gets the real signature of the bytes it sends (serialized here as
`requests` will serialize them; the body itself is left alone, so checks see the case as
generated). Cases that mutate the headers, or that drop the signature, are sent as generated:
they fuzz the signature check itself.

A valid event's `created_at` is set to now before it is signed (see below).

Meta's webhooks (`POST /v1/webhooks/meta`, `X-Hub-Signature-256`) are signed the same way, and
a valid send's `callback_url` is pointed inside the stack's allow list and its `send_at` an hour
ahead (it must be in the future, at most 30 days ahead: a rule of time no schema can state).

Loaded by file path (SCHEMATHESIS_HOOKS), so it imports nothing from the project. The secrets are
GATEWAY_WEBHOOK_SECRET and GATEWAY_META_APP_SECRET of the environment `st` runs in; unset,
nothing is signed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis
from requests import compat
from schemathesis.core import NotSet
from schemathesis.core.parameters import ParameterLocation
from schemathesis.transport.prepare import prepare_body

# Signed routes: the header of each, and the environment variable holding its secret.
SIGNED = {
    "/v1/events": ("X-Signature-256", "GATEWAY_WEBHOOK_SECRET"),
    "/v1/webhooks/meta": ("X-Hub-Signature-256", "GATEWAY_META_APP_SECRET"),
}
# A callback URL inside the stack's GATEWAY_CALLBACK_ALLOW (tests/fuzz/stack.py): whether a URL
# is allowed is the operator's setting, which no schema can state.
CALLBACK_URL = "http://127.0.0.1:9/fuzz/status"


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


def _allowed_callbacks(body: Any) -> None:
    """Point a valid send's (or a batch's messages') `callback_url` inside the allow list, and
    its `send_at` an hour ahead."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in messages if isinstance(messages, list) else [body]:
        if isinstance(message, dict) and isinstance(message.get("callback_url"), str):
            message["callback_url"] = CALLBACK_URL
        if isinstance(message, dict) and isinstance(message.get("send_at"), str):
            message["send_at"] = (datetime.now(tz=UTC) + timedelta(hours=1)).isoformat()


def meta_negative_body(case: schemathesis.Case[Any]) -> bool:
    meta = case.meta
    return meta is not None and meta.is_negative_at(ParameterLocation.BODY)


@schemathesis.hook
def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case[Any], kwargs: dict[str, Any]
) -> None:
    if case.method.upper() != "POST":
        return
    if case.path in ("/v1/messages", "/v1/messages/batch") and not meta_negative_body(case):
        _allowed_callbacks(case.body)
    if case.path not in SIGNED:
        return
    header, variable = SIGNED[case.path]
    secret = os.environ.get(variable)
    if not secret:
        return
    headers = case.headers
    if not headers or header not in headers or "data" in kwargs or "json" in kwargs:
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
        headers[header] = f"sha256={digest}"
