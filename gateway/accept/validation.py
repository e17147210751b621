"""Checking one send request and turning it into what the store keeps.

This runs for every message of every batch, so it is written for speed: one pass over the
fields, no schema library, and the upstream payload serialized once here so the drain sends
stored bytes without parsing them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import ApiError, FieldProblem, invalid_request
from gateway.registry.model import phone_number_id_problem

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
MAX_REFERENCE = 256
MAX_OPAQUE = 512

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
    }
)
_TO = re.compile(r"^\+?[0-9]{7,15}$")


@dataclass(slots=True)
class Outbound:
    """A valid message, ready for the store."""

    phone_number_id: str
    lane_list: str  # lane (h, n, l), plus "m" for marketing
    category: str
    payload: bytes  # the Cloud API body without "messaging_product"
    reference: str
    ttl_seconds: str  # "" when none


def parse_message(body: Any, prefix: str = "") -> Outbound:
    """Validate one message; raises `ApiError` (400 invalid_request) listing every problem.

    `prefix` names the message's place in a batch in field paths (e.g. "messages[3].").
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
    elif not isinstance(to, str) or not _TO.match(to):
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

    for name in body:
        if name not in _KNOWN and name != kind:
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
        if isinstance(ttl, int) and not isinstance(ttl, bool) and 1 <= ttl <= MAX_TTL_SECONDS:
            ttl_text = str(ttl)
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
    return Outbound(
        pn,  # type: ignore[arg-type]
        lane + "m" if category == "marketing" else lane,
        category,
        orjson.dumps(payload),
        reference,
        ttl_text,
    )


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
