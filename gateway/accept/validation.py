"""Checking one send request and turning it into what the store keeps.

This runs for every message of every batch, so it is written for speed: one pass over the
fields, no schema library, and the upstream payload serialized once here so the drain sends
stored bytes without parsing them.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.callbacks.urls import CallbackPolicy
from gateway.clock import parse_rfc3339_ms
from gateway.errors import ApiError, FieldProblem, invalid_request
from gateway.registry.model import json_integer, phone_number_id_problem

MESSAGE_TYPES = frozenset(
    {
        "text",
        "template",
        "image",
        "audio",
        "video",
        "document",
        "sticker",
        "location",
        "contacts",
        "interactive",
        "reaction",
    }
)
CATEGORIES = ("marketing", "utility", "authentication", "service")
PRIORITY_LANES = {"high": "h", "normal": "n", "low": "l"}
DEFAULT_PRIORITY = {"authentication": "h", "marketing": "l", "utility": "n", "service": "n"}
MAX_TTL_SECONDS = 2_592_000
MAX_SCHEDULE_AHEAD_MS = 30 * 86_400_000
SEND_AT_RULE = "must be an RFC 3339 date-time with an offset, in the future, at most 30 days ahead"
MAX_REFERENCE = 256
MAX_OPAQUE = 512
MAX_IDEMPOTENCY_KEY = 255
# orjson writes at most 254 levels of nested objects and arrays; a message is one of them.
MAX_DEPTH = 254

_KNOWN = frozenset(
    {
        "phone_number_id",
        "to",
        "type",
        "category",
        "priority",
        "client_reference",
        "ttl_seconds",
        "context",
        "biz_opaque_callback_data",
        "recipient_type",
        "callback_url",
        "send_at",
    }
)
_TO = re.compile(r"\+?[0-9]{7,15}")
# Visible ASCII and space: what an HTTP header carries safely, and all a key needs.
_IDEMPOTENCY_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_IDEMPOTENCY_KEY}}}")
IDEMPOTENCY_KEY_RULE = "must be 1-255 printable ASCII characters"


def idempotency_key_problem(value: object) -> str | None:
    """Why `value` is not an idempotency key, or None when it is one."""
    if isinstance(value, str) and _IDEMPOTENCY_KEY.fullmatch(value):
        return None
    return IDEMPOTENCY_KEY_RULE


@dataclass(slots=True)
class Outbound:
    """A valid message, ready for the store."""

    phone_number_id: str
    lane_list: str  # lane (h, n, l), plus "m" for marketing
    category: str
    payload: bytes  # the Cloud API body without "messaging_product"
    reference: str
    ttl_seconds: str  # "" when none
    idempotency_key: str = ""  # a batch message's own key; "" when none
    callback_url: str = ""  # its own, else GATEWAY_CALLBACK_URL; "" when none
    send_at_ms: str = ""  # when it is scheduled for (epoch ms); "" when it is not
    recipient: str = ""  # `to` without its "+": the pair Meta's pair rate counts


def parse_message(
    body: Any,
    prefix: str = "",
    *,
    in_batch: bool = False,
    callbacks: CallbackPolicy | None = None,
) -> Outbound:
    """Validate one message; raises `ApiError` (400 invalid_request) listing every problem.

    `prefix` names the message's place in a batch in field paths (e.g. "messages[3].").
    A message of a batch (`in_batch`) may carry its own `idempotency_key`; a single send
    takes it as the Idempotency-Key header. `callbacks` says which `callback_url`s are allowed
    and the default one (without it, none is allowed and there is no default).
    """
    if not isinstance(body, dict):
        raise invalid_request([FieldProblem(prefix.rstrip(".") or "body", "must be a JSON object")])
    problems: list[FieldProblem] = []

    pn = body.get("phone_number_id")
    if pn is None:
        problems.append(FieldProblem(prefix + "phone_number_id", "is required"))
    else:
        why = phone_number_id_problem(pn)
        if why is not None:
            problems.append(FieldProblem(prefix + "phone_number_id", why))

    to = body.get("to")
    if to is None:
        problems.append(FieldProblem(prefix + "to", "is required"))
    elif not isinstance(to, str) or not _TO.fullmatch(to):
        problems.append(
            FieldProblem(prefix + "to", "must be the recipient's number: 7-15 digits, optional +")
        )

    kind = body.get("type")
    if kind is None:
        problems.append(FieldProblem(prefix + "type", "is required"))
    elif not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        problems.append(
            FieldProblem(prefix + "type", "must be one of " + ", ".join(sorted(MESSAGE_TYPES)))
        )
        kind = None
    elif not isinstance(body.get(kind), dict):
        problems.append(FieldProblem(prefix + kind, f"must be an object, since type is {kind}"))

    idempotency_key = ""
    for name in body:
        if name in _KNOWN or name == kind:
            continue
        if name == "idempotency_key":
            if not in_batch:
                problems.append(
                    FieldProblem(prefix + name, "is sent as the Idempotency-Key header here")
                )
            elif (why := idempotency_key_problem(body[name])) is not None:
                problems.append(FieldProblem(prefix + name, why))
            else:
                idempotency_key = body[name]
            continue
        problems.append(FieldProblem(prefix + name, "is not a field of a message"))

    category = body.get("category", "utility")
    if category not in CATEGORIES:
        problems.append(
            FieldProblem(prefix + "category", "must be one of " + ", ".join(CATEGORIES))
        )
        category = "utility"

    priority = body.get("priority")
    if priority is None:
        lane = DEFAULT_PRIORITY[category]
    elif isinstance(priority, str) and priority in PRIORITY_LANES:
        lane = PRIORITY_LANES[priority]
    else:
        problems.append(FieldProblem(prefix + "priority", "must be one of high, normal, low"))
        lane = "n"

    reference = body.get("client_reference")
    if reference is None:
        reference = ""
    elif not isinstance(reference, str) or len(reference) > MAX_REFERENCE:
        problems.append(
            FieldProblem(prefix + "client_reference", "must be a string of at most 256 characters")
        )
        reference = ""

    ttl = body.get("ttl_seconds")
    ttl_text = ""
    if ttl is not None:
        whole = json_integer(ttl)
        if whole is not None and 1 <= whole <= MAX_TTL_SECONDS:
            ttl_text = str(whole)
        else:
            problems.append(
                FieldProblem(prefix + "ttl_seconds", "must be a whole number from 1 to 2592000")
            )

    context = body.get("context")
    if context is not None and not isinstance(context, dict):
        problems.append(FieldProblem(prefix + "context", "must be an object"))
    opaque = body.get("biz_opaque_callback_data")
    if opaque is not None and (not isinstance(opaque, str) or len(opaque) > MAX_OPAQUE):
        problems.append(
            FieldProblem(
                prefix + "biz_opaque_callback_data", "must be a string of at most 512 characters"
            )
        )
    recipient_type = body.get("recipient_type")
    if recipient_type is not None and not isinstance(recipient_type, str):
        problems.append(FieldProblem(prefix + "recipient_type", "must be a string"))

    send_at = body.get("send_at")
    send_at_text = ""
    if send_at is not None:
        due = parse_rfc3339_ms(send_at) if isinstance(send_at, str) else None
        now = time.time_ns() // 1_000_000
        if due is not None and now < due <= now + MAX_SCHEDULE_AHEAD_MS:
            send_at_text = str(due)
        else:
            problems.append(FieldProblem(prefix + "send_at", SEND_AT_RULE))

    callback_url = body.get("callback_url")
    if callback_url is None:
        callback_url = callbacks.default if callbacks is not None else ""
    else:
        why = (
            callbacks.problem(callback_url)
            if callbacks is not None
            else "is not allowed: this gateway allows no callback URLs"
        )
        if why is not None:
            problems.append(FieldProblem(prefix + "callback_url", why))

    if problems:
        raise invalid_request(problems)

    payload: dict[str, Any] = {}
    if recipient_type is not None:
        payload["recipient_type"] = recipient_type
    payload["to"] = to
    payload["type"] = kind
    payload[kind] = body[kind]  # type: ignore[index]
    if context is not None:
        payload["context"] = context
    if opaque is not None:
        payload["biz_opaque_callback_data"] = opaque
    try:
        serialized = orjson.dumps(payload)
    except orjson.JSONEncodeError:
        # Only nesting can fail here (JSON in, JSON out); catching it costs nothing per message.
        raise invalid_request(_too_deep(body, prefix, kind)) from None  # type: ignore[arg-type]
    return Outbound(
        pn,  # type: ignore[arg-type]
        lane + "m" if category == "marketing" else lane,
        category,
        serialized,
        reference,
        ttl_text,
        idempotency_key,
        callback_url,
        send_at_text,
        to.lstrip("+"),  # type: ignore[union-attr]
    )


def _too_deep(body: dict[str, Any], prefix: str, kind: str) -> list[FieldProblem]:
    rule = f"nests too deeply: a message may hold at most {MAX_DEPTH} levels of objects and arrays"
    culprits = []
    for name in (kind, "context"):
        try:
            orjson.dumps({name: body.get(name)})
        except orjson.JSONEncodeError:
            culprits.append(FieldProblem(prefix + name, rule))
    return culprits or [FieldProblem(prefix.rstrip(".") or "body", rule)]


def body_digest(body: dict[str, Any]) -> str:
    """What makes two sends "the same body" for an idempotency key: every field but the key.

    Field order does not matter. Call it on a message `parse_message` accepted (it nests no
    deeper than orjson can write).
    """
    if "idempotency_key" in body:
        body = {k: v for k, v in body.items() if k != "idempotency_key"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or `400 invalid_json`."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {exc}.") from None


def upstream_body(payload: bytes) -> bytes:
    """The Cloud API request body for a stored payload (see `Outbound.payload`)."""
    if payload.startswith(b'{"recipient_type"'):
        return b'{"messaging_product":"whatsapp",' + payload[1:]
    return b'{"messaging_product":"whatsapp","recipient_type":"individual",' + payload[1:]
