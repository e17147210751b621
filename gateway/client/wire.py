"""What the sync and async clients share: the requests they build, the answers they read,
and when and how long to wait before trying again.

Only `429` and `503` are retried (and a connection that failed or timed out): a `503` means
the outcome is unknown, so every send carries an idempotency key, and a retry with the same key
is answered with the first answer instead of queueing the message twice.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from gateway.client.errors import GatewayAPIError

BATCH_LIMIT = 1_000  # messages per POST /v1/messages/batch (API.md)
RETRY_STATUSES = frozenset({429, 503})
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0
RETRY_AFTER_CAP_S = 60.0  # a longer Retry-After is the caller's call, not a hidden sleep


@dataclass(frozen=True)
class Accepted:
    """A message the gateway queued (or had queued already: `replayed`)."""

    id: str
    status: str
    idempotency_key: str
    phone_number_id: str | None = None
    replayed: bool = False


@dataclass(frozen=True)
class Rejected:
    """A batch message the gateway refused; the others of its batch are unaffected."""

    code: str
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Call:
    """One request, as the transports send it (the same bytes on every retry)."""

    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def new_idempotency_key() -> str:
    return f"gwc-{uuid.uuid4()}"


def message_path(message_id: str) -> str:
    if not message_id:
        raise ValueError("a message id is required")
    return "/v1/messages/" + quote(message_id, safe="")


def _encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def send_call(
    message: Mapping[str, Any] | None, fields: Mapping[str, Any], key: str | None
) -> tuple[Call, str]:
    """POST /v1/messages for `message` with `fields` on top, and the idempotency key it carries."""
    body = {**(message or {}), **fields}
    key = key or new_idempotency_key()
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    return Call("POST", "/v1/messages", _encode(body), headers), key


Chunk = list[dict[str, Any]]


def batch_calls(messages: Iterable[Mapping[str, Any]]) -> Iterator[tuple[Call, Chunk]]:
    """POST /v1/messages/batch per chunk of 1,000, each message with its idempotency key."""
    chunk: Chunk = []
    for message in messages:
        copy = dict(message)  # the caller's own dict is left as it was
        copy.setdefault("idempotency_key", new_idempotency_key())
        chunk.append(copy)
        if len(chunk) == BATCH_LIMIT:
            yield _batch_call(chunk)
            chunk = []
    if chunk:
        yield _batch_call(chunk)


def _batch_call(chunk: Chunk) -> tuple[Call, Chunk]:
    headers = {"Content-Type": "application/json"}
    return Call("POST", "/v1/messages/batch", _encode({"messages": chunk}), headers), chunk


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (what the gateway sends); anything else is ignored."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def retry_delay(attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """How long to wait before retry number `attempt` (0-based).

    At least the server's `Retry-After`, plus up to a fifth more so that clients told the same
    time do not all come back at once; without one, exponential backoff with full jitter.
    """
    if retry_after is not None:
        return retry_after + rng.uniform(0.0, 0.2 * max(retry_after, BACKOFF_BASE_S))
    return rng.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def error_from(status: int, body: bytes, retry_after: str | None) -> GatewayAPIError:
    """The typed error of a non-2xx answer, from API.md's error shape when it has one."""
    parsed = decode(body)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        details = error.get("details")
        return GatewayAPIError(
            status,
            error["code"],
            str(error.get("message", "")),
            details if isinstance(details, list) else None,
            parse_retry_after(retry_after),
        )
    text = body[:200].decode(errors="replace")
    return GatewayAPIError(status, f"http_{status}", text, None, parse_retry_after(retry_after))


def expect_object(status: int, body: bytes) -> dict[str, Any]:
    parsed = decode(body)
    if not isinstance(parsed, dict):
        raise GatewayAPIError(status, "invalid_response", "the gateway's answer is not JSON")
    return parsed


def accepted(
    body: dict[str, Any], key: str, replayed: bool, phone_number_id: Any = None
) -> Accepted:
    pn = body.get("phone_number_id", phone_number_id)
    return Accepted(
        id=str(body["id"]),
        status=str(body["status"]),
        idempotency_key=key,
        phone_number_id=pn if isinstance(pn, str) else None,
        replayed=replayed,
    )


def batch_results(body: dict[str, Any], chunk: Chunk) -> list[Accepted | Rejected]:
    """The results of one chunk, in its order."""
    results = body.get("results")
    if not isinstance(results, list) or len(results) != len(chunk):
        raise GatewayAPIError(200, "invalid_response", "the batch answer has the wrong results")
    out: list[Accepted | Rejected] = []
    for result, message in zip(results, chunk, strict=True):
        error = result.get("error")
        if isinstance(error, dict):
            details = error.get("details")
            out.append(
                Rejected(
                    str(error.get("code", "")),
                    str(error.get("message", "")),
                    details if isinstance(details, list) else [],
                )
            )
        else:
            key = str(message["idempotency_key"])
            replayed = bool(result.get("replayed", False))
            out.append(accepted(result, key, replayed, message.get("phone_number_id")))
    return out
